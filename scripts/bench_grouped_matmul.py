"""The Mosaic GPU grouped matmul (jaxvlm.kernels.grouped_matmul) against XLA's ragged_dot_general, on a Hopper GPU.

    python -m scripts.bench_grouped_matmul

Qwen3-VL-30B-A3B's expert products (128 experts; gate_up 2048 -> 1536, down 768 -> 2048) for the (token,
expert) pairs of a batch of 4 and 8 samples of 454 tokens with top-8 routing (random, so groups are uneven),
and the products of rank-16 LoRA factors on them (x A^T: in -> 16, then (x A^T) B^T: 16 -> out; padded to the
kernel's width of 128): relative error of the product and of the gradients (input; weight for the LoRA
factors, which are trained), and the median time of each path (product alone, product + gradients). One JSON
line per shape and batch.
"""
from __future__ import annotations

import json
import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.kernels import grouped_matmul as gm
from scripts.bench_kernels import median_us

EXPERTS, TOP_K, SEQ, RANK = 128, 8, 454, 16
# name: (out, in, whether the weight is trained)
SHAPES = {"gate_up_proj": (1536, 2048, False), "down_proj": (2048, 768, False),
          "gate_up_proj.lora_A": (RANK, 2048, True), "gate_up_proj.lora_B": (1536, RANK, True),
          "down_proj.lora_A": (RANK, 768, True), "down_proj.lora_B": (2048, RANK, True)}


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    rng = np.random.default_rng(0)
    for batch in (4, 8):
        m = batch * SEQ * TOP_K
        sizes = jnp.asarray(np.bincount(rng.integers(0, EXPERTS, m), minlength=EXPERTS), jnp.int32)
        for name, (out, inp, trained) in SHAPES.items():
            x = jnp.asarray(rng.standard_normal((m, inp)), jnp.bfloat16)
            w = jnp.asarray(rng.standard_normal((EXPERTS, out, inp)) * 0.02, jnp.bfloat16)
            g = jnp.asarray(rng.standard_normal((m, out)), jnp.bfloat16)
            line = dict(bench="grouped_matmul", weight=name, rows=m, out=out, inp=inp, experts=EXPERTS,
                        device=jax.devices()[0].device_kind)
            paths = {"xla": gm.xla_grouped_matmul, "mgpu": gm.padded(gm._mgpu_grouped_matmul)}
            results = {}
            for label, f in paths.items():
                try:
                    fwd = jax.jit(f)
                    if trained:
                        both = jax.jit(lambda x, w, s, f=f: jax.vjp(lambda x_, w_: f(x_, w_, s), x, w)[1](g))
                    else:
                        both = jax.jit(lambda x, w, s, f=f: jax.vjp(lambda x_: f(x_, w, s), x)[1](g)[0])
                    results[label] = (fwd(x, w, sizes), both(x, w, sizes))
                    line[f"{label}_ms"] = round(median_us(fwd, x, w, sizes, n=20) / 1e3, 3)
                    line[f"{label}_with_grads_ms"] = round(median_us(both, x, w, sizes, n=20) / 1e3, 3)
                except Exception as e:  # a lowering failure is a result too
                    line[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
            if len(results) == 2:
                line["rel_err_out"] = rel(results["mgpu"][0], results["xla"][0])
                grads = [jax.tree.leaves(results[k][1]) for k in ("mgpu", "xla")]
                line["rel_err_dx"] = rel(grads[0][0], grads[1][0])
                if trained:
                    line["rel_err_dw"] = rel(grads[0][1], grads[1][1])
                line["speedup"] = round(line["xla_ms"] / line["mgpu_ms"], 2)
                line["speedup_with_grads"] = round(line["xla_with_grads_ms"] / line["mgpu_with_grads_ms"], 2)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
