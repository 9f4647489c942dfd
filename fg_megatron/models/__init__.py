"""Model families -> one megatron-core GPTModel.

A family is a module with ``arch_from_hf_config(hf_config, family)``,
``state_dict_adapter(arch)`` and ``hf_config_from_arch(arch, base)``;
:func:`family_name` picks it from an HF ``config.json``.  A family with several
HF checkpoint layouts (chatglm: transformers' ``glm`` and THUDM's original
``chatglm``) also lists them in ``EXPORT_LAYOUTS`` (default first) and takes
``layout=`` in ``state_dict_adapter`` and ``hf_config_from_arch``.
"""

from __future__ import annotations

from types import ModuleType

from fg_megatron.models.arch import ModelArch, ModelConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "glm", "chatglm")
# model_type -> family: transformers' GLM port and THUDM's original ChatGLM3 layout are one family.
_FAMILY_OF_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "glm": "chatglm", "chatglm": "chatglm"}


def family_name(hf_config: dict) -> str:
    """Our family name for an HF config.json (its ``model_type``)."""
    model_type = hf_config.get("model_type")
    if model_type in _FAMILY_OF_MODEL_TYPE:
        return _FAMILY_OF_MODEL_TYPE[model_type]
    raise ModelConfigError(
        f"config.json: model_type {model_type!r} is not supported "
        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    )


def family_module(family: str) -> ModuleType:
    if family in ("llama", "mistral"):
        from fg_megatron.models import llama

        return llama
    if family == "chatglm":
        from fg_megatron.models import chatglm

        return chatglm
    raise ModelConfigError(f"unknown model family {family!r}")


def arch_from_hf_config(hf_config: dict) -> ModelArch:
    family = family_name(hf_config)
    return family_module(family).arch_from_hf_config(hf_config, family)
