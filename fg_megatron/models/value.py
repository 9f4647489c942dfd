"""Value-head models (reward models, critics) as HF config.json sees them.

A value model is transformers' ``*ForSequenceClassification`` with one label:
the causal LM's body with ``score`` (``Linear(hidden, 1, bias=False)``) in place
of ``lm_head``.  This module is the one home for the config side: which model
types have such a class, and how an LM's config.json becomes a value model's.
"""

from __future__ import annotations

from typing import Optional

from fg_megatron.models.arch import ModelConfigError

# config.json model_type -> transformers' sequence-classification class.  THUDM's original
# ``chatglm`` layout is absent on purpose: its remote code has no class transformers can load
# with our tensors, so a GLM value model is written in transformers' ``glm`` layout.
SEQ_CLS_ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "glm": "GlmForSequenceClassification",
}
ONE_LABEL = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}  # as transformers writes num_labels=1


def check_value_head_supported(hf_config: dict, source: str = "config.json") -> None:
    """One line when this model type cannot carry a value head."""
    model_type = hf_config.get("model_type")
    if model_type == "chatglm":
        raise ModelConfigError(
            f"{source}: a value head is not supported in THUDM's original chatglm layout; convert the model to "
            f"transformers' glm layout first (convert_checkpoint.py fg-to-hf --layout glm) and use that"
        )
    if model_type not in SEQ_CLS_ARCHITECTURES:
        raise ModelConfigError(f"{source}: model_type {model_type!r} has no value head here "
                               f"(supported: {', '.join(SEQ_CLS_ARCHITECTURES)})")


def value_hf_config(lm_config: dict, pad_token_id: Optional[int] = None, source: str = "config.json") -> dict:
    """The ``*ForSequenceClassification`` config.json (one label) for a causal LM's config.json.

    Everything else is kept.  ``pad_token_id`` fills in a missing one: transformers' pooling
    finds each row's last token through it, so an export without one scores batches of one only.
    """
    check_value_head_supported(lm_config, source)
    out = dict(lm_config)
    out["architectures"] = [SEQ_CLS_ARCHITECTURES[lm_config["model_type"]]]
    out.pop("num_labels", None)  # transformers derives it from id2label
    out.update({k: dict(v) for k, v in ONE_LABEL.items()})
    if out.get("pad_token_id") is None and pad_token_id is not None:
        out["pad_token_id"] = int(pad_token_id)
    return out
