"""Qwen3-VL (dense): the family's config, vision tower with deepstack, language model, host inputs, top module.

What differs from Qwen2.5-VL (jaxvlm.models.qwen2_vl), as transformers' modeling_qwen3_vl.py does it:
  vision  a patch embedding with a bias; a learned position table (`pos_embed`, a square grid) resampled
          bilinearly to each image's patch grid and added to the patch embeddings; LayerNorm blocks with a
          `linear_fc1`/`linear_fc2` MLP, every block attending within its image; a merger, and one
          "deepstack" merger per `deepstack_visual_indexes` layer, applied to that block's output;
  text    q/k RMSNorm over each head before the rotary, an explicit head_dim, no q/k/v bias by default,
          and M-RoPE with the temporal/height/width frequencies interleaved (t h w t h w ... t) rather than
          in three chunks; the deepstack features are added to the hidden states of the first decoder
          layers' outputs at the image tokens.
The positions of `get_rope_index` are Qwen2-VL's (jaxvlm.models.qwen_inputs.rope_index), each video frame a
grid of its own (the processor writes a timestamp before each frame's tokens). Attribute paths mirror transformers' module paths
(`model.visual.blocks.attn.qkv.weight`, `model.visual.deepstack_merger_list.0.linear_fc1.weight`,
`model.language_model.layers.self_attn.q_norm.weight`, `lm_head.weight`), blocks and layers stacked.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.layers import (
    ACTIVATIONS,
    Embedding,
    LayerNorm,
    Linear,
    dropout_key,
    linear,
    next_dropout_key,
    scan_blocks,
    scatter_rows,
)
from jaxvlm.models import qwen_text
from jaxvlm.models.base import ConfigError, FamilyInfo, TinySpec, VisionLanguageModel
from jaxvlm.models.qwen_inputs import qwen_inputs
from jaxvlm.models.qwen_text import ASSISTANT_TURN, TINY_SPECIAL_TOKENS, USER_TURN, VISION_TOKENS, MRoPEModelMethods
from jaxvlm.models.qwen_vision import VisionAttention, VisionConfig, layout_fill, vision_cos_sin, vision_layout

MODEL_TYPE = "qwen3_vl"


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention_bias: bool
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]  # frequencies read from the (t, h, w) positions, interleaved
    hidden_act: str
    qk_norm: ClassVar[bool] = True  # the attention layout qwen_text.Attention reads

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig:
    tower: VisionConfig  # the blocks' geometry (window_size 0: every block attends within its image)
    num_position_embeddings: int  # a square grid of learned positions
    deepstack_visual_indexes: tuple[int, ...]  # blocks whose outputs feed the deepstack mergers

    @property
    def grid_side(self) -> int:
        return int(round(self.num_position_embeddings**0.5))


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    model_type: str
    text: TextConfig
    vision: Qwen3VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None


def _int_size(where: str, value) -> int:
    if not isinstance(value, int):
        raise ConfigError(f"{where}={value!r}: only a single int is supported")
    return value


def text_config_from_hf(t, config_class=None, **extra) -> TextConfig:
    """The language model's config from a transformers Qwen3-VL text config; `config_class` (a TextConfig
    subclass) and `extra` fields for a variant's own settings (the MoE family's experts)."""
    rope = dict(t.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"text_config.rope_parameters.rope_type={rope.get('rope_type')!r}: only the default "
                          f"(interleaved M-RoPE) is supported")
    # transformers' Qwen3-VL always interleaves (mrope_interleaved is ignored there), and so do we.
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    section = tuple(int(s) for s in rope.get("mrope_section", (24, 20, 20)))
    if len(section) != 3 or sum(section) != head_dim // 2 or 3 * max(section[1:]) > head_dim // 2:
        raise ConfigError(f"text_config.rope_parameters.mrope_section={list(section)}: expected 3 sections summing "
                          f"to head_dim/2 = {head_dim // 2}, the height and width ones at most a third of it")
    if t.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"text_config.hidden_act={t.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
    return (config_class or TextConfig)(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads or t.num_attention_heads, head_dim=head_dim,
        attention_bias=bool(getattr(t, "attention_bias", False)), rms_norm_eps=t.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", 5e6)), mrope_section=section, hidden_act=t.hidden_act, **extra)


def vision_config_from_hf(v) -> Qwen3VisionConfig:
    """The vision tower's config from a transformers Qwen3-VL vision config."""
    if v.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"vision_config.hidden_act={v.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
    vrope = dict(getattr(v, "rope_parameters", None) or {})
    if vrope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"vision_config.rope_parameters.rope_type={vrope.get('rope_type')!r}: expected 'axial'")
    tower = VisionConfig(
        depth=v.depth, hidden_size=v.hidden_size, out_hidden_size=v.out_hidden_size,
        intermediate_size=v.intermediate_size, num_heads=v.num_heads, hidden_act=v.hidden_act,
        in_channels=v.in_channels, patch_size=_int_size("vision_config.patch_size", v.patch_size),
        temporal_patch_size=_int_size("vision_config.temporal_patch_size", v.temporal_patch_size),
        spatial_merge_size=v.spatial_merge_size, rope_theta=float(vrope.get("rope_theta", 10000.0)),
        rmsnorm_gated=False, window_size=0, fullatt_block_indexes=())
    if v.hidden_size % v.num_heads or tower.head_dim % 4:
        raise ConfigError(f"vision_config.hidden_size={v.hidden_size} / num_heads={v.num_heads}: expected a head "
                          f"dimension that is a multiple of 4 (the 2D rotary's rows and columns)")
    side = int(round(v.num_position_embeddings**0.5))
    if side * side != v.num_position_embeddings:
        raise ConfigError(f"vision_config.num_position_embeddings={v.num_position_embeddings}: expected a square")
    deepstack = tuple(int(i) for i in v.deepstack_visual_indexes)
    if len(set(deepstack)) != len(deepstack) or any(not 0 <= i < v.depth for i in deepstack):
        raise ConfigError(f"vision_config.deepstack_visual_indexes={list(deepstack)}: expected distinct block "
                          f"indexes in [0, depth={v.depth})")
    return Qwen3VisionConfig(tower, v.num_position_embeddings, deepstack)


def from_hf(hf, text: TextConfig | None = None) -> Qwen3VLConfig:
    """Our config from a transformers Qwen3VLConfig; ConfigError naming a config.json field we do not support.
    `text`: the language model's config when a variant builds its own (else read from hf.text_config)."""
    if text is None:
        if hf.model_type != MODEL_TYPE:
            raise ConfigError(f"model_type {hf.model_type!r} is not a Qwen3-VL dense model ({MODEL_TYPE})")
        text = text_config_from_hf(hf.text_config)
    vision = vision_config_from_hf(hf.vision_config)
    if vision.tower.out_hidden_size != text.hidden_size:
        raise ConfigError(f"vision_config.out_hidden_size={vision.tower.out_hidden_size} != text_config.hidden_size="
                          f"{text.hidden_size}")
    return Qwen3VLConfig(
        model_type=hf.model_type, text=text, vision=vision,
        image_token_id=hf.image_token_id, video_token_id=hf.video_token_id,
        vision_start_token_id=hf.vision_start_token_id,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(hf.text_config, "max_position_embeddings", None))


# ----------------------------------------------------------------------------------------------
# Host-side inputs.


def position_taps(grid_thw: np.ndarray, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps into the `side x side` learned position grid for every patch: indices [patches, 4] int32
    and weights [patches, 4] float32, patches in merge-block order (transformers'
    get_vision_interpolation_indices_and_weights with align_corners=True, in its fp32 arithmetic)."""
    indices, weights = [], []
    for t, h, w in (tuple(int(x) for x in g) for g in grid_thw):
        def axis_taps(n):
            src = np.arange(n, dtype=np.float32) * np.float32(side - 1) / np.float32(max(n - 1, 1))
            floor = np.floor(src)
            offsets = np.arange(2)
            taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
            weight = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
            return taps, weight.astype(np.float32)
        (ht, hw), (wt, ww) = axis_taps(h), axis_taps(w)
        idx = (ht[:, None, :, None] * side + wt[None, :, None, :]).reshape(h, w, 4)
        wgt = (hw[:, None, :, None] * ww[None, :, None, :]).reshape(h, w, 4)
        block = lambda a: a.reshape(h // merge, merge, w // merge, merge, 4).transpose(0, 2, 1, 3, 4).reshape(-1, 4)
        indices.append(np.tile(block(idx), (t, 1)))
        weights.append(np.tile(block(wgt), (t, 1)))
    return np.concatenate(indices).astype(np.int32), np.concatenate(weights).astype(np.float32)


def prepare_inputs(cfg: Qwen3VLConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, n_pad_patches: int = 0,
                   **unused) -> dict[str, np.ndarray]:
    """The arrays the jit'd forward takes, from what the processor returns (numpy or anything array-like).

    Extra processor outputs (mm_token_type_ids, ...) are accepted; image and video tokens are found from
    input_ids. Each video frame is a run of tokens of its own (the processor writes a timestamp before each),
    so each frame is one grid row here, for the positions and for the vision tower alike.
    """
    vision = cfg.vision.tower
    out, grid = qwen_inputs(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw, n_pad_patches=n_pad_patches,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        spatial_merge_size=vision.spatial_merge_size, patch_dim=vision.patch_dim, split_video_frames=True)
    if grid is not None:
        taps, tap_weights = position_taps(grid, cfg.vision.grid_side, vision.spatial_merge_size)
        out.update(pos_taps=taps, pos_tap_weights=tap_weights, **vision_layout(vision, grid))
    return out


# ----------------------------------------------------------------------------------------------
# Vision tower.


class Conv3d(nnx.Module):
    """A Conv3d's `weight [out, in, t, p, p]` and `bias [out]` (HF layout); not a Linear, so LoRA and 4-bit
    quantization leave it alone, as PEFT and bitsandbytes do with transformers' Conv3d."""

    def __init__(self, out_features: int, kernel: tuple[int, ...], *, dtype):
        self.weight = nnx.Param(jnp.zeros((out_features, *kernel), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype))


class PatchEmbed(nnx.Module):
    """The 3D-conv patch embedding as one matmul: each patch row is already (C, T, P, P) flattened."""

    def __init__(self, cfg: VisionConfig, dtype):
        self.proj = Conv3d(cfg.hidden_size, (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size,
                                             cfg.patch_size), dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.proj.weight.get_value()
        return linear(x, w.reshape(w.shape[0], -1), self.proj.bias.get_value())


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, stack):
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, stack=stack)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, stack=stack)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.linear_fc2(ACTIVATIONS[self.act](self.linear_fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, stack):
        self.norm1 = LayerNorm(cfg.hidden_size, eps=1e-6, dtype=dtype, stack=stack)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=1e-6, dtype=dtype, stack=stack)
        self.attn = VisionAttention(cfg, dtype, stack)
        self.mlp = VisionMLP(cfg, dtype, stack)

    def __call__(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments, True)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Concatenates each merge**2 block of patches and projects it to the language model's width. The final
    merger normalises each patch first; the deepstack mergers normalise the concatenation (postshuffle)."""

    def __init__(self, cfg: VisionConfig, dtype, postshuffle: bool):
        width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(width if postshuffle else cfg.hidden_size, eps=1e-6, dtype=dtype)
        self.linear_fc1 = Linear(width, width, bias=True, dtype=dtype)
        self.linear_fc2 = Linear(width, cfg.out_hidden_size, bias=True, dtype=dtype)
        self.width = width

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[merged, out_hidden]` from patches `[patches, hidden]`."""
        x = self.norm(x.reshape(-1, self.width)) if self.postshuffle else self.norm(x).reshape(-1, self.width)
        return self.linear_fc2(ACTIVATIONS["gelu"](self.linear_fc1(x)))


def _layer_slice(stack: nnx.Module, start: int, stop: int) -> nnx.Module:
    """Layers start..stop-1 of a stacked module (every array leaf, whatever the weight type, has the layer axis)."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: Qwen3VisionConfig, dtype):
        tower = cfg.tower
        self.cfg = cfg
        self.remat = None  # a REMAT_POLICIES name while training (set by FastVisionModel.for_training)
        self.patch_embed = PatchEmbed(tower, dtype)
        self.pos_embed = Embedding(cfg.num_position_embeddings, tower.hidden_size, dtype=dtype)
        self.blocks = VisionBlock(tower, dtype, stack=(tower.depth,))
        self.merger = PatchMerger(tower, dtype, postshuffle=False)
        self.deepstack_merger_list = nnx.List([PatchMerger(tower, dtype, postshuffle=True)
                                               for _ in cfg.deepstack_visual_indexes])

    def __call__(self, pixel_values: jax.Array, inputs: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(merged image embeddings `[merged, out_hidden]`, deepstack features `[deepstack, merged, out_hidden]`)
        from patches `[patches, patch_dim]`."""
        tower = self.cfg.tower
        x = self.patch_embed(pixel_values.astype(self.patch_embed.proj.weight.get_value().dtype))
        pos = jnp.sum(self.pos_embed(inputs["pos_taps"]).astype(jnp.float32) * inputs["pos_tap_weights"][..., None],
                      axis=1)
        x = x + pos.astype(x.dtype)
        cos, sin = vision_cos_sin(tower, inputs["rot_pos"])
        segments = [inputs["full_attn_index"]]

        def block(blk, h):
            return blk(h, cos, sin, segments), None

        # The blocks run as scans between the deepstack taps, so that no tap rides in a scan carry (which
        # autodiff would keep for every block).
        features, start = {}, 0
        for stop in sorted(self.cfg.deepstack_visual_indexes) + [tower.depth - 1]:
            if stop >= start:  # blocks start..stop
                with dropout_key(next_dropout_key()):  # each scan its own dropout keys (none in inference)
                    x, _ = scan_blocks(_layer_slice(self.blocks, start, stop + 1), x, block, remat=self.remat)
                start = stop + 1
            features[stop] = x
        deepstack = [merger(features[i]) for merger, i in zip(self.deepstack_merger_list,
                                                              self.cfg.deepstack_visual_indexes)]
        merged = self.merger(x)
        return merged, (jnp.stack(deepstack) if deepstack else jnp.zeros((0, *merged.shape), merged.dtype))


# ----------------------------------------------------------------------------------------------
# Language model.


def interleaved_mrope_cos_sin(cfg: TextConfig, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[batch, seq, head_dim]` for M-RoPE positions `[3, batch, seq]`, frequencies interleaved.

    Frequency f takes its angle from the height position when f % 3 == 1 and f < 3 * mrope_section[1],
    from the width position when f % 3 == 2 and f < 3 * mrope_section[2], else from the temporal one
    (transformers' Qwen3VLTextRotaryEmbedding); the halves are then repeated (rotate_half layout).
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, d/2]
    f = np.arange(d // 2)
    axis = np.zeros(d // 2, np.int32)
    axis[(f % 3 == 1) & (f < 3 * cfg.mrope_section[1])] = 1
    axis[(f % 3 == 2) & (f < 3 * cfg.mrope_section[2])] = 2
    freqs = freqs[axis, :, :, f].transpose(1, 2, 0)  # [B, T, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class TextModel(qwen_text.TextModel):
    """Qwen's decoder stack with Qwen3-VL's interleaved M-RoPE (its layers: qwen_text.DecoderLayer with the
    q/k norms this TextConfig switches on; deepstack through qwen_text.TextModel)."""

    def cos_sin(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return interleaved_mrope_cos_sin(self.cfg, position_ids)


# ----------------------------------------------------------------------------------------------
# The family.


class Qwen3VLModel(nnx.Module):
    TEXT_MODEL: ClassVar[type] = TextModel

    def __init__(self, cfg: Qwen3VLConfig, dtype):
        self.visual = VisionTransformer(cfg.vision, dtype)
        self.language_model = self.TEXT_MODEL(cfg.text, dtype)


class Qwen3VLForConditionalGeneration(MRoPEModelMethods, VisionLanguageModel):
    """Qwen3-VL (dense): `model.visual`, `model.language_model`, `lm_head` (absent when tied)."""

    INFO = FamilyInfo(
        model_types=(MODEL_TYPE,),
        stacked=("model.language_model.layers", "model.visual.blocks"),
        # Qwen3-VL checkpoints (the hub's and transformers' save_pretrained) use the in-memory names.
        legacy_keys=(),
        export_keys=(),
        ignored_keys=(),
        # As Unsloth keeps them (SKIP_QUANTIZATION_MODULES: lm_head, merger): the output head, the merger and
        # the deepstack mergers stay 16-bit; the patch embedding (a Conv3d) and the position table (an
        # Embedding) are not Linear, so they stay 16-bit anyway.
        quant_skip=("lm_head", "merger", "deepstack_merger_list", "patch_embed", "pos_embed"),
        processor_classes=((MODEL_TYPE, "Qwen3VLProcessor"),),
        vision_tokens=VISION_TOKENS,
        instruction_part=USER_TURN,
        response_part=ASSISTANT_TURN,
    )
    TINY = TinySpec(
        special_tokens=TINY_SPECIAL_TOKENS,
        pad_token="<|endoftext|>", eos_token="<|im_end|>",
        # Qwen3-VL's template, minus tools, reasoning and vision ids: no default system turn, then each
        # message with its images/videos as <|vision_start|><|image_pad|><|vision_end|> in content order.
        chat_template=(
            "{% for message in messages %}"
            "<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for content in message['content'] %}"
            "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
            "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|im_end|>\n"
            "{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
        # Small images, Qwen3-VL's 16-pixel patches: a 56-wide, 84-high image becomes a 6x4 grid, 6 image tokens.
        image_processor={
            "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "merge_size": 2,
            "temporal_patch_size": 2, "min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 64,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        # Small videos: the pixel budget counts every frame (4096..32768 for the whole video); 4 frames of
        # 56x84 become a 2x6x4 grid, 12 video tokens. Frames are sampled at 2 fps (Qwen3-VL's default).
        video_processor={
            "video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16, "merge_size": 2,
            "temporal_patch_size": 2, "size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 32},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    )

    MODEL: ClassVar[type] = Qwen3VLModel  # a variant's own (the MoE family's text model inside)

    def __init__(self, cfg: Qwen3VLConfig, dtype=jnp.bfloat16):
        super().__init__(cfg, dtype)
        self.model = self.MODEL(cfg, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, dtype=dtype))

    @classmethod
    def config_from_hf(cls, hf_config) -> Qwen3VLConfig:
        return from_hf(hf_config)

    @classmethod
    def tiny_config(cls, model_type: str, size: str = "test", **text_overrides):
        return _tiny_config(size, cls.TINY.special_tokens, text_overrides)

    # Batches padded to one length and one patch count differ only in the vision segments' arrays.
    PER_SHARD_INPUTS = True

    def prepare_inputs(self, **processor_outputs) -> dict[str, np.ndarray]:
        return prepare_inputs(self.config, **processor_outputs)

    def input_fill(self, name: str, inputs: dict[str, np.ndarray]):
        return layout_fill(name, inputs)

    def embed(self, inputs: dict[str, jax.Array]):
        """(token embeddings `[batch, seq, hidden]` with the image tokens replaced by the vision tower's
        output, deepstack for `TextModel`: (image_pos, features) or None without images)."""
        h = self.model.language_model.embed_tokens(inputs["input_ids"])
        if "pixel_values" not in inputs:
            return h, None
        image, features = self.model.visual(inputs["pixel_values"], inputs)
        return scatter_rows(h, inputs["image_pos"], image), (inputs["image_pos"], features)

    def hidden_states(self, inputs: dict[str, jax.Array]) -> jax.Array:
        h, deepstack = self.embed(inputs)
        h, _ = self.model.language_model(h, inputs["position_ids"], inputs["attention_mask"], deepstack=deepstack)
        return h

    def prefill(self, inputs, cache, key_mask):
        h, deepstack = self.embed(inputs)  # the deepstack features enter with the prompt only
        return self.model.language_model(h, inputs["position_ids"], key_mask, cache, 0, deepstack)



def _tiny_config(size: str, special_tokens: dict[str, int], text_overrides: dict):
    """A tiny transformers Qwen3VLConfig with every switch the real checkpoints use: an explicit head_dim
    unlike hidden/heads, q/k norms, interleaved M-RoPE, grouped KV heads, two deepstack taps (feeding two of
    the three text layers), a 7x7 learned position grid resampled to each image's grid."""
    import transformers
    text_overrides = dict(text_overrides)
    tie = text_overrides.pop("tie_word_embeddings", False)  # a top-level field in Qwen3-VL's config
    text = dict(hidden_size=64, intermediate_size=88, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=20, vocab_size=300, max_position_embeddings=1024,
                rms_norm_eps=1e-6, bos_token_id=special_tokens["<|endoftext|>"],
                eos_token_id=special_tokens["<|im_end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=4, hidden_size=32, intermediate_size=40, num_heads=2, deepstack_visual_indexes=[0, 2])
    if size == "demo":  # twice as wide and deeper, still seconds per hundred steps on a CPU
        text.update(hidden_size=128, intermediate_size=256, num_hidden_layers=4, head_dim=32,
                    rope_parameters={**text["rope_parameters"], "mrope_section": [6, 5, 5]})
        vision.update(hidden_size=64, intermediate_size=128, num_heads=4)
    text.update(text_overrides)
    return transformers.Qwen3VLConfig(
        text_config=text,
        vision_config=dict(**vision, out_hidden_size=text["hidden_size"], in_channels=3, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=49,
                           hidden_act="gelu_pytorch_tanh"),
        image_token_id=special_tokens["<|image_pad|>"], video_token_id=special_tokens["<|video_pad|>"],
        vision_start_token_id=special_tokens["<|vision_start|>"],
        vision_end_token_id=special_tokens["<|vision_end|>"], tie_word_embeddings=tie)
