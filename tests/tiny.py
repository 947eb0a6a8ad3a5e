"""Tiny random-weight transformers models (torch) for parity tests; the offline pieces live in jaxvlm.tiny."""
import torch

from jaxvlm.tiny import (CONFIGS, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID, VOCAB,  # noqa: F401
                         qwen2_5_vl_config, qwen2_vl_config, save_tiny_processor)


def build_hf_model(family, seed=0, **text_overrides):
    """A random-weight transformers model of the family, fp32, eval mode."""
    from transformers import AutoModelForImageTextToText
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(CONFIGS[family](**text_overrides), dtype=torch.float32)
    # transformers' init leaves norms at 1 and biases at 0; randomise them so the parity test sees them.
    # Its small init also makes attention nearly uniform, which would hide position (rotary) errors:
    # larger query/key weights make attention depend on positions, as in a trained model.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv.weight")):
                p.mul_(8.0)
    return model.eval()
