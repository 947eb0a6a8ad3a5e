"""Parity of jaxvlm.models.mllama_vision with transformers' MllamaVisionModel (Llama 3.2 Vision's vision encoder)
on a tiny random model in fp32: masked tiles, several images per sample, the processor's own output, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import MllamaVisionConfig as HFVisionConfig
from transformers import MllamaVisionModel as HFVisionModel
from transformers.models.mllama.image_processing_pil_mllama import (
    MllamaImageProcessorPil,
    get_all_supported_aspect_ratios,
)

from jaxvlm.models import mllama_vision
from jaxvlm.models.base import ConfigError
from jaxvlm.models.mllama_vision import (
    MllamaVisionModel,
    hf_key_map,
    prepare_vision_inputs,
    vision_config_from_hf,
)
from tests.tiny import with_hf_weights

TILES = 4
SIZE, PATCH = 28, 7  # 16 patches + class token = 17 tokens per tile, padded to 24


def hf_config(**overrides):
    kwargs = dict(hidden_size=36, intermediate_size=52, num_hidden_layers=4, num_global_layers=2,
                  attention_heads=3, image_size=SIZE, patch_size=PATCH, max_num_tiles=TILES,
                  intermediate_layers_indices=[2, 0], vision_output_dim=36 * 3, norm_eps=1e-6,
                  supported_aspect_ratios=[list(r) for r in get_all_supported_aspect_ratios(TILES)])
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
            if name.endswith(("gate", "gate_attn", "gate_ffn")):
                # transformers starts some gates at zero, which would hide whole branches: random signs, |g| >= 0.3
                sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
                p.copy_(sign * (0.3 + 0.9 * torch.rand(p.shape, generator=gen)))
            elif "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif ("layernorm" in name or name.startswith("transformer") or name.startswith("global")) \
                    and name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "embedding" in name and "patch" not in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    cfg = vision_config_from_hf(config)
    return hf, cfg, load(hf, cfg)


@pytest.fixture(params=["dense", "split"], autouse=True)
def attention_form(request, monkeypatch):
    """Each test with transformers' mask as an array ("dense") and without one ("split"): the setting is read at
    trace time, so the jit caches are cleared around it."""
    monkeypatch.setattr(mllama_vision, "vision_attention", request.param)
    jax.clear_caches()
    yield request.param
    jax.clear_caches()


def load(hf, cfg):
    """Our module with the transformers model's weights, per-layer tensors stacked by `hf_key_map`."""
    return with_hf_weights(MllamaVisionModel(cfg, jnp.float32), hf, hf_key_map(cfg))


def reference(hf, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
    with torch.no_grad():
        return hf(pixel_values=torch.as_tensor(np.asarray(pixel_values, np.float32)),
                  aspect_ratio_ids=torch.as_tensor(np.asarray(aspect_ratio_ids)).long(),
                  aspect_ratio_mask=torch.as_tensor(np.asarray(aspect_ratio_mask)).long()).last_hidden_state.numpy()


@nnx.jit(static_argnames="dtype")
def forward(model, inputs, dtype=jnp.float32):
    return model(**inputs, dtype=dtype)


def relative_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def tiles(rng, counts, max_images):
    """pixel_values / aspect_ratio_ids / aspect_ratio_mask as the processor lays them out, for `counts[b]` =
    aspect-ratio ids of sample b's images (tiles past an image's count and padding images are zeros)."""
    ratios = get_all_supported_aspect_ratios(TILES)
    b = len(counts)
    pixels = np.zeros((b, max_images, TILES, 3, SIZE, SIZE), np.float32)
    ids = np.zeros((b, max_images), np.int64)
    mask = np.zeros((b, max_images, TILES), np.int64)
    mask[:, :, 0] = 1
    for i, sample in enumerate(counts):
        for j, ratio_id in enumerate(sample):
            n = ratios[ratio_id - 1][0] * ratios[ratio_id - 1][1]
            pixels[i, j, :n] = rng.standard_normal((n, 3, SIZE, SIZE))
            ids[i, j] = ratio_id
            mask[i, j, :n] = 1
    return pixels, ids, mask


def test_key_map_and_config(models):
    hf, cfg, _ = models
    # transformers' per-layer names are stacked rows of ours, both encoders stacked separately
    key_map = hf_key_map(cfg)
    assert key_map["transformer.layers.3.self_attn.q_proj.weight"] == ("transformer.layers.self_attn.q_proj.weight", 3)
    assert key_map["global_transformer.layers.1.gate_ffn"] == ("global_transformer.layers.gate_ffn", 1)
    assert key_map["gated_positional_embedding.tile_embedding.weight"] == (
        "gated_positional_embedding.tile_embedding.weight", None)
    assert (cfg.num_patches, cfg.padded_patches, cfg.max_aspect_ratio_id, cfg.output_dim) == (17, 24, 8, 108)
    assert cfg.intermediate_layers_indices == (2, 0)
    assert hf.num_patches == cfg.num_patches


def test_masked_tiles_match_transformers(models):
    """Batch of 2: one 1-tile image against one 3-tile image (of 4 tiles): the switched-off tiles and the padding
    tokens change what the real tokens see (transformers masks only masked-to-masked pairs)."""
    hf, cfg, model = models
    pixels, ids, mask = tiles(np.random.default_rng(0), [[1], [3]], 1)
    ref = reference(hf, pixels, ids, mask)
    ours = forward(model, prepare_vision_inputs(cfg, pixels, ids, mask))
    assert ours.shape == ref.shape == (2, 1, TILES, 17, 108)
    assert relative_error(ours, ref) < 1e-4


def test_several_images_per_sample_match_transformers(models):
    """Sample 0: two images (2 tiles, 4 tiles); sample 1: one 3-tile image and a padding image (id 0)."""
    hf, cfg, model = models
    pixels, ids, mask = tiles(np.random.default_rng(1), [[2, 6], [7]], 2)
    ref = reference(hf, pixels, ids, mask)
    ours = forward(model, prepare_vision_inputs(cfg, pixels, ids, mask))
    assert ours.shape == ref.shape == (2, 2, TILES, 17, 108)
    assert relative_error(ours, ref) < 1e-4


def test_every_tile_on_matches_transformers_with_its_gradients(models, attention_form):
    """Images whose 4 tiles are all on (the masked tokens are the tiles' padding tokens alone: "split" then forms
    just those again), two per sample: the outputs and the gradients of a projection of them."""
    hf, cfg, model = models
    four = 1 + next(i for i, (a, b) in enumerate(get_all_supported_aspect_ratios(TILES)) if a * b == TILES)
    pixels, ids, mask = tiles(np.random.default_rng(5), [[four, four], [four, four]], 2)
    assert mask.all()
    inputs = prepare_vision_inputs(cfg, pixels, ids, mask)
    if attention_form == "split":
        assert bool(mllama_vision.split_mask(cfg, jnp.asarray(inputs["token_valid"].reshape(4, -1))).all_on)
    probe = np.random.default_rng(6).standard_normal((2, 2, TILES, 17, 108)).astype(np.float32)
    hf.zero_grad()
    out = hf(pixel_values=torch.as_tensor(pixels), aspect_ratio_ids=torch.as_tensor(ids),
             aspect_ratio_mask=torch.as_tensor(mask)).last_hidden_state
    (out * torch.as_tensor(probe)).sum().backward()
    assert relative_error(forward(model, inputs), out.detach().numpy()) < 1e-4
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(**inputs, dtype=jnp.float32) * probe)))(model)
    g = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(grads)}
    path, layer = hf_key_map(cfg)["transformer.layers.1.self_attn.k_proj.weight"]
    expected = dict(hf.named_parameters())["transformer.layers.1.self_attn.k_proj.weight"].grad.numpy()
    assert relative_error(g[path][layer], expected) < 1e-4


def test_processor_output_matches_transformers(models):
    hf, cfg, model = models
    processor = MllamaImageProcessorPil(size={"height": SIZE, "width": SIZE}, max_image_tiles=TILES)
    rng = np.random.default_rng(2)
    image = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    batch = processor(images=[[image(30, 28)], [image(28, 80), image(60, 50)]], return_tensors="np")
    assert batch["aspect_ratio_mask"].sum() < batch["aspect_ratio_mask"].size  # some tiles are switched off
    args = (batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
    ref = reference(hf, *args)
    ours = forward(model, prepare_vision_inputs(cfg, *args))
    assert ours.shape == ref.shape
    assert relative_error(ours, ref) < 1e-4


def test_gradients_with_remat_match_transformers(models):
    """Gradients of a random projection of the output, remat on, for params of the patch embedding, a local
    layer on each side of the taps, the gated global layers and the gated embeddings."""
    hf, cfg, model = models
    pixels, ids, mask = tiles(np.random.default_rng(3), [[1], [3]], 1)
    probe = np.random.default_rng(4).standard_normal((2, 1, TILES, 17, 108)).astype(np.float32)
    hf.zero_grad()
    out = hf(pixel_values=torch.as_tensor(pixels), aspect_ratio_ids=torch.as_tensor(ids),
             aspect_ratio_mask=torch.as_tensor(mask)).last_hidden_state
    (out * torch.as_tensor(probe)).sum().backward()
    expected = {n: p.grad.numpy() for n, p in hf.named_parameters()}

    inputs = prepare_vision_inputs(cfg, pixels, ids, mask)
    model.remat = "full"
    try:
        @nnx.jit
        def grads(m):
            return nnx.grad(lambda m: jnp.sum(m(**inputs, dtype=jnp.float32) * probe))(m)
        g = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(grads(model))}
    finally:
        model.remat = None
    key_map = hf_key_map(cfg)
    names = ["patch_embedding.weight", "class_embedding", "pre_tile_positional_embedding.gate",
             "gated_positional_embedding.gate", "gated_positional_embedding.tile_embedding.weight",
             "transformer.layers.0.self_attn.q_proj.weight", "transformer.layers.3.mlp.fc1.weight",
             "layernorm_post.weight", "global_transformer.layers.0.gate_attn", "global_transformer.layers.1.gate_ffn",
             "global_transformer.layers.1.self_attn.v_proj.weight", "post_tile_positional_embedding.embedding.weight"]
    for name in names:
        path, layer = key_map[name]
        ours = g[path] if layer is None else g[path][layer]
        assert np.max(np.abs(expected[name])) > 0, name
        assert relative_error(ours, expected[name]) < 1e-4, name


def test_prepare_rejects_bad_inputs(models):
    _, cfg, _ = models
    pixels, ids, mask = tiles(np.random.default_rng(0), [[1]], 1)
    with pytest.raises(ValueError, match="pixel_values has shape"):
        prepare_vision_inputs(cfg, pixels[:, :, :3], ids, mask[:, :, :3])
    with pytest.raises(ValueError, match="aspect_ratio_ids range"):
        prepare_vision_inputs(cfg, pixels, ids + 8, mask)
    with pytest.raises(ValueError, match="aspect_ratio_mask has shape"):
        prepare_vision_inputs(cfg, pixels, ids, mask[0])


@pytest.mark.parametrize("overrides,field", [
    (dict(vision_output_dim=36 * 4), "vision_output_dim"),
    (dict(intermediate_layers_indices=[0, 4]), "intermediate_layers_indices"),
    (dict(hidden_act="relu6"), "hidden_act"),
    (dict(image_size=30), "image_size"),
    (dict(attention_heads=5), "attention_heads"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"vision_config\.{field}="):
        vision_config_from_hf(hf_config(**overrides))


def test_bfloat16_runs_close_to_fp32_reference(models):
    hf, cfg, model = models
    pixels, ids, mask = tiles(np.random.default_rng(5), [[1], [3]], 1)
    ref = reference(hf, pixels, ids, mask)
    graphdef, state = nnx.split(model)
    bf16 = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
    ours = forward(bf16, prepare_vision_inputs(cfg, pixels, ids, mask), dtype=jnp.bfloat16)
    assert ours.dtype == jnp.bfloat16
    assert relative_error(np.asarray(ours.astype(jnp.float32)), ref) < 3e-2
