"""The Qwen vision tower (Qwen2-VL, Qwen2.5-VL): patch embedding, 2D-rotary blocks, patch merger.

Patches arrive from the processor flattened and in merge-block-major order; `vision_layout` computes, on
the host, each patch's rotary position and the attention segments (per image frame, and per window for
Qwen2.5-VL's window blocks). Attribute paths mirror transformers' `model.visual.*`, with the blocks
stacked (`blocks.attn.qkv.weight [depth, 3*hidden, hidden]`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.layers import (
    ACTIVATIONS,
    Activation,
    ConvWeight,
    GatedMLP,
    LayerNorm,
    Linear,
    RMSNorm,
    apply_rotary,
    linear,
    scan_blocks,
    segment_attention,
)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int  # width of the vision blocks (Qwen2-VL calls it embed_dim)
    out_hidden_size: int  # width after the merger = the language model's hidden size
    intermediate_size: int
    num_heads: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    rope_theta: float
    rmsnorm_gated: bool  # Qwen2.5-VL: RMSNorm + gate/up/down MLP; Qwen2-VL: LayerNorm + fc1/fc2
    window_size: int  # Qwen2.5-VL window attention, in pixels; 0 = every block attends per image
    fullatt_block_indexes: tuple[int, ...]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2



# ----------------------------------------------------------------------------------------------
# Host-side layout of the patches.


def vision_layout(cfg: VisionConfig, grid_thw: np.ndarray) -> dict[str, np.ndarray]:
    """Per-patch rotary positions, attention segments and (Qwen2.5-VL) the window permutation.

    Patches come from the processor in merge-block-major order (each run of merge**2 patches forms one
    merged token). Returns, in the order the blocks see the patches:
      rot_pos [patches, 2] (row, col); full_attn_index [segments, length] (the patches of each image
      frame, padded with the out-of-range index `patches`: see `segment_attention`); and with windows
      window_attn_index [windows, length] likewise per window, window_index [merged] (the permutation
      of merged tokens that makes windows contiguous) and reverse_index [merged].
    """
    m = cfg.spatial_merge_size
    rot, seg, windows, wseg = [], [], [], []
    n_frames = n_windows = offset = 0
    win = cfg.window_size // m // cfg.patch_size if cfg.window_size else 0
    for t, h, w in (tuple(int(x) for x in g) for g in grid_thw):
        if h % m or w % m:
            raise ValueError(f"image_grid_thw row {(t, h, w)}: h and w must be multiples of spatial_merge_size {m}")
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
        rot.append(np.tile(np.stack([block(hpos), block(wpos)], -1), (t, 1)))
        seg.append(np.repeat(np.arange(n_frames, n_frames + t), h * w))
        n_frames += t
        if win:
            gh, gw = h // m, w // m
            idx = np.arange(t * gh * gw).reshape(t, gh, gw)
            ph, pw = -gh % win, -gw % win
            idx = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
            nh, nw = (gh + ph) // win, (gw + pw) // win
            idx = idx.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
            for row in idx:
                row = row[row >= 0]
                if len(row):
                    windows.append(row + offset)
                    wseg.append(np.full(len(row) * m * m, n_windows))
                    n_windows += 1
            offset += t * gh * gw
    rot_pos, image_seg = np.concatenate(rot).astype(np.int32), np.concatenate(seg)
    out = {}
    if win:
        window_index = np.concatenate(windows).astype(np.int32)
        unit = m * m
        patch_perm = (window_index[:, None] * unit + np.arange(unit)).ravel()
        rot_pos, image_seg = rot_pos[patch_perm], image_seg[patch_perm]
        out["window_attn_index"] = segment_index(np.concatenate(wseg))
        out["window_index"] = window_index
        out["reverse_index"] = np.argsort(window_index).astype(np.int32)
    out["rot_pos"] = rot_pos
    out["full_attn_index"] = segment_index(image_seg)
    return out


def layout_fill(name: str, inputs: dict[str, np.ndarray]) -> int | None:
    """What pads `vision_layout`'s segment arrays when batches of one shape must agree (a family's `input_fill`):
    the out-of-range patch index, which makes padding segments and padding slots of a segment attend nothing."""
    if name in ("full_attn_index", "window_attn_index"):
        return len(inputs["pixel_values"])
    return None


def ladder(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x them) that is >= n:
    padding wastes at most a third, and a run meets few distinct shapes (few compiled programs)."""
    size = 1
    while True:
        for candidate in (size, size * 3 // 2):
            if candidate >= n:
                return max(candidate, 1)
        size *= 2


def segment_index(seg: np.ndarray) -> np.ndarray:
    """index [segments, length]: the positions of each run of equal ids in `seg` (runs are contiguous),
    padded with len(seg); both axes rounded up by `ladder`, padding segments all len(seg)."""
    n = len(seg)
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    lengths = np.diff(np.r_[starts, n])
    index = np.full((ladder(len(starts)), ladder(int(lengths.max()))), n, np.int32)
    for row, (start, length) in enumerate(zip(starts, lengths)):
        index[row, :length] = np.arange(start, start + length)
    return index


def vision_cos_sin(cfg: VisionConfig, rot_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[patches, head_dim]` of the 2D rotary: a quarter of head_dim each for rows and columns."""
    spatial = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = rot_pos.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, head_dim/4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # rows then columns
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# ----------------------------------------------------------------------------------------------
# Modules.


class PatchEmbed(nnx.Module):
    """The 3D-conv patch embedding as one matmul: each patch row is already (C, T, P, P) flattened."""

    def __init__(self, cfg: VisionConfig, dtype):
        self.proj = ConvWeight((cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size,
                                cfg.patch_size), dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.proj.weight.get_value()
        return linear(x, w.reshape(w.shape[0], -1))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, stack):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = Linear(d, 3 * d, bias=True, dtype=dtype, stack=stack)
        self.proj = Linear(d, d, bias=True, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array, cos, sin, segments, use_first) -> jax.Array:
        """Attention within segments: `segments` is one or two `segment_attention` index arrays, and
        `use_first` (a traced bool) picks between two (Qwen2.5-VL's full vs window blocks)."""
        n, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(n, 3, self.num_heads, -1), 3, axis=1)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]  # [N, heads, head_dim]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if len(segments) == 1:
            out = segment_attention(q, k, v, segments[0], contiguous=True)
        else:
            out = jax.lax.cond(use_first, lambda: segment_attention(q, k, v, segments[0], contiguous=True),
                               lambda: segment_attention(q, k, v, segments[1], contiguous=True))
        return self.proj(out.reshape(n, d))


class VisionMLP(nnx.Module):
    """Qwen2-VL: fc1 -> act -> fc2."""

    def __init__(self, cfg: VisionConfig, dtype, stack):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, stack=stack)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, stack=stack)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


def _vision_norm(cfg: VisionConfig, dtype, stack=()):
    if cfg.rmsnorm_gated:
        return RMSNorm(cfg.hidden_size, eps=1e-6, dtype=dtype, stack=stack)
    return LayerNorm(cfg.hidden_size, eps=1e-6, dtype=dtype, stack=stack)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, stack):
        self.norm1 = _vision_norm(cfg, dtype, stack)
        self.norm2 = _vision_norm(cfg, dtype, stack)
        self.attn = VisionAttention(cfg, dtype, stack)
        if cfg.rmsnorm_gated:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True, dtype=dtype,
                                stack=stack)
        else:
            self.mlp = VisionMLP(cfg, dtype, stack)

    def __call__(self, x, cos, sin, segments, use_first):
        x = x + self.attn(self.norm1(x), cos, sin, segments, use_first)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Concatenates each merge**2 block of patches and projects it to the language model's width."""

    def __init__(self, cfg: VisionConfig, dtype):
        width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = _vision_norm(cfg, dtype)
        self.mlp = nnx.List([Linear(width, width, bias=True, dtype=dtype), Activation("gelu"),
                             Linear(width, cfg.out_hidden_size, bias=True, dtype=dtype)])
        self.width = width

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, self.width)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype):
        self.cfg = cfg
        self.remat = None  # a REMAT_POLICIES name while training (set by FastVisionModel.for_training)
        self.patch_embed = PatchEmbed(cfg, dtype)
        self.blocks = VisionBlock(cfg, dtype, stack=(cfg.depth,))
        self.merger = PatchMerger(cfg, dtype)

    def __call__(self, pixel_values: jax.Array, inputs: dict[str, jax.Array]) -> jax.Array:
        """Merged image embeddings `[merged_tokens, out_hidden]` from patches `[patches, patch_dim]`."""
        cfg = self.cfg
        x = self.patch_embed(pixel_values.astype(self.patch_embed.proj.weight.get_value().dtype))
        unit = cfg.spatial_merge_size**2
        if "window_index" in inputs:
            x = x.reshape(-1, unit, x.shape[-1])[inputs["window_index"]].reshape(x.shape)
        cos, sin = vision_cos_sin(cfg, inputs["rot_pos"])
        segments = [inputs["full_attn_index"]]
        if "window_attn_index" in inputs:
            segments.append(inputs["window_attn_index"])
        is_full = np.array([cfg.window_size == 0 or i in cfg.fullatt_block_indexes for i in range(cfg.depth)])

        def block(blk, h, full):
            return blk(h, cos, sin, segments, full), None

        x, _ = scan_blocks(self.blocks, x, block, jnp.asarray(is_full), remat=self.remat)
        x = self.merger(x)
        if "reverse_index" in inputs:
            x = x[inputs["reverse_index"]]
        return x
