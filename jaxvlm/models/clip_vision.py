"""The CLIP vision tower (transformers' CLIPVisionModel), as LLaVA 1.5 and LLaVA-NeXT use it.

Images are square, of the config's `image_size`; each is cut into `patch_size` patches on the host
(`patchify`) and embedded by the patch convolution (no bias; a product with its flattened kernel). A learned
class embedding goes in front, a learned position embedding (one row per patch plus one for the class token) is
added, then `pre_layrnorm` (transformers' spelling) and pre-norm encoder layers (full attention among the tokens
of one image, biased q/k/v/out projections, an fc1/fc2 MLP, quick_gelu in the OpenAI checkpoints).

LLaVA reads no final output: it takes transformers' `hidden_states` at `vision_feature_layer` (one index or a
list), where entry 0 is the embeddings after `pre_layrnorm` and entry i the output of encoder layer i. The tower
returns those entries (`feature_layers`) and runs no layer past the deepest one asked for (LLaVA's usual -2 skips
the last layer). `post_layernorm` is held, since checkpoints carry it, but never applied: transformers applies it
only to the pooled class token, which LLaVA does not use.

Attribute paths mirror transformers 5's in-memory names of CLIPVisionModel (`embeddings.patch_embedding.weight`,
`embeddings.class_embedding`, `pre_layrnorm.weight`, `encoder.layers.self_attn.q_proj.weight`,
`post_layernorm.bias`), the encoder layers stacked (`STACKED`). Under LLaVA the tower sits at
`model.vision_tower` in memory; checkpoints on disk spell it `vision_tower.vision_model.` (and older ones carry the
`embeddings.position_ids` buffer, which has no param here).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvlm.layers import (
    ACTIVATIONS,
    ConvWeight,
    Embedding,
    FeedForward,
    LayerNorm,
    Linear,
    attention,
    dropout_key,
    linear,
    next_dropout_key,
    scan_blocks,
    sibling_linears,
)
from jaxvlm.models.base import ConfigError
from jaxvlm.models.siglip import patchify  # noqa: F401 (the same square patches; re-exported)
from jaxvlm.paths import per_layer_keys

# The stacked block (HF module path relative to CLIPVisionModel; see jaxvlm.paths).
STACKED = ("encoder.layers",)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
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
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per image, without the class token (transformers' `embeddings.num_patches`)."""
        return self.patches_per_side ** 2

    @property
    def num_positions(self) -> int:
        """Tokens per image: the class token and the patches (the position embedding's rows)."""
        return self.num_patches + 1

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size


def clip_config_from_hf(v, where: str = "vision_config") -> CLIPVisionConfig:
    """Our config from a transformers CLIPVisionConfig; ConfigError naming the field we cannot take."""
    def positive(name):
        value = getattr(v, name, None)
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]  # a square given as a pair
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}.{name}={value!r}: expected a positive int")
        return value

    image_size, patch_size = positive("image_size"), positive("patch_size")
    if image_size % patch_size:
        raise ConfigError(f"{where}.image_size={image_size}: expected a multiple of patch_size={patch_size}")
    act = getattr(v, "hidden_act", None)
    if act not in ACTIVATIONS:
        raise ConfigError(f"{where}.hidden_act={act!r}: expected one of {sorted(ACTIVATIONS)}")
    hidden, heads = positive("hidden_size"), positive("num_attention_heads")
    if hidden % heads:
        raise ConfigError(f"{where}.num_attention_heads={heads}: expected a divisor of hidden_size={hidden}")
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=positive("intermediate_size"),
        num_layers=positive("num_hidden_layers"), num_heads=heads, num_channels=positive("num_channels"),
        image_size=image_size, patch_size=patch_size, hidden_act=act, layer_norm_eps=float(v.layer_norm_eps))


def feature_layer_indices(cfg: CLIPVisionConfig, feature_layers, where: str = "vision_feature_layer"
                          ) -> tuple[int, ...]:
    """`feature_layers` (an int or a sequence of ints in transformers' `hidden_states` indexing, negatives
    counting from the end) as non-negative indices into the num_layers + 1 entries, order kept; ConfigError
    naming `where` for anything else."""
    layers = (feature_layers,) if isinstance(feature_layers, int) else feature_layers
    n = cfg.num_layers + 1
    if (not isinstance(layers, Sequence) or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and -n <= i < n for i in layers)):
        raise ConfigError(f"{where}={feature_layers!r}: expected an int or a non-empty list of ints in [-{n}, {n}) "
                          f"(indices into the {n} hidden states: the embeddings, then each of the "
                          f"{cfg.num_layers} layers' outputs)")
    return tuple(i % n for i in layers)


# ----------------------------------------------------------------------------------------------
# Modules.


class Embeddings(nnx.Module):
    """`patch_embedding.weight [hidden, channels, patch, patch]` (the Conv2d, no bias; not a Linear, so LoRA
    targets and 4-bit quantization leave it alone, as PEFT and bitsandbytes do), `class_embedding [hidden]`,
    `position_embedding.weight [num_positions, hidden]`."""

    def __init__(self, cfg: CLIPVisionConfig, dtype):
        d = cfg.hidden_size
        self.patch_embedding = ConvWeight((d, cfg.num_channels, cfg.patch_size, cfg.patch_size), dtype=dtype)
        self.class_embedding = nnx.Param(jnp.zeros((d,), dtype))
        self.position_embedding = Embedding(cfg.num_positions, d, dtype=dtype)

    def __call__(self, patches: jax.Array) -> jax.Array:
        """`[images, patches, patch_dim]` -> `[images, num_positions, hidden]` (the class token first)."""
        w = self.patch_embedding.weight.get_value()
        h = linear(patches, w.reshape(w.shape[0], -1))
        cls = jnp.broadcast_to(self.class_embedding.get_value().astype(h.dtype), (h.shape[0], 1, h.shape[-1]))
        h = jnp.concatenate([cls, h], axis=1)
        return h + self.position_embedding.weight.get_value().astype(h.dtype)


class SelfAttention(nnx.Module):
    SIBLINGS = (("q_proj", "k_proj", "v_proj"),)  # what __call__ passes to layers.sibling_linears

    def __init__(self, cfg: CLIPVisionConfig, dtype, stack):
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
        return self.out_proj(attention(q, k, v).reshape(n, t, -1))  # scale 1/sqrt(head_dim), as CLIP's


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, dtype, stack):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, stack=stack)
        self.self_attn = SelfAttention(cfg, dtype, stack)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, stack=stack)
        self.mlp = FeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        self.layers = EncoderLayer(cfg, dtype, stack=(cfg.num_layers,))


def _layer_slice(stack: nnx.Module, start: int, stop: int) -> nnx.Module:
    """Layers start..stop-1 of a stacked module (every array leaf, whatever the weight type, has the layer axis)."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))


class CLIPVisionTower(nnx.Module):
    """`embeddings`, `pre_layrnorm`, `encoder.layers` (stacked), `post_layernorm` (held, unused): images' patches
    -> the hidden states LLaVA selects."""

    def __init__(self, cfg: CLIPVisionConfig, dtype):
        self.cfg = cfg
        self.remat = None  # a REMAT_POLICIES name while training
        self.embeddings = Embeddings(cfg, dtype)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.encoder = Encoder(cfg, dtype)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, patches: jax.Array, dtype, feature_layers) -> tuple[jax.Array, ...]:
        """`patches [images, patches, patch_dim]` (`patchify`) -> one `[images, num_positions, hidden]` array in
        `dtype` per entry of `feature_layers` (an int or a sequence of ints, static under jit), in its order:
        transformers' `hidden_states[i]` (0: the embeddings after pre_layrnorm; i: encoder layer i's output;
        negatives from the end, -1 the last layer). Layers past the deepest entry are not run."""
        wanted = feature_layer_indices(self.cfg, feature_layers, where="feature_layers")
        h = self.pre_layrnorm(self.embeddings(patches.astype(dtype)))
        states, start = {0: h}, 0
        layers = self.encoder.layers
        for stop in sorted(set(wanted) - {0}):  # runs layers start..stop-1, ending on hidden_states[stop]
            stack = layers if (start, stop) == (0, self.cfg.num_layers) else _layer_slice(layers, start, stop)
            with dropout_key(next_dropout_key()):  # each scan its own dropout keys (none in inference)
                h, _ = scan_blocks(stack, h, lambda layer, x: (layer(x), None), remat=self.remat)
            states[stop], start = h, stop
        return tuple(states[i] for i in wanted)


def hf_key_map(cfg: CLIPVisionConfig) -> dict[str, tuple[str, int | None]]:
    """{transformers' state_dict key (relative to CLIPVisionModel): (our param path, layer index or None)}."""
    return per_layer_keys(nnx.eval_shape(lambda: CLIPVisionTower(cfg, jnp.float32)), STACKED)
