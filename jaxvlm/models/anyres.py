"""LLaVA-NeXT's "anyres" image features: which tiles go through the vision tower, and how their features are
packed into each image's token sequence. The host side (numpy) works out an index; the device side is one
`jnp.take`, so the jit'd forward has no Python loop over images and no data-dependent shapes.

The tiles (LlavaNextImageProcessor). An image of (height, width) pixels gets a best resolution out of the
config's `image_grid_pinpoints` (`select_best_resolution`: the pinpoint keeping the most of the image's pixels
once it is scaled to fit, ties going to the one that wastes least, then to the earlier one). The image is
scaled to fit that resolution, centred on zero padding, and cut into a rows x cols grid of square tiles of the
tower's image size (`tile_size`). Its tiles are the base tile (the whole image resized to one tile) followed
by the grid's tiles in row-major order: 1 + rows * cols of them (transformers' `image_size_to_num_patches`).
The processor stacks the images' tiles into pixel_values [images, max_tiles, 3, s, s], padding with zero
tiles; `select_tiles` keeps the real ones, [sum of tiles, 3, s, s], which is what the tower runs on.

The features (transformers' `LlavaNextModel.pack_image_features`, "spatial_unpad"). The tower (CLIP, with
vision_feature_select_strategy="default": the CLS row dropped) and the projector give every tile a
patches_per_side x patches_per_side map of feature rows, row-major. An image's tokens are
  1. its base tile's patches_per_side**2 rows, in order;
  2. its grid tiles' maps put side by side into one (rows * pps) x (cols * pps) map, then unpadded: of the
     map's rows (if the image is wider than the map) or columns (otherwise) the bands that are the zero
     padding of the processor are cut off. The kept height (or width) is
     int(round(original_height * map_width / original_width, 7)), that is floored unless within 5e-8 of
     the next integer, and the cut is (map_height - kept) // 2 from each side, so that when the
     difference is odd one more row (column) than `kept` stays. The comparison that picks the side is
     original_width / original_height > map_width / map_height, in float64 as in transformers;
  3. the map row by row, each row followed by the `image_newline` vector (when the model has one;
     LLaVA-NeXT always does).
An extremely thin image may keep no map row at all; its tokens are then the base tile's only.

So the packed tokens of all images, in order, are rows of one table: the tower's features of all real
tiles, [tiles * pps**2, d], with image_newline as one more row at the end (index tiles * pps**2).
`anyres_layout` gives the row index of every image token (`feature_index`), the tiles per image and the
tokens per image (equal to what LlavaNextProcessor expands each <image> into: `_get_number_of_features`,
less the CLS it counts through num_additional_image_tokens=1 under "default"); `pack_features` gathers
them on the device.

vision_feature_select_strategy="full" keeps the CLS row: pps**2 + 1 rows per tile. transformers cannot
pack that for LLaVA-NeXT: every image has at least one grid tile, whose pps**2 + 1 rows do not reshape
into a pps x pps map (a RuntimeError, or, where the sizes happen to divide, a map of wrong width that then
fails to join the newline or the base tile). `anyres_layout` refuses it with a ValueError.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Sequence

import numpy as np

STRATEGIES = ("default", "full")


# -- validation --------------------------------------------------------------------------------------


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return int(value)


def _image_sizes(image_sizes) -> np.ndarray:
    """image_sizes as an int64 array [images, 2] of (height, width), every value a positive integer."""
    try:
        sizes = np.asarray(image_sizes)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"image_sizes: expected an array [images, 2] of (height, width), got {image_sizes!r}") \
            from e
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"image_sizes of shape {sizes.shape}: expected [images, 2], one (height, width) per image "
                         f"(the processor's image_sizes)")
    if sizes.size and not (np.issubdtype(sizes.dtype, np.integer)
                           or (np.issubdtype(sizes.dtype, np.floating) and np.isfinite(sizes).all()
                               and (sizes == np.round(sizes)).all())):
        raise ValueError(f"image_sizes of dtype {sizes.dtype}: expected whole numbers of pixels")
    sizes = sizes.astype(np.int64)
    if (sizes <= 0).any():
        raise ValueError(f"image_sizes: every height and width must be positive, got {sizes.tolist()}")
    return sizes


def pinpoints(grid_pinpoints, tile_size: int) -> list[tuple[int, int]]:
    """grid_pinpoints as a list of (height, width), each a positive multiple of tile_size."""
    tile_size = _positive_int(tile_size, "tile_size")
    try:
        points = [tuple(p) for p in grid_pinpoints]
    except TypeError:
        raise ValueError(f"grid_pinpoints={grid_pinpoints!r}: expected a list of (height, width) pairs") from None
    if not points:
        raise ValueError("grid_pinpoints is empty: expected at least one (height, width)")
    out = []
    for p in points:
        if len(p) != 2 or any(isinstance(v, bool) or not isinstance(v, Integral) or v <= 0 for v in p):
            raise ValueError(f"grid_pinpoints entry {p!r}: expected (height, width), two positive integers")
        if p[0] % tile_size or p[1] % tile_size:
            # transformers counts a partial tile in the tile count (image_size_to_num_patches) but not in the
            # grid it lays the features out on (get_anyres_image_grid_shape): such a config cannot run.
            raise ValueError(f"grid_pinpoints entry {list(p)} is not a multiple of the tile size {tile_size} "
                             f"(the vision tower's image_size): LLaVA-NeXT cuts each pinpoint into whole tiles")
        out.append((int(p[0]), int(p[1])))
    return out


# -- one image ---------------------------------------------------------------------------------------


def select_best_resolution(image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) of `grid_pinpoints` an image of `image_size` (height, width) is fitted to.

    The image scaled (aspect kept) to fit inside a pinpoint keeps int(w * s) * int(h * s) pixels, at most
    its own count: the pinpoint keeping most wins; among equals the one with the smallest area left over,
    then the earlier one (transformers' `select_best_resolution`, same float arithmetic).
    """
    height, width = (int(v) for v in image_size)
    best, best_kept, best_waste = None, 0, float("inf")
    for ph, pw in grid_pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (ph, pw), kept, waste
    return best


def grid_shape(image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int) -> tuple[int, int]:
    """(rows, cols) of grid tiles of an image of `image_size` (height, width); the base tile not counted."""
    points = pinpoints(grid_pinpoints, tile_size)
    height, width = select_best_resolution(image_size, points)
    return height // tile_size, width // tile_size


def unpadded_window(image_size: Sequence[int], map_height: int, map_width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the part [top:bottom, left:right] of a map_height x map_width patch map
    of a padded image that the image of `image_size` (height, width) covers (transformers' `unpad_image`)."""
    height, width = (int(v) for v in image_size)
    if width / height > map_width / map_height:  # wider than the map: padding above and below
        kept = int(round(height * (map_width / width), 7))
        cut = (map_height - kept) // 2
        return cut, map_height - cut, 0, map_width
    kept = int(round(width * (map_height / height), 7))
    cut = (map_width - kept) // 2
    return 0, map_height, cut, map_width - cut


# -- all images --------------------------------------------------------------------------------------


def tiles_per_image(image_sizes, grid_pinpoints: Sequence[Sequence[int]], tile_size: int) -> np.ndarray:
    """The number of real tiles of every image, base tile included: int32 [images]
    (transformers' `image_size_to_num_patches`)."""
    sizes = _image_sizes(image_sizes)
    points = pinpoints(grid_pinpoints, tile_size)
    counts = []
    for size in sizes.tolist():
        height, width = select_best_resolution(size, points)
        counts.append(1 + (height // tile_size) * (width // tile_size))
    return np.asarray(counts, np.int32).reshape(len(sizes))


def select_tiles(pixel_values: np.ndarray, image_sizes, grid_pinpoints: Sequence[Sequence[int]]) -> np.ndarray:
    """The real tiles of the processor's pixel_values [images, max_tiles, C, s, s] (zero tiles padding every
    image to max_tiles), image by image: [sum of tiles_per_image, C, s, s]. The tile size is s."""
    pixels = np.asarray(pixel_values)
    if pixels.ndim != 5 or pixels.shape[-1] != pixels.shape[-2]:
        raise ValueError(f"pixel_values of shape {pixels.shape}: expected [images, max_tiles, channels, size, size] "
                         f"(LlavaNextImageProcessor's pixel_values)")
    sizes = _image_sizes(image_sizes)
    if len(sizes) != len(pixels):
        raise ValueError(f"pixel_values has {len(pixels)} images, image_sizes {len(sizes)}")
    counts = tiles_per_image(sizes, grid_pinpoints, pixels.shape[-1])
    if len(counts) and counts.max() > pixels.shape[1]:
        i = int(counts.argmax())
        raise ValueError(f"image {i} of size {sizes[i].tolist()} has {counts[i]} tiles under grid_pinpoints "
                         f"{list(grid_pinpoints)}, pixel_values only {pixels.shape[1]}: the processor's "
                         f"image_grid_pinpoints or size differ from the model's")
    if not len(counts):
        return pixels.reshape(0, *pixels.shape[2:])
    return np.concatenate([image[:n] for image, n in zip(pixels, counts.tolist())])


@dataclass(frozen=True)
class AnyresLayout:
    """Where every image token's feature row comes from (see the module docstring).

    tiles_per_image: int32 [images], base tile included: the tiles the tower runs on, image by image.
    grid: int32 [images, 2], (rows, cols) of every image's grid tiles.
    tokens_per_image: int32 [images], the packed tokens of every image (the processor's <image> expansion).
    feature_index: int32 [tokens_per_image.sum()], the tokens of all images in order, as rows of the table
        concat([features of all real tiles reshaped to [n_rows, d], image_newline[None]]).
    n_rows: tiles_per_image.sum() * patches_per_side**2; also the index of the image_newline row.
    """
    tiles_per_image: np.ndarray
    grid: np.ndarray
    tokens_per_image: np.ndarray
    feature_index: np.ndarray
    n_rows: int


def anyres_layout(image_sizes, grid_pinpoints: Sequence[Sequence[int]], tile_size: int, patches_per_side: int, *,
                  max_tiles: int | None = None, image_newline: bool = True,
                  vision_feature_select_strategy: str = "default") -> AnyresLayout:
    """The packing of LLaVA-NeXT's image features for images of `image_sizes` [images, 2] (height, width).

    grid_pinpoints: the config's image_grid_pinpoints, (height, width) pairs, multiples of tile_size.
    tile_size: the vision tower's image_size (the processor's crop size); patches_per_side: image_size //
    patch_size, so a tile has patches_per_side**2 feature rows. max_tiles: pixel_values.shape[1], if given
    checked to hold every image's tiles. image_newline: whether the model has the newline vector (each map
    row then ends with it). vision_feature_select_strategy: the config's; only "default" can be packed.
    """
    if vision_feature_select_strategy not in STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy={vision_feature_select_strategy!r}: expected one of "
                         f"{STRATEGIES}")
    if vision_feature_select_strategy == "full":
        raise ValueError("vision_feature_select_strategy='full' keeps the CLS row, patches_per_side**2 + 1 feature "
                         "rows per tile, which LLaVA-NeXT's anyres packing cannot lay out as a patch map "
                         "(transformers fails on it too); use 'default'")
    pps = _positive_int(patches_per_side, "patches_per_side")
    points = pinpoints(grid_pinpoints, tile_size)
    sizes = _image_sizes(image_sizes)
    grids = np.asarray([[h // tile_size, w // tile_size] for h, w in
                        (select_best_resolution(s, points) for s in sizes.tolist())], np.int64).reshape(-1, 2)
    tiles = 1 + grids[:, 0] * grids[:, 1]
    if max_tiles is not None and len(tiles) and tiles.max() > _positive_int(max_tiles, "max_tiles"):
        i = int(tiles.argmax())
        raise ValueError(f"image {i} of size {sizes[i].tolist()} has {tiles[i]} tiles under grid_pinpoints "
                         f"{points}, more than max_tiles={max_tiles}")
    per_tile = pps * pps
    n_rows = int(tiles.sum()) * per_tile
    if n_rows >= 2 ** 31 - 1:
        raise ValueError(f"{n_rows} feature rows do not fit an int32 index")
    first_tiles = np.concatenate([[0], np.cumsum(tiles)[:-1]]).astype(np.int64)
    pieces, counts = [], []
    for size, (rows, cols), first in zip(sizes.tolist(), grids.tolist(), first_tiles.tolist()):
        top, bottom, left, right = unpadded_window(size, rows * pps, cols * pps)
        y = np.arange(top, bottom)[:, None]
        x = np.arange(left, right)[None, :]
        tile = first + 1 + (y // pps) * cols + x // pps  # +1: the base tile comes first
        grid_rows = tile * per_tile + (y % pps) * pps + x % pps
        if image_newline:
            grid_rows = np.concatenate([grid_rows, np.full((len(grid_rows), 1), n_rows)], axis=1)
        piece = np.concatenate([first * per_tile + np.arange(per_tile), grid_rows.reshape(-1)])
        pieces.append(piece)
        counts.append(len(piece))
    index = np.concatenate(pieces) if pieces else np.zeros((0,), np.int64)
    return AnyresLayout(tiles_per_image=tiles.astype(np.int32), grid=grids.astype(np.int32),
                        tokens_per_image=np.asarray(counts, np.int32).reshape(len(sizes)),
                        feature_index=index.astype(np.int32), n_rows=n_rows)


# -- device side -------------------------------------------------------------------------------------


def pack_features(features, image_newline, feature_index, *, n_rows: int | None = None):
    """The packed image tokens [len(feature_index), d]: rows `feature_index` of the table
    concat([features.reshape(-1, d), image_newline[None]]), one gather.

    features: [tiles, patches_per_tile, d], the projected tower features of the real tiles in the layout's
    order; image_newline: [d], or None for a model without one (a layout made with image_newline=False);
    feature_index: AnyresLayout.feature_index (traced or not). n_rows: the layout's n_rows, if given checked
    against features (a mismatch would move the newline row into the features).
    """
    import jax.numpy as jnp

    if features.ndim != 3:
        raise ValueError(f"features of shape {features.shape}: expected [tiles, patches_per_tile, d]")
    d = features.shape[-1]
    rows = features.shape[0] * features.shape[1]
    if n_rows is not None and n_rows != rows:
        raise ValueError(f"features of shape {features.shape} hold {rows} rows, the layout {n_rows}: the tower ran "
                         f"on other tiles than the layout's (select_tiles)")
    table = features.reshape(rows, d)
    if image_newline is not None:
        if image_newline.shape != (d,):
            raise ValueError(f"image_newline of shape {image_newline.shape}: expected ({d},), the features' width")
        table = jnp.concatenate([table, image_newline[None].astype(table.dtype)], axis=0)
    if isinstance(feature_index, np.ndarray) and feature_index.size and feature_index.max() >= table.shape[0]:
        raise ValueError(f"feature_index reaches row {feature_index.max()}, the table has {table.shape[0]} rows")
    return jnp.take(table, feature_index, axis=0)
