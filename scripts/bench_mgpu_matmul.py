"""jax's Mosaic GPU Hopper matmul (`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`) against XLA's dot (cuBLAS)
at the Qwen2-VL-2B training step's GEMM shapes (an experiment of issue 19: a fused LoRA matmul in Pallas would start
from such a kernel, adding the adapter's columns and an activation to its pipeline and epilogue).

    PYTHONPATH=. python -m scripts.bench_mgpu_matmul [--full]

Hopper GPUs only (wgmma, TMA). Per shape (M, K, N; bf16, M a multiple of 128 as the kernel requires): XLA's
`jnp.dot` and the kernel's best of a small grid of its TuningConfig (`--full`: a larger one), each the best of 5
timings of back-to-back calls; the kernel's output checked against XLA's. One JSON line per shape.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import time

import jax
import jax.numpy as jnp

SHAPES = [(4096, 1536, 8960), (4096, 8960, 1536), (8192, 1280, 5120), (8192, 5120, 1280)]


def best_time_us(f, *args, calls: int = 30) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            y = f(*args)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - t0) / calls)
    return 1e6 * min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="tiles 64/128 wide, 4 or 5 stages, grid widths 1/4/8")
    args = ap.parse_args(argv)
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    dims = (hm.MatmulDimension.N, hm.MatmulDimension.M)
    grid = itertools.product((128,), (64, 128) if args.full else (128,), (4, 5) if args.full else (4,), dims, dims,
                             (1, 4, 8) if args.full else (1, 8))
    configs = [hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=steps, epi_tile_n=64,
                               epi_tile_m=64, grid_minor_dim=minor, grid_tile_width=width, wg_dimension=wg)
               for tm, tn, steps, wg, minor, width in grid]
    for m, k, n in SHAPES:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
        xla = jax.jit(jnp.dot)
        ref = xla(a, b).astype(jnp.float32)
        t_xla = best_time_us(xla, a, b)
        best = (float("inf"), None)
        for cfg in configs:
            try:
                f = jax.jit(functools.partial(hm.matmul, c=None, config=cfg))
                err = float(jnp.max(jnp.abs(f(a, b).astype(jnp.float32) - ref)))
                t = best_time_us(f, a, b, calls=10)
            except Exception as e:  # a config the kernel refuses (shared memory, divisibility)
                print(json.dumps(dict(skipped=str(cfg), why=str(e)[:200])), flush=True)
                continue
            if t < best[0]:
                best = (t, dict(tm=cfg.tile_m, tn=cfg.tile_n, steps=cfg.max_concurrent_steps,
                                wg=str(cfg.wg_dimension), minor=str(cfg.grid_minor_dim), width=cfg.grid_tile_width,
                                err=err))
        flops = 2 * m * n * k
        print(json.dumps(dict(bench="mgpu-matmul-feasibility", m=m, k=k, n=n, xla_us=round(t_xla, 1),
                              xla_tflops=round(flops / t_xla / 1e6, 1), mgpu_us=round(best[0], 1),
                              mgpu_tflops=round(flops / best[0] / 1e6, 1), mgpu_config=best[1], jax=jax.__version__,
                              device=jax.devices()[0].device_kind)), flush=True)


if __name__ == "__main__":
    main()
