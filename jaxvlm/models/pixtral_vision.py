"""The Pixtral vision tower: transformers' `PixtralVisionModel`, as `llava` (with a pixtral vision_config) and
`mistral3` (Mistral Small 3.x) use it.

Every image keeps its own size (height and width multiples of `patch_size`, at most `image_size`; the processor
pads a batch to its largest height and width and says each image's real size in `image_sizes`). On the host
(`prepare_pixtral_inputs`) each image's real patches are cut row by row and all images' patches are laid end to
end into ONE sequence. The tower then applies the patch convolution (no bias; a product with its flattened
kernel), `ln_pre` (RMSNorm), and pre-norm layers (`attention_norm`, attention with q/k/v/o_proj and no biases,
`ffn_norm`, a gated `feed_forward`), all RMSNorms with transformers' fixed eps 1e-5. Attention is
block-diagonal: each image attends only to its own patches (transformers builds a dense block mask; here
`layers.segment_attention` gathers each image into its own row). There is no norm after the last layer.

Positions: a 2-D rotary over each image's own patch grid. With inverse frequencies f_j = theta^(-2j / head_dim),
j < head_dim / 2, a patch at (row, col) gets the angles [row * f_0, row * f_2, ..., col * f_1, col * f_3, ...]
(the even frequencies for rows, the odd ones for columns), repeated twice and applied in the rotate-half layout
(not interleaved). This is what transformers 5's axial `PixtralVisionRotaryEmbedding` computes from
(row, col) position ids and what older versions computed from a table indexed by
row * (image_size // patch_size) + col.

Attribute paths mirror transformers' names relative to `PixtralVisionModel` (`patch_conv.weight`, `ln_pre.weight`,
`transformer.layers.attention.q_proj.weight`, `transformer.layers.feed_forward.gate_proj.weight`,
`transformer.layers.attention_norm.weight`, `transformer.layers.ffn_norm.weight`), the layers stacked along a
leading layer axis (`STACKED`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.layers import (
    ACTIVATIONS,
    ConvWeight,
    GatedMLP,
    Linear,
    RMSNorm,
    apply_rotary,
    linear,
    scan_blocks,
    segment_attention,
    sibling_linears,
)
from jaxvlm.models.base import ConfigError
from jaxvlm.models.qwen_vision import segment_index
from jaxvlm.paths import per_layer_keys

# The stacked blocks (HF module paths relative to PixtralVisionModel; see jaxvlm.paths).
STACKED = ("transformer.layers",)

# transformers' PixtralRMSNorm(hidden_size, eps=1e-5) for ln_pre, attention_norm and ffn_norm: fixed, not a
# config field.
NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class PixtralVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_heads: int
    num_channels: int
    image_size: int  # the largest image side in pixels (the rotary covers image_size // patch_size per side)
    patch_size: int
    hidden_act: str
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size


def pixtral_config_from_hf(v, where: str = "vision_config") -> PixtralVisionConfig:
    """Our config from a transformers PixtralVisionConfig; ConfigError naming the field we cannot take."""
    def field(name, default=None):
        return getattr(v, name, default)

    def positive(name, value=None):
        value = field(name) if value is None else value
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]  # image_size / patch_size may come as a square pair
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}.{name}={value!r}: expected a positive int")
        return value

    hidden, intermediate = positive("hidden_size"), positive("intermediate_size")
    layers, channels = positive("num_hidden_layers"), positive("num_channels")
    image_size, patch_size = positive("image_size"), positive("patch_size")
    heads = positive("num_attention_heads")
    if hidden % heads:
        raise ConfigError(f"{where}.num_attention_heads={heads}: expected a divisor of hidden_size={hidden}")
    head_dim = hidden // heads
    if head_dim % 2:
        raise ConfigError(f"{where}.num_attention_heads={heads}: hidden_size / num_attention_heads = {head_dim} "
                          f"must be even (the rotary turns pairs of features)")
    if field("head_dim") not in (None, head_dim):
        # transformers' attention always uses hidden_size // num_attention_heads
        raise ConfigError(f"{where}.head_dim={field('head_dim')!r}: expected hidden_size / num_attention_heads = "
                          f"{head_dim}")
    if image_size < patch_size:
        raise ConfigError(f"{where}.image_size={image_size}: expected at least patch_size={patch_size}")
    if field("hidden_act") not in ACTIVATIONS:
        raise ConfigError(f"{where}.hidden_act={field('hidden_act')!r}: expected one of {sorted(ACTIVATIONS)}")
    rope = field("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}.rope_parameters={rope!r}: expected a dict")
    rope_type = rope.get("rope_type", "axial")
    if rope_type != "axial":
        raise ConfigError(f"{where}.rope_parameters.rope_type={rope_type!r}: only the axial 2-D rotary is supported")
    unknown = sorted(set(rope) - {"rope_type", "rope_theta"})
    if unknown:
        raise ConfigError(f"{where}.rope_parameters.{unknown[0]}={rope[unknown[0]]!r}: the Pixtral rotary takes "
                          f"only rope_theta")
    theta = rope.get("rope_theta", field("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"{where}.rope_parameters.rope_theta={theta!r}: expected a positive number")
    return PixtralVisionConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_heads=heads,
        num_channels=channels, image_size=image_size, patch_size=patch_size, hidden_act=field("hidden_act"),
        rope_theta=float(theta))


# ----------------------------------------------------------------------------------------------
# Host-side input preparation.


def prepare_pixtral_inputs(cfg: PixtralVisionConfig, pixel_values, image_sizes=None, *,
                           pad_to: int | None = None) -> dict[str, np.ndarray]:
    """The arrays `PixtralVisionTower.__call__` takes, from what PixtralImageProcessor / LlavaProcessor return.

    pixel_values: [images, channels, H_max, W_max] (a batch padded at the bottom and right), or a list of
    [channels, H, W] arrays; image_sizes [images, 2]: each image's real (height, width) in pixels (None: the
    whole of each array). As transformers does, an image's patch grid is (height // patch, width // patch).
    pad_to: pad the patch count to this many (a bucket, for static shapes) with zero patches; they attend only
    among themselves (in segments no longer than the longest image) and their outputs are to be dropped.

    Returns
      patches float32 [patches, channels * patch * patch]: each image's real patches row by row, the images in
        order (then the padding), each flattened as the convolution's kernel is (channel, row, column);
      positions int32 [patches, 2]: each patch's (row, col) in its own image's grid;
      attn_index int32 [segments, length]: `segment_attention`'s index, one segment per image (and the padding).
    """
    if isinstance(pixel_values, (list, tuple)):
        images = [np.asarray(x, np.float32) for x in pixel_values]
    else:
        x = np.asarray(pixel_values, np.float32)
        if x.ndim != 4:
            raise ValueError(f"pixel_values has shape {tuple(x.shape)}; expected [images, {cfg.num_channels}, "
                             f"height, width]")
        images = list(x)
    if image_sizes is None:
        sizes = np.array([img.shape[-2:] for img in images], np.int64).reshape(-1, 2)
    else:
        sizes = np.asarray(image_sizes).astype(np.int64).reshape(-1, 2)
    if len(sizes) != len(images):
        raise ValueError(f"image_sizes has {len(sizes)} rows for {len(images)} images")
    if not images:
        raise ValueError("no images given")
    c, p = cfg.num_channels, cfg.patch_size
    patches, positions, seg = [], [], []
    for i, (img, (h, w)) in enumerate(zip(images, sizes)):
        if img.ndim != 3 or img.shape[0] != c:
            raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected [{c}, height, width] "
                             f"(num_channels={c})")
        if h > img.shape[1] or w > img.shape[2]:
            raise ValueError(f"image_sizes[{i}]={(int(h), int(w))} exceeds its pixel_values' {tuple(img.shape[1:])}")
        gh, gw = int(h) // p, int(w) // p
        if gh < 1 or gw < 1:
            raise ValueError(f"image_sizes[{i}]={(int(h), int(w))}: smaller than one patch ({p} pixels)")
        if gh > cfg.max_patches_per_side or gw > cfg.max_patches_per_side:
            raise ValueError(f"image_sizes[{i}]={(int(h), int(w))}: more than image_size // patch_size = "
                             f"{cfg.max_patches_per_side} patches on a side (image_size={cfg.image_size})")
        grid = img[:, :gh * p, :gw * p].reshape(c, gh, p, gw, p).transpose(1, 3, 0, 2, 4)
        patches.append(grid.reshape(gh * gw, c * p * p))
        rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        positions.append(np.stack([rows.ravel(), cols.ravel()], -1))
        seg.append(np.full(gh * gw, i))
    n = sum(len(x) for x in patches)
    if pad_to is not None and pad_to > n:
        extra = pad_to - n
        chunk = max(len(x) for x in patches)  # padding segments no longer than the longest image
        patches.append(np.zeros((extra, c * p * p), np.float32))
        positions.append(np.zeros((extra, 2), np.int64))
        seg.append(len(images) + np.arange(extra) // chunk)
    elif pad_to is not None and pad_to < n:
        raise ValueError(f"pad_to={pad_to}: fewer than the images' {n} patches")
    return {"patches": np.ascontiguousarray(np.concatenate(patches), np.float32),
            "positions": np.concatenate(positions).astype(np.int32),
            "attn_index": segment_index(np.concatenate(seg))}


def rotary_cos_sin(cfg: PixtralVisionConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[patches, head_dim]` of the 2-D rotary (rotate-half layout) for `positions [patches, 2]` (row, col)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [d/2]
    pos = positions.astype(jnp.float32)
    angles = jnp.concatenate([pos[:, :1] * inv_freq[0::2], pos[:, 1:] * inv_freq[1::2]], axis=-1)  # [N, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


# ----------------------------------------------------------------------------------------------
# Modules.


class Attention(nnx.Module):
    SIBLINGS = (("q_proj", "k_proj", "v_proj"),)  # what __call__ passes to layers.sibling_linears

    def __init__(self, cfg: PixtralVisionConfig, dtype, stack):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = Linear(d, d, bias=False, dtype=dtype, stack=stack)
        self.k_proj = Linear(d, d, bias=False, dtype=dtype, stack=stack)
        self.v_proj = Linear(d, d, bias=False, dtype=dtype, stack=stack)
        self.o_proj = Linear(d, d, bias=False, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attn_index: jax.Array) -> jax.Array:
        n = x.shape[0]
        q, k, v = (y.reshape(n, self.num_heads, -1)
                   for y in sibling_linears(x, (self.q_proj, self.k_proj, self.v_proj)))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = segment_attention(q, k, v, attn_index, contiguous=True)
        return self.o_proj(out.reshape(n, -1))


class AttentionLayer(nnx.Module):
    def __init__(self, cfg: PixtralVisionConfig, dtype, stack):
        self.attention_norm = RMSNorm(cfg.hidden_size, eps=NORM_EPS, dtype=dtype, stack=stack)
        self.attention = Attention(cfg, dtype, stack)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=NORM_EPS, dtype=dtype, stack=stack)
        self.feed_forward = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False,
                                     dtype=dtype, stack=stack)

    def __call__(self, x, cos, sin, attn_index):
        x = x + self.attention(self.attention_norm(x), cos, sin, attn_index)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nnx.Module):
    def __init__(self, cfg: PixtralVisionConfig, dtype):
        self.layers = AttentionLayer(cfg, dtype, stack=(cfg.num_hidden_layers,))


class PixtralVisionTower(nnx.Module):
    """transformers' PixtralVisionModel: the packed patches of several images -> their final hidden states."""

    def __init__(self, cfg: PixtralVisionConfig, dtype):
        self.cfg = cfg
        self.remat = None  # a REMAT_POLICIES name while training (set by FastVisionModel.for_training)
        # The patch Conv2d (no bias): not a Linear, so LoRA targets and 4-bit quantization leave it alone.
        self.patch_conv = ConvWeight((cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size),
                                     dtype=dtype)
        self.ln_pre = RMSNorm(cfg.hidden_size, eps=NORM_EPS, dtype=dtype)
        self.transformer = Transformer(cfg, dtype)

    def __call__(self, patches: jax.Array, positions: jax.Array, attn_index: jax.Array, dtype) -> jax.Array:
        """`prepare_pixtral_inputs`' arrays -> `[patches, hidden]` in `dtype`: transformers' `last_hidden_state[0]`
        for the real patches in order, then (with `pad_to`) rows for the padding patches, to be dropped."""
        w = self.patch_conv.weight.get_value()
        h = linear(patches.astype(dtype), w.reshape(w.shape[0], -1))
        h = self.ln_pre(h)
        cos, sin = rotary_cos_sin(self.cfg, positions)

        def layer_fn(layer, x):
            return layer(x, cos, sin, attn_index), None

        h, _ = scan_blocks(self.transformer.layers, h, layer_fn, remat=self.remat)
        return h


def hf_key_map(cfg: PixtralVisionConfig) -> dict[str, tuple[str, int | None]]:
    """{transformers' state_dict key (relative to PixtralVisionModel): (our param path, layer index or None)}."""
    return per_layer_keys(nnx.eval_shape(lambda: PixtralVisionTower(cfg, jnp.float32)), STACKED)
