"""LLaVA-NeXT's anyres packing (jaxvlm.models.anyres) against transformers: the packed features of
LlavaNextModel.pack_image_features, the tiles and <image> expansion of LlavaNextProcessor (PIL backend),
and get_image_features end to end on a tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxvlm.models.anyres import (anyres_layout, grid_shape, pack_features, select_best_resolution, select_tiles,
                                  tiles_per_image, unpadded_window)
from tests.conftest import random_image

TILE, PATCH = 28, 7
PPS = TILE // PATCH  # 4 x 4 feature rows per tile
IMAGE_TOKEN_ID = 2

PINPOINTS = {
    "2-tiles": [[28, 56], [56, 28], [56, 56]],
    "3-across": [[28, 84], [84, 28], [56, 56], [28, 28]],
    "big": [[56, 84], [84, 56], [84, 84], [28, 112], [112, 28]],
}
# (height, width): wide, tall, square, tiny, larger than every pinpoint, odd paddings, one pixel thin (no map
# row / column kept), and sizes where the kept rows are x.9999999999 in float64 (the round(..., 7) matters).
SIZES = [(30, 70), (70, 30), (50, 50), (5, 3), (300, 200), (37, 101), (64, 29), (1, 200), (200, 1), (28, 28),
         (47, 188), (188, 47), (343, 392)]


def hf_config(pinpoints, tile=TILE, patch=PATCH, hidden=16):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
    vision = CLIPVisionConfig(image_size=tile, patch_size=patch, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=hidden)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=8)
    return LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_grid_pinpoints=pinpoints,
                           image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                           vision_feature_select_strategy="default")


def hf_pack(config, features, image_sizes, newline):
    """transformers' pack_image_features on per-image feature lists; (features [tokens, d], lengths)."""
    from types import SimpleNamespace

    from transformers import LlavaNextModel
    packed, lengths = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=config), list(features), torch.as_tensor(image_sizes), "default",
        image_newline=None if newline is None else torch.from_numpy(newline))
    return torch.cat(packed).numpy(), lengths.numpy()


def tiny_processor(pinpoints, tile=TILE, patch=PATCH):
    """LlavaNextProcessor (PIL image processor) with a three-word tokenizer, as llava-v1.6 checkpoints set it."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor, PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "<image>": IMAGE_TOKEN_ID}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")
    images = LlavaNextImageProcessor(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                     image_grid_pinpoints=pinpoints)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def image_runs(input_ids):
    """Lengths of the runs of image tokens in a row of ids."""
    is_image = np.r_[False, input_ids == IMAGE_TOKEN_ID, False].astype(np.int8)
    starts, ends = np.flatnonzero(np.diff(is_image) == 1), np.flatnonzero(np.diff(is_image) == -1)
    return (ends - starts).tolist()


@pytest.fixture(scope="module")
def warnings_quiet():
    """Silences transformers' "falling back to LlavaNextImageProcessorPil" warning for this module's tests."""
    from transformers.utils import logging
    before = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(before)


# -- the packing against transformers' pack_image_features ------------------------------------------


@pytest.mark.parametrize("name", sorted(PINPOINTS))
@pytest.mark.parametrize("newline", [True, False])
def test_packed_features_equal_transformers(name, newline):
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches)
    pinpoints = PINPOINTS[name]
    config = hf_config(pinpoints)
    sizes = np.asarray(SIZES, np.int64)
    layout = anyres_layout(sizes, pinpoints, TILE, PPS, image_newline=newline)
    hf_tiles = [image_size_to_num_patches(s, pinpoints, TILE) for s in sizes]
    np.testing.assert_array_equal(layout.tiles_per_image, hf_tiles)
    np.testing.assert_array_equal(layout.grid, [get_anyres_image_grid_shape(s, pinpoints, TILE) for s in sizes])
    assert layout.n_rows == sum(hf_tiles) * PPS**2

    rng = np.random.default_rng(0)
    d = 12
    features = rng.standard_normal((sum(hf_tiles), PPS**2, d)).astype(np.float32)
    image_newline = rng.standard_normal(d).astype(np.float32)
    expected, lengths = hf_pack(config, torch.split(torch.from_numpy(features), hf_tiles), sizes,
                                image_newline if newline else None)
    ours = pack_features(jnp.asarray(features), jnp.asarray(image_newline) if newline else None,
                         layout.feature_index, n_rows=layout.n_rows)
    np.testing.assert_array_equal(layout.tokens_per_image, lengths)
    assert ours.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ours), expected)

    # one gather under jit, the index a traced argument
    jitted = jax.jit(pack_features)(jnp.asarray(features), jnp.asarray(image_newline) if newline else None,
                                    jnp.asarray(layout.feature_index))
    np.testing.assert_array_equal(np.asarray(jitted), expected)


@pytest.mark.parametrize("name", sorted(PINPOINTS))
def test_token_counts_equal_the_processors_count(name, warnings_quiet):
    pinpoints = PINPOINTS[name]
    processor = tiny_processor(pinpoints)
    layout = anyres_layout(SIZES, pinpoints, TILE, PPS)
    # _get_number_of_features counts the CLS (num_additional_image_tokens=1) that "default" then drops
    counts = [processor._get_number_of_features(h, w, TILE, TILE) - 1 for h, w in SIZES]
    np.testing.assert_array_equal(layout.tokens_per_image, counts)


def test_the_pieces_equal_transformers_functions():
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import unpad_image
    rng = np.random.default_rng(1)
    for name, pinpoints in PINPOINTS.items():
        for h, w in [*SIZES, *rng.integers(1, 400, (40, 2)).tolist()]:
            assert select_best_resolution((h, w), pinpoints) == hf_select((h, w), pinpoints), (name, h, w)
            rows, cols = grid_shape((h, w), pinpoints, TILE)
            grid = torch.arange(rows * PPS * cols * PPS).reshape(1, rows * PPS, cols * PPS)
            top, bottom, left, right = unpadded_window((h, w), rows * PPS, cols * PPS)
            np.testing.assert_array_equal(grid[0, top:bottom, left:right].numpy(), unpad_image(grid, [h, w])[0])


# -- the processor's tiles, <image> expansion, and tile selection ------------------------------------


@pytest.mark.parametrize("name", sorted(PINPOINTS))
def test_processor_tiles_and_expansion(name, warnings_quiet):
    pinpoints = PINPOINTS[name]
    processor = tiny_processor(pinpoints)
    images = [random_image(w, h, seed=i) for i, (h, w) in enumerate(SIZES)]
    out = processor(text=[" a ".join(["<image>"] * len(images))], images=images, return_tensors="np")
    pixels, sizes = out["pixel_values"], out["image_sizes"]
    np.testing.assert_array_equal(sizes, SIZES)
    layout = anyres_layout(sizes, pinpoints, TILE, PPS, max_tiles=pixels.shape[1])
    np.testing.assert_array_equal(image_runs(out["input_ids"][0]), layout.tokens_per_image)

    # real tiles are never all zero (normalisation moves black off zero); the padding tiles are zeros
    real = np.abs(pixels).reshape(*pixels.shape[:2], -1).max(-1) > 0
    np.testing.assert_array_equal(real.sum(1), layout.tiles_per_image)
    np.testing.assert_array_equal(tiles_per_image(sizes, pinpoints, TILE), layout.tiles_per_image)
    assert all(r[:n].all() for r, n in zip(real, layout.tiles_per_image))
    tiles = select_tiles(pixels, sizes, pinpoints)
    assert tiles.shape == (layout.tiles_per_image.sum(), 3, TILE, TILE)
    np.testing.assert_array_equal(tiles, pixels[real])


def test_get_image_features_end_to_end(warnings_quiet):
    """transformers' get_image_features on the processor's output = the torch tower on select_tiles' tiles,
    packed by pack_features."""
    from transformers import LlavaNextModel
    pinpoints = PINPOINTS["3-across"]
    config = hf_config(pinpoints)
    torch.manual_seed(0)
    model = LlavaNextModel(config).eval()
    sizes = [(30, 70), (300, 200), (5, 3), (64, 29)]
    images = [random_image(w, h, seed=i) for i, (h, w) in enumerate(sizes)]
    out = tiny_processor(pinpoints)(text=["<image>"] * len(images), images=images, return_tensors="np")
    with torch.no_grad():
        expected = model.get_image_features(torch.from_numpy(out["pixel_values"]),
                                            torch.from_numpy(out["image_sizes"])).pooler_output
        expected = torch.cat(expected).numpy()
        tiles = torch.from_numpy(select_tiles(out["pixel_values"], out["image_sizes"], pinpoints))
        hidden = model.vision_tower(tiles, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        features = model.multi_modal_projector(hidden[:, 1:]).numpy()
        newline = model.image_newline.numpy()
    layout = anyres_layout(out["image_sizes"], pinpoints, TILE, PPS)
    ours = pack_features(jnp.asarray(features), jnp.asarray(newline), layout.feature_index, n_rows=layout.n_rows)
    np.testing.assert_array_equal(np.asarray(ours), expected)


# -- what is refused ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes,message", [
    ([30, 70], r"image_sizes of shape \(2,\): expected \[images, 2\]"),
    ([[30, 70, 3]], r"image_sizes of shape \(1, 3\): expected \[images, 2\]"),
    (np.zeros((2, 2, 1)), r"image_sizes of shape \(2, 2, 1\)"),
    ([[30, 0]], "must be positive"),
    ([[30.5, 70]], "whole numbers"),
])
def test_bad_image_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        anyres_layout(sizes, PINPOINTS["2-tiles"], TILE, PPS)
    with pytest.raises(ValueError, match=message):
        tiles_per_image(sizes, PINPOINTS["2-tiles"], TILE)


@pytest.mark.parametrize("pinpoints,message", [
    ([[28, 50]], r"\[28, 50\] is not a multiple of the tile size 28"),
    ([], "grid_pinpoints is empty"),
    ([[28]], r"expected \(height, width\)"),
    ([[28, -28]], r"expected \(height, width\)"),
    (28, "expected a list of"),
])
def test_bad_pinpoints(pinpoints, message):
    with pytest.raises(ValueError, match=message):
        anyres_layout([[30, 70]], pinpoints, TILE, PPS)


def test_full_strategy_is_refused_as_transformers_cannot_pack_it():
    from transformers import LlavaNextModel
    with pytest.raises(ValueError, match="'full' keeps the CLS row"):
        anyres_layout([[30, 70]], PINPOINTS["2-tiles"], TILE, PPS, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="expected one of"):
        anyres_layout([[30, 70]], PINPOINTS["2-tiles"], TILE, PPS, vision_feature_select_strategy="cls")
    # transformers: grid tiles with the CLS row (17 rows) do not reshape into 4 x 4 maps
    from types import SimpleNamespace
    config = hf_config(PINPOINTS["2-tiles"])
    for d in (16, 10):  # 16: the view "works" with a wrong width, then the newline does not fit
        with pytest.raises(RuntimeError):
            LlavaNextModel.pack_image_features(SimpleNamespace(config=config), [torch.zeros(3, PPS**2 + 1, d)],
                                               torch.tensor([[30, 70]]), "full", image_newline=torch.zeros(d))


def test_other_refusals():
    pinpoints = PINPOINTS["3-across"]
    with pytest.raises(ValueError, match=r"has 4 tiles .* more than max_tiles=3"):
        anyres_layout([[30, 90]], pinpoints, TILE, PPS, max_tiles=3)
    with pytest.raises(ValueError, match="patches_per_side=0"):
        anyres_layout([[30, 90]], pinpoints, TILE, 0)
    pixels = np.zeros((2, 3, 3, TILE, TILE), np.float32)
    with pytest.raises(ValueError, match="pixel_values has 2 images, image_sizes 1"):
        select_tiles(pixels, [[30, 90]], pinpoints)
    with pytest.raises(ValueError, match="has 4 tiles .* pixel_values only 3"):
        select_tiles(pixels[:1], [[30, 90]], pinpoints)
    with pytest.raises(ValueError, match=r"expected \[images, max_tiles, channels, size, size\]"):
        select_tiles(pixels[0], [[30, 90]], pinpoints)
    layout = anyres_layout([[30, 90]], pinpoints, TILE, PPS)
    features, newline = jnp.zeros((3, PPS**2, 8)), jnp.zeros(8)
    with pytest.raises(ValueError, match="hold 48 rows, the layout 64"):
        pack_features(features, newline, layout.feature_index, n_rows=layout.n_rows)
    with pytest.raises(ValueError, match="feature_index reaches row 64, the table has 49 rows"):
        pack_features(features, newline, layout.feature_index)
    with pytest.raises(ValueError, match=r"image_newline of shape \(7,\)"):
        pack_features(jnp.zeros((4, PPS**2, 8)), jnp.zeros(7), layout.feature_index)


def test_no_images():
    layout = anyres_layout(np.zeros((0, 2), np.int64), PINPOINTS["2-tiles"], TILE, PPS)
    assert layout.feature_index.shape == (0,) and layout.tokens_per_image.shape == (0,) and layout.n_rows == 0
    assert select_tiles(np.zeros((0, 3, 3, TILE, TILE)), np.zeros((0, 2)), PINPOINTS["2-tiles"]).shape == \
        (0, 3, TILE, TILE)
