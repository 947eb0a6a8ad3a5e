"""jaxvlm param tree -> HF tensors and safetensors files (stacked blocks split per layer).

Tensors are produced one at a time (a stacked param's rows sliced on its devices, then each gathered alone) and
written shard by shard, so the host holds at most one shard.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from jaxvlm.paths import layer_key, path_key, stacked_prefix

INDEX_NAME = "model.safetensors.index.json"
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def host_array(x) -> np.ndarray:
    """`x` (a jax.Array on any devices, or a host array) as one host numpy array. An array spread over several
    processes (jax.distributed) is gathered with `process_allgather`: a collective, which every process calls and
    after which each holds the whole array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def to_first_device(x: jax.Array) -> jax.Array:
    """`x` whole on this process's first device: copied there from the devices it lives on, or, spread over several
    processes, gathered through the host (`host_array`)."""
    return jax.device_put(x if x.is_fully_addressable else host_array(x), jax.local_devices()[0])


@jax.jit
def take_layer(value, i):
    """Row `i` of a stacked param value (array, NF4, LoRA: the leading axis of every array leaf), sliced on the
    devices it lives on. The index is traced: one compile serves every layer."""
    return jax.tree.map(lambda x: x[i], value)


def num_layers(value) -> int:
    """The length of a stacked param value's leading layer axis."""
    return jax.tree.leaves(value)[0].shape[0]


def hf_tensors(model: nnx.Module, stacked: Iterable[str], convert: Callable) -> Iterator[tuple[str, np.ndarray]]:
    """(HF in-memory key, host array) for every param, one tensor at a time.

    `model.language_model.layers.self_attn.q_proj.weight [L, out, in]` becomes L tensors
    `model.language_model.layers.{i}.self_attn.q_proj.weight [out, in]`. Each tensor's param value (array, NF4,
    LoRA; a stacked param's row, sliced on the devices it lives on by `take_layer`) is gathered alone onto this
    process's first device (`to_first_device`), `convert(value)` turns it there into the array to write (a jit'd
    function: its compiles then serve every export), and `host_array` brings that to the host. So the host holds one
    tensor at a time, and `convert` runs the same program however the model is sharded: a sharded model exports the
    bytes an unsharded one does (XLA's products over split operands may round differently). On several processes
    every process iterates: the gathers are collectives. On an abstract model (nnx.eval_shape) `convert` is called
    with each tensor's abstract value instead.
    """
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = path_key(path)
        value = var.get_value()
        rows = [None] if stacked_prefix(key, stacked) is None else range(num_layers(value))
        abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(value))
        for i in rows:
            if abstract:
                array = convert(value if i is None else jax.eval_shape(take_layer, value, i))
            else:
                array = convert(jax.tree.map(to_first_device, value if i is None else take_layer(value, i)))
            yield layer_key(key, i, stacked), host_array(array)


def parse_size(size) -> int:
    """Bytes from 5_000_000, "5GB", "500MB", "2GiB" (transformers' max_shard_size forms)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '5GB' / '500MB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str, max_shard_size="5GB",
                      sizes: list[int] | None = None) -> list[str]:
    """Writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus their index when the
    tensors exceed `max_shard_size`. `sizes` (bytes per tensor, in order) lets shards be named before the
    tensors exist; without it the tensors are collected first. Returns the file names written."""
    limit = parse_size(max_shard_size)
    if sizes is None:
        tensors = list(tensors)
        sizes = [t.nbytes for _, t in tensors]
    bounds, current = [0], 0
    for i, size in enumerate(sizes):
        if current and current + size > limit:
            bounds.append(i)
            current = 0
        current += size
    bounds.append(len(sizes))
    n_shards = len(bounds) - 1
    names = (["model.safetensors"] if n_shards == 1 else
             [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)])
    weight_map, it = {}, iter(tensors)
    for shard, name in enumerate(names):
        chunk = {}
        for _ in range(bounds[shard + 1] - bounds[shard]):
            key, array = next(it)
            chunk[key] = np.ascontiguousarray(array)
            weight_map[key] = name
        save_file(chunk, os.path.join(out_dir, name), metadata={"format": "pt"})
    if n_shards > 1:
        with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}, f, indent=2)
    return names


def remove_stale_weights(out_dir: str, written: list[str]) -> None:
    """Removes the weight files of an earlier save into `out_dir` that this save did not rewrite: a model
    saved sharded, then unsharded (or into fewer shards), would otherwise keep an index or shards that
    transformers reads instead of, or besides, the new weights. Other files are left alone."""
    index = os.path.join(out_dir, INDEX_NAME)
    stale = {"model.safetensors"} if len(written) > 1 else set()
    if len(written) == 1 and os.path.exists(index):
        with open(index) as f:
            stale |= set(json.load(f).get("weight_map", {}).values())
        stale.add(INDEX_NAME)
    stale |= {n for n in os.listdir(out_dir) if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)}
    for name in stale - set(written):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)