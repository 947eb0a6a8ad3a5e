"""Llama 3.2 Vision (11B, 90B; `model_type` mllama): images enter the language model through cross-attention layers.

The tiled vision encoder is jaxvlm.models.mllama_vision, the language model (self-attention and gated
cross-attention layers, two stacks) jaxvlm.models.mllama_text; here the projector (`multi_modal_projector`, a
Linear from the encoder's concatenated features to the text width) and the host-side inputs: the processor's
`pixel_values [batch, images, tiles, 3, size, size]`, `aspect_ratio_ids`, `aspect_ratio_mask` and
`cross_attention_mask [batch, seq, images, tiles]` (which tiles each text token may see; expanded to the tiles'
tokens on the device). Positions count real tokens only, as transformers' generate sets them. Attribute paths
mirror transformers 5's (`model.vision_model`, `model.multi_modal_projector`, `model.language_model.layers.N`);
the language model's two stacks number their rows within `model.language_model.layers` (`stacks()`).

Generation caches the self-attention keys and values and, once per prompt, each cross-attention layer's image keys
and values (mllama_text.KVCache); generated tokens see the image tiles the prompt's last token sees, as in
transformers.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.layers import Linear
from jaxvlm.models.base import ConfigError, FamilyInfo, TinySpec, VisionLanguageModel
from jaxvlm.models.mllama_text import MllamaTextConfig, MllamaTextModel, text_config_from_hf
from jaxvlm.models.mllama_vision import (MllamaVisionConfig, MllamaVisionModel, prepare_vision_inputs,
                                         vision_config_from_hf)
from jaxvlm.paths import Stack

MODEL_TYPE = "mllama"


@dataclasses.dataclass(frozen=True)
class MllamaConfig:
    text: MllamaTextConfig
    vision: MllamaVisionConfig
    image_token_id: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None


def from_hf(hf) -> MllamaConfig:
    if hf.model_type != MODEL_TYPE:
        raise ConfigError(f"model_type {hf.model_type!r} is not a Llama 3.2 Vision model ({MODEL_TYPE})")
    t = hf.text_config
    return MllamaConfig(text=text_config_from_hf(t), vision=vision_config_from_hf(hf.vision_config),
                        image_token_id=hf.image_token_index,
                        tie_word_embeddings=bool(getattr(t, "tie_word_embeddings", False)),
                        max_position_embeddings=getattr(t, "max_position_embeddings", None))


def prepare_inputs(cfg: MllamaConfig, input_ids, attention_mask=None, pixel_values=None, aspect_ratio_ids=None,
                   aspect_ratio_mask=None, cross_attention_mask=None, **unused) -> dict[str, np.ndarray]:
    """The arrays the jit'd forward takes, from what MllamaProcessor returns. Without pixel_values the batch is
    text only (the cross-attention layers are skipped, as in transformers)."""
    ids = np.asarray(input_ids).astype(np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, seq], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    out = {"input_ids": ids, "attention_mask": mask,
           "positions": np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)}
    if pixel_values is None:
        return out
    if aspect_ratio_ids is None or aspect_ratio_mask is None or cross_attention_mask is None:
        raise ValueError("pixel_values need aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask (what "
                         "MllamaProcessor returns with them)")
    out.update(prepare_vision_inputs(cfg.vision, pixel_values, aspect_ratio_ids, aspect_ratio_mask))
    tiles = np.asarray(cross_attention_mask)
    b, m, t = np.asarray(pixel_values).shape[:3]
    if tiles.shape != (*ids.shape, m, t):
        raise ValueError(f"cross_attention_mask has shape {tiles.shape}; expected {(*ids.shape, m, t)} (batch, seq, "
                         f"images, tiles)")
    out["cross_tiles"] = tiles.astype(bool)
    return out


class MllamaModel(nnx.Module):
    def __init__(self, cfg: MllamaConfig, dtype):
        self.vision_model = MllamaVisionModel(cfg.vision, dtype)
        self.language_model = MllamaTextModel(cfg.text, dtype)
        self.multi_modal_projector = Linear(cfg.vision.output_dim, cfg.text.hidden_size, bias=True, dtype=dtype)


_CHAT_TEMPLATE = (
    # Llama 3.2 Vision's template, minus tools and dates: <|begin_of_text|>, each turn in headers, images first.
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


class MllamaForConditionalGeneration(VisionLanguageModel):
    """Llama 3.2 Vision: `model.vision_model`, `model.multi_modal_projector`, `model.language_model`, `lm_head`."""

    INFO = FamilyInfo(
        model_types=(MODEL_TYPE,),
        # The vision encoder's stacks; the language model's two (numbered within one prefix) come from stacks().
        stacked=("model.vision_model.transformer.layers", "model.vision_model.global_transformer.layers"),
        # The hub's checkpoints (transformers 4.x names; transformers 5's save_pretrained writes them too).
        legacy_keys=((r"^language_model\.model\.", "model.language_model."),
                     (r"^language_model\.lm_head\.", "lm_head."),
                     (r"^vision_model\.", "model.vision_model."),
                     (r"^multi_modal_projector\.", "model.multi_modal_projector.")),
        export_keys=((r"^model\.language_model\.", "language_model.model."),
                     (r"^lm_head\.", "language_model.lm_head."),
                     (r"^model\.vision_model\.", "vision_model."),
                     (r"^model\.multi_modal_projector\.", "multi_modal_projector.")),
        ignored_keys=(),
        # Unsloth's SKIP_QUANTIZATION_MODULES for mllama: the projector and lm_head.
        quant_skip=("lm_head", "multi_modal_projector"),
        processor_classes=((MODEL_TYPE, "MllamaProcessor"),),
        vision_tokens=("<|image|>",),
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
        sample_arrays=(("pixel_values", ("images",)), ("aspect_ratio_ids", ("images",)),
                       ("aspect_ratio_mask", ("images",)), ("cross_attention_mask", ("seq", "images"))),
        # The cache's image keys and values (k_cross, v_cross; last_cross) are sized by the prompt's images: zero
        # keys and values with last_cross False add exactly nothing (a row that sees no vision token attends to all
        # of them, zero values, and its MLP is gated off), as a text prompt skips the cross-attention layers.
        prompt_sized_cache=True,
    )
    TINY = TinySpec(
        special_tokens={"<|finetune_right_pad_id|>": 285, "<|begin_of_text|>": 286, "<|eot_id|>": 287,
                        "<|start_header_id|>": 288, "<|end_header_id|>": 289, "<|python_tag|>": 290,
                        "<|end_of_text|>": 291, "<|image|>": 292},
        pad_token="<|finetune_right_pad_id|>", eos_token="<|eot_id|>", bos_token="<|begin_of_text|>",
        chat_template=_CHAT_TEMPLATE,
        # 28-pixel tiles of 7-pixel patches (16 patches + the class token), up to 4 tiles per image.
        image_processor={
            "image_processor_type": "MllamaImageProcessor", "size": {"height": 28, "width": 28}, "max_image_tiles": 4,
            "do_resize": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": True, "do_pad": True},
    )

    def __init__(self, cfg: MllamaConfig, dtype=jnp.bfloat16):
        super().__init__(cfg, dtype)
        self.model = MllamaModel(cfg, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, dtype=dtype))

    @classmethod
    def config_from_hf(cls, hf_config) -> MllamaConfig:
        return from_hf(hf_config)

    @classmethod
    def tiny_config(cls, model_type: str, size: str = "test", **text_overrides):
        """Two cross-attention layers among five, llama3 rope scaling, 4 tiles of 28 pixels, 2 local + 2 global
        vision layers with two intermediate features; the image token at vocab_size, as in the checkpoints (the
        embedding has 8 more rows)."""
        import transformers
        tokens = cls.TINY.special_tokens
        text = dict(vocab_size=tokens["<|image|>"], hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                    num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3], rms_norm_eps=1e-5,
                    max_position_embeddings=1024, pad_token_id=tokens["<|finetune_right_pad_id|>"],
                    bos_token_id=tokens["<|begin_of_text|>"], eos_token_id=tokens["<|eot_id|>"],
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})
        if size == "demo":
            text.update(hidden_size=128, intermediate_size=256, num_hidden_layers=6, cross_attention_layers=[1, 4])
        text.update(text_overrides)
        width, layers = (32, 2) if size == "test" else (64, 3)
        vision = dict(hidden_size=width, intermediate_size=2 * width + 4, num_hidden_layers=layers,
                      num_global_layers=2, attention_heads=2, image_size=28, patch_size=7, max_num_tiles=4,
                      intermediate_layers_indices=[1, 0], vision_output_dim=3 * width, norm_eps=1e-5,
                      supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
        return transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=tokens["<|image|>"])

    def stacks(self) -> tuple:
        t = self.config.text
        prefix = "model.language_model"
        return (Stack(f"{prefix}.layers", f"{prefix}.layers", t.self_attention_layers),
                Stack(f"{prefix}.cross_attention_layers", f"{prefix}.layers", t.cross_attention_layers),
                *type(self).INFO.stacked)

    def prepare_inputs(self, **processor_outputs) -> dict[str, np.ndarray]:
        return prepare_inputs(self.config, **processor_outputs)

    def sample_padding(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        out = np.zeros(shape, dtype)
        if name == "aspect_ratio_mask":  # MllamaImageProcessor marks a padding image's first tile as real
            out[..., 0] = 1
        return out

    def vision_states(self, inputs) -> jax.Array:
        """The projector's output for every image tile's tokens: `[batch, images * tiles * tokens, hidden]`."""
        features = self.model.vision_model(inputs["patches"], inputs["aspect_ratio_ids"], inputs["token_valid"],
                                           self.dtype)
        b = features.shape[0]
        return self.model.multi_modal_projector(features).reshape(b, -1, self.config.text.hidden_size)

    def _vision_and_mask(self, inputs, dtype):
        if "patches" not in inputs:
            return None, None
        vision = self.vision_states(inputs).astype(dtype)
        tiles = inputs["cross_tiles"]  # [batch, seq, images, tiles]
        cross = jnp.repeat(tiles, self.config.vision.num_patches, axis=3).reshape(*tiles.shape[:2], -1)
        return vision, cross

    def hidden_states(self, inputs: dict[str, jax.Array]) -> jax.Array:
        lm = self.model.language_model
        h = lm.embed_tokens(inputs["input_ids"])
        vision, cross = self._vision_and_mask(inputs, h.dtype)
        return lm(h, inputs["positions"], inputs["attention_mask"], vision, cross)[0]

    def logits(self, h: jax.Array) -> jax.Array:
        if self.lm_head is None:
            w = self.model.language_model.embed_tokens.weight.get_value()[:self.config.text.vocab_size]
            return jax.lax.dot_general(h, w.astype(h.dtype), (((h.ndim - 1,), (1,)), ((), ())))
        return self.lm_head(h)

    @property
    def max_positions(self) -> int | None:
        return self.config.max_position_embeddings

    def next_positions(self, inputs) -> np.ndarray:
        return (np.asarray(inputs["positions"]).max(axis=1) + 1).astype(np.int32)

    def init_cache(self, batch: int, length: int):
        return self.model.language_model.init_cache(batch, length, self.dtype)

    def prefill(self, inputs, cache, key_mask):
        lm = self.model.language_model
        h = lm.embed_tokens(inputs["input_ids"])
        vision, cross = self._vision_and_mask(inputs, h.dtype)
        return lm(h, inputs["positions"], key_mask, vision, cross, cache, 0)

    def decode(self, tokens, positions, cache, key_mask, index):
        lm = self.model.language_model
        return lm(lm.embed_tokens(tokens[:, None]), positions[:, None], key_mask, cache=cache, index=index)
