"""Param paths: transformers' per-layer module names <-> jaxvlm's stacked param paths.

jaxvlm stacks repeated blocks along a leading layer axis, so the HF name
`model.language_model.layers.7.self_attn.q_proj.weight` is row 7 of our param
`model.language_model.layers.self_attn.q_proj.weight`. A family names its stacked prefixes
(`FamilyInfo.stacked`, or `VisionLanguageModel.stacks()` with `Stack`s whose rows are numbered otherwise); every
conversion between the two spellings goes through this module.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class Stack:
    """A stacked block whose rows are not numbered as transformers numbers its layers: row r of our prefix `ours`
    is transformers' layer `layers[r]` under its prefix `hf`. Llama 3.2 Vision's cross-attention layers are one
    such stack and its self-attention layers another, both numbered within `model.language_model.layers.N`.
    A family gives them from its config (`VisionLanguageModel.stacks`); a plain prefix string is a stack whose
    row r is layer r under the same prefix."""
    ours: str
    hf: str
    layers: tuple[int, ...]


def _ours(entry) -> str:
    return entry if isinstance(entry, str) else entry.ours


def path_key(path: tuple) -> str:
    """'a.b.c' for an NNX state path ('a', 'b', 'c')."""
    return ".".join(str(p) for p in path)


def stacked_prefix(key: str, stacked: Iterable) -> str | None:
    """The stacked prefix (ours) that our `key` lies under, or None for an unstacked param."""
    return next((_ours(e) for e in stacked if key.startswith(_ours(e) + ".")), None)


def split_layer(hf_key: str, stacked: Iterable) -> tuple[str, int | None]:
    """('model.visual.blocks.attn.qkv.weight', 3) for the HF key 'model.visual.blocks.3.attn.qkv.weight' (our key
    and row); (hf_key, None) for a key outside the stacked blocks."""
    for entry in stacked:
        if isinstance(entry, str):
            m = re.match(re.escape(entry) + r"\.(\d+)\.(.+)$", hf_key)
            if m:
                return f"{entry}.{m.group(2)}", int(m.group(1))
            continue
        m = re.match(re.escape(entry.hf) + r"\.(\d+)\.(.+)$", hf_key)
        if m and int(m.group(1)) in entry.layers:
            return f"{entry.ours}.{m.group(2)}", entry.layers.index(int(m.group(1)))
    return hf_key, None


def layer_key(key: str, layer: int | None, stacked: Iterable) -> str:
    """The HF per-layer key of row `layer` of our stacked `key` (`key` itself when layer is None)."""
    if layer is None:
        return key
    entry = next((e for e in stacked if key.startswith(_ours(e) + ".")), None)
    if entry is None:
        raise ValueError(f"{key} is not under a stacked block ({', '.join(map(_ours, stacked))}): it has no "
                         f"layer {layer}")
    rest = key[len(_ours(entry)) + 1:]
    if isinstance(entry, str):
        return f"{entry}.{layer}.{rest}"
    return f"{entry.hf}.{entry.layers[layer]}.{rest}"


def per_layer_keys(module, stacked: Iterable) -> dict[str, tuple[str, int | None]]:
    """{transformers' key: (our param path, row or None)} for every param of `module` (an nnx module; an abstract one
    from nnx.eval_shape will do), the rows of its `stacked` params spelled per layer (`layer_key`)."""
    from flax import nnx
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        key = path_key(path)
        if not any(key.startswith(_ours(e) + ".") for e in stacked):
            out[key] = (key, None)
            continue
        for row in range(var.get_value().shape[0]):
            out[layer_key(key, row, stacked)] = (key, row)
    return out

