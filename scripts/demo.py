"""Import a VLM and run it on an image: the shortest path through jaxvlm.

    python scripts/demo.py                      # a tiny random Qwen2-VL made on the spot (CPU, seconds)
    python scripts/demo.py --model DIR_OR_HUB_ID --dtype bfloat16

Prints the next-token distribution for a question about a drawn image, and the forward's time.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from jaxvlm import FastVisionModel


def digit_image(text="7", size=84):
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((size // 3, size // 4), text, fill="black", font_size=size // 2)
    return image


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model dir or hub id (default: a tiny random Qwen2-VL)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 for the tiny model)")
    args = ap.parse_args()
    model_name = args.model
    if model_name is None:
        from jaxvlm.tiny import save_random_model
        model_name = tempfile.mkdtemp(prefix="jaxvlm-tiny-")
        save_random_model(model_name, "qwen2_vl")
        print(f"made a tiny random Qwen2-VL in {model_name}")
    dtype = args.dtype or ("float32" if args.model is None else "bfloat16")
    model, processor = FastVisionModel.from_pretrained(model_name, dtype=dtype, load_in_4bit=False)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is this?"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[prompt], images=[digit_image()], return_tensors="np")
    for step in ("compile + forward", "forward"):
        start = time.perf_counter()
        logits = np.asarray(model(**batch), dtype=np.float32)
        print(f"{step}: {time.perf_counter() - start:.2f} s, logits {logits.shape}")
    probs = np.exp(logits[0, -1] - logits[0, -1].max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:5]
    print("next token:", ", ".join(f"{processor.tokenizer.decode([int(i)])!r} {probs[i]:.3f}" for i in top))


if __name__ == "__main__":
    main()
