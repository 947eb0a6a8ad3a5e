"""Param paths: transformers' per-layer module names <-> jaxvlm's stacked param paths.

jaxvlm stacks repeated blocks along a leading layer axis, so the HF name
`model.language_model.layers.7.self_attn.q_proj.weight` is row 7 of our param
`model.language_model.layers.self_attn.q_proj.weight`. A family names its stacked prefixes
(`FamilyInfo.stacked`); every conversion between the two spellings goes through this module.
"""
from __future__ import annotations

import re
from collections.abc import Iterable


def path_key(path: tuple) -> str:
    """'a.b.c' for an NNX state path ('a', 'b', 'c')."""
    return ".".join(str(p) for p in path)


def stacked_prefix(key: str, stacked: Iterable[str]) -> str | None:
    """The stacked prefix that our `key` lies under, or None for an unstacked param."""
    return next((p for p in stacked if key.startswith(p + ".")), None)


def split_layer(hf_key: str, stacked: Iterable[str]) -> tuple[str, int | None]:
    """('model.visual.blocks.attn.qkv.weight', 3) for the HF key 'model.visual.blocks.3.attn.qkv.weight';
    (hf_key, None) for a key outside the stacked blocks."""
    for prefix in stacked:
        m = re.match(re.escape(prefix) + r"\.(\d+)\.(.+)$", hf_key)
        if m:
            return f"{prefix}.{m.group(2)}", int(m.group(1))
    return hf_key, None


def layer_key(key: str, layer: int | None, stacked: Iterable[str]) -> str:
    """The HF per-layer key of layer `layer` of our stacked `key` (`key` itself when layer is None)."""
    if layer is None:
        return key
    prefix = stacked_prefix(key, stacked)
    if prefix is None:
        raise ValueError(f"{key} is not under a stacked block ({', '.join(stacked)}): it has no layer {layer}")
    return f"{prefix}.{layer}.{key[len(prefix) + 1:]}"
