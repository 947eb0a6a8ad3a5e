"""Read HF safetensors checkpoints (one file or a sharded set with its index) tensor by tensor.

A tensor is a zero-copy numpy view of the memory-mapped file, so reading a checkpoint never holds a
second full copy of it in host memory; bf16 comes through ml_dtypes. No torch needed. `Checkpoint.read_slice`
copies one block of a tensor (what one device of a mesh holds) out of the mapped file.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# transformers' pickled PyTorch checkpoints, which we refuse to open.
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


# Threads that read tensors from files (Checkpoint.read): reads of a few tensors at once keep a disk or the page cache
# busier than one.
_READERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="jaxvlm-read")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or malformed; the message names the file and key."""


@dataclass(frozen=True)
class _Entry:
    path: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(path: str) -> dict[str, _Entry]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which is not supported")
        entry = _Entry(path, info["dtype"], tuple(info["shape"]), 8 + n + start, 8 + n + end)
        if entry.end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {key!r} ends at byte {entry.end}, file has {size}")
        entries[key] = entry
    return entries


class Checkpoint:
    """The tensors of an HF model directory, by their on-disk key."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index = os.path.join(model_dir, INDEX_NAME)
        single = os.path.join(model_dir, SINGLE_NAME)
        if os.path.exists(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: not a safetensors index (expected a 'weight_map'): {e}") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files, weight_map = [SINGLE_NAME], None
        else:
            pickled = [os.path.join(model_dir, n) for n in PICKLE_NAMES if os.path.exists(os.path.join(model_dir, n))]
            if pickled:
                raise CheckpointError(
                    f"{pickled[0]}: a pickled PyTorch checkpoint, and {model_dir} has no {SINGLE_NAME} or "
                    f"{INDEX_NAME}; pickled checkpoints are refused because loading a pickle can run arbitrary "
                    f"code. Convert it to safetensors: load it in transformers and call "
                    f"model.save_pretrained(dir, safe_serialization=True), or load the hub repo's safetensors "
                    f"revision (revision='refs/pr/N', N its safetensors conversion pull request)")
            raise CheckpointError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME} found")
        self.entries: dict[str, _Entry] = {}
        for name in files:
            path = os.path.join(model_dir, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: shard named in {INDEX_NAME} is missing")
            self.entries.update(_read_header(path))
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self.entries]
            if missing:
                raise CheckpointError(
                    f"{index}: {len(missing)} tensors listed in the index are not in their shards, e.g. "
                    f"{missing[0]!r} (expected in {weight_map[missing[0]]})")
        self._maps: dict[str, np.memmap] = {}

    @classmethod
    def from_file(cls, path: str) -> "Checkpoint":
        """The tensors of one safetensors file (e.g. a PEFT adapter's)."""
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing")
        ckpt = cls.__new__(cls)
        ckpt.model_dir = os.path.dirname(path)
        ckpt.entries = _read_header(path)
        ckpt._maps = {}
        return ckpt

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def get(self, key: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the mapped file (no copy)."""
        e = self.entries[key]
        if e.path not in self._maps:
            self._maps[e.path] = np.memmap(e.path, dtype=np.uint8, mode="r")
        raw = self._maps[e.path][e.start:e.end]
        return raw.view(_DTYPES[e.dtype]).reshape(e.shape)

    def read(self, keys: list[str]) -> np.ndarray:
        """The tensors `keys` (one shape and dtype) stacked on a new first axis, in host memory of their own: each
        read from its file by plain reads, several at a time (the reads release the GIL), not by touching the mapped
        pages one by one (measured on the CPU machine: 24 s of `np.stack` over the maps for a 2B checkpoint)."""
        first = self.entries[keys[0]]
        out = np.empty((len(keys), *first.shape), _DTYPES[first.dtype])
        flat = out.reshape(len(keys), -1).view(np.uint8)
        for key in keys:
            e = self.entries[key]
            if e.shape != first.shape or e.dtype != first.dtype:
                raise CheckpointError(f"{e.path}: tensor {key!r} is {e.dtype} {e.shape}, expected {first.dtype} "
                                      f"{first.shape} as {keys[0]!r} (the layers of one param)")

        def one(i: int) -> None:
            e = self.entries[keys[i]]
            view, done = memoryview(flat[i]), 0
            with open(e.path, "rb", buffering=0) as f:
                f.seek(e.start)
                while done < view.nbytes:
                    n = f.readinto(view[done:])
                    if not n:
                        raise CheckpointError(f"{e.path}: ends inside tensor {keys[i]!r}")
                    done += n
        list(_READERS.map(one, range(len(keys))))
        return out

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` of tensor `key` (one slice per leading axis, step 1; the axes after them whole),
        copied into host memory from the mapped file, which reads only the pages that hold the block: a range of
        the first axis is one contiguous range of the file, a narrower block a strided set of runs. ValueError
        naming the key for an index that does not fit the tensor's shape."""
        shape = self.shape(key)

        def fits(s: slice, n: int) -> bool:
            start, stop = 0 if s.start is None else s.start, n if s.stop is None else s.stop
            return s.step in (None, 1) and 0 <= start <= stop <= n
        if len(index) > len(shape) or not all(fits(s, n) for s, n in zip(index, shape)):
            raise ValueError(f"{key}: block {tuple(index)} does not fit the tensor's shape {shape} (expected at "
                             f"most {len(shape)} slices of step 1 within it)")
        return np.array(self.get(key)[tuple(index)])
