"""Peak device memory and time of `from_pretrained` for the Qwen2-VL-2B geometry: 16-bit vs load_in_4bit.

    python scripts/bench_load.py --dir /tmp/qwen2vl-2b-random    # writes the checkpoint there first

Writes a random-weight bf16 checkpoint in transformers' layout (4.4 GB) once, then loads it in a fresh
process per mode and prints one JSON line each: seconds, peak device GiB, GiB held by the params after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def write_checkpoint(path: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxvlm.converters.hf_export import hf_tensors, write_safetensors
    from jaxvlm.tiny import save_tiny_processor
    from scripts.bench_common import MODEL, qwen2_vl_2b_config

    cfg = qwen2_vl_2b_config()
    abstract = nnx.eval_shape(lambda: MODEL(cfg, jnp.bfloat16))
    key = jax.random.key(0)
    draws = iter(range(10**6))

    def draw(spec):
        return np.asarray(0.02 * jax.random.normal(jax.random.fold_in(key, next(draws)), spec.shape, jnp.bfloat16))

    def tensors():
        yield from hf_tensors(abstract, MODEL.INFO.stacked, draw)
    os.makedirs(path, exist_ok=True)
    write_safetensors(tensors(), path, max_shard_size="2GB")
    from scripts.bench_common import qwen2_vl_2b_hf_config
    qwen2_vl_2b_hf_config().save_pretrained(path)
    save_tiny_processor(path, "qwen2_vl")


def load_once(path: str, mode: str) -> dict:
    import jax
    from flax import nnx

    from jaxvlm import FastVisionModel
    t0 = time.perf_counter()
    model, _ = FastVisionModel.from_pretrained(path, load_in_4bit=mode == "4bit", load_in_16bit=mode == "16bit")
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    params = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return dict(bench="load", geometry="qwen2-vl-2b", mode=mode, device=jax.devices()[0].device_kind,
                seconds=round(seconds, 1), peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
                params_gib=round(params / 2**30, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/qwen2vl-2b-random")
    ap.add_argument("--mode", choices=["16bit", "4bit"], help="(internal) load once in this process")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(load_once(args.dir, args.mode)), flush=True)
        return
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        t0 = time.perf_counter()
        write_checkpoint(args.dir)
        print(json.dumps({"bench": "write_checkpoint", "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    for mode in ("16bit", "4bit"):
        subprocess.run([sys.executable, "-m", "scripts.bench_load", "--dir", args.dir, "--mode", mode], check=True)


if __name__ == "__main__":
    main()
