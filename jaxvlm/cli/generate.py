"""jaxvlm-generate: answer a prompt about images or videos with a VLM (optionally with a LoRA adapter).

    jaxvlm-generate --model Qwen/Qwen2-VL-2B-Instruct --image cat.jpg --prompt "Describe this image."
    jaxvlm-generate --model DIR --adapter out/adapter --image a.png --image b.png --prompt "Compare them." \\
        --max-new-tokens 256 --do-sample --temperature 0.7 --top-p 0.9
    jaxvlm-generate --model Qwen/Qwen2.5-VL-3B-Instruct --video clip.mp4 --prompt "What happens?"   # needs PyAV
    jaxvlm-generate --model DIR --image cat.jpg --prompt "Describe this image." --mesh tensor=4   # on 4 devices

The answer streams to stdout as it is generated.
"""
from __future__ import annotations

import argparse
import os
import sys

from jaxvlm.cli.common import add_debug_option, check_adapter_dir, run_tool


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="jaxvlm-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory or hub id")
    ap.add_argument("--adapter", help="a LoRA adapter directory (ours or PEFT's) to apply")
    ap.add_argument("--prompt", required=True, help="the user's message")
    ap.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    ap.add_argument("--video", action="append", default=[],
                    help="a video file (decoded with PyAV: pip install 'jaxvlm[video]'); repeat for several")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=None, help="bfloat16 (default), float16 or float32")
    ap.add_argument("--load-in-4bit", action="store_true", help="store the base weights in NF4")
    ap.add_argument("--max-seq-length", type=int, default=2048)
    ap.add_argument("--mesh", default=None,
                    help="device mesh to generate on, e.g. tensor=4 or data=2,tensor=4 (axes data, fsdp, tensor; left "
                         "out: 1; the sizes multiply to the device count); default: one device")
    add_debug_option(ap)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    return run_tool("jaxvlm-generate", generate, parse_args(argv))


def generate(args) -> int:
    if args.adapter:
        check_adapter_dir(args.adapter)
    from PIL import Image
    from transformers import TextStreamer

    from jaxvlm import FastVisionModel
    from jaxvlm.sharding import as_mesh

    images = []
    for path in args.image:
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as e:  # a missing file, or one PIL cannot decode
            raise ValueError(f"cannot read image {path}: {e.strerror or e}") from e
    for path in args.video:
        if not os.path.isfile(path):
            raise ValueError(f"cannot read video {path}: no such file")
    mesh = as_mesh(args.mesh) if args.mesh else None  # a bad --mesh fails before the model loads
    model, processor = FastVisionModel.from_pretrained(
        args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit, max_seq_length=args.max_seq_length)
    if args.adapter:
        from jaxvlm.converters.peft_adapter import load_adapter
        model = load_adapter(model, args.adapter)
    FastVisionModel.for_inference(model)
    content = ([{"type": "image"} for _ in images] + [{"type": "video"} for _ in args.video]
               + [{"type": "text", "text": args.prompt}])
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    batch = processor(text=[prompt], images=images or None, videos=args.video or None, return_tensors="np")
    tokenizer = processor.tokenizer
    model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                   seed=args.seed, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   mesh=mesh, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
