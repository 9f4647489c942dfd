"""Model families -> one megatron-core GPTModel.

A family is a module with ``arch_from_hf_config(hf_config, family)``,
``state_dict_adapter(arch)`` and ``hf_config_from_arch(arch, base)``;
:func:`family_name` picks it from an HF ``config.json``.  A family with several
HF checkpoint layouts (chatglm: transformers' ``glm`` and THUDM's original
``chatglm``) also lists them in ``EXPORT_LAYOUTS`` (default first) and takes
``layout=`` in ``state_dict_adapter`` and ``hf_config_from_arch``.

Everything outside this package reads an HF config through
:func:`arch_from_hf_config` and gets name maps through :func:`state_dict_adapter`,
so the head (``lm`` or ``value``, :func:`~fg_megatron.models.arch.head_from_hf_config`)
is decided once and never forgotten.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Optional

from fg_megatron.models.adapter import StateDictAdapter
from fg_megatron.models.arch import VALUE_HEAD, ModelArch, ModelConfigError, head_from_hf_config
from fg_megatron.models.value import check_value_head_supported

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


def arch_from_hf_config(hf_config: dict, family: Optional[str] = None, source: str = "config.json") -> ModelArch:
    """The architecture of an HF config.json, head included (``family`` defaults to its model_type's)."""
    family = family or family_name(hf_config)
    arch = family_module(family).arch_from_hf_config(hf_config, family)
    if head_from_hf_config(hf_config, source) == VALUE_HEAD:
        check_value_head_supported(hf_config, source)
        # No output layer, so nothing is tied to the embedding (and under PP the last
        # stage keeps no copy of it), whatever tie_word_embeddings says.
        arch = dataclasses.replace(arch, head=VALUE_HEAD, tie_word_embeddings=False)
    return arch


def state_dict_adapter(arch: ModelArch, layout: Optional[str] = None) -> StateDictAdapter:
    """HF <-> megatron name map of ``arch`` (``layout``: one of the family's ``EXPORT_LAYOUTS``)."""
    module = family_module(arch.family)
    return module.state_dict_adapter(arch) if layout is None else module.state_dict_adapter(arch, layout)
