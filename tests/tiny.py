"""Tiny random-weight Qwen2-VL / Qwen2.5-VL models built from configs with transformers (no download).

Token ids: the tiny vocab (300) holds the special tokens at the ids the configs name below.
"""
import torch

VOCAB = 300
IMAGE_TOKEN_ID = 290
VIDEO_TOKEN_ID = 291
VISION_START_ID = 288
VISION_END_ID = 289

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, rope_theta=1e6, max_position_embeddings=1024,
             rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
_TOKENS = dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
               vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID)


def qwen2_vl_config(**text_overrides):
    from transformers import Qwen2VLConfig
    return Qwen2VLConfig(
        text_config={**_TEXT, **text_overrides},
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **_TOKENS)


def qwen2_5_vl_config(**text_overrides):
    from transformers import Qwen2_5_VLConfig
    return Qwen2_5_VLConfig(
        text_config={**_TEXT, **text_overrides},
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=56, fullatt_block_indexes=[1, 3], hidden_act="silu"),
        **_TOKENS)


CONFIGS = {"qwen2_vl": qwen2_vl_config, "qwen2_5_vl": qwen2_5_vl_config}


def build_hf_model(family, seed=0, **text_overrides):
    """A random-weight transformers model of the family, fp32, eval mode."""
    from transformers import AutoModelForImageTextToText
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(CONFIGS[family](**text_overrides), dtype=torch.float32)
    # transformers' init leaves norms at 1 and biases at 0; randomise them so the parity test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
