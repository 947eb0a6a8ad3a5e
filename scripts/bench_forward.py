"""First compile + forward time of the Qwen2-VL-2B geometry with random weights (run on the GPU).

    PYTHONPATH=. python scripts/bench_forward.py [--batch 4] [--text 256] [--image 448] [--dtype bfloat16]

Prints one JSON line per batch size: compile+first-call seconds, steady forward seconds (median of 10),
tokens/s and peak device memory. No checkpoint is read: weights are random, drawn on the device.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scripts.bench_common import batch_inputs, qwen2_vl_2b_config, random_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    cfg = qwen2_vl_2b_config()
    t0 = time.perf_counter()
    model = random_model(cfg, dtype)
    jax.block_until_ready(nnx.state(model))
    init_s = time.perf_counter() - t0
    forward = nnx.jit(lambda m, x: m.forward(x))
    for b in args.batch:
        inputs = jax.device_put(batch_inputs(cfg, b, args.text, args.image))
        t0 = time.perf_counter()
        jax.block_until_ready(forward(model, inputs))
        first = time.perf_counter() - t0
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(model, inputs))
            times.append(time.perf_counter() - t0)
        step = float(np.median(times))
        stats = jax.devices()[0].memory_stats() or {}
        tokens = inputs["input_ids"].size
        print(json.dumps(dict(
            bench="forward", geometry="qwen2-vl-2b", device=jax.devices()[0].device_kind, dtype=args.dtype, batch=b,
            seq=int(inputs["input_ids"].shape[1]), random_init_s=round(init_s, 2), compile_and_first_s=round(first, 2),
            forward_s=round(step, 4), tokens_per_s=round(tokens / step), peak_gib=round(
                stats.get("peak_bytes_in_use", 0) / 2**30, 2))))


if __name__ == "__main__":
    main()
