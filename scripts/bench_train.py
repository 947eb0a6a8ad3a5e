"""LoRA training step of the Qwen2-VL-2B geometry (random weights) through jaxvlm's SFTTrainer, on the GPU.

    python -m scripts.bench_train --batch 4 8 --weights bf16 nf4 --remat unsloth full
    python -m scripts.bench_train --batch 4 --attn xla auto --loss-chunk 0 512 --trace $OUT/trace

Workload (the benchmark issue's): each sample one 448x448 image (256 merged tokens) + `--text` text
tokens, LoRA r=16 on every Linear Unsloth's default regex picks (vision and language, attention and
MLP), AdamW, remat per block. Each configuration runs in its own process; one JSON line each: median
step seconds over 10 steps after 3 warm-ups, tokens/s, peak device GiB, model FLOP utilisation.
With --trace DIR the first configuration is also profiled (3 steps) and its GPU kernel time is
summarised by kind and by kernel (DIR/summary.json, and printed).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from scripts.bench_forward import GEOMETRIES, batch_inputs, geometry_config, random_model

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM


def model_flops_per_step(cfg, batch: int, seq: int, patches: int) -> float:
    """6 x params x tokens for the matmuls of a full step (LoRA still back-propagates through the base),
    plus attention (12 x layers x tokens x seq x width; causal text attention counted in full), text
    and vision."""
    t, v = cfg.text, cfg.vision
    text_params = t.num_layers * (t.hidden_size * (t.hidden_size + 2 * t.num_kv_heads * t.head_dim) +
                                  t.hidden_size * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    text_params += t.vocab_size * t.hidden_size  # lm_head
    vision_params = v.depth * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    merger = (v.hidden_size * 4) ** 2 + v.hidden_size * 4 * v.out_hidden_size
    tokens, vis_tokens = batch * seq, batch * patches
    flops = 6 * (text_params * tokens + (vision_params + merger / 4) * vis_tokens)
    flops += 12 * t.num_layers * tokens * seq * t.hidden_size
    flops += 12 * v.depth * vis_tokens * patches * v.hidden_size
    return flops


KINDS = (("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
         ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "triton_gemm")),
         ("copy host<->device", ("memcpy", "dtoh", "htod", "d2h", "h2d")),
         ("other (XLA fusions)", ("",)))


def summarize_trace(trace_dir: str, steps: int) -> dict:
    """GPU kernel time per step from a jax.profiler perfetto trace: by kind and the top kernels."""
    import glob
    import gzip
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", "")).upper()}
    per_name: dict[str, float] = {}
    count: dict[str, int] = {}
    hlo: dict[str, str] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            per_name[e["name"]] = per_name.get(e["name"], 0.0) + e.get("dur", 0.0)
            count[e["name"]] = count.get(e["name"], 0) + 1
            hlo.setdefault(e["name"], str({k: v for k, v in e.get("args", {}).items()
                                           if k in ("hlo_op", "hlo_module", "long_name", "tf_op")})[:200])
    by_kind: dict[str, float] = {}
    for name, us in per_name.items():
        low = name.lower()
        kind = next(k for k, keys in KINDS if any(key in low for key in keys))
        by_kind[kind] = by_kind.get(kind, 0.0) + us
    ms = lambda us: round(us / 1000 / steps, 3)  # noqa: E731
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:40]
    return dict(gpu_ms_per_step=ms(sum(per_name.values())),
                by_kind_ms={k: ms(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                top_kernels_ms=[(name[:120], ms(us), count[name] // steps, hlo[name]) for name, us in top])


def run_one(batch: int, weights: str, remat: str, attn: str, loss_chunk: int, text: int = 256, steps: int = 13,
            trace: str | None = None, geometry: str = "qwen2-vl-2b") -> dict:
    from jaxvlm import FastVisionModel, layers
    from jaxvlm.train.trainer import SFTConfig, SFTTrainer
    layers.attention_implementation = attn
    cfg = geometry_config(geometry)
    model = random_model(cfg, jnp.bfloat16, nf4=weights == "nf4")
    model.max_seq_length = max(2048, text + 258)
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16)
    FastVisionModel.for_training(model, use_gradient_checkpointing=False if remat == "none" else remat)
    inputs = batch_inputs(cfg, batch, text, 448)
    raw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
               pixel_values=inputs["pixel_values"], image_grid_thw=np.array([[1, 32, 32]] * batch))
    labels = inputs["input_ids"].copy()
    labels[:, :2 + 256] = -100

    class SyntheticTrainer(SFTTrainer):
        def micro_batch(self, index):
            return {**raw, "labels": labels}, list(range(batch))

    def trainer(n):
        return SyntheticTrainer(model, processing_class=None, data_collator=lambda *a, **k: None,
                                train_dataset=[{}], args=SFTConfig(
                                    per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                                    max_steps=n, learning_rate=1e-4, optim="adamw_torch", logging_steps=0,
                                    output_dir="/tmp/bench_train", loss_chunk_size=loss_chunk))
    t0 = time.perf_counter()
    tr = trainer(steps)
    tr.train()
    wall = time.perf_counter() - t0
    seq = inputs["input_ids"].shape[1]
    step_s = float(np.median([batch * seq / r["tokens_per_s"] for r in tr.log_history[3:]]))
    stats = jax.devices()[0].memory_stats() or {}
    flops = model_flops_per_step(cfg, batch, seq, 1024)
    out = dict(bench="train", impl="jaxvlm", geometry=geometry, weights=weights, remat=remat, attn=attn,
               loss_chunk=loss_chunk, batch=batch, seq=seq, device=jax.devices()[0].device_kind,
               step_s=round(step_s, 4), tokens_per_s=round(batch * seq / step_s),
               peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
               mfu=round(flops / step_s / H100_BF16_FLOPS, 3), run_s=round(wall, 1))
    if trace:
        tr = trainer(2)  # compiled again (a new jit); then profile 3 steps of a warm one
        tr.train()
        jax.profiler.start_trace(trace, create_perfetto_trace=True)
        trainer(3).train()
        jax.profiler.stop_trace()
        summary = summarize_trace(trace, 3)
        with open(os.path.join(trace, "summary.json"), "w") as f:
            json.dump({"config": out, **summary}, f, indent=1)
        out["trace"] = summary
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--weights", nargs="+", default=["bf16"], choices=["bf16", "nf4"])
    ap.add_argument("--remat", nargs="+", default=["unsloth"], help="unsloth (host offload), full, dots, none")
    ap.add_argument("--attn", nargs="+", default=["auto"], help="auto (cuDNN on a GPU), xla, cudnn")
    ap.add_argument("--loss-chunk", type=int, nargs="+", default=[512], help="tokens per loss chunk; 0: all logits")
    ap.add_argument("--text", type=int, default=256, help="text tokens per sample (beside 256 image tokens)")
    ap.add_argument("--geometry", default="qwen2-vl-2b", choices=sorted(GEOMETRIES))
    ap.add_argument("--trace", help="profile the first configuration into this directory")
    ap.add_argument("--one", help="(internal) one configuration as JSON")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))), flush=True)
        return
    trace = args.trace
    for weights, remat, attn, chunk, b in itertools.product(args.weights, args.remat, args.attn, args.loss_chunk,
                                                             args.batch):
        one = dict(batch=b, weights=weights, remat=remat, attn=attn, loss_chunk=chunk, text=args.text, trace=trace,
                   geometry=args.geometry)
        trace = None
        r = subprocess.run([sys.executable, "-m", "scripts.bench_train", "--one", json.dumps(one)])
        if r.returncode:
            print(json.dumps(dict(bench="train", error=f"exit {r.returncode}", **one)), flush=True)


if __name__ == "__main__":
    main()
