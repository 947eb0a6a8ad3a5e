"""HF checkpoint -> jaxvlm param tree.

The model's flat param paths, joined with dots, are transformers' in-memory key names with the layer
index left out of stacked blocks: HF `model.language_model.layers.7.self_attn.q_proj.weight` is row 7
of our `model.language_model.layers.self_attn.q_proj.weight`. Older on-disk names (`model.layers.*`,
`visual.*`) are renamed by the family's regexes first. Each destination param is assembled from its
tensors, cast, and put on device before the next one is read, so the host never holds the whole model.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import jax
import numpy as np
from flax import nnx

from converters.safetensors_io import Checkpoint, CheckpointError


def path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def normalize_key(key: str, renames: Iterable[tuple[str, str]]) -> str:
    """The current transformers key for an on-disk key that may use older names."""
    for pattern, repl in renames:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _split_stacked(key: str, stacked: Iterable[str]) -> tuple[str, int | None]:
    """('model.visual.blocks.attn.qkv.weight', 3) for 'model.visual.blocks.3.attn.qkv.weight'."""
    for prefix in stacked:
        m = re.match(re.escape(prefix) + r"\.(\d+)\.(.+)$", key)
        if m:
            return f"{prefix}.{m.group(2)}", int(m.group(1))
    return key, None


def load_state(
    abstract: nnx.Module,
    ckpt: Checkpoint,
    *,
    stacked: Iterable[str],
    renames: Iterable[tuple[str, str]],
    ignored: Iterable[str] = (),
    convert: Callable[[str, np.ndarray], object] | None = None,
) -> nnx.Module:
    """The model `abstract` (built under nnx.eval_shape) with every param read from `ckpt`.

    Raises CheckpointError naming the key for a missing, unexpected or mis-shaped tensor: a model
    is never returned partly loaded. `convert(key, array)` may turn a float array into another
    weight type (e.g. NF4) once it is on device; by default arrays are cast to the param's dtype.
    """
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    wanted = {path_key(p): v for p, v in flat}

    sources: dict[str, dict[int | None, str]] = {}  # our key -> {layer index or None: checkpoint key}
    unexpected = []
    for disk_key in ckpt.keys():
        key = normalize_key(disk_key, renames)
        if any(re.search(p, key) for p in ignored):
            continue
        ours, layer = _split_stacked(key, stacked)
        if ours not in wanted:
            unexpected.append(disk_key)
            continue
        sources.setdefault(ours, {})[layer] = disk_key
    if unexpected:
        raise CheckpointError(
            f"{ckpt.model_dir}: {len(unexpected)} unexpected tensors that this model has no place for, e.g. "
            f"{', '.join(unexpected[:5])}")
    missing = [k for k in wanted if k not in sources]
    if missing:
        raise CheckpointError(f"{ckpt.model_dir}: missing tensors for {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")

    loaded = []
    for path, var in flat:
        key = path_key(path)
        spec = var.get_value()
        src = sources[key]
        if None in src:
            if len(src) > 1:
                raise CheckpointError(f"{ckpt.model_dir}: {key} is given both stacked and per layer")
            array = _checked(ckpt, src[None], spec.shape, key)
        else:
            n = spec.shape[0]
            absent = [i for i in range(n) if i not in src]
            extra = [i for i in src if i >= n]
            if absent or extra:
                raise CheckpointError(
                    f"{ckpt.model_dir}: {key}: expected layers 0..{n - 1}, "
                    f"{'missing ' + str(absent[:5]) if absent else 'got extra ' + str(extra[:5])}")
            array = np.stack([_checked(ckpt, src[i], spec.shape[1:], key) for i in range(n)])
        value = convert(key, array) if convert else None
        if value is None:
            value = jax.device_put(np.asarray(array).astype(spec.dtype))
        loaded.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _checked(ckpt: Checkpoint, disk_key: str, shape: tuple, ours: str) -> np.ndarray:
    got = ckpt.shape(disk_key)
    if tuple(got) != tuple(shape):
        raise CheckpointError(
            f"{ckpt.model_dir}: tensor {disk_key!r} has shape {tuple(got)}, the model expects {tuple(shape)} "
            f"(for {ours})")
    return ckpt.get(disk_key)
