"""EXPERIMENT (issue 19): the one-row NF4 product by a native CUDA kernel (nf4_cuda.cu) behind XLA's FFI.

Built with nvcc on first use into ~/.cache/jaxvlm (or $JAXVLM_CUDA_CACHE), registered as the FFI target
"jaxvlm_nf4_gemv". Only for measuring what a kernel outside Pallas buys (JAXVLM_NF4_KERNEL=cuda).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.quant.nf4 import NF4

# (T lanes a row, R rows a team, U chunks in flight, S warps splitting K, min blocks an SM): nf4_cuda.cu's switch.
CONFIGS = [
    (16, 2, 3, 1, 2),
    (16, 2, 2, 1, 3),
    (16, 1, 3, 1, 4),
    (16, 1, 3, 2, 4),
    (8, 2, 3, 2, 2),
    (32, 2, 3, 2, 2),
    (8, 2, 3, 4, 2),
    (16, 2, 3, 4, 2),
    (4, 2, 3, 4, 2),
    (8, 1, 3, 8, 3),
    (2, 1, 3, 8, 3),
    (16, 1, 2, 1, 4),
]
_SRC = os.path.join(os.path.dirname(__file__), "nf4_cuda.cu")


@functools.cache
def _register() -> None:
    src = open(_SRC, "rb").read()
    cache = os.environ.get("JAXVLM_CUDA_CACHE", os.path.expanduser("~/.cache/jaxvlm"))
    os.makedirs(cache, exist_ok=True)
    lib = os.path.join(cache, f"nf4_cuda-{hashlib.sha256(src).hexdigest()[:16]}.so")
    if not os.path.exists(lib):
        nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90,code=sm_90",
               "-I", jax.ffi.include_dir(), _SRC, "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            os.unlink(tmp)
            raise RuntimeError(f"nf4_cuda: nvcc failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, lib)
    handle = ctypes.cdll.LoadLibrary(lib)
    jax.ffi.register_ffi_target("jaxvlm_nf4_gemv", jax.ffi.pycapsule(handle.JaxvlmNf4Gemv), platform="CUDA")


@functools.cache
def _table() -> dict:
    path = os.environ.get("JAXVLM_NF4_CUDA_TABLE")
    return {tuple(map(int, key.split("x"))): v for key, v in json.load(open(path)).items()} if path else {}


def default_config(n: int, k: int) -> int:
    """The config for an [n, k] weight: $JAXVLM_NF4_CUDA_TABLE's ("NxK": index) when it names the shape."""
    if (n, k) in _table():
        return _table()[(n, k)]
    return 2 if n >= 4096 else 6 if k > 2048 else 8


def supported(x: jax.Array, w: NF4, layer: int | None) -> bool:
    rows = int(np.prod(x.shape[:-1]))
    stacked = w.stack_ndim == 1 and layer is not None
    return (len(w.shape) == 2 and (w.stack_ndim == 0 and layer is None or stacked) and w.double_quantized
            and x.shape[-1] == w.shape[1] and w.shape[1] % 64 == 0 and w.blocksize == 64 and rows == 1)


def nf4_gemv(x: jax.Array, w: NF4, layer: int | None = None, config: int | None = None) -> jax.Array:
    """x [..., K] (one row) @ dequantize(w[layer]).T -> [..., N] in x's dtype; w a stack read in place."""
    _register()
    n, k = w.shape
    s = w if layer is not None else jax.tree.map(lambda a: a[None], w)
    lyr = 0 if layer is None else layer
    cfg = default_config(n, k) if config is None else config
    call = jax.ffi.ffi_call("jaxvlm_nf4_gemv", jax.ShapeDtypeStruct((n,), jnp.bfloat16))
    y = call(x.reshape(k).astype(jnp.bfloat16), s.codes, s.absmax, s.nested_absmax, s.nested_table, s.offset,
             layer=np.int64(lyr), n=np.int64(n), k=np.int64(k), config=np.int64(cfg))
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)
