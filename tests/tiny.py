"""Tiny random-weight transformers models (torch) for parity tests; the offline pieces live in jaxvlm.tiny."""
import torch

from jaxvlm.models.qwen2_vl import Qwen2VLForConditionalGeneration
from jaxvlm.tiny import VOCAB, save_tiny_processor, tiny_config  # noqa: F401 (re-exported to the tests)

_QWEN_TOKENS = Qwen2VLForConditionalGeneration.TINY.special_tokens
IMAGE_TOKEN_ID = _QWEN_TOKENS["<|image_pad|>"]
VIDEO_TOKEN_ID = _QWEN_TOKENS["<|video_pad|>"]
VISION_START_ID = _QWEN_TOKENS["<|vision_start|>"]
VISION_END_ID = _QWEN_TOKENS["<|vision_end|>"]


def build_hf_model(family, seed=0, **text_overrides):
    """A random-weight transformers model of the family, fp32, eval mode."""
    from transformers import AutoModelForImageTextToText
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(family, **text_overrides), dtype=torch.float32)
    # transformers' init leaves norms at 1 and biases at 0; randomise them so the parity test sees them.
    # Its small init also makes attention nearly uniform, which would hide position (rotary) errors:
    # larger query/key weights make attention depend on positions, as in a trained model.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv.weight")):
                p.mul_(8.0)
            if p.ndim >= 2 and not p.any():  # a weight initialised to zero (Gemma 3's mm_input_projection_weight),
                p.normal_(0.0, p.shape[0] ** -0.5)  # which would hide everything before it
    return model.eval()
