"""Parity of jaxvlm.models.pixtral_vision with transformers' PixtralVisionModel (the vision tower of Pixtral /
Mistral Small 3.x) on a tiny random model in fp32: images of different sizes packed into one sequence, block-diagonal
attention, bucket padding, gradients, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import PixtralVisionConfig as HFVisionConfig
from transformers import PixtralVisionModel as HFVisionModel

from jaxvlm.models.base import ConfigError
from jaxvlm.models.pixtral_vision import (
    PixtralVisionTower,
    hf_key_map,
    pixtral_config_from_hf,
    prepare_pixtral_inputs,
    rotary_cos_sin,
)
from tests.tiny import with_hf_weights

SIZE, PATCH = 48, 6  # at most 8 x 8 patches per image
SIZES = [(30, 42), (24, 18)]  # (height, width): 5 x 7 and 4 x 3 patches


def hf_config(**overrides):
    # head_dim 12: the rotary splits its 6 frequencies 3 / 3 between rows and columns
    kwargs = dict(hidden_size=36, intermediate_size=52, num_hidden_layers=3, num_attention_heads=3,
                  image_size=SIZE, patch_size=PATCH, hidden_act="silu", rope_parameters={"rope_theta": 97.0})
    kwargs.update(overrides)
    return HFVisionConfig(**kwargs)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = hf_config()
    config._attn_implementation = "eager"
    hf = HFVisionModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.startswith("ln_pre"):  # transformers starts the RMSNorm weights at one
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    cfg = pixtral_config_from_hf(config)
    return hf, cfg, load(hf, cfg)


def load(hf, cfg):
    """Our module with the transformers model's weights, per-layer tensors stacked by `hf_key_map`."""
    return with_hf_weights(PixtralVisionTower(cfg, jnp.float32), hf, hf_key_map(cfg))


def batch(rng, sizes):
    """pixel_values [images, 3, H_max, W_max] and image_sizes as the Pixtral processor lays them out: each image
    at the top left, zeros past its own size."""
    h_max, w_max = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixels = np.zeros((len(sizes), 3, h_max, w_max), np.float32)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, :h, :w] = rng.standard_normal((3, h, w))
    return pixels, np.array(sizes, np.int64)


def reference(hf, pixels, sizes):
    with torch.no_grad():
        out = hf(pixel_values=torch.as_tensor(pixels), image_sizes=torch.as_tensor(sizes)).last_hidden_state
    return out[0].numpy()


@nnx.jit(static_argnames="dtype")
def forward(model, inputs, dtype=jnp.float32):
    return model(**inputs, dtype=dtype)


def relative_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def test_key_map_and_layout(models):
    _, cfg, _ = models
    key_map = hf_key_map(cfg)
    assert key_map["transformer.layers.2.attention.q_proj.weight"] == ("transformer.layers.attention.q_proj.weight", 2)
    assert key_map["transformer.layers.0.feed_forward.gate_proj.weight"] == (
        "transformer.layers.feed_forward.gate_proj.weight", 0)
    assert key_map["transformer.layers.1.ffn_norm.weight"] == ("transformer.layers.ffn_norm.weight", 1)
    assert key_map["patch_conv.weight"] == ("patch_conv.weight", None)
    assert key_map["ln_pre.weight"] == ("ln_pre.weight", None)
    inputs = prepare_pixtral_inputs(cfg, *batch(np.random.default_rng(0), SIZES))
    assert inputs["patches"].shape == (35 + 12, 3 * PATCH * PATCH)
    np.testing.assert_array_equal(inputs["positions"][:8], [[0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [0, 5], [0, 6],
                                                            [1, 0]])
    np.testing.assert_array_equal(inputs["positions"][35:39], [[0, 0], [0, 1], [0, 2], [1, 0]])
    index = inputs["attn_index"]  # one row per image, padded with the out-of-range 47
    assert index.shape == (2, 48)
    np.testing.assert_array_equal(index[0], np.r_[np.arange(35), np.full(13, 47)])
    np.testing.assert_array_equal(index[1], np.r_[35 + np.arange(12), np.full(36, 47)])


def test_rotary_matches_transformers(models):
    hf, cfg, _ = models
    positions = np.array([[0, 0], [1, 0], [0, 1], [7, 5], [3, 6]])
    cos, sin = hf.patch_positional_embedding(torch.zeros(1), torch.as_tensor(positions))
    ours = rotary_cos_sin(cfg, jnp.asarray(positions, jnp.int32))
    np.testing.assert_allclose(ours[0], cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours[1], sin.numpy(), atol=1e-6)


def test_two_images_of_different_sizes_match_transformers(models):
    hf, cfg, model = models
    pixels, sizes = batch(np.random.default_rng(1), SIZES)
    ref = reference(hf, pixels, sizes)
    ours = forward(model, prepare_pixtral_inputs(cfg, pixels, sizes))
    assert ours.shape == ref.shape == (47, 36)
    assert relative_error(ours, ref) < 1e-5


def test_single_image_matches_transformers(models):
    """One full-size image (the whole 8 x 8 rotary grid), no image_sizes: transformers takes the array's size."""
    hf, cfg, model = models
    pixels = np.random.default_rng(2).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.as_tensor(pixels)).last_hidden_state[0].numpy()
    ours = forward(model, prepare_pixtral_inputs(cfg, pixels))
    assert ours.shape == ref.shape == (64, 36)
    assert relative_error(ours, ref) < 1e-5


def test_images_do_not_see_each_other_and_padding_keeps_the_outputs(models):
    hf, cfg, model = models
    pixels, sizes = batch(np.random.default_rng(3), SIZES)
    base = np.asarray(forward(model, prepare_pixtral_inputs(cfg, pixels, sizes)))
    changed = pixels.copy()
    changed[1, :, :24, :18] = np.random.default_rng(4).standard_normal((3, 24, 18))
    other = np.asarray(forward(model, prepare_pixtral_inputs(cfg, changed, sizes)))
    np.testing.assert_allclose(other[:35], base[:35], rtol=0, atol=1e-6 * np.abs(base).max())  # image 1 unchanged
    assert np.abs(other[35:] - base[35:]).max() > 1e-2  # image 2 did change
    # bucket padding: 49 padding patches, in segments no longer than the longest image (35)
    padded = prepare_pixtral_inputs(cfg, pixels, sizes, pad_to=96)
    assert padded["patches"].shape == (96, 108) and padded["attn_index"].shape[1] == 48
    out = np.asarray(forward(model, padded))
    assert out.shape == (96, 36)
    np.testing.assert_allclose(out[:47], base, rtol=0, atol=1e-5 * np.abs(base).max())
    with pytest.raises(ValueError, match="pad_to=40"):
        prepare_pixtral_inputs(cfg, pixels, sizes, pad_to=40)


def test_gradients_with_remat_match_transformers(models):
    """Gradients of a random projection of the output with respect to the input patches (the pixels) and to
    some weights, remat on."""
    hf, cfg, model = models
    pixels, sizes = batch(np.random.default_rng(5), SIZES)
    probe = np.random.default_rng(6).standard_normal((47, 36)).astype(np.float32)
    hf.zero_grad()
    x = torch.as_tensor(pixels).requires_grad_(True)
    out = hf(pixel_values=x, image_sizes=torch.as_tensor(sizes)).last_hidden_state[0]
    (out * torch.as_tensor(probe)).sum().backward()
    expected = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    expected_pixels = x.grad.numpy()

    inputs = prepare_pixtral_inputs(cfg, pixels, sizes, pad_to=64)
    padded_probe = np.concatenate([probe, np.zeros((17, 36), np.float32)])  # the padding rows' outputs dropped
    model.remat = "full"
    try:
        @nnx.jit
        def grads(m, patches):
            def loss(m, patches):
                return jnp.sum(m(patches, inputs["positions"], inputs["attn_index"], dtype=jnp.float32) * padded_probe)
            return nnx.grad(loss, argnums=(0, 1))(m, patches)
        g_model, g_patches = grads(model, jnp.asarray(inputs["patches"]))
        g = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(g_model)}
    finally:
        model.remat = None
    # the pixels' gradient, cut into patches the same way
    ref_patches = prepare_pixtral_inputs(cfg, expected_pixels, sizes)["patches"]
    assert relative_error(np.asarray(g_patches)[:47], ref_patches) < 1e-5
    assert not np.asarray(g_patches)[47:].any()
    key_map = hf_key_map(cfg)
    for name in ["patch_conv.weight", "ln_pre.weight", "transformer.layers.0.attention.q_proj.weight",
                 "transformer.layers.1.attention.k_proj.weight", "transformer.layers.2.attention.o_proj.weight",
                 "transformer.layers.0.feed_forward.gate_proj.weight",
                 "transformer.layers.2.feed_forward.up_proj.weight",
                 "transformer.layers.1.attention_norm.weight", "transformer.layers.2.ffn_norm.weight"]:
        path, layer = key_map[name]
        ours = g[path] if layer is None else g[path][layer]
        assert np.max(np.abs(expected[name])) > 0, name
        assert relative_error(ours, expected[name]) < 1e-5, name


def test_prepare_rejects_bad_inputs(models):
    _, cfg, _ = models
    pixels, sizes = batch(np.random.default_rng(0), SIZES)
    with pytest.raises(ValueError, match="image_sizes has 1 rows"):
        prepare_pixtral_inputs(cfg, pixels, sizes[:1])
    with pytest.raises(ValueError, match="exceeds"):
        prepare_pixtral_inputs(cfg, pixels, sizes + PATCH)
    with pytest.raises(ValueError, match="more than image_size // patch_size"):
        prepare_pixtral_inputs(cfg, np.zeros((1, 3, 54, 12), np.float32), [(54, 12)])
    with pytest.raises(ValueError, match="smaller than one patch"):
        prepare_pixtral_inputs(cfg, pixels, [(30, 42), (5, 18)])


@pytest.mark.parametrize("overrides,field", [
    (dict(hidden_act="relu6"), "hidden_act"),
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_attention_heads=4), "num_attention_heads"),  # head_dim 9: odd
    (dict(rope_parameters={"rope_theta": 10.0, "rope_type": "axial", "factor": 2.0}), "rope_parameters.factor"),
    (dict(head_dim=16), "head_dim"),
    (dict(image_size=4), "image_size"),
])
def test_config_errors_name_the_field(overrides, field):
    config = hf_config()
    for name, value in overrides.items():  # set afterwards: transformers' own validation refuses some at __init__
        setattr(config, name, value)
    with pytest.raises(ConfigError, match=rf"vision_config\.{field}="):
        pixtral_config_from_hf(config)


def test_bfloat16_runs_close_to_fp32_reference(models):
    hf, cfg, model = models
    pixels, sizes = batch(np.random.default_rng(8), SIZES)
    ref = reference(hf, pixels, sizes)
    graphdef, state = nnx.split(model)
    bf16 = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
    ours = forward(bf16, prepare_pixtral_inputs(cfg, pixels, sizes), dtype=jnp.bfloat16)
    assert ours.dtype == jnp.bfloat16
    assert relative_error(np.asarray(ours.astype(jnp.float32)), ref) < 3e-2
