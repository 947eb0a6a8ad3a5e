"""HF checkpoint -> jaxvlm param tree.

The model's flat param paths, joined with dots, are transformers' in-memory key names with the layer
index left out of stacked blocks: HF `model.language_model.layers.7.self_attn.q_proj.weight` is row 7
of our `model.language_model.layers.self_attn.q_proj.weight`. Older on-disk names (`model.layers.*`,
`visual.*`) are renamed by the family's regexes first. Each destination param is assembled from its
tensors, converted, and put on device before the next one is read, so the host never holds the model.

bitsandbytes 4-bit checkpoints (`*-bnb-4bit`) store a quantized Linear weight as `<key>` (packed uint8)
plus `<key>.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map` and
`.quant_state.bitsandbytes__nf4`; such a weight arrives at `convert` as an NF4, never as floats.

On a device mesh (`load_state(..., mesh=)`) each device's block of a param (`jaxvlm.sharding.param_shardings`:
where `shard_model` would put it) is read from the files alone, layer by layer for a stacked param, and only for
the devices of this process, so no param is whole in host memory or on one device. A Linear weight bound for NF4
or int8 is read so too, as floats laid out as the 16-bit model would hold them, and quantized on the mesh (the
same bits as on one device). bitsandbytes-quantized weights and `transposed_keys` tensors are the exception: read
whole on the host (one stacked param at a time), then split.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxvlm.converters.safetensors_io import Checkpoint, CheckpointError
from jaxvlm.layers import dense_weight
from jaxvlm.paths import path_key, split_layer
from jaxvlm.quant import NF4
from jaxvlm.quantize import quantize
from jaxvlm.sharding import param_shardings

# Suffixes of the tensors that carry a bitsandbytes-quantized weight's statistics.
_BNB_PARTS = re.compile(r"^(.*)(\.absmax|\.quant_map|\.nested_absmax|\.nested_quant_map|"
                        r"\.quant_state\.bitsandbytes__\w+|\.SCB|\.weight_format)$")


def normalize_key(key: str, renames: Iterable[tuple[str, str]]) -> str:
    """The current transformers key for an on-disk key that may use older names."""
    for pattern, repl in renames:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _on_device(value, dtype) -> jax.Array:
    """`value` in `dtype` on device: a host array cast on the host; a jax.Array (already placed on a mesh) cast where
    it lies."""
    if isinstance(value, jax.Array):
        return value.astype(dtype)
    value = np.asarray(value)
    # An array of its own (a stack of layers) is cast in place when it has the dtype already; a view of the
    # checkpoint's memory map is copied, so that no param (a CPU backend may alias host memory) reads the file.
    return jax.device_put(value.astype(dtype, copy=not value.flags.owndata))


def default_convert(key: str, value, spec) -> jax.Array:
    """A float array, cast to the param's dtype, on device; a quantized weight is dequantized."""
    if hasattr(value, "dequantize"):
        return dense_weight(jax.device_put(value), spec.dtype)
    return _on_device(value, spec.dtype)


def quantizing_convert(quant: str | None, targets: set[str], compute_dtype, prequantized: bool):
    """The importer's convert hook: Linear weights in `targets` become NF4 / Int8 on device as they stream in.

    A checkpoint that is already 4-bit keeps its NF4 weights as they are and its float weights in float
    (its creator chose which modules to leave unquantized); with quant=None everything is dequantized.
    """
    def convert(key, value, spec):
        if quant is None or key not in targets:
            return default_convert(key, value, spec)
        if isinstance(value, NF4):
            if quant == "nf4":
                return jax.device_put(value)
            dense = dense_weight(jax.device_put(value), compute_dtype)
        elif prequantized:
            return default_convert(key, value, spec)
        else:
            dense = _on_device(value, compute_dtype)
        return quantize(dense, quant)
    return convert


def load_state(
    abstract: nnx.Module,
    ckpt: Checkpoint,
    *,
    stacked: Iterable[str],
    renames: Iterable[tuple[str, str]],
    ignored: Iterable[str] = (),
    convert: Callable[[str, object, jax.ShapeDtypeStruct], object] = default_convert,
    mesh: Mesh | None = None,
) -> nnx.Module:
    """The model `abstract` (built under nnx.eval_shape) with every param read from `ckpt`.

    Raises CheckpointError naming the key for a missing, unexpected or mis-shaped tensor: a model
    is never returned partly loaded. `convert(key, value, spec)` turns what was read (a host array
    [*stack, ...], or an NF4 of host arrays for a bnb-quantized weight) into the param's value.
    With a `mesh`, what was read arrives at `convert` as a jax.Array (an NF4 of them) already placed on
    the mesh (see the module docstring), and every array of the result is placed as
    `jaxvlm.sharding.model_shardings` places it in the loaded model.
    """
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    wanted = {path_key(p): v for p, v in flat}

    sources: dict[str, dict[int | None, str]] = {}  # our key -> {layer index or None: checkpoint key}
    quantized: dict[str, dict[str, str]] = {}  # checkpoint weight key -> {suffix: checkpoint key}
    unexpected = []
    for disk_key in ckpt.keys():
        part = _BNB_PARTS.match(disk_key)
        if part:
            quantized.setdefault(part.group(1), {})[part.group(2)] = disk_key
            continue
        key = normalize_key(disk_key, renames)
        if any(re.search(p, key) for p in ignored):
            continue
        ours, layer = split_layer(key, stacked)
        if ours not in wanted:
            unexpected.append(disk_key)
            continue
        sources.setdefault(ours, {})[layer] = disk_key
    # Statistics follow their weight (read, ignored or unexpected with it); only a weight that is not on
    # disk at all leaves them stranded.
    unpacked = [k for k in quantized if k not in ckpt.keys()]
    if unpacked:
        k = unpacked[0]
        raise CheckpointError(
            f"{ckpt.model_dir}: the packed 4-bit weight {k} is missing while its statistics "
            f"({', '.join(sorted(quantized[k]))}) are present"
            f"{f' (and {len(unpacked) - 1} more such weights)' if len(unpacked) > 1 else ''}")
    if unexpected:
        raise CheckpointError(
            f"{ckpt.model_dir}: {len(unexpected)} unexpected tensors that this model has no place for, e.g. "
            f"{', '.join(unexpected[:5])}")
    missing = [k for k in wanted if k not in sources]
    if missing:
        raise CheckpointError(f"{ckpt.model_dir}: missing tensors for {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")

    # Tensors the family allows on disk with their last two axes swapped (FamilyInfo.transposed_keys).
    transposed = tuple(getattr(getattr(type(abstract), "INFO", None), "transposed_keys", ()))

    def read(disk_key: str, shape: tuple, ours: str):
        if disk_key in quantized:
            return _read_bnb(ckpt, disk_key, quantized[disk_key], shape, ours)
        if any(re.search(p, ours) for p in transposed):
            return _checked_either_layout(ckpt, disk_key, shape, ours)
        return _checked(ckpt, disk_key, shape, ours)

    def read_whole(disk_keys: list[str], per_layer: bool, shape: tuple, key: str, plain: bool = False):
        if plain:  # shapes checked (the plan): read into memory of its own, the layers stacked as they arrive
            whole = ckpt.read(disk_keys)
            return whole if per_layer else whole[0]
        if not per_layer:
            return read(disk_keys[0], shape, key)
        layers = [read(k, shape[1:], key) for k in disk_keys]
        return jax.tree.map(lambda *xs: np.stack(xs), *layers)

    def placement(key: str, value):
        return param_shardings(key, value, mesh, stacked, abstract.sharding_rules())

    # Where each param comes from, its layers and the shapes of its plain tensors checked before anything is read.
    plan = []
    for path, var in flat:
        key = path_key(path)
        spec = var.get_value()
        src = sources[key]
        if None in src:
            if len(src) > 1:
                raise CheckpointError(f"{ckpt.model_dir}: {key} is given both stacked and per layer")
            disk_keys, per_layer = [src[None]], False
        else:
            n = spec.shape[0]
            absent = [i for i in range(n) if i not in src]
            extra = [i for i in src if i >= n]
            if absent or extra:
                raise CheckpointError(
                    f"{ckpt.model_dir}: {key}: expected layers 0..{n - 1}, "
                    f"{'missing ' + str(absent[:5]) if absent else 'got extra ' + str(extra[:5])}")
            disk_keys, per_layer = [src[i] for i in range(n)], True
        plain = not any(k in quantized for k in disk_keys) and not any(re.search(p, key) for p in transposed)
        if plain:
            for k in disk_keys:
                _check_shape(ckpt, k, spec.shape[1:] if per_layer else spec.shape, key)
        plan.append((path, var, key, spec, disk_keys, per_layer, plain))

    def load(path, var, key, spec, disk_keys, per_layer, plain):
        size = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
        with budget.holding(size):
            if mesh is None:
                value = read_whole(disk_keys, per_layer, spec.shape, key, plain)
            elif plain:
                value = read_sharded(ckpt, disk_keys, per_layer, spec.shape, placement(key, spec))
            else:
                value = read_whole(disk_keys, per_layer, spec.shape, key)
                value = jax.device_put(value, placement(key, value))
            value = convert(key, value, spec)
            if mesh is not None:
                value = jax.device_put(value, placement(key, value))
            jax.block_until_ready(value)  # its host memory free before the budget is given back
        return path, var.replace(value)

    # Params load on LOADERS threads (8, or one per core): a host-to-device copy from memory never sent before runs at
    # about 2.6 GB/s alone and 25 GB/s with others beside it (H200 machine; scripts/bench_read.py). At most IN_FLIGHT
    # bytes are read and not yet on the device (a larger param loads alone).
    budget = _Budget(IN_FLIGHT)
    with concurrent.futures.ThreadPoolExecutor(LOADERS, thread_name_prefix="jaxvlm-load") as pool:
        loaded = [f.result() for f in [pool.submit(load, *item) for item in plan]]
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


LOADERS = min(8, os.cpu_count() or 1)
IN_FLIGHT = 4 << 30


class _Budget:
    """Bytes held by params read and not yet on the device: `holding(n)` waits until n more fit under `limit`, or
    until nothing else is held."""

    def __init__(self, limit: int):
        self.limit, self.used, self.cond = limit, 0, threading.Condition()

    @contextlib.contextmanager
    def holding(self, n: int):
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


def read_sharded(ckpt: Checkpoint, disk_keys: list[str], per_layer: bool, shape: tuple,
                 sharding: NamedSharding) -> jax.Array:
    """The param of `shape` `[*stack, ...]` laid out by `sharding`, from the tensor `disk_keys[0]` (per_layer False)
    or the per-layer tensors `disk_keys` (row r of the stack). Each block that a device of this process holds is
    read alone (`Checkpoint.read_slice`, layer by layer), once however many devices hold it, and handed to them
    before the next block is read."""
    def read(index: tuple[slice, ...]) -> np.ndarray:
        if not per_layer:
            return ckpt.read_slice(disk_keys[0], index)
        rows = range(*index[0].indices(shape[0]))
        block = None
        for i, row in enumerate(rows):
            part = ckpt.read_slice(disk_keys[row], index[1:])
            if block is None:
                block = np.empty((len(rows), *part.shape), part.dtype)
            block[i] = part
        return block

    holders: dict[tuple, tuple[tuple[slice, ...], list]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        holders.setdefault(tuple((s.start, s.stop) for s in index), (index, []))[1].append(device)
    arrays = []
    for index, devices in holders.values():
        block = read(index)
        arrays += [jax.device_put(block, d) for d in devices]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _check_shape(ckpt: Checkpoint, disk_key: str, shape: tuple, ours: str) -> None:
    got = ckpt.shape(disk_key)
    if tuple(got) != tuple(shape):
        raise CheckpointError(
            f"{ckpt.model_dir}: tensor {disk_key!r} has shape {tuple(got)}, the model expects {tuple(shape)} "
            f"(for {ours})")


def _checked(ckpt: Checkpoint, disk_key: str, shape: tuple, ours: str) -> np.ndarray:
    _check_shape(ckpt, disk_key, shape, ours)
    return ckpt.get(disk_key)


def _checked_either_layout(ckpt: Checkpoint, disk_key: str, shape: tuple, ours: str) -> np.ndarray:
    """The tensor in the model's layout `shape`, whether stored so or with its last two axes swapped. A shape
    that fits both (square matrices) is taken as stored, as transformers takes it."""
    got, swapped = tuple(ckpt.shape(disk_key)), (*shape[:-2], shape[-1], shape[-2])
    if got == tuple(shape):
        return ckpt.get(disk_key)
    if got == swapped:
        return np.swapaxes(ckpt.get(disk_key), -1, -2)
    raise CheckpointError(
        f"{ckpt.model_dir}: tensor {disk_key!r} has shape {got}, the model expects {tuple(shape)} or, with its last "
        f"two axes swapped (the layout on the hub), {swapped} (for {ours})")


def _read_bnb(ckpt: Checkpoint, disk_key: str, parts: dict[str, str], shape: tuple, ours: str):
    """The NF4 of a bitsandbytes-quantized weight (host arrays), its shape checked against the model's."""
    from jaxvlm.quant import nf4_from_bnb
    if ".SCB" in parts or ".weight_format" in parts:
        raise CheckpointError(f"{ckpt.model_dir}: {disk_key} has bitsandbytes 8-bit statistics "
                              f"({', '.join(sorted(parts))}); 8-bit (SCB) checkpoints are not supported, "
                              f"expected 4-bit NF4")
    tensors = {"": ckpt.get(disk_key), **{suffix: ckpt.get(k) for suffix, k in parts.items()}}
    try:
        q = nf4_from_bnb(tensors, name=disk_key)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.model_dir}: {e}") from None
    if tuple(q.shape) != tuple(shape):
        raise CheckpointError(f"{ckpt.model_dir}: quantized tensor {disk_key!r} has shape {tuple(q.shape)}, "
                              f"the model expects {tuple(shape)} (for {ours})")
    return q
