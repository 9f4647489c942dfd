"""Build one megatron-core ``GPTModel`` from a :class:`ModelArch`.

The model's last pipeline stage does not compute logits: it returns an
:class:`LMHead` (final hidden states + this rank's output-weight shard + where
that shard sits in the vocabulary) so the log-likelihood code can work from
hidden states without materialising ``[tokens, vocab]`` logits.  A value model
(``arch.head == "value"``: reward model, critic) has no output layer; its last
stage returns a :class:`ValueHead`, one scalar per token from ``value_head``
(``Linear(hidden, 1)``, replicated over TP), and :func:`sequence_scores` pools
it the way transformers' ``*ForSequenceClassification`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fg_megatron import platform
from fg_megatron.config.schema import RECOMPUTE_MODES
from fg_megatron.models.arch import VALUE_HEAD, ModelArch, rope_inv_freq
from fg_megatron.parallel import stage_layer_counts

DEFAULT_VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = DEFAULT_VOCAB_PAD_MULTIPLE) -> int:
    """Megatron's padding: a multiple of ``multiple * tp`` so every TP shard is equal."""
    if multiple < 1 or tp < 1:
        raise ValueError(f"vocabulary pad multiple and TP must be >= 1 (got {multiple}, {tp})")
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step


@dataclass
class LMHead:
    """What the last pipeline stage hands to the log-likelihood code."""

    hidden: Tensor  # [s, b, h] after the final norm
    weight: Tensor  # [V_pad / tp, h]: this rank's rows of the output layer
    vocab_start: int  # global vocabulary index of weight[0]
    vocab_size: int  # the real vocabulary: rows at or beyond it are padding


@dataclass
class ValueHead:
    """What the last pipeline stage of a value model returns."""

    hidden: Tensor  # [s, b, h] after the final norm
    values: Tensor  # [b, s] fp32: value_head(hidden) at every token (padding positions included)


def sequence_scores(values: Tensor, lengths: Tensor) -> Tensor:
    """``[b]``: each row's value at its last real token (index ``lengths - 1``).

    With right padding this is the token transformers' ``*ForSequenceClassification`` pools
    (the rightmost non-pad token), as long as no real token equals the pad id."""
    index = (lengths.to(device=values.device, dtype=torch.long) - 1).unsqueeze(1)  # [b, 1]
    return values.gather(1, index).squeeze(1)


def pipeline_layout(counts: Sequence[int]) -> Optional[list[list[str]]]:
    """megatron-core's ``pipeline_model_parallel_layout`` for per-stage layer counts, or None
    for an even split (megatron-core's own ``num_layers // pp``).

    Stage ``i`` holds ``counts[i]`` decoder layers; the embedding sits on the first stage
    and the loss (output layer) on the last, as ``pre_process`` / ``post_process`` build
    them.  megatron-core numbers each stage's layers from the sum of the counts before it
    (``PipelineParallelLayerLayout.get_layer_offset``): the checkpoint mapping of
    :func:`fg_megatron.models.sharding.layers_of_stage`, checked in :func:`build_gpt_model`.
    """
    if len(set(counts)) <= 1:
        return None
    layout = [["decoder"] * n for n in counts]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def recompute_settings(mode: str) -> dict:
    """megatron-core's recompute fields for ``model.recompute``.

    selective: megatron-core's default ``recompute_modules`` (``core_attn``: the attention
    scores, softmax and weighted sum, the activations that grow with s^2) are recomputed in
    the backward; full: every transformer layer keeps only its input and reruns its forward
    (uniform method, one layer per checkpoint), as Megatron-LM's ``--recompute-granularity full
    --recompute-method uniform --recompute-num-layers 1``.
    """
    if mode == "none":
        return {}
    if mode == "selective":
        return dict(recompute_granularity="selective")
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    raise ValueError(f"recompute must be one of {RECOMPUTE_MODES} (got {mode!r})")


def transformer_config(arch: ModelArch, *, tp: int, pp: int, dtype: torch.dtype = torch.float32,
                       perform_initialization: bool = False, recompute: str = "none",
                       sequence_parallel: bool = False, layers_per_stage: Optional[Sequence[int]] = None):
    """megatron-core ``TransformerConfig`` for this architecture and layout; the pipeline
    split is :func:`~fg_megatron.parallel.stage_layer_counts` of ``layers_per_stage``."""
    from megatron.core.transformer import TransformerConfig

    on_gpu = platform.cuda_available()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        rotary_interleaved=arch.rotary_interleaved,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=perform_initialization,
        # Fusions need CUDA extensions (apex / TE); the unfused paths are exact.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        batch_p2p_comm=True,
        batch_p2p_sync=on_gpu,
        deallocate_pipeline_outputs=False,
    )
    if pp > 1:
        # Micro-batches of one step may differ in length: stages exchange shapes.
        kwargs.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
        layout = pipeline_layout(stage_layer_counts(arch.num_layers, pp, layers_per_stage))
        if layout is not None:
            kwargs["pipeline_model_parallel_layout"] = layout
    if arch.sliding_window is not None:
        # HF Mistral: position i sees j when i - j < window (itself included).
        kwargs["window_size"] = (arch.sliding_window - 1, 0)
    kwargs.update(recompute_settings(recompute))
    if sequence_parallel:
        # megatron-core scatters activations along the sequence between TP ranks outside the
        # tensor-parallel regions; only its Transformer Engine spec supports it (parallel.sequence_parallel_error).
        kwargs["sequence_parallel"] = True
    return TransformerConfig(**kwargs)


def layer_spec(arch: ModelArch, use_te: Optional[bool] = None):
    """Transformer Engine spec when TE and a GPU are present, else megatron-core's local spec."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te is None:
        use_te = platform.is_transformer_engine_usable()
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def _gather_sequence(hidden_states: Tensor) -> Tensor:
    """Sequence parallel: the last stage's ``[s/tp, b, h]`` shard -> the whole ``[s, b, h]``.

    megatron-core's output layer gathers the same way before its vocab-parallel matmul, but it
    reduce-scatters the gradient in the backward (``tensor_parallel_output_grad=True``) because
    the gather replaces its all-reduce.  Our heads keep their own: the log-prob code puts
    ``copy_to_tensor_model_parallel_region`` (all-reduce in the backward) on ``LMHead.hidden``, and
    a value head's gradient is already whole on every TP rank.  So the backward here only
    splits (``tensor_parallel_output_grad=False``): all-reduce then split = reduce-scatter.
    """
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)


def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    class FGGPTModel(GPTModel):
        """GPTModel whose last stage returns an :class:`LMHead` instead of logits."""

        def _postprocess(self, hidden_states, *args, **kwargs):
            if not self.post_process:
                return hidden_states
            if self.config.sequence_parallel:
                hidden_states = _gather_sequence(hidden_states)
            if getattr(self, "value_head", None) is not None:
                # fp32 for the scalar head whatever the model dtype: it is one dot product per
                # token, and rewards / advantages are differences of these values.
                w = self.value_head.weight
                values = torch.matmul(hidden_states.float(), w.float().t()).squeeze(-1)  # [s, b]
                return ValueHead(hidden=hidden_states, values=values.transpose(0, 1))
            if self.share_embeddings_and_output_weights:
                weight = self.shared_embedding_or_output_weight()
            else:
                weight = self.output_layer.weight
            shard = weight.shape[0]
            return LMHead(
                hidden=hidden_states,
                weight=weight,
                vocab_start=self.pg_collection.tp.rank() * shard,
                vocab_size=self.real_vocab_size,
            )

    return FGGPTModel


# Transformer Engine's layer spec fuses each pre-attention / pre-MLP norm into the
# linear layer after it.  Checkpoints always use the local spec's names.
_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def local_param_name(name: str) -> str:
    """The local-spec (checkpoint) name of a parameter of either layer spec."""
    for te_suffix, local_suffix in _TE_FUSED_NORMS.items():
        if name.endswith("." + te_suffix):
            return name[: -len(te_suffix)] + local_suffix
    return name


def stage_state_dict(model) -> dict[str, Tensor]:
    """A stage's tensors under checkpoint (local-spec) names, without ``_extra_state``."""
    return {local_param_name(k): v for k, v in model.state_dict(keep_vars=True).items()
            if not k.endswith("_extra_state") and isinstance(v, Tensor)}


def _mark_tensor_parallel_params(model, arch: ModelArch, pp: int, pp_rank: int,
                                 layers_per_stage: Optional[Sequence[int]]) -> None:
    """Tag each parameter as TP-sharded or replicated.

    megatron-core only sets ``tensor_model_parallel`` while initialising weights;
    with ``perform_initialization=False`` (we load checkpoints) the tags are
    missing and the optimizer counts every shard as a TP duplicate in the grad
    norm.  The sharding rules are the single source of truth.
    """
    from megatron.core.tensor_parallel.layers import (
        set_defaults_if_not_set_tensor_model_parallel_attributes,
        set_tensor_model_parallel_attributes,
    )

    from fg_megatron.models import sharding

    for name, param in model.named_parameters():
        kind = sharding.shard_kind(sharding.full_name(local_param_name(name), arch, pp, pp_rank, layers_per_stage))
        if kind == "rep":
            set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        else:
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(param, attr):
                    delattr(param, attr)
            set_tensor_model_parallel_attributes(param, True, 1 if kind == "row" else 0, 1)


def _replace_output_layer_with_value_head(model, arch: ModelArch, dtype: torch.dtype) -> None:
    """Drop the vocabulary output layer of the last stage and add ``value_head`` [1, h].

    GPTModel always builds ``output_layer`` on its last stage; nothing reads it once
    ``_postprocess`` returns a ValueHead (weights are untied, MTP and deferred embedding
    wgrad are off), so it is deleted before any optimizer or checkpoint sees it.
    ``value_head`` is a plain replicated Linear: every TP rank holds the full hidden state
    after the final norm, computes the same values and the same weight gradient, and the
    gradient into the hidden state is already whole (no TP all-reduce, unlike the
    vocab-parallel LM head).  It starts at zero (see checkpoint.value_seed for why); loads
    overwrite it.
    """
    del model.output_layer
    model.value_head = torch.nn.Linear(arch.hidden_size, 1, bias=False, dtype=dtype,
                                       device=platform.default_device())
    with torch.no_grad():
        model.value_head.weight.zero_()


def _check_layer_numbers(model, arch: ModelArch, pp: int, pp_rank: int,
                         layers_per_stage: Optional[Sequence[int]]) -> None:
    """The layers megatron-core built on this stage are the ones the checkpoint maps here
    (its ``layer_number`` is the 1-based model-wide index)."""
    from fg_megatron.models import sharding

    built = [layer.layer_number - 1 for layer in model.decoder.layers]
    expected = list(sharding.layers_of_stage(arch.num_layers, pp, pp_rank, layers_per_stage))
    assert built == expected, f"stage {pp_rank}: megatron-core built layers {built}, the checkpoint maps {expected}"


def build_gpt_model(arch: ModelArch, *, tp: int, pp: int, pp_rank: int,
                    dtype: torch.dtype = torch.float32,
                    vocab_pad_multiple: int = DEFAULT_VOCAB_PAD_MULTIPLE,
                    use_te: Optional[bool] = None, recompute: str = "none", sequence_parallel: bool = False,
                    perform_initialization: bool = False, layers_per_stage: Optional[Sequence[int]] = None):
    """This rank's pipeline stage of the model, on this process's device.

    Weights are left uninitialised unless ``perform_initialization``: callers load
    a checkpoint right after.  ``layers_per_stage`` None is the default split of
    :func:`~fg_megatron.parallel.stage_layer_counts`.  ``pp_rank`` must be this process's
    rank in megatron-core's pipeline group (an uneven split's layout reads it from there).
    """
    config = transformer_config(arch, tp=tp, pp=pp, dtype=dtype, perform_initialization=perform_initialization,
                                recompute=recompute, sequence_parallel=sequence_parallel,
                                layers_per_stage=layers_per_stage)
    value = arch.head == VALUE_HEAD
    model_cls = _gpt_model_class()
    model = model_cls(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_te),
        vocab_size=padded_vocab_size(arch.vocab_size, tp, vocab_pad_multiple),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings and not value,
        position_embedding_type="rope",
        rotary_percent=arch.rotary_percent,
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        rope_scaling=False,
        seq_len_interpolation_factor=None,
    )
    model.real_vocab_size = arch.vocab_size
    _check_layer_numbers(model, arch, pp, pp_rank, layers_per_stage)
    if value and model.post_process:
        _replace_output_layer_with_value_head(model, arch, dtype)
    _mark_tensor_parallel_params(model, arch, pp, pp_rank, layers_per_stage)
    # megatron-core hard-codes llama3's constants and ignores other rope types;
    # use the checkpoint's own parameters.
    model.rotary_pos_emb.inv_freq = rope_inv_freq(arch).to(platform.default_device())
    model.to(platform.default_device())
    return model
