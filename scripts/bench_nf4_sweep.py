"""Configs of the Pallas NF4 decode kernel (jaxvlm.kernels.nf4_matmul), timed as a decode step runs them: one jit
of the products of the layers of a stacked weight (as many as make 120 MB of codes, past the L2; at least 32), one
after another, each layer read in place.

    PYTHONPATH=. python -m scripts.bench_nf4_sweep                 # the Qwen2-VL-2B shapes, a few minutes on an H200
    PYTHONPATH=. python -m scripts.bench_nf4_sweep --cpu-check     # tiny shapes, interpret mode, two configs

For each Linear shape of the 2B geometry (q/o, k/v, gate/up, down; one row of x): XLA's one-row product (today's
decode path: dequantization fused into a float32 multiply + sum) and the kernel, first over (block_n, block_k) at 4
warps and 2 stages, then over (num_warps 2/4/8, num_stages 2/3/4) at the best of those. `us` is the median over 30
calls of the jit divided by the products in it (launch gaps included, as in a decode step); `tbps` the NF4 codes read
per second. One JSON line per (shape, variant); at the end the best config per shape. All four shapes take more than
the device's 10 minutes a call (compiles): pass --shapes to run some. `--configs 32,1,3,4 16,1,8,4 ...` times XLA's
product and the configs given (block_n, block_k, split_k, num_warps) instead of the sweep.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from jaxvlm.kernels import nf4_matmul as nk
from jaxvlm.quant import quantize_nf4
from scripts.bench_kernels import median_us

SHAPES = {"gate_proj/up_proj": (8960, 1536), "down_proj": (1536, 8960), "q_proj/o_proj": (1536, 1536),
          "k_proj/v_proj": (256, 1536)}
CPU_SHAPES = {"tiny": (64, 256)}
L2_DEFEAT = 120e6  # bytes of codes per jit: well past the H200's L2 (60 MB), so that each call reads from HBM


def stack(n: int, k: int, layers: int):
    w = quantize_nf4(0.02 * jax.random.normal(jax.random.key(0), (n, k), jnp.bfloat16))
    return jax.tree.map(lambda a: jnp.stack([a] * layers), w)  # equal layers: the bytes read are what count


def chain(product, layers: int):
    """jit(x, ws -> sum of the layers' products): each layer's product of x, in order, each one read in place."""
    def run(x, ws):
        return sum(product(x, ws, i).astype(jnp.float32) for i in range(layers))
    return jax.jit(run)


def xla_rows(x, ws, i):
    w = jax.tree.map(lambda a: a[i], ws).dequantize(jnp.float32)
    return jnp.sum(x.astype(jnp.float32)[..., None, :] * w, axis=-1).astype(x.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-check", action="store_true")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--configs", nargs="*", metavar="BN,BK,SK,WARPS",
                    help="time these kernel configs (block_n, block_k, split_k, num_warps; 2 stages), not the sweep")
    args = ap.parse_args()
    interpret = args.cpu_check
    shapes = CPU_SHAPES if interpret else {s: SHAPES[s] for s in args.shapes}
    runs = 1 if interpret else 30
    device = jax.devices()[0].device_kind
    best = []
    for name, (n, k) in shapes.items():
        layers = 2 if interpret else max(32, min(512, int(L2_DEFEAT // (n * k // 2))))
        ws = stack(n, k, layers)
        x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
        ref = chain(xla_rows, layers)(x, ws)
        codes_bytes = n * k // 2

        def run(variant, product, config=None):
            line = dict(bench="nf4-sweep", weight=name, n=n, k=k, layers=layers, variant=variant, device=device,
                        **({"config": config} if config else {}))
            try:
                fn = chain(product, layers)
                err = float(jnp.max(jnp.abs(fn(x, ws) - ref)) / jnp.max(jnp.abs(ref)))
                us = median_us(fn, x, ws, n=runs) / layers
                line.update(us=round(us, 2), tbps=round(codes_bytes / us / 1e6, 3), rel_err=err)
            except Exception as e:  # a config that does not lower or compile is a result too
                line["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(line), flush=True)
            return line.get("us", float("inf"))

        run("xla_rows", xla_rows)
        default = nk.default_config(1, n, k)
        found = {}

        def kernel(config):
            key = json.dumps(config, sort_keys=True)
            if key not in found:
                found[key] = run("kernel", lambda x, ws, i: nk.nf4_matmul(x, ws, i, interpret=interpret, **config),
                                 config)
            return found[key]

        if args.configs is not None:
            for spec in args.configs:
                bn, bk, sk, warps = map(int, spec.split(","))
                kernel(dict(block_n=bn, block_k=bk, split_k=sk, num_warps=warps, num_stages=2))
            continue
        kernel(default)
        pairs = [(16, 1), (32, 2)] if interpret else [(bn, bk) for bn in (8, 16, 32, 64) for bk in (1, 2, 4, 8)]
        scored = []
        for bn, bk in pairs:
            if n % bn:
                continue
            c = nk.default_config(1, n, k, block_n=bn)
            if (k // 64) % (bk * c["split_k"]):
                continue
            c.update(block_k=bk)
            scored.append((kernel(c), c))
        us, c = min(scored, key=lambda s: s[0])
        if not interpret:
            for warps in (2, 4, 8):
                for stages in (2, 3, 4):
                    scored.append((kernel(dict(c, num_warps=warps, num_stages=stages)), dict(c, num_warps=warps,
                                                                                            num_stages=stages)))
        us, c = min(scored, key=lambda s: s[0])
        best.append(dict(bench="nf4-sweep", weight=name, variant="best", config=c, us=us,
                         tbps=round(codes_bytes / us / 1e6, 3)))
    for line in best:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
