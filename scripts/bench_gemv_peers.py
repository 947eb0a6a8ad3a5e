"""One-row products (a batch-1 decode step's GEMVs) at the Qwen2-VL-2B weight shapes: jaxvlm's XLA path against
cuBLAS (torch) and bitsandbytes' native NF4 GEMV, on the GPU. Each implementation in its own process:

    PYTHONPATH=.:.peers/bnb python -m scripts.bench_gemv_peers    # .peers/bnb: scripts/fetch_peers.sh

Per shape, a stack of `--layers` random weights (so that the L2 does not hold them) is multiplied, each by its own
row of x, in one jit (jax) or one CUDA graph (torch); microseconds a product and TB/s of weight bytes read (bf16:
2 bytes a weight; NF4: the packed codes and the absmax, ~0.52). jax bf16 and NF4 go through `jaxvlm.layers.linear`
as generation's decode step does (its one-row reduction, an NF4 weight dequantized inside it); torch bf16 is
`x @ W.T` (cuBLAS), bitsandbytes NF4 `bnb.matmul_4bit` on a 1-row x (its `gemv_4bit` kernel), double-quantized
absmax as bitsandbytes' and our defaults. One JSON line per implementation, weights and shape, with the largest
error against the float32 product of the dequantized weight.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# gate_up: the sibling product (training); gate: one of the two, as the NF4 decode step forms them
SHAPES = {"gate_up": (17920, 1536), "gate": (8960, 1536), "down": (1536, 8960), "q_o": (1536, 1536), "k_v": (256, 1536)}


def _line(impl, weights, shape, n, k, seconds, layers, nbytes, err):
    us = seconds / layers * 1e6
    return dict(bench="gemv", impl=impl, weights=weights, shape=shape, n=n, k=k, us=round(us, 2),
                tbps=round(nbytes / (us * 1e-6) / 1e12, 3), max_err=err)


def run_jax(layers: int, reps: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxvlm import layers as L
    from jaxvlm.quant.nf4 import dequantize_nf4, quantize_nf4
    for shape, (n, k) in SHAPES.items():
        w = jax.random.normal(jax.random.PRNGKey(0), (layers, n, k), jnp.float32).astype(jnp.bfloat16)
        x = jax.random.normal(jax.random.PRNGKey(1), (layers, 1, k), jnp.float32).astype(jnp.bfloat16)
        q = [quantize_nf4(w[i]) for i in range(layers)]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *q)
        for weights, stack in (("bf16", w), ("nf4", stacked)):
            f = jax.jit(lambda x, s: jnp.stack([L.linear(x[i], jax.tree.map(lambda a: a[i], s))
                                                for i in range(layers)]))
            y = f(x, stack).block_until_ready()
            t = time.perf_counter()
            for _ in range(reps):
                y = f(x, stack)
            y.block_until_ready()
            seconds = (time.perf_counter() - t) / reps
            dense = w[0] if weights == "bf16" else dequantize_nf4(q[0], jnp.float32)
            want = x[0].astype(jnp.float32) @ dense.astype(jnp.float32).T
            err = float(jnp.max(jnp.abs(y[0].astype(jnp.float32) - want)))
            nbytes = n * k * 2 if weights == "bf16" else q[0].codes.nbytes + q[0].absmax.nbytes
            print(json.dumps(_line("jaxvlm", weights, shape, n, k, seconds, layers, nbytes, err)), flush=True)


def run_torch(layers: int, reps: int):
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemv_peers --impl torch: no CUDA device for torch")
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    torch.manual_seed(0)
    for shape, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda").to(torch.bfloat16) for _ in range(layers)]
        xs = [torch.randn(1, k, device="cuda").to(torch.bfloat16) for _ in range(layers)]
        qs = [F.quantize_4bit(w, quant_type="nf4", compress_statistics=True) for w in ws]
        calls = {"bf16": (lambda: [x @ w.t() for x, w in zip(xs, ws)]),
                 "nf4": (lambda: [bnb.matmul_4bit(x, p.t(), quant_state=s) for x, (p, s) in zip(xs, qs)])}
        for weights, call in calls.items():
            with torch.no_grad():
                ys = call()  # warm-up (and bitsandbytes' lazy setup) outside the graph
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    ys = call()
                graph.replay()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1e3 / reps
                dense = ws[0].float() if weights == "bf16" else F.dequantize_4bit(*qs[0]).float()
                err = float((ys[0].float() - xs[0].float() @ dense.t()).abs().max())
            s = qs[0][1]
            nbytes = n * k * 2 if weights == "bf16" else qs[0][0].numel() + s.absmax.numel()
            print(json.dumps(_line("torch" if weights == "bf16" else "bitsandbytes", weights, shape, n, k, seconds,
                                   layers, nbytes, err)), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        (run_jax if a.impl == ["jax"] else run_torch)(a.layers, a.reps)
        return
    for impl in a.impl:  # each in its own process: JAX and torch do not share the GPU's memory well
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        subprocess.run([sys.executable, "-m", "scripts.bench_gemv_peers", "--one", "--impl", impl, "--layers",
                        str(a.layers), "--reps", str(a.reps)], env=env, check=False)


if __name__ == "__main__":
    main()
