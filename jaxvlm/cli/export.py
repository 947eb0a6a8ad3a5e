"""jaxvlm-export: write a model (with its LoRA adapter merged, or the adapter alone) as an HF directory.

    jaxvlm-export --model Qwen/Qwen2-VL-2B-Instruct --adapter out/adapter --output merged/
    jaxvlm-export --model DIR --adapter out/adapter --output merged4/ --save-method merged_4bit
    jaxvlm-export --model DIR --adapter out/adapter --push-to-hub you/my-vlm --token $HF_TOKEN

save methods: merged_16bit (default: LoRA merged into the base, 16-bit safetensors), merged_4bit
(bitsandbytes NF4 that transformers + bitsandbytes load), lora (the PEFT adapter only).
"""
from __future__ import annotations

import argparse
import os
import sys

from jaxvlm.cli.common import add_debug_option, check_adapter_dir, run_tool
from jaxvlm.export import SAVE_METHODS


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="jaxvlm-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory or hub id (the base)")
    ap.add_argument("--adapter", help="a LoRA adapter directory to merge")
    ap.add_argument("--output", help="directory to write (refused if it exists and is not empty)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    ap.add_argument("--save-method", default="merged_16bit", choices=SAVE_METHODS)
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default), float16 or float32")
    ap.add_argument("--push-to-hub", metavar="REPO_ID", help="upload to this hub repo instead of --output")
    ap.add_argument("--token", default=None)
    ap.add_argument("--private", action="store_true")
    add_debug_option(ap)
    args = ap.parse_args(argv)
    if not args.output and not args.push_to_hub:
        ap.error("give --output DIR or --push-to-hub REPO_ID")
    return args


def check_output(args) -> None:
    """Raises if --output is a file, or a non-empty directory without --overwrite."""
    out = args.output
    if out is None or not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise NotADirectoryError(f"--output {out}: exists and is not a directory")
    if os.listdir(out) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite to write into it")


def main(argv=None) -> int:
    return run_tool("jaxvlm-export", export, parse_args(argv))


def export(args) -> int:
    check_output(args)  # before loading the model, which takes minutes for a large one
    if args.adapter:
        check_adapter_dir(args.adapter)
    from jaxvlm import FastVisionModel
    model, processor = FastVisionModel.from_pretrained(args.model, dtype=args.dtype, load_in_4bit=False)
    if args.adapter:
        from jaxvlm.converters.peft_adapter import load_adapter
        model = load_adapter(model, args.adapter)
    if args.push_to_hub:
        url = model.push_to_hub_merged(args.push_to_hub, processor, save_method=args.save_method,
                                       token=args.token, private=args.private, max_shard_size=args.max_shard_size)
        print(f"pushed to {url}")
    else:
        model.save_pretrained_merged(args.output, processor, save_method=args.save_method,
                                     max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
