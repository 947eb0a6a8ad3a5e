"""The SigLIP vision tower (transformers' SiglipVisionModel without its pooling head), as Gemma 3 uses it.

Images are square, of the config's `image_size`; each is cut into `patch_size` patches on the host
(`patchify`), embedded by the patch convolution (a product with its flattened kernel) plus a learned position
embedding, and run through pre-norm encoder layers (full attention among the patches of one image, GELU MLP)
and a final LayerNorm. Attribute paths mirror transformers 5's in-memory names under the tower
(`embeddings.patch_embedding.weight`, `encoder.layers.self_attn.q_proj.weight`, `post_layernorm`), the
encoder layers stacked.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.layers import (ACTIVATIONS, Embedding, FeedForward, LayerNorm, Linear, attention, linear, scan_blocks,
                           sibling_linears)
from jaxvlm.models.base import ConfigError


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size


def siglip_config_from_hf(v, where: str = "vision_config") -> SiglipVisionConfig:
    """Our config from a transformers SiglipVisionConfig; ConfigError naming the field we cannot take."""
    if getattr(v, "vision_use_head", False):
        raise ConfigError(f"{where}.vision_use_head=true: the attention-pooling head is not supported (Gemma 3 "
                          f"checkpoints leave it off)")
    if v.image_size % v.patch_size:
        raise ConfigError(f"{where}.image_size={v.image_size}: expected a multiple of patch_size={v.patch_size}")
    if v.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"{where}.hidden_act={v.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
    if v.hidden_size % v.num_attention_heads:
        raise ConfigError(f"{where}.hidden_size={v.hidden_size}: expected a multiple of num_attention_heads="
                          f"{v.num_attention_heads}")
    return SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads, num_channels=v.num_channels, image_size=v.image_size,
        patch_size=v.patch_size, hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps)


def patchify(cfg: SiglipVisionConfig, pixel_values, where: str = "pixel_values") -> np.ndarray:
    """float32 `[images, patches, channels * patch * patch]` from `pixel_values [images, channels, size, size]`,
    patches row by row, each flattened as the convolution's kernel is (channel, row, column)."""
    x = np.asarray(pixel_values, np.float32)
    expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if x.ndim != 4 or x.shape[1:] != expected:
        raise ValueError(f"{where} has shape {tuple(x.shape)}; expected [images, {', '.join(map(str, expected))}]")
    n, c, p, g = x.shape[0], cfg.num_channels, cfg.patch_size, cfg.patches_per_side
    x = x.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(n, g * g, c * p * p))


class PatchEmbedding(nnx.Module):
    """The patch convolution: `weight [hidden, channels, patch, patch]` and `bias [hidden]`. Not a Linear: LoRA
    targets and 4-bit quantization leave it alone, as PEFT and bitsandbytes do with transformers' Conv2d."""

    def __init__(self, cfg: SiglipVisionConfig, dtype):
        self.weight = nnx.Param(jnp.zeros((cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size),
                                          dtype))
        self.bias = nnx.Param(jnp.zeros((cfg.hidden_size,), dtype))

    def __call__(self, patches: jax.Array) -> jax.Array:
        w = self.weight.get_value()
        return linear(patches, w.reshape(w.shape[0], -1), self.bias.get_value())


class Embeddings(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, dtype):
        self.patch_embedding = PatchEmbedding(cfg, dtype)
        self.position_embedding = Embedding(cfg.patches_per_side ** 2, cfg.hidden_size, dtype=dtype)

    def __call__(self, patches: jax.Array) -> jax.Array:
        h = self.patch_embedding(patches)
        return h + self.position_embedding.weight.get_value().astype(h.dtype)


class SelfAttention(nnx.Module):
    SIBLINGS = (("q_proj", "k_proj", "v_proj"),)  # what __call__ passes to layers.sibling_linears

    def __init__(self, cfg: SiglipVisionConfig, dtype, stack):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = Linear(d, d, bias=True, dtype=dtype, stack=stack)
        self.k_proj = Linear(d, d, bias=True, dtype=dtype, stack=stack)
        self.v_proj = Linear(d, d, bias=True, dtype=dtype, stack=stack)
        self.out_proj = Linear(d, d, bias=True, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, _ = x.shape
        q, k, v = (y.reshape(n, t, self.num_heads, -1)
                   for y in sibling_linears(x, (self.q_proj, self.k_proj, self.v_proj)))
        return self.out_proj(attention(q, k, v).reshape(n, t, -1))



class EncoderLayer(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, dtype, stack):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, stack=stack)
        self.self_attn = SelfAttention(cfg, dtype, stack)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, stack=stack)
        self.mlp = FeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, dtype):
        self.layers = EncoderLayer(cfg, dtype, stack=(cfg.num_layers,))


class SiglipVisionTower(nnx.Module):
    """`embeddings`, `encoder.layers` (stacked), `post_layernorm`: images' patches -> their final hidden states."""

    def __init__(self, cfg: SiglipVisionConfig, dtype):
        self.cfg = cfg
        self.remat = None
        self.embeddings = Embeddings(cfg, dtype)
        self.encoder = Encoder(cfg, dtype)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, patches: jax.Array, dtype) -> jax.Array:
        """`patches [images, patches, patch_dim]` (`patchify`) -> `[images, patches, hidden]` in `dtype`."""
        h = self.embeddings(patches.astype(dtype))
        h, _ = scan_blocks(self.encoder.layers, h, lambda layer, x: (layer(x), None), remat=self.remat)
        return self.post_layernorm(h)
