"""The registry: config.json's `model_type` -> the family's model class, imported when first asked for.

A new family is one file under jaxvlm/models/ and one line here (see jaxvlm/models/base.py).
"""
from __future__ import annotations

import importlib

REGISTRY = {
    "qwen2_vl": "jaxvlm.models.qwen2_vl:Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "jaxvlm.models.qwen2_vl:Qwen2VLForConditionalGeneration",
    "qwen3_vl": "jaxvlm.models.qwen3_vl:Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "jaxvlm.models.qwen3_vl_moe:Qwen3VLMoeForConditionalGeneration",
    "gemma3": "jaxvlm.models.gemma3:Gemma3ForConditionalGeneration",
    "mllama": "jaxvlm.models.mllama:MllamaForConditionalGeneration",
    "llava": "jaxvlm.models.llava:LlavaForConditionalGeneration",
    "llava_next": "jaxvlm.models.llava:LlavaNextForConditionalGeneration",
    "mistral3": "jaxvlm.models.llava:Mistral3ForConditionalGeneration",
}


def model_class(model_type: str | None, where: str):
    """The model class implementing `model_type`; ValueError naming `where` and the supported types."""
    if model_type not in REGISTRY:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(REGISTRY))}")
    module, name = REGISTRY[model_type].split(":")
    return getattr(importlib.import_module(module), name)
