"""The Llama / Mistral / Qwen2 language model (jaxvlm.models.llama_text) against transformers' LlamaForCausalLM (llama3
rope scaling, attention_bias), MistralForCausalLM (explicit head_dim, a sliding window shorter than the sequence) and
Qwen2ForCausalLM (q/k/v biases, tied embeddings, linear rope scaling, sliding layers above max_window_layers) in fp32:
hidden states and logits with right and left padding, generation through the cache, gradients, config errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxvlm.layers import linear
from jaxvlm.models.base import ConfigError
from jaxvlm.models.llama_text import LlamaTextModel, text_config_from_hf
from jaxvlm.paths import path_key

TOL = 1e-5  # relative to the largest reference value
SEQ = 13
COMMON = dict(vocab_size=300, hidden_size=60, intermediate_size=100, num_hidden_layers=3, num_attention_heads=6,
              rms_norm_eps=1e-5, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf_config(kind, **overrides):
    import transformers
    if kind == "llama":
        return transformers.LlamaConfig(**{**COMMON, **dict(
            num_key_value_heads=2, attention_bias=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), **overrides})
    if kind == "mistral":  # head_dim 8: q/k/v widths differ from hidden, as in Mistral Small 3
        return transformers.MistralConfig(**{**COMMON, **dict(
            num_key_value_heads=3, head_dim=8, sliding_window=4,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}), **overrides})
    return transformers.Qwen2Config(**{**COMMON, **dict(  # layer 0 full, layers 1-2 sliding
        num_key_value_heads=3, tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
        max_window_layers=1, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        **overrides})


def build_hf(kind, seed=0):
    import transformers
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[kind]
    torch.manual_seed(seed)
    hf = cls._from_config(hf_config(kind), attn_implementation="eager", dtype=torch.float32)
    # Norms at 1 and biases at 0 would hide them; larger q/k weights make attention depend on positions.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return hf.eval()


def load(hf, cfg):
    """Our model with transformers' weights (model.layers.N.* -> row N of layers.*), and the output head
    `[vocab, hidden]` (the embedding when tied)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaTextModel(cfg, jnp.float32)))
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    used = set()

    def value(key):
        if key.startswith("layers."):
            names = [f"model.layers.{i}.{key[len('layers.'):]}" for i in range(cfg.num_layers)]
        else:
            names = [f"model.{key}"]
        used.update(names)
        rows = [sd[n] for n in names]
        return np.stack(rows) if key.startswith("layers.") else rows[0]

    new = [(p, v.replace(jnp.asarray(value(path_key(p))))) for p, v in nnx.to_flat_state(state)]
    assert set(sd) - used <= {"lm_head.weight"}, set(sd) - used
    head = sd["model.embed_tokens.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    return nnx.merge(graphdef, nnx.from_flat_state(new)), jnp.asarray(head)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def models(request):
    hf = build_hf(request.param)
    cfg = text_config_from_hf(hf.config)
    return request.param, hf, cfg, *load(hf, cfg)


def batch(padding, seed=0):
    """ids, mask, positions `[2, SEQ]`; row 1 padded (4 pads) on the `padding` side; positions count real tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 300, (2, SEQ))
    mask = np.ones((2, SEQ), np.int64)
    if padding == "right":
        mask[1, SEQ - 4:] = 0
    else:
        mask[1, :4] = 0
    return ids, mask, positions_of(mask)


def positions_of(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def hf_forward(hf, ids, mask, positions):
    """(last hidden state, logits) of transformers' causal LM."""
    kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              position_ids=torch.from_numpy(positions))
    with torch.no_grad():
        return hf.model(**kw).last_hidden_state.numpy(), hf(**kw).logits.numpy()


_forward = jax.jit(lambda m, h, p, a: m(h, p, a)[0])
_step = jax.jit(lambda m, h, p, a, cache, index: m(h, p, a, cache, index))


def assert_close(ours, ref, keep=None):
    ours, ref = np.asarray(ours), np.asarray(ref)
    if keep is not None:
        keep = keep.astype(bool)
        ours, ref = ours[keep], ref[keep]
    err = np.abs(ours - ref).max()
    assert err <= TOL * np.abs(ref).max(), f"max abs error {err:.3g} of {np.abs(ref).max():.3g}"


@pytest.mark.parametrize("padding", ["right", "left"])
def test_hidden_states_and_logits_equal_transformers(models, padding):
    kind, hf, cfg, ours, head = models
    ids, mask, positions = batch(padding)
    ref_h, ref_logits = hf_forward(hf, ids, mask, positions)
    h = _forward(ours, ours.embed_tokens(jnp.asarray(ids)), jnp.asarray(positions), jnp.asarray(mask))
    assert_close(h, ref_h, mask)
    assert_close(linear(h, head), ref_logits, mask)


def test_the_sliding_window_matters(models):
    kind, hf, cfg, ours, _ = models
    if cfg.sliding_window is None:
        assert kind == "llama"
        return
    assert cfg.sliding_window < SEQ and any(cfg.sliding) and (kind == "mistral" or not all(cfg.sliding))
    ids, mask, positions = batch("left")
    args = ours.embed_tokens(jnp.asarray(ids)), jnp.asarray(positions), jnp.asarray(mask)
    graphdef, state = nnx.split(ours)
    windowless = nnx.merge(graphdef, state)
    windowless.cfg = dataclasses.replace(cfg, sliding_window=None)
    diff = np.abs(np.asarray(_forward(ours, *args)) - np.asarray(_forward(windowless, *args)))[:, -1]
    assert diff.max() > 1e-2


def test_generation_through_the_cache_equals_the_full_forward(models):
    """A left-padded prompt of 5 at slots 0-4, then 8 tokens one at a time: each step's last logits equal
    transformers' full forward of the sequence so far."""
    kind, hf, cfg, ours, head = models
    prompt, steps = 5, 8
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 300, (2, prompt + steps))
    key_mask = np.ones(ids.shape, np.int64)
    key_mask[1, :2] = 0
    positions = positions_of(key_mask)
    cache = ours.init_cache(2, prompt + steps, jnp.float32)
    for start, stop in [(0, prompt)] + [(prompt + s, prompt + s + 1) for s in range(steps)]:
        h = ours.embed_tokens(jnp.asarray(ids[:, start:stop]))
        out, cache = _step(ours, h, jnp.asarray(positions[:, start:stop]), jnp.asarray(key_mask), cache,
                           jnp.int32(start))
        _, ref = hf_forward(hf, ids[:, :stop], key_mask[:, :stop], positions[:, :stop])
        assert_close(linear(out[:, -1], head), ref[:, -1])


def test_gradients_equal_torch_under_remat(models):
    """Gradients of a random projection of the real tokens' hidden states wrt the input embeddings and some
    weights, each layer rematerialized."""
    kind, hf, cfg, ours, _ = models
    ids, mask, positions = batch("left", seed=1)
    proj = np.random.default_rng(2).standard_normal((2, SEQ, cfg.hidden_size)).astype(np.float32)
    weight = proj * mask[..., None]
    hf.zero_grad()
    embeds = hf.model.embed_tokens(torch.from_numpy(ids)).detach().requires_grad_(True)
    out = hf.model(inputs_embeds=embeds, attention_mask=torch.from_numpy(mask),
                   position_ids=torch.from_numpy(positions)).last_hidden_state
    (out * torch.from_numpy(weight)).sum().backward()

    ours.remat = "full"
    try:
        @nnx.jit
        def grads(m, h):
            def loss(m, h):
                return jnp.sum(m(h, jnp.asarray(positions), jnp.asarray(mask))[0] * weight)
            return nnx.grad(loss, argnums=(0, 1))(m, h)
        g_model, g_input = grads(ours, ours.embed_tokens(jnp.asarray(ids)))
    finally:
        ours.remat = None
    assert_close(g_input, embeds.grad.numpy())
    g = {path_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g_model)}
    for name in ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight"]:
        ref = np.stack([hf.get_parameter(f"model.layers.{i}.{name}").grad.numpy() for i in range(cfg.num_layers)])
        assert_close(g[f"layers.{name}"], ref)
    if cfg.qkv_bias:
        ref = np.stack([hf.get_parameter(f"model.layers.{i}.self_attn.v_proj.bias").grad.numpy()
                        for i in range(cfg.num_layers)])
        assert_close(g["layers.self_attn.v_proj.bias"], ref)


def test_config_from_hf_fields():
    llama = text_config_from_hf(hf_config("llama"))
    assert (llama.qkv_bias, llama.o_bias, llama.sliding_window, llama.head_dim) == (True, True, None, 10)
    assert dict(llama.rope_scaling)["rope_type"] == "llama3"
    plain = text_config_from_hf(hf_config("llama", attention_bias=False))
    assert (plain.qkv_bias, plain.o_bias) == (False, False)
    mistral = text_config_from_hf(hf_config("mistral"))
    assert (mistral.head_dim, mistral.sliding_window, mistral.sliding, mistral.qkv_bias) == (8, 4, (True,) * 3, False)
    qwen = text_config_from_hf(hf_config("qwen2"))
    assert (qwen.qkv_bias, qwen.o_bias, qwen.tie_word_embeddings) == (True, False, True)
    assert (qwen.sliding_window, qwen.sliding) == (5, (False, True, True))
    assert text_config_from_hf(hf_config("qwen2", use_sliding_window=False)).sliding_window is None
    assert text_config_from_hf(hf_config("qwen2", max_window_layers=3)).sliding_window is None  # no layer slides
    assert text_config_from_hf(hf_config("mistral", sliding_window=None)).sliding == (False,) * 3


@pytest.mark.parametrize("kind, overrides, field", [
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}), "rope_type"),
    ("llama", dict(mlp_bias=True), "mlp_bias"),
    ("llama", dict(hidden_act="tanh"), "hidden_act"),
    ("mistral", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    ("gemma", {}, "model_type"),
])
def test_unsupported_config_values_are_named(kind, overrides, field):
    import transformers
    cfg = transformers.GemmaConfig() if kind == "gemma" else hf_config(kind, **overrides)
    with pytest.raises(ConfigError, match=field):
        text_config_from_hf(cfg, where="text_config")
