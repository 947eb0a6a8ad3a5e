"""The peer of bench_train for any geometry of bench_common: transformers + PEFT LoRA training step (bf16).

    PYTHONPATH=. python scripts/bench_hf_peft.py --geometry qwen3-vl-2b --batch 4 8

The workload of bench_train (and of ../shared/bench/hf_peft_step.py, which is Qwen2-VL only): random bf16
weights, each sample one 448x448 image + `--text` tokens, labels on the text only, LoRA r=16 alpha=16 on the
modules Unsloth's default regex picks (jaxvlm.targets.get_peft_regex over the torch model's Linear names),
gradient checkpointing, torch AdamW lr 1e-4, sdpa attention; median step of 10 after 3 warm-ups. One JSON
line per batch size.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from jaxvlm.targets import get_peft_regex
from scripts.bench_common import GEOMETRIES, load_geometry, vision_tower


def run(geometry: str, batch: int, text: int, image: int = 448) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText
    hf_config = GEOMETRIES[geometry]()
    _, cfg = load_geometry(geometry)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(hf_config, dtype=torch.bfloat16, attn_implementation="sdpa")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=get_peft_regex(linears))
    model = get_peft_model(model, lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    vision = vision_tower(cfg)
    grid = image // vision.patch_size
    n_img = grid * grid // vision.spatial_merge_size**2
    seq = n_img + text + 2
    ids = torch.randint(0, 150000, (batch, seq), device="cuda")
    ids[:, 0] = cfg.vision_start_token_id
    ids[:, 1:1 + n_img] = cfg.image_token_id
    ids[:, 1 + n_img] = cfg.vision_start_token_id + 1
    pixels = torch.randn(batch * grid * grid, vision.patch_dim, device="cuda", dtype=torch.bfloat16)
    thw = torch.tensor([[1, grid, grid]] * batch, device="cuda")
    mm = (ids == cfg.image_token_id).long()
    labels = ids.clone()
    labels[:, :2 + n_img] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_grid_thw=thw,
                    mm_token_type_ids=mm, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    return dict(bench="train", impl="transformers+peft", geometry=geometry, weights="bf16", remat="full", batch=batch,
                seq=seq, device=torch.cuda.get_device_name(), step_s=round(step_s, 4),
                tokens_per_s=round(batch * seq / step_s), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="qwen3-vl-2b", choices=sorted(GEOMETRIES))
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--text", type=int, default=256)
    args = ap.parse_args()
    for batch in args.batch:
        print(json.dumps(run(args.geometry, batch, args.text)), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
