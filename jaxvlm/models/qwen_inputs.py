"""Host-side inputs of the Qwen VLM families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): M-RoPE positions and the
vision tower's patches, from what the processor returns, in numpy, so that the jit'd forward sees arrays only.

Images and videos go through the vision tower in one call: their patches are joined (images, then videos,
then a collator's padding patches) with one grid row per image or video, and the tower's merged tokens
are scattered to the image tokens then the video tokens of the flattened batch (`image_pos`).
"""
from __future__ import annotations

import numpy as np


def rope_index(input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray | None = None,
               video_grid_thw: np.ndarray | None = None, *, image_token_id: int, video_token_id: int | None = None,
               spatial_merge_size: int, video_time_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions `[3, batch, seq]` and per-sequence deltas `[batch]` (transformers' get_rope_index).

    Text tokens count up by one on all three axes. An image's or video's tokens take (t, h, w) grid
    positions offset by the running position, which then advances by max(h, w) / merge; a video's
    temporal position is int(t * video_time_scale[i]) (Qwen2.5-VL: tokens_per_second x seconds per grid
    step; 1 when None). Grids are consumed in order across the batch. Padding gets position 0; the
    positions are counted over the attended tokens only, so left padding shifts nothing.
    """
    merge = spatial_merge_size
    batch, seq = input_ids.shape
    positions = np.zeros((3, batch, seq), np.int32)
    deltas = np.zeros((batch,), np.int32)
    n_videos = 0 if video_grid_thw is None else len(video_grid_thw)
    scales = (np.ones(n_videos, np.float32) if video_time_scale is None
              else np.asarray(video_time_scale, np.float32).reshape(-1))
    if len(scales) != n_videos:
        raise ValueError(f"{len(scales)} video time scales (second_per_grid_ts) for {n_videos} videos (video_grid_thw)")
    kinds = {image_token_id: ("image", iter(image_grid_thw if image_grid_thw is not None else []), None)}
    if video_token_id is not None:
        kinds[video_token_id] = ("video", iter(video_grid_thw if video_grid_thw is not None else []), iter(scales))
    for b in range(batch):
        keep = attention_mask[b].astype(bool)
        ids = input_ids[b][keep]
        out = np.zeros((3, len(ids)), np.int32)
        i, pos = 0, 0
        while i < len(ids):
            kind = kinds.get(int(ids[i]))
            if kind is None:
                out[:, i] = pos
                i, pos = i + 1, pos + 1
                continue
            name, grids, times = kind
            try:
                t, h, w = (int(x) for x in next(grids))
            except StopIteration:
                raise ValueError(f"sequence {b} has more {name}s than {name}_grid_thw has rows") from None
            h, w = h // merge, w // merge
            n = t * h * w
            if not (ids[i:i + n] == ids[i]).all() or (i + n < len(ids) and ids[i + n] == ids[i]):
                run = np.argmax(np.r_[ids[i:] != ids[i], True])
                raise ValueError(f"sequence {b}: a {name} of grid {(t, h * merge, w * merge)} needs {n} {name} "
                                 f"tokens, the run at position {i} has {run}")
            temporal = np.arange(t, dtype=np.float32)
            if times is not None:
                temporal = temporal * next(times)
            tt, hh, ww = np.meshgrid(temporal.astype(np.int64), np.arange(h), np.arange(w), indexing="ij")
            out[:, i:i + n] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos
            i, pos = i + n, pos + max(h, w)
        positions[:, b, keep] = out
        deltas[b] = (out.max() + 1 - len(ids)) if len(ids) else 0
    return positions, deltas


def _grid(value) -> np.ndarray | None:
    return None if value is None else np.asarray(value).astype(np.int64).reshape(-1, 3)


def qwen_inputs(*, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                video_grid_thw=None, second_per_grid_ts=None, n_pad_patches: int = 0, image_token_id: int,
                video_token_id: int, spatial_merge_size: int, patch_dim: int, tokens_per_second: float | None = None,
                split_video_frames: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(arrays, grid): input_ids, attention_mask, position_ids, rope_deltas, and with vision input
    pixel_values (images', videos', padding patches) and image_pos (the flat token index of each merged
    token; out of range for the padding's); `grid` holds one row per image, video and padding block, for
    the family's vision layout (None without vision input).

    tokens_per_second: Qwen2.5-VL's temporal scale of video positions (times second_per_grid_ts, 1 s when
    absent); None: a video's temporal positions count frames. split_video_frames: Qwen3-VL's processor
    writes each frame of a video as its own run of tokens (after a timestamp), so each frame is a grid row.
    """
    input_ids = np.asarray(input_ids).astype(np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, seq], got shape {input_ids.shape}")
    attention_mask = (np.ones_like(input_ids) if attention_mask is None
                      else np.asarray(attention_mask).astype(np.int32))
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {input_ids.shape} like input_ids, got {attention_mask.shape}")
    m = spatial_merge_size
    image_grid, video_grid = _grid(image_grid_thw), _grid(video_grid_thw)
    time_scale = None
    if video_grid is not None and tokens_per_second is not None:
        seconds = (np.ones(len(video_grid), np.float32) if second_per_grid_ts is None
                   else np.asarray(second_per_grid_ts, np.float32).reshape(-1))
        time_scale = np.float32(tokens_per_second) * seconds
    if video_grid is not None and split_video_frames:
        video_grid = np.repeat(video_grid, video_grid[:, 0], axis=0)
        video_grid[:, 0] = 1
    positions, deltas = rope_index(input_ids, attention_mask, image_grid, video_grid, image_token_id=image_token_id,
                                   video_token_id=video_token_id, spatial_merge_size=m, video_time_scale=time_scale)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions, "rope_deltas": deltas}

    parts, grids, token_pos = [], [], []
    for name, pixels, grid, token in (("image", pixel_values, image_grid, image_token_id),
                                      ("video", pixel_values_videos, video_grid, video_token_id)):
        pos = np.flatnonzero((input_ids == token) & (attention_mask > 0)).astype(np.int32)
        suffix = "" if name == "image" else "_videos"
        if pixels is None:
            if len(pos):
                raise ValueError(f"input_ids hold {len(pos)} {name} tokens but no pixel_values{suffix} were given")
            continue
        if grid is None:
            raise ValueError(f"pixel_values{suffix} given without {name}_grid_thw")
        pixels = np.asarray(pixels)
        n_patches = int(np.prod(grid, axis=1).sum())
        pad = n_pad_patches if name == "image" else 0  # a collator's padding rows end pixel_values
        if pixels.shape != (n_patches + pad, patch_dim):
            raise ValueError(f"pixel_values{suffix}: expected shape {(n_patches + pad, patch_dim)} from "
                             f"{name}_grid_thw{' and n_pad_patches=%d' % pad if pad else ''}, got {pixels.shape}")
        if len(pos) != n_patches // m**2:
            kind = "Image" if name == "image" else "Video"
            raise ValueError(f"{kind} features and {name} tokens do not match: {len(pos)} {name} tokens in "
                             f"input_ids, {n_patches // m**2} merged patches from {name}_grid_thw")
        parts.append(pixels[:n_patches])
        grids.append(grid)
        token_pos.append(pos)
    if n_pad_patches % (m * m):
        raise ValueError(f"n_pad_patches={n_pad_patches}: expected a multiple of spatial_merge_size**2 = {m * m}")
    if n_pad_patches:
        if pixel_values is None:
            raise ValueError(f"n_pad_patches={n_pad_patches} without pixel_values to hold them")
        # The padding patches (a collator's bucket padding) form one more image, attending only among
        # themselves; its merged tokens scatter to index batch*seq, out of range, which the model drops.
        parts.append(np.asarray(pixel_values)[-n_pad_patches:])
        grids.append(np.array([[1, m, n_pad_patches // m]]))
        token_pos.append(input_ids.size + np.arange(n_pad_patches // m**2, dtype=np.int32))  # distinct
    if not parts:
        return out, None
    out.update(pixel_values=np.concatenate(parts), image_pos=np.concatenate(token_pos))
    return out, np.concatenate(grids)
