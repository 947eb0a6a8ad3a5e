"""Parity of jaxvlm.models.clip_vision with transformers' CLIPVisionModel (LLaVA's vision tower) on a tiny random
model in fp32: the hidden states LLaVA selects (vision_feature_layer, one or several), gradients, the early stop
past the deepest selected layer, NF4 + LoRA weights in the sliced stack, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPVisionConfig as HFVisionConfig
from transformers import CLIPVisionModel as HFVisionModel

from jaxvlm.layers import dense_weight
from jaxvlm.lora import LoRA
from jaxvlm.models.base import ConfigError
from jaxvlm.models.clip_vision import (
    CLIPVisionTower,
    clip_config_from_hf,
    feature_layer_indices,
    hf_key_map,
    patchify,
)
from jaxvlm.quant import NF4
from jaxvlm.quantize import linear_weight_keys, quantize
from tests.tiny import with_hf_weights

LAYERS = 4  # hidden_states has 5 entries: the embeddings and each layer's output
SIZE, PATCH = 30, 6  # 25 patches + the class token


def hf_config(**overrides):
    kwargs = dict(hidden_size=36, intermediate_size=52, num_hidden_layers=LAYERS, num_attention_heads=3,
                  image_size=SIZE, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5)
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
            if "norm" in name and name.endswith("weight"):  # pre_layrnorm, layer_norm1/2, post_layernorm
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "class_embedding" in name or "position_embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    cfg = clip_config_from_hf(config)
    return hf, cfg, load(hf, cfg)


def load(hf, cfg):
    """Our module with the transformers model's weights, per-layer tensors stacked by `hf_key_map`."""
    return with_hf_weights(CLIPVisionTower(cfg, jnp.float32), hf, hf_key_map(cfg))


def pixels(seed, n=2):
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def reference(hf, pixel_values):
    with torch.no_grad():
        out = hf(pixel_values=torch.as_tensor(pixel_values), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


@nnx.jit(static_argnames=("dtype", "feature_layers"))
def forward(model, patches, feature_layers, dtype=jnp.float32):
    return model(patches, dtype, feature_layers)


def relative_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def test_key_map_and_config(models):
    hf, cfg, _ = models
    key_map = hf_key_map(cfg)
    assert key_map["encoder.layers.3.self_attn.out_proj.bias"] == ("encoder.layers.self_attn.out_proj.bias", 3)
    assert key_map["embeddings.class_embedding"] == ("embeddings.class_embedding", None)
    assert key_map["pre_layrnorm.weight"] == ("pre_layrnorm.weight", None)
    assert "post_layernorm.bias" in key_map  # held (checkpoints carry it) though LLaVA never applies it
    assert (cfg.num_patches, cfg.num_positions, cfg.patch_dim, cfg.head_dim) == (25, 26, 108, 12)
    assert hf.embeddings.num_positions == cfg.num_positions
    assert feature_layer_indices(cfg, -2) == (3,)
    assert feature_layer_indices(cfg, [-2, -5, 4]) == (3, 0, 4)


@pytest.mark.parametrize("feature_layers", [-2, (-1,), (0,), (-2, -5), (3, 1, -1, 1)])
def test_hidden_states_match_transformers(models, feature_layers):
    hf, cfg, model = models
    x = pixels(0)
    ref = reference(hf, x)
    assert len(ref) == LAYERS + 1
    ours = forward(model, patchify(cfg, x), feature_layers)
    wanted = (feature_layers,) if isinstance(feature_layers, int) else feature_layers
    assert len(ours) == len(wanted)
    for i, h in zip(wanted, ours):
        assert h.shape == ref[i].shape == (2, 26, 36)
        assert relative_error(h, ref[i]) < 1e-5, i


def test_gradients_with_remat_match_transformers(models):
    """Gradients of random projections of hidden_states[-2] and [1] (two scans, remat on) wrt the pixels (as
    patches) and some params; the last layer and post_layernorm get none."""
    hf, cfg, model = models
    x = pixels(1)
    rng = np.random.default_rng(2)
    probes = [rng.standard_normal((2, 26, 36)).astype(np.float32) for _ in range(2)]
    hf.zero_grad()
    pt = torch.as_tensor(x).requires_grad_(True)
    hs = hf(pixel_values=pt, output_hidden_states=True).hidden_states
    (sum((h * torch.as_tensor(p)).sum() for h, p in zip((hs[-2], hs[1]), probes))).backward()
    expected = {n: (p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32))
                for n, p in hf.named_parameters()}
    expected_input = patchify(cfg, pt.grad.numpy())  # patchify is a permutation: the gradient moves with it

    def loss(m, patches):
        return sum(jnp.sum(h * p) for h, p in zip(m(patches, jnp.float32, (-2, 1)), probes))

    model.remat = "full"
    try:
        @nnx.jit
        def grads(m, patches):
            return nnx.grad(loss, argnums=(0, 1))(m, patches)
        g_model, g_input = grads(model, jnp.asarray(patchify(cfg, x)))
    finally:
        model.remat = None
    assert relative_error(g_input, expected_input) < 1e-5
    g = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(g_model)}
    key_map = hf_key_map(cfg)
    for name in ["embeddings.patch_embedding.weight", "embeddings.class_embedding",
                 "embeddings.position_embedding.weight", "pre_layrnorm.bias",
                 "encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.1.mlp.fc1.bias",
                 "encoder.layers.2.layer_norm2.weight", "encoder.layers.2.self_attn.k_proj.weight"]:
        path, layer = key_map[name]
        ours = g[path] if layer is None else g[path][layer]
        assert np.max(np.abs(expected[name])) > 0, name
        assert relative_error(ours, expected[name]) < 1e-5, name
    for name in ["encoder.layers.3.mlp.fc2.weight", "encoder.layers.3.layer_norm1.bias", "post_layernorm.weight"]:
        path, layer = key_map[name]
        assert not np.any(expected[name]) and not np.any(g[path] if layer is None else g[path][layer]), name


def test_early_stop_ignores_the_last_layer(models):
    """hidden_states[-2] runs layers 0..2 only: perturbing layer 3 (and post_layernorm) changes nothing there,
    while hidden_states[-1] moves."""
    hf, cfg, model = models
    patches = patchify(cfg, pixels(3))
    perturbed = nnx.clone(model)  # (nnx.merge of a split would share the fixture's Variables)
    for _, var in nnx.to_flat_state(nnx.state(perturbed.encoder.layers, nnx.Param)):
        assert var.get_value().shape[0] == LAYERS
        var.set_value(var.get_value().at[3].add(1.0))
    perturbed.post_layernorm.weight.set_value(perturbed.post_layernorm.weight.get_value() + 1.0)
    (before,), (after,) = forward(model, patches, (-2,)), forward(perturbed, patches, (-2,))
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    assert relative_error(before, reference(hf, pixels(3))[-2]) < 1e-5
    (last,), (last_perturbed,) = forward(model, patches, (-1,)), forward(perturbed, patches, (-1,))
    assert np.max(np.abs(np.asarray(last) - np.asarray(last_perturbed))) > 1e-2
    # and the layers are not run at all: the traced scans cover 3 layers for -2, 4 for -1, none for 0
    for feature_layers, lengths in [((-2,), [3]), ((-1, 1), [1, 3]), ((0,), [])]:
        assert scan_lengths(model, patches, feature_layers) == lengths, feature_layers


def scan_lengths(model, patches, feature_layers):
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(patches, jnp.float32, feature_layers))(state)
    return [eqn.params["length"] for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]


def test_nf4_and_lora_weights_run_through_the_sliced_stack(models):
    """All Linear weights NF4, fc1 and q_proj with LoRA on some layers: the output equals the dense tower holding
    the dequantized weights plus the adapters' masked deltas (the slice cuts every leaf, mask included)."""
    _, cfg, model = models
    patches = patchify(cfg, pixels(4))
    graphdef, state = nnx.split(model)
    keys = linear_weight_keys(model, ())
    rng = np.random.default_rng(5)
    flat_q, flat_d = [], []
    for path, var in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        if key not in keys:
            flat_q.append((path, var))
            flat_d.append((path, var))
            continue
        w = quantize(var.get_value(), "nf4")
        assert isinstance(w, NF4)
        dense = dense_weight(w, jnp.float32)
        if key.endswith(("mlp.fc1.weight", "self_attn.q_proj.weight")):
            out_f, in_f = dense.shape[1:]
            a = jnp.asarray(rng.standard_normal((LAYERS, 4, in_f)), jnp.float32) * 0.1
            b = jnp.asarray(rng.standard_normal((LAYERS, out_f, 4)), jnp.float32) * 0.1
            mask = jnp.asarray([0.0, 1.0, 1.0, 0.0])
            w = LoRA(base=w, lora_A=a, lora_B=b, mask=mask, scale=2.0)
            dense = dense + 2.0 * jnp.einsum("lor,lri->loi", b, a) * mask[:, None, None]
        flat_q.append((path, var.replace(w)))
        flat_d.append((path, var.replace(dense)))
    quantized = nnx.merge(graphdef, nnx.from_flat_state(flat_q))
    reference_model = nnx.merge(graphdef, nnx.from_flat_state(flat_d))
    ours = forward(quantized, patches, (-2, 1))
    ref = forward(reference_model, patches, (-2, 1))
    dense_out = forward(model, patches, (-2, 1))
    for h, r, d in zip(ours, ref, dense_out):
        assert relative_error(h, np.asarray(r)) < 1e-5
        assert relative_error(h, np.asarray(d)) > 1e-3  # the adapters and the quantization do show


def test_patchify_rejects_a_wrong_shape(models):
    _, cfg, _ = models
    with pytest.raises(ValueError, match="pixel_values has shape"):
        patchify(cfg, pixels(0)[:, :, :24, :24])


@pytest.mark.parametrize("overrides,field", [
    (dict(image_size=32), "image_size"),
    (dict(hidden_act="relu6"), "hidden_act"),
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(patch_size=0), "patch_size"),
])
def test_config_errors_name_the_field(overrides, field):
    config = hf_config()
    for name, value in overrides.items():  # after construction: transformers validates some at __init__
        setattr(config, name, value)
    with pytest.raises(ConfigError, match=rf"vision_config\.{field}="):
        clip_config_from_hf(config)


@pytest.mark.parametrize("bad", [5, -6, (), (1, 7), True, "last"])
def test_feature_layer_errors_name_the_field(models, bad):
    _, cfg, model = models
    with pytest.raises(ConfigError, match=r"vision_feature_layer="):
        feature_layer_indices(cfg, bad)
    with pytest.raises(ConfigError, match=r"feature_layers="):
        model(patchify(cfg, pixels(0, n=1)), jnp.float32, bad)
