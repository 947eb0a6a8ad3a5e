"""LoRA training step of the Qwen2-VL-2B geometry (random weights) through jaxvlm's SFTTrainer, on the GPU.

    python scripts/bench_train.py --batch 4 8 --weights bf16 nf4 --remat unsloth full

Workload (the benchmark issue's): each sample one 448x448 image (256 merged tokens) + 256 text tokens,
LoRA r=16 on every Linear Unsloth's default regex picks (vision and language, attention and MLP),
AdamW, remat per block. Each configuration runs in its own process; one JSON line each: median step
seconds over 10 steps after 3 warm-ups, tokens/s, peak device GiB, model FLOP utilisation.
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

from scripts.bench_forward import batch_inputs, qwen2_vl_2b_config, random_model

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM


def model_flops_per_step(cfg, batch: int, seq: int, patches: int) -> float:
    """6 x params x tokens for the matmuls of a full step (LoRA still back-propagates through the base),
    plus attention (12 x layers x tokens x seq x width), text and vision."""
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


def run_one(batch: int, weights: str, remat: str, steps: int = 13) -> dict:
    from jaxvlm import FastVisionModel
    from jaxvlm.train.trainer import SFTConfig, SFTTrainer
    cfg = qwen2_vl_2b_config()
    model = random_model(cfg, jnp.bfloat16)
    if weights == "nf4":
        from scripts.bench_generate import quantize_nf4_model
        model = quantize_nf4_model(model)
    model.max_seq_length = 2048
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16)
    FastVisionModel.for_training(model, use_gradient_checkpointing=remat)
    inputs = batch_inputs(cfg, batch, 256, 448)
    raw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
               pixel_values=inputs["pixel_values"], image_grid_thw=np.array([[1, 32, 32]] * batch))
    labels = inputs["input_ids"].copy()
    labels[:, :2 + 256] = -100

    class SyntheticTrainer(SFTTrainer):
        def micro_batch(self, index):
            return {**raw, "labels": labels}, list(range(batch))

    trainer = SyntheticTrainer(model, processing_class=None, data_collator=lambda *a, **k: None,
                               train_dataset=[{}], args=SFTConfig(
                                   per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                                   max_steps=steps, learning_rate=1e-4, optim="adamw_torch", logging_steps=0,
                                   output_dir="/tmp/bench_train"))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    step_s = float(np.median([batch * inputs["input_ids"].shape[1] / r["tokens_per_s"]
                              for r in trainer.log_history[3:]]))
    seq = inputs["input_ids"].shape[1]
    stats = jax.devices()[0].memory_stats() or {}
    flops = model_flops_per_step(cfg, batch, seq, 1024)
    return dict(bench="train", impl="jaxvlm", geometry="qwen2-vl-2b", weights=weights, remat=remat, batch=batch,
                seq=seq, device=jax.devices()[0].device_kind, step_s=round(step_s, 4),
                tokens_per_s=round(batch * seq / step_s), peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
                mfu=round(flops / step_s / H100_BF16_FLOPS, 3), run_s=round(wall, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--weights", nargs="+", default=["bf16"], choices=["bf16", "nf4"])
    ap.add_argument("--remat", nargs="+", default=["unsloth"], help="unsloth (host offload), full, dots")
    ap.add_argument("--one", nargs=3, metavar=("BATCH", "WEIGHTS", "REMAT"), help="(internal)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1], args.one[2])), flush=True)
        return
    for weights in args.weights:
        for remat in args.remat:
            for b in args.batch:
                subprocess.run([sys.executable, "-m", "scripts.bench_train", "--one", str(b), weights, remat])


if __name__ == "__main__":
    main()
