"""Qwen2-VL and Qwen2.5-VL: the family's config, host-side inputs and top module.

The vision tower is jaxvlm.models.qwen_vision, the M-RoPE language model jaxvlm.models.qwen_text. Both
model types share this class: Qwen2.5-VL changes only the vision tower (RMSNorm + gated MLP blocks,
window attention with a few full-attention blocks), which `VisionConfig`'s flags carry. Attribute paths
mirror transformers' in-memory module paths (`model.visual.blocks.attn.qkv.weight`,
`model.language_model.layers.self_attn.q_proj.weight`, `lm_head.weight`), blocks stacked.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.layers import ACTIVATIONS, Linear, scatter_rows
from jaxvlm.models.base import ConfigError, FamilyInfo, TinySpec, VisionLanguageModel
from jaxvlm.models.qwen_inputs import qwen_inputs
from jaxvlm.models.qwen_text import (ASSISTANT_TURN, TINY_SPECIAL_TOKENS, USER_TURN, VISION_TOKENS,
                                     MRoPEModelMethods, TextConfig, TextModel)
from jaxvlm.models.qwen_vision import VisionConfig, VisionTransformer, layout_fill, vision_layout

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    tokens_per_second: float | None = None  # Qwen2.5-VL: video positions per second; None: per frame


def from_hf(hf) -> Qwen2VLConfig:
    """Our config from a transformers Qwen2VLConfig / Qwen2_5_VLConfig (flat or nested config.json)."""
    model_type = hf.model_type
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not a Qwen2-VL family model ({', '.join(MODEL_TYPES)})")
    t, v = hf.text_config, hf.vision_config

    rope = dict(t.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"text_config.rope_parameters.rope_type={rope_type!r}: only the default M-RoPE is supported")
    head_dim = t.hidden_size // t.num_attention_heads
    section = tuple(rope.get("mrope_section", (16, 24, 24)))
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise ConfigError(
            f"text_config.rope_parameters.mrope_section={list(section)}: expected 3 sections summing to "
            f"head_dim/2 = {head_dim // 2}")
    if getattr(t, "use_sliding_window", False):
        raise ConfigError("text_config.use_sliding_window=true is not supported (Qwen2-VL checkpoints leave it off)")
    for where, act in (("text_config.hidden_act", t.hidden_act), ("vision_config.hidden_act", v.hidden_act)):
        if act not in ACTIVATIONS:
            raise ConfigError(f"{where}={act!r}: expected one of {sorted(ACTIVATIONS)}")

    text = TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads or t.num_attention_heads, rms_norm_eps=t.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", 1e6)), mrope_section=section, hidden_act=t.hidden_act)

    vrope = dict(getattr(v, "rope_parameters", None) or {})
    if model_type == "qwen2_vl":
        vision = VisionConfig(
            depth=v.depth, hidden_size=v.embed_dim, out_hidden_size=v.hidden_size,
            intermediate_size=int(v.embed_dim * v.mlp_ratio), num_heads=v.num_heads, hidden_act=v.hidden_act,
            in_channels=v.in_channels, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size, rope_theta=float(vrope.get("rope_theta", 10000.0)),
            rmsnorm_gated=False, window_size=0, fullatt_block_indexes=())
    else:
        vision = VisionConfig(
            depth=v.depth, hidden_size=v.hidden_size, out_hidden_size=v.out_hidden_size,
            intermediate_size=v.intermediate_size, num_heads=v.num_heads, hidden_act=v.hidden_act,
            in_channels=v.in_channels, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size, rope_theta=float(vrope.get("rope_theta", 10000.0)),
            rmsnorm_gated=True, window_size=v.window_size,
            fullatt_block_indexes=tuple(int(i) for i in v.fullatt_block_indexes))
        unit = v.spatial_merge_size * v.patch_size
        if v.window_size % unit:
            raise ConfigError(f"vision_config.window_size={v.window_size}: expected a multiple of "
                              f"spatial_merge_size * patch_size = {unit}")
    if vision.out_hidden_size != text.hidden_size:
        raise ConfigError(f"vision output width {vision.out_hidden_size} != text hidden_size {text.hidden_size}")
    return Qwen2VLConfig(
        model_type=model_type, text=text, vision=vision, image_token_id=hf.image_token_id,
        video_token_id=hf.video_token_id, vision_start_token_id=hf.vision_start_token_id,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(t, "max_position_embeddings", None),
        tokens_per_second=None if model_type == "qwen2_vl" else float(getattr(v, "tokens_per_second", 2)))



# ----------------------------------------------------------------------------------------------
# Host-side inputs: positions and vision segments, computed in numpy from the processor's outputs so
# that the jit'd forward sees only arrays.


def prepare_inputs(cfg: Qwen2VLConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, n_pad_patches: int = 0,
                   **unused) -> dict[str, np.ndarray]:
    """The arrays the jit'd forward takes, from what the processor returns (numpy or anything array-like).

    Extra processor outputs (mm_token_type_ids, ...) are accepted; image and video tokens are found from
    input_ids. Videos' temporal positions: frame steps (Qwen2-VL), or tokens_per_second x second_per_grid_ts
    (Qwen2.5-VL).
    """
    out, grid = qwen_inputs(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts, n_pad_patches=n_pad_patches, image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id, spatial_merge_size=cfg.vision.spatial_merge_size,
        patch_dim=cfg.vision.patch_dim, tokens_per_second=cfg.tokens_per_second)
    if grid is not None:
        out.update(vision_layout(cfg.vision, grid))
    return out


class Qwen2VLModel(nnx.Module):
    def __init__(self, cfg: Qwen2VLConfig, dtype):
        self.visual = VisionTransformer(cfg.vision, dtype)
        self.language_model = TextModel(cfg.text, dtype)


class Qwen2VLForConditionalGeneration(MRoPEModelMethods, VisionLanguageModel):
    """Qwen2-VL / Qwen2.5-VL: `model.visual`, `model.language_model`, `lm_head` (absent when tied)."""

    INFO = FamilyInfo(
        model_types=MODEL_TYPES,
        stacked=("model.language_model.layers", "model.visual.blocks"),
        # transformers 4.x checkpoints on disk (and transformers 5's save_pretrained) use the older names.
        legacy_keys=((r"^model\.(layers|embed_tokens|norm)\.", r"model.language_model.\1."),
                     (r"^visual\.", "model.visual.")),
        # Exports write the older names: what transformers 5 writes for this family, and all 4.x reads.
        export_keys=((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")),
        ignored_keys=(r"rotary_emb\.inv_freq$",),
        # The output head and the vision-to-text merger stay 16-bit, as Unsloth (SKIP_QUANTIZATION_MODULES)
        # and its bnb-4bit Qwen2-VL checkpoints keep them; the patch embedding is a convolution in
        # transformers, which bitsandbytes does not quantize either.
        quant_skip=("lm_head", "merger", "patch_embed"),
        processor_classes=(("qwen2_vl", "Qwen2VLProcessor"), ("qwen2_5_vl", "Qwen2_5_VLProcessor")),
        vision_tokens=VISION_TOKENS,
        instruction_part=USER_TURN,
        response_part=ASSISTANT_TURN,
    )
    TINY = TinySpec(
        special_tokens=TINY_SPECIAL_TOKENS,
        pad_token="<|endoftext|>", eos_token="<|im_end|>",
        # Qwen2-VL's template, minus tools and vision ids: a default system turn, then each message with
        # its images/videos as <|vision_start|><|image_pad|><|vision_end|> in content order.
        chat_template=(
            "{% for message in messages %}"
            "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
            "<|im_end|>\n{% endif %}"
            "<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for content in message['content'] %}"
            "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
            "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|im_end|>\n"
            "{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
        # Small images: a 56-wide, 84-high image becomes a 6x4 grid of 14-pixel patches, 6 image tokens.
        image_processor={
            "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2,
            "temporal_patch_size": 2, "min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
        # Small videos: each frame resized on its own, 3136..12544 pixels; 4 frames of 56x84 become a
        # 2x6x4 grid, 12 video tokens.
        video_processor={
            "video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "merge_size": 2,
            "temporal_patch_size": 2, "size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16},
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
    )

    def __init__(self, cfg: Qwen2VLConfig, dtype=jnp.bfloat16):
        super().__init__(cfg, dtype)
        self.model = Qwen2VLModel(cfg, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, dtype=dtype))

    @classmethod
    def config_from_hf(cls, hf_config) -> Qwen2VLConfig:
        return from_hf(hf_config)

    @classmethod
    def tiny_config(cls, model_type: str, size: str = "test", **text_overrides):
        return _tiny_config(model_type, size, cls.TINY.special_tokens, text_overrides)

    # Batches padded to one length and one patch count differ only in the vision segments' arrays.
    PER_SHARD_INPUTS = True

    def prepare_inputs(self, **processor_outputs) -> dict[str, np.ndarray]:
        return prepare_inputs(self.config, **processor_outputs)

    def input_fill(self, name: str, inputs: dict[str, np.ndarray]):
        return layout_fill(name, inputs)

    def embed(self, inputs: dict[str, jax.Array]) -> jax.Array:
        """Token embeddings `[batch, seq, hidden]` with the image and video tokens replaced by the vision tower's output."""
        h = self.model.language_model.embed_tokens(inputs["input_ids"])
        if "pixel_values" in inputs:
            h = scatter_rows(h, inputs["image_pos"], self.model.visual(inputs["pixel_values"], inputs))
        return h

    def hidden_states(self, inputs: dict[str, jax.Array]) -> jax.Array:
        h, _ = self.model.language_model(self.embed(inputs), inputs["position_ids"], inputs["attention_mask"])
        return h

    def prefill(self, inputs, cache, key_mask):
        return self.model.language_model(self.embed(inputs), inputs["position_ids"], key_mask, cache, 0)



def _tiny_config(model_type: str, size: str, special_tokens: dict[str, int], text_overrides: dict):
    """A tiny transformers config: 300-token vocab, 64-wide text model; Qwen2.5-VL with window blocks
    (a 56-pixel window) and full-attention blocks."""
    import transformers
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, rope_theta=1e6, max_position_embeddings=1024,
                rms_norm_eps=1e-6, bos_token_id=285, eos_token_id=287,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    if size == "demo":  # twice as wide and deeper, still seconds per hundred steps on a CPU
        text.update(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    text.update(text_overrides)
    tokens = dict(image_token_id=special_tokens["<|image_pad|>"], video_token_id=special_tokens["<|video_pad|>"],
                  vision_start_token_id=special_tokens["<|vision_start|>"],
                  vision_end_token_id=special_tokens["<|vision_end|>"])
    width, heads = (32, 2) if size == "test" else (64, 4)
    if model_type == "qwen2_vl":
        return transformers.Qwen2VLConfig(
            text_config=text, vision_config=dict(
                depth=2, embed_dim=width, hidden_size=text["hidden_size"], mlp_ratio=2, num_heads=heads,
                in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2), **tokens)
    return transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(
            depth=4, hidden_size=width, intermediate_size=48 if size == "test" else 128, num_heads=heads,
            out_hidden_size=text["hidden_size"], in_channels=3, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3], hidden_act="silu"), **tokens)
