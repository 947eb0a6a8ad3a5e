"""Qwen2-VL and Qwen2.5-VL in Flax NNX: vision tower, M-RoPE language model, and their host-side inputs.

Attribute paths mirror transformers' in-memory module paths (`model.visual.blocks.attn.qkv.weight`,
`model.language_model.layers.self_attn.q_proj.weight`, `lm_head.weight`), with one difference: repeated
blocks are stacked, so `layers.7.self_attn.q_proj.weight` is row 7 of `layers.self_attn.q_proj.weight`.
Both families live here because Qwen2.5-VL changes only the vision tower (RMSNorm + gated MLP blocks,
window attention with a few full-attention blocks); the flags in `VisionConfig` carry the difference.
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
    Embedding,
    LayerNorm,
    Linear,
    RMSNorm,
    apply_rotary,
    attention,
    linear,
    scan_blocks,
    segment_attention,
)
from jaxvlm.models.base import VLM

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

# Checkpoint mapping (see converters/hf_import.py): the stacked blocks, and the older key names that
# transformers 4.x checkpoints use on disk (and that transformers 5's save_pretrained still writes).
STACKED = ("model.language_model.layers", "model.visual.blocks")
LEGACY_KEYS = (
    (r"^model\.(layers|embed_tokens|norm)\.", r"model.language_model.\1."),
    (r"^visual\.", "model.visual."),
)
IGNORED_KEYS = (r"rotary_emb\.inv_freq$",)
# Linear weights kept in 16 bit under load_in_4bit / load_in_8bit: the output head and the vision-to-text
# merger, as Unsloth (SKIP_QUANTIZATION_MODULES) and its bnb-4bit Qwen2-VL checkpoints do; the patch
# embedding is a convolution in transformers, which bitsandbytes does not quantize either.
QUANT_SKIP = ("lm_head", "merger", "patch_embed")
# Exports use the older names: what transformers 5's save_pretrained writes for this family, and the only
# names transformers 4.x reads.
EXPORT_KEYS = (
    (r"^model\.language_model\.", "model."),
    (r"^model\.visual\.", "visual."),
)


# ----------------------------------------------------------------------------------------------
# Configs: frozen dataclasses built from the HF config in one place (`from_hf`).


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


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


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    tie_word_embeddings: bool


class ConfigError(ValueError):
    """A config.json field this code does not understand."""


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
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)))


# ----------------------------------------------------------------------------------------------
# Host-side inputs: positions, vision segments and windows, computed in numpy from the processor's
# outputs so that the jit'd forward sees only arrays.


def rope_index(cfg: Qwen2VLConfig, input_ids: np.ndarray, attention_mask: np.ndarray,
               image_grid_thw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions `[3, batch, seq]` and per-sequence deltas `[batch]` (transformers' get_rope_index).

    Text tokens count up by one on all three axes; an image's tokens take (t, h, w) grid positions
    offset by the running position, which then advances by max(h, w) / merge. Padding gets position 0.
    The positions are counted over the attended tokens only, so left padding shifts nothing.
    """
    merge = cfg.vision.spatial_merge_size
    batch, seq = input_ids.shape
    positions = np.zeros((3, batch, seq), np.int32)
    deltas = np.zeros((batch,), np.int32)
    grids = iter(image_grid_thw if image_grid_thw is not None else [])
    for b in range(batch):
        keep = attention_mask[b].astype(bool)
        ids = input_ids[b][keep]
        is_image = ids == cfg.image_token_id
        out = np.zeros((3, len(ids)), np.int32)
        i, pos = 0, 0
        while i < len(ids):
            if not is_image[i]:
                out[:, i] = pos
                i, pos = i + 1, pos + 1
                continue
            try:
                t, h, w = (int(x) for x in next(grids))
            except StopIteration:
                raise ValueError(f"sequence {b} has more images than image_grid_thw has rows") from None
            h, w = h // merge, w // merge
            n = t * h * w
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            out[:, i:i + n] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos
            i, pos = i + n, pos + max(h, w)
        positions[:, b, keep] = out
        deltas[b] = (out.max() + 1 - len(ids)) if len(ids) else 0
    return positions, deltas


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


def _ladder(n: int) -> int:
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
    padded with len(seg); both axes rounded up by `_ladder`, padding segments all len(seg)."""
    n = len(seg)
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    lengths = np.diff(np.r_[starts, n])
    index = np.full((_ladder(len(starts)), _ladder(int(lengths.max()))), n, np.int32)
    for row, (start, length) in enumerate(zip(starts, lengths)):
        index[row, :length] = np.arange(start, start + length)
    return index


def prepare_inputs(cfg: Qwen2VLConfig, input_ids, attention_mask=None, pixel_values=None,
                   image_grid_thw=None, n_pad_patches: int = 0, **unused) -> dict[str, np.ndarray]:
    """The arrays the jit'd forward takes, from what the processor returns (numpy or anything array-like).

    Extra processor outputs (mm_token_type_ids, ...) are accepted and derived here from input_ids.
    """
    if unused.get("pixel_values_videos") is not None:
        raise NotImplementedError("video inputs (pixel_values_videos) are not supported yet")
    input_ids = np.asarray(input_ids).astype(np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, seq], got shape {input_ids.shape}")
    attention_mask = (np.ones_like(input_ids) if attention_mask is None
                      else np.asarray(attention_mask).astype(np.int32))
    grid = None if image_grid_thw is None else np.asarray(image_grid_thw).astype(np.int64).reshape(-1, 3)
    positions, deltas = rope_index(cfg, input_ids, attention_mask, grid)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions,
           "rope_deltas": deltas}
    image_pos = np.flatnonzero((input_ids == cfg.image_token_id) & (attention_mask > 0)).astype(np.int32)
    if pixel_values is None:
        if len(image_pos):
            raise ValueError(f"input_ids hold {len(image_pos)} image tokens but no pixel_values were given")
        return out
    if grid is None:
        raise ValueError("pixel_values given without image_grid_thw")
    pixel_values = np.asarray(pixel_values)
    m = cfg.vision.spatial_merge_size
    if n_pad_patches % (m * m):
        raise ValueError(f"n_pad_patches={n_pad_patches}: expected a multiple of spatial_merge_size**2 = {m * m}")
    n_patches = int(np.prod(grid, axis=1).sum())
    if pixel_values.shape != (n_patches + n_pad_patches, cfg.vision.patch_dim):
        raise ValueError(f"pixel_values: expected shape {(n_patches + n_pad_patches, cfg.vision.patch_dim)} from "
                         f"image_grid_thw and n_pad_patches={n_pad_patches}, got {pixel_values.shape}")
    n_merged = n_patches // m**2
    if len(image_pos) != n_merged:
        raise ValueError(f"Image features and image tokens do not match: {len(image_pos)} image tokens in "
                         f"input_ids, {n_merged} merged patches from image_grid_thw")
    if n_pad_patches:
        # The padding patches (a collator's bucket padding) form one more image, so they attend only among
        # themselves; its merged tokens scatter to index batch*seq, out of range, which embed() drops.
        grid = np.concatenate([grid, [[1, m, n_pad_patches // m]]])
        image_pos = np.concatenate([image_pos, np.full(n_pad_patches // m**2, input_ids.size, np.int32)])
    out.update(pixel_values=pixel_values, image_pos=image_pos, **vision_layout(cfg.vision, grid))
    return out


# ----------------------------------------------------------------------------------------------
# Rotary tables (fp32).


def mrope_cos_sin(cfg: TextConfig, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[batch, seq, head_dim]` for M-RoPE positions `[3, batch, seq]`.

    The head_dim/2 frequencies are split into mrope_section chunks taking their angle from the
    temporal, height and width positions in turn; the halves are then repeated (rotate_half layout).
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, d/2]
    axis = np.repeat(np.arange(3), cfg.mrope_section)  # which position axis each frequency reads
    freqs = freqs[axis, :, :, np.arange(d // 2)].transpose(1, 2, 0)  # [B, T, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(cfg: VisionConfig, rot_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[patches, head_dim]` of the 2D rotary: a quarter of head_dim each for rows and columns."""
    spatial = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = rot_pos.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, head_dim/4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # rows then columns
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# ----------------------------------------------------------------------------------------------
# Vision tower.


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


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): the language model's MLP, and Qwen2.5-VL's vision MLP (with bias)."""

    def __init__(self, hidden: int, intermediate: int, act: str, *, bias: bool, dtype, stack=()):
        self.gate_proj = Linear(hidden, intermediate, bias=bias, dtype=dtype, stack=stack)
        self.up_proj = Linear(hidden, intermediate, bias=bias, dtype=dtype, stack=stack)
        self.down_proj = Linear(intermediate, hidden, bias=bias, dtype=dtype, stack=stack)
        self.act = act

    def __call__(self, x):
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


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


# ----------------------------------------------------------------------------------------------
# Language model.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer: `[layers, batch, cache_len, kv_heads, head_dim]` each."""
    k: jax.Array
    v: jax.Array


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, stack):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=True, dtype=dtype, stack=stack)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, bias=True, dtype=dtype, stack=stack)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, bias=True, dtype=dtype, stack=stack)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=False, dtype=dtype, stack=stack)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        """Self-attention over `x [batch, seq, hidden]`; with a cache `kv = (k, v)`, each
        `[batch, cache_len, kv_heads, head_dim]`, this step's keys/values are written at slot `index`
        and attention reads the whole cache (`mask` then spans the cache). Returns (out, kv)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, -1)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, -1)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, -1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
            kv = (k, v)
        return self.o_proj(attention(q, k, v, mask, causal=kv is None).reshape(b, t, -1)), kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, stack):
        self.self_attn = Attention(cfg, dtype, stack)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype,
                            stack=stack)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype):
        self.cfg = cfg
        self.remat = None
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = DecoderLayer(cfg, dtype, stack=(cfg.num_layers,))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, h: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None, index=0):
        """Final hidden states `[batch, seq, hidden]` from input embeddings `[batch, seq, hidden]`.

        Without a cache, `attention_mask [batch, seq]` marks the real tokens. With one, the step's
        tokens go to cache slots index..index+seq, and `attention_mask [batch, cache_len]` marks the
        slots holding real tokens. Returns (hidden, cache).
        """
        cos, sin = mrope_cos_sin(self.cfg, position_ids)
        t = h.shape[1]
        keys = attention_mask.shape[1]
        key_ok = jnp.broadcast_to(attention_mask[:, None, None, :] > 0, (h.shape[0], 1, t, keys))
        if cache is None:  # causal over the sequence itself: the attention kernel applies it
            h, _ = scan_blocks(self.layers, h, lambda layer, x: (layer(x, cos, sin, key_ok)[0], None),
                               remat=self.remat)
        else:
            mask = (jnp.arange(keys)[None, :] <= jnp.arange(t)[:, None] + index)[None, None] & key_ok

            def layer_step(layer, x, kv):
                return layer(x, cos, sin, mask, kv, index)

            h, kv = scan_blocks(self.layers, h, layer_step, (cache.k, cache.v))
            cache = KVCache(*kv)
        return self.norm(h), cache


class Qwen2VLModel(nnx.Module):
    def __init__(self, cfg: Qwen2VLConfig, dtype):
        self.visual = VisionTransformer(cfg.vision, dtype)
        self.language_model = TextModel(cfg.text, dtype)


class Qwen2VLForConditionalGeneration(VLM):
    """Qwen2-VL / Qwen2.5-VL: `model.visual`, `model.language_model`, `lm_head` (absent when tied)."""

    def __init__(self, cfg: Qwen2VLConfig, dtype=jnp.bfloat16):
        self.config = cfg
        self.model = Qwen2VLModel(cfg, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, dtype=dtype))

    def embed(self, inputs: dict[str, jax.Array]) -> jax.Array:
        """Token embeddings `[batch, seq, hidden]` with the image tokens replaced by the vision tower's output."""
        lm = self.model.language_model
        h = lm.embed_tokens(inputs["input_ids"])
        if "pixel_values" in inputs:
            image = self.model.visual(inputs["pixel_values"], inputs).astype(h.dtype)
            b, t, d = h.shape
            h = h.reshape(b * t, d).at[inputs["image_pos"]].set(image, mode="drop").reshape(b, t, d)
        return h

    def hidden_states(self, inputs: dict[str, jax.Array]) -> jax.Array:
        h, _ = self.model.language_model(self.embed(inputs), inputs["position_ids"], inputs["attention_mask"])
        return h

    def init_cache(self, batch: int, length: int, dtype) -> KVCache:
        """An empty KV cache `[layers, batch, length, kv_heads, head_dim]` for generation."""
        t = self.config.text
        shape = (t.num_layers, batch, length, t.num_kv_heads, t.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def logits(self, h: jax.Array) -> jax.Array:
        """Vocabulary logits `[..., vocab]` from final hidden states, in the compute dtype."""
        if self.lm_head is None:
            return linear(h, self.model.language_model.embed_tokens.weight.get_value())
        return self.lm_head(h)

    def forward(self, inputs: dict[str, jax.Array]) -> jax.Array:
        """Logits `[batch, seq, vocab]` from `prepare_inputs` arrays; jit-compatible."""
        return self.logits(self.hidden_states(inputs))

    def prepare_inputs(self, **processor_outputs) -> dict[str, np.ndarray]:
        return prepare_inputs(self.config, **processor_outputs)


def build(cfg: Qwen2VLConfig, dtype) -> Qwen2VLForConditionalGeneration:
    """The model with zero weights of the right shapes (use under nnx.eval_shape to allocate nothing)."""
    return Qwen2VLForConditionalGeneration(cfg, dtype)
