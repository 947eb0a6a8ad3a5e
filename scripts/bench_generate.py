"""Decode speed of the Qwen2-VL-2B geometry (random weights): jaxvlm vs transformers' generate, same GPU.

    python scripts/bench_generate.py [--batch 1 8] [--new 128] [--quant 16bit nf4] [--hf]

Each prompt: one 448x448 image (256 merged tokens) + 32 text tokens. Generation runs exactly --new tokens
(no EOS). Prints one JSON line per (implementation, weights, batch): generate seconds (median of 3 after a
warm-up), new tokens/s, peak device memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from scripts.bench_common import batch_inputs, qwen2_vl_2b_config, qwen2_vl_2b_hf_config, random_model


def timed(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_jaxvlm(cfg, model, batch, new, label):
    inputs = batch_inputs(cfg, batch, 32, 448)
    raw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
               pixel_values=inputs["pixel_values"], image_grid_thw=np.array([[1, 32, 32]] * batch))
    from jaxvlm.generate import generate
    seconds = timed(lambda: generate(model, **raw, max_new_tokens=new, eos_token_id=-1, pad_token_id=0))
    stats = jax.devices()[0].memory_stats() or {}
    return dict(impl="jaxvlm", weights=label, batch=batch, new_tokens=new, generate_s=round(seconds, 3),
                new_tokens_per_s=round(batch * new / seconds, 1),
                peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2))


def bench_hf(batch, new):
    import torch
    from transformers import Qwen2VLForConditionalGeneration
    hf_cfg = qwen2_vl_2b_hf_config()
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration._from_config(hf_cfg, torch_dtype=torch.bfloat16).eval()
    cfg = qwen2_vl_2b_config()
    inputs = batch_inputs(cfg, batch, 32, 448)
    ids = torch.tensor(inputs["input_ids"], device="cuda", dtype=torch.long)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
              pixel_values=torch.tensor(inputs["pixel_values"], device="cuda", dtype=torch.bfloat16),
              image_grid_thw=torch.tensor([[1, 32, 32]] * batch, device="cuda"),
              mm_token_type_ids=(ids == cfg.image_token_id).long())

    def run():
        with torch.no_grad():
            model.generate(**kw, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(run)
    out = dict(impl="transformers", weights="16bit", batch=batch, new_tokens=new, generate_s=round(seconds, 3),
               new_tokens_per_s=round(batch * new / seconds, 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    del model
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--quant", nargs="+", default=["16bit"], choices=["16bit", "nf4"])
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate (needs torch+cuda)")
    ap.add_argument("--dir", help="load this checkpoint (scripts/bench_load.py writes one) instead of random "
                                  "weights, so that the NF4 run's peak memory never holds a 16-bit copy")
    ap.add_argument("--one", help="(internal) run one implementation/weights in this process")
    args = ap.parse_args()
    if args.one is None:
        # One process per configuration, so that each peak-memory reading is its own.
        for one in [*args.quant, *(["hf"] if args.hf else [])]:
            subprocess.run([sys.executable, "-m", "scripts.bench_generate", "--one", one, "--new", str(args.new),
                            "--batch", *map(str, args.batch), *(["--dir", args.dir] if args.dir else [])],
                           check=True)
        return
    if args.one == "hf":
        for b in args.batch:
            print(json.dumps(bench_hf(b, args.new)), flush=True)
        return
    cfg = qwen2_vl_2b_config()
    if args.dir:
        from jaxvlm import FastVisionModel
        model, _ = FastVisionModel.from_pretrained(args.dir, load_in_4bit=args.one == "nf4")
    else:
        model = random_model(cfg, jnp.bfloat16, nf4=args.one == "nf4")
    for b in args.batch:
        print(json.dumps(bench_jaxvlm(cfg, model, b, args.new, args.one)), flush=True)


if __name__ == "__main__":
    main()
