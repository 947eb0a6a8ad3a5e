"""Llama 3.2 Vision's language model (jaxvlm.models.mllama_text, a building block of the coming `mllama` family)
against transformers' MllamaTextModel in fp32: self-attention layers with llama3 rope scaling, gated cross-attention
layers at two positions (their own stack), text rows that may see no vision token, padding, and a text-only batch
(cross-attention layers skipped)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxvlm.models.mllama_text import MllamaTextModel, rope_inv_freq, text_config_from_hf
from jaxvlm.paths import path_key

TOL = 1e-4


@pytest.fixture(scope="module")
def models():
    import transformers
    cfg = transformers.MllamaTextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, cross_attention_layers=[1, 3], rms_norm_eps=1e-5, max_position_embeddings=512,
        pad_token_id=299, bos_token_id=298, eos_token_id=297,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    torch.manual_seed(0)
    hf = transformers.MllamaTextModel(cfg).eval()
    with torch.no_grad():  # gates start at 0 and norms at 1 in transformers: randomise so that both show
        for name, p in hf.named_parameters():
            if "gate" in name and p.ndim == 1 and p.numel() == 1:
                p.copy_(torch.tensor([0.7 if "attn_gate" in name else -0.5]))
            elif "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    ours = nnx.eval_shape(lambda: MllamaTextModel(text_config_from_hf(cfg), jnp.float32))
    return hf, load_into(ours, hf), cfg


def load_into(model, hf):
    """Our model with transformers' weights: layer i goes to row i of its kind's stack."""
    c = model.cfg
    graphdef, state = nnx.split(model)
    flat = {path_key(p): v for p, v in nnx.to_flat_state(state)}
    values = {k: np.zeros(v.get_value().shape, np.float32) for k, v in flat.items()}
    for name, tensor in hf.state_dict().items():
        parts = name.split(".")
        if parts[0] == "layers":
            i = int(parts[1])
            kind = "cross_attention_layers" if i in c.cross_attention_layers else "layers"
            rows = c.cross_attention_layers if i in c.cross_attention_layers else c.self_attention_layers
            key = ".".join([kind, *parts[2:]])
            values[key][rows.index(i)] = tensor.numpy()
        elif name in values:
            values[name][...] = tensor.numpy()
        else:
            raise KeyError(name)
    new = [(p, v.replace(jnp.asarray(values[path_key(p)]))) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(new))


def test_llama3_rope_equals_transformers():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.MllamaTextConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(16, 500000.0, dict(text_config_from_hf(cfg).rope_scaling))
    plain = rope_inv_freq(16, 500000.0, {"rope_type": "default"})
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    assert np.abs(ours - plain).max() > 1e-3 * plain.max(), "the scaling should change some frequencies"


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 300, (2, 11))
    mask = np.ones((2, 11), np.int64)
    mask[1, 8:] = 0  # right padding
    vision = rng.standard_normal((2, 12, 64)).astype(np.float32)  # 2 images x 2 tiles x 3 tokens
    tiles = np.zeros((2, 11, 2, 2), np.int64)  # [batch, text, image, tile]
    tiles[0, 3:, 0, :] = 1  # sample 0: tokens from 3 on see image 0 (both tiles) ...
    tiles[0, 7:, 1, 0] = 1  # ... and from 7 on image 1's first tile; tokens 0-2 see nothing
    tiles[1, 2:, 0, 0] = 1  # sample 1: one image of one tile, from token 2 on
    return ids, mask, vision, tiles


def _hf_hidden(hf, ids, mask, vision=None, tiles=None):
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask
    kw = {}
    if vision is not None:
        bias, rows = _prepare_cross_attention_mask(torch.from_numpy(tiles), num_vision_tokens=3, dtype=torch.float32)
        kw = dict(cross_attention_states=torch.from_numpy(vision), cross_attention_mask=bias,
                  full_text_row_masked_out_mask=rows)
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw).last_hidden_state.numpy()


def _ours(model, ids, mask, vision=None, tiles=None):
    h = model.embed_tokens(jnp.asarray(ids))
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    cross = None if tiles is None else jnp.asarray(np.repeat(tiles, 3, axis=3).reshape(*tiles.shape[:2], -1) > 0)
    out = jax.jit(lambda m, *a: m(*a)[0])(model, h, positions, jnp.asarray(mask),
                                       None if vision is None else jnp.asarray(vision), cross)
    return np.asarray(out)


def _assert_close(ours, ref, mask):
    keep = mask.astype(bool)
    err = np.abs(ours[keep] - ref[keep]).max()
    assert err <= TOL * np.abs(ref[keep]).max(), f"max abs error {err:.3g}"


def test_hidden_states_with_vision_equal_transformers(models):
    hf, ours, _ = models
    ids, mask, vision, tiles = _inputs()
    ref = _hf_hidden(hf, ids, mask, vision, tiles)
    _assert_close(_ours(ours, ids, mask, vision, tiles), ref, mask)
    # The cross-attention layers weigh in, the rows that see nothing included (their attention output stays).
    text_only = _hf_hidden(hf, ids, mask)
    assert np.abs(ref[0, :3] - text_only[0, :3]).max() > 1e-3
    assert np.abs(ref[0, 3:] - text_only[0, 3:]).max() > 1e-3


def test_text_only_batch_skips_the_cross_attention_layers(models):
    hf, ours, _ = models
    ids, mask, _, _ = _inputs(1)
    _assert_close(_ours(ours, ids, mask), _hf_hidden(hf, ids, mask), mask)


def test_gradients_flow_through_both_stacks_under_remat(models):
    """Rematerialized, the same output; gradients reach both stacks' params (the cond's two branches)."""
    hf, ours, _ = models
    ids, mask, vision, tiles = _inputs()
    ref = _ours(ours, ids, mask, vision, tiles)
    ours.remat = "full"
    try:
        np.testing.assert_allclose(_ours(ours, ids, mask, vision, tiles), ref, rtol=1e-5, atol=1e-5)
        graphdef, state = nnx.split(ours)
        h = ours.embed_tokens(jnp.asarray(ids))
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        cross = jnp.asarray(np.repeat(tiles, 3, axis=3).reshape(2, 11, -1) > 0)

        def loss(state):
            out = nnx.merge(graphdef, state)(h, positions, jnp.asarray(mask), jnp.asarray(vision), cross)[0]
            return jnp.sum(out ** 2)
        grads = jax.jit(jax.grad(loss))(state)
        flat = {path_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
        for key in ("layers.self_attn.q_proj.weight", "cross_attention_layers.cross_attn.k_proj.weight",
                    "cross_attention_layers.cross_attn_mlp_gate"):
            g = flat[key]
            assert all(np.abs(g[i]).max() > 0 for i in range(g.shape[0])), key
    finally:
        ours.remat = None


def test_two_stacks_numbered_within_one_hf_prefix_round_trip():
    """jaxvlm.paths.Stack: transformers' layer N goes to the row of its kind's stack, and back."""
    from jaxvlm.paths import Stack, layer_key, split_layer, stacked_prefix
    stacks = (Stack("model.language_model.layers", "model.language_model.layers", (0, 2, 4)),
              Stack("model.language_model.cross_attention_layers", "model.language_model.layers", (1, 3)),
              "model.vision_model.transformer.layers")
    cases = {"model.language_model.layers.3.cross_attn.q_proj.weight":
             ("model.language_model.cross_attention_layers.cross_attn.q_proj.weight", 1),
             "model.language_model.layers.4.self_attn.q_proj.weight": ("model.language_model.layers.self_attn.q_proj.weight", 2),
             "model.vision_model.transformer.layers.7.mlp.fc1.weight": ("model.vision_model.transformer.layers.mlp.fc1.weight", 7),
             "model.language_model.norm.weight": ("model.language_model.norm.weight", None)}
    for hf, (ours, row) in cases.items():
        assert split_layer(hf, stacks) == (ours, row)
        assert layer_key(ours, row, stacks) == hf
    assert stacked_prefix("model.language_model.cross_attention_layers.mlp.up_proj.weight", stacks) == \
        "model.language_model.cross_attention_layers"
    assert split_layer("model.language_model.layers.5.self_attn.q_proj.weight", stacks)[1] is None  # no such layer
