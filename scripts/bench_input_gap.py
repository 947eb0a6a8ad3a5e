"""Does the training loop keep the GPU fed? The SFTTrainer's step (Qwen2-VL-2B geometry by default, random weights,
bench_train's synthetic batch) three ways in one process, on the GPU:

    PYTHONPATH=. python -m scripts.bench_input_gap --batch 8

- `trainer`: as it runs (inputs made on the host and put on the device per micro-batch);
- `model_inputs`: the host's own work per micro-batch (prepare_inputs), seconds;
- `device_inputs`: the first micro-batch's inputs put on the device once and reused every step (no host work and no
  host-to-device copy left in the loop): the step the device alone allows.

Steps: median of steps 4-13, as bench_train. One JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from scripts.bench_common import GEOMETRIES, load_geometry, random_model, workload_image
from scripts.bench_train import synthetic_trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", default="qwen2-vl-2b", choices=sorted(GEOMETRIES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="the family's tiny config (a CPU check)")
    args = ap.parse_args()
    from jaxvlm import FastVisionModel
    model_cls, cfg = load_geometry(args.geometry, args.tiny)
    image = workload_image(cfg, args.tiny)
    model = random_model(cfg, jnp.bfloat16, nf4=False, model_cls=model_cls)
    model.max_seq_length = 2048
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16)
    FastVisionModel.for_training(model, use_gradient_checkpointing="full")
    trainer, seq = synthetic_trainer(model, cfg, args.batch, 256, image)

    def step_s(tr):
        return float(np.median([args.batch * seq / r["tokens_per_s"] for r in tr.log_history[3:]]))

    tr = trainer(13)
    tr.train()
    out = dict(bench="input-gap", geometry=args.geometry, batch=args.batch, device=jax.devices()[0].device_kind,
               trainer_step_s=round(step_s(tr), 4))
    batch, _ = tr.micro_batch(0)
    t0 = time.perf_counter()
    for _ in range(5):
        tr.model_inputs(batch)
    out["model_inputs_s"] = round((time.perf_counter() - t0) / 5, 4)
    placed = tr._placed_inputs(0)

    class Resident(type(tr)):
        def _placed_inputs(self, index):
            return placed

    tr = trainer(13)
    tr.__class__ = Resident
    tr.train()
    out["device_inputs_step_s"] = round(step_s(tr), 4)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
