"""LoRA: the modules Unsloth + PEFT adapt, PEFT adapter round trips, gradients, merge, bad input."""
import dataclasses
import itertools
import json
import re
import unittest.mock
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxvlm import FastVisionModel
from jaxvlm.converters.peft_adapter import load_adapter
from jaxvlm.kernels import lora_matmul
from jaxvlm.kernels.lora_matmul import adapted_linear, concat_linear
from jaxvlm.lora import LoRA, linear_modules, merge, unmerge
from jaxvlm.targets import get_peft_regex, select_modules
from tests.conftest import chat, random_image
from tests.test_qwen2_vl_parity import assert_logits_match, encode, hf_logits, load
from tests.tiny import build_hf_model

FLAGS = list(itertools.product([True, False], repeat=4))


def peft_adapted(hf_model, target_modules, **kw):
    """Module names PEFT wraps with LoRA for `target_modules` on the transformers model."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(hf_model, LoraConfig(r=2, target_modules=target_modules, **kw))
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
            if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)}


@pytest.fixture(scope="module")
def base(tiny):
    family, path, hf_model = tiny
    model, processor = load(path)
    return family, path, model, processor


def with_random_b(model, seed=1):
    """The model with every LoRA's B drawn at random, so that the adapter changes the logits."""
    graphdef, state = nnx.split(model)
    flat = []
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        value = var.get_value()
        if isinstance(value, LoRA):
            key = jax.random.fold_in(jax.random.key(seed), i)
            value = dataclasses.replace(value, lora_B=0.1 * jax.random.normal(key, value.lora_B.shape))
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def batch_for(processor):
    return encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])


@pytest.mark.parametrize("vision,language,attention,mlp", FLAGS)
def test_adapted_modules_equal_peft_with_unsloths_regex(base, vision, language, attention, mlp):
    family, path, model, processor = base
    flags = dict(finetune_vision_layers=vision, finetune_language_layers=language,
                 finetune_attention_modules=attention, finetune_mlp_modules=mlp)
    names = list(linear_modules(model))
    if not (vision or language) or not (attention or mlp):
        with pytest.raises(ValueError, match="no (layers|modules) to finetune"):
            FastVisionModel.get_peft_model(model, **flags)
        return
    regex = get_peft_regex(names, vision, language, attention, mlp)
    adapted = FastVisionModel.get_peft_model(model, r=2, **flags)
    ours = {name for name, (param, layer) in linear_modules(adapted).items() if _is_adapted(adapted, param, layer)}
    assert ours == set(select_modules(names, regex))
    assert ours == peft_adapted(build_hf_model(family), regex)
    assert "lm_head" not in ours and not any(".merger." in n for n in ours)


def _is_adapted(model, param, layer):
    module = model
    for part in param.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    w = module.weight.get_value()
    return isinstance(w, LoRA) and (w.mask is None or bool(w.mask[layer]))


def test_list_targets_and_layers_to_transform_match_peft(base):
    family, path, model, processor = base
    adapted = FastVisionModel.get_peft_model(model, r=2, target_modules=["q_proj", "qkv"], layers_to_transform=[1])
    ours = {n for n, (p, layer) in linear_modules(adapted).items() if _is_adapted(adapted, p, layer)}
    assert ours and all(".1." in n for n in ours)
    assert ours == peft_adapted(build_hf_model(family), ["q_proj", "qkv"], layers_to_transform=[1])


def test_our_adapter_loads_in_peft_with_our_logits(base, tmp_path):
    from peft import PeftModel
    family, path, model, processor = base
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_rslora=True))
    adapted.save_pretrained(str(tmp_path / "adapter"), processor)
    peft_model = PeftModel.from_pretrained(build_hf_model(family), str(tmp_path / "adapter")).eval()
    batch = batch_for(processor)
    ref = hf_logits(peft_model, batch)
    assert np.abs(np.asarray(model(**batch)) - ref).max() > 1e-2, "the adapter should change the logits"
    assert_logits_match(adapted(**batch), ref, batch["attention_mask"])


def test_peft_adapter_loads_here_with_peft_logits(base, tmp_path):
    from peft import LoraConfig, get_peft_model
    family, path, model, processor = base
    regex = get_peft_regex(list(linear_modules(model)))
    peft_model = get_peft_model(build_hf_model(family), LoraConfig(
        r=4, lora_alpha=16, target_modules=regex, init_lora_weights=False, modules_to_save=["lm_head"]))
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    peft_model.save_pretrained(tmp_path)
    ours = load_adapter(model, str(tmp_path))
    batch = batch_for(processor)
    assert_logits_match(ours(**batch), hf_logits(peft_model.eval(), batch), batch["attention_mask"])


def test_lora_gradients_match_peft(base):
    from jaxvlm.kernels.cross_entropy import token_loss_sum
    from jaxvlm.train.trainer import split_trainable
    family, path, model, processor = base
    targets = ["q_proj", "k_proj", "v_proj", "down_proj", "qkv", "fc1", "gate_proj", "up_proj"]
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, layers_to_transform=[0, 2],
                                                          target_modules=targets))
    # At least as many vision patches and text tokens as the Linears' input widths, so that the widening
    # ones take the one-matmul path (`lora.concat_linear`), as in training, and q/k/v and gate/up each one product
    # over their stacked weights (`LoRA.sibling_linear`).
    batch = encode(processor, [chat("describe the image in detail, " * 8, 1)], [random_image(112, 84)])
    labels = batch["input_ids"].copy()
    inputs = {k: jnp.asarray(v) for k, v in adapted.prepare_inputs(**batch).items() if k != "rope_deltas"}
    trainable, frozen, rebuild, paths = split_trainable(adapted, lambda p: p[-1].name in ("lora_A", "lora_B"))

    def loss(t):
        s, n = token_loss_sum(rebuild(t, frozen).forward(inputs), jnp.asarray(labels))
        return s / n
    fused = []  # the widening Linears and the siblings take the one-matmul path; the others two products
    stacked = lambda w: (sum(p.shape[0] for p in w), w[0].shape[1]) if isinstance(w, tuple) else w.shape  # noqa: E731
    with unittest.mock.patch("jaxvlm.kernels.lora_matmul.concat_linear",
                             lambda *a: fused.append(stacked(a[2])) or concat_linear(*a)):
        grads = dict(zip([p for p in paths], jax.grad(loss)(trainable)))
    text = model.config.text
    assert (text.hidden_size + 2 * text.num_kv_heads * text.head_dim, text.hidden_size) in fused, fused  # q/k/v
    assert (2 * text.intermediate_size, text.hidden_size) in fused, fused  # gate/up
    assert len(set(fused)) >= 3, set(fused)  # and the vision tower's qkv, its fc1 or gate/up (2.5: the same shape)

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        adapted.save_pretrained(d)
        from peft import PeftModel
        peft_model = PeftModel.from_pretrained(build_hf_model(family), d, is_trainable=True)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    out = peft_model(**tensors, labels=torch.from_numpy(labels))
    out.loss.backward()
    checked, worst = 0, 0.0
    for path, g in grads.items():
        key = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        m = re.match(r"(.*)\.weight\.value\.(lora_A|lora_B)$", key) or re.match(r"(.*)\.weight\.(lora_A|lora_B)$", key)
        module, part = m.group(1), m.group(2)
        stacked = re.match(r"(model\.language_model\.layers|model\.visual\.blocks)\.(.*)", module)
        layers = [(f"{stacked.group(1)}.{i}.{stacked.group(2)}", i) for i in (0, 2)] if stacked else [(module, None)]
        for name, i in layers:
            torch_param = dict(peft_model.named_parameters()).get(f"base_model.model.{name}.{part}.default.weight")
            if torch_param is None:
                continue
            ours = np.asarray(g if i is None else g[i])
            err = np.abs(ours - torch_param.grad.numpy()).max() / np.abs(ours).max()
            worst = max(worst, err)
            checked += 1
    assert checked >= 8
    assert worst < 1e-4, f"LoRA gradients differ from PEFT's by {worst:.2g} of their scale"


def test_merged_logits_equal_unmerged(base):
    family, path, model, processor = base
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4))
    batch = batch_for(processor)
    merged = merge(adapted)
    assert not any(isinstance(v.get_value(), LoRA) for _, v in nnx.to_flat_state(nnx.state(merged)))
    assert_logits_match(merged(**batch), np.asarray(adapted(**batch)), batch["attention_mask"])
    np.testing.assert_array_equal(np.asarray(unmerge(adapted)(**batch)), np.asarray(model(**batch)))


def test_lora_on_an_nf4_base_merges_to_16_bit(tiny):
    from jaxvlm.quant import NF4
    family, path, hf_model = tiny
    model, processor = load(path, load_in_4bit=True)
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4))
    w = adapted.model.language_model.layers.mlp.up_proj.weight.get_value()
    assert isinstance(w, LoRA) and isinstance(w.base, NF4)
    merged = merge(adapted)
    assert merged.model.language_model.layers.mlp.up_proj.weight.get_value().dtype == jnp.float32
    batch = batch_for(processor)
    assert_logits_match(merged(**batch), np.asarray(adapted(**batch)), batch["attention_mask"])


def test_target_that_matches_nothing_lists_close_names(base):
    family, path, model, processor = base
    with pytest.raises(ValueError, match=r"matches no Linear module; close module names: .*q_proj"):
        FastVisionModel.get_peft_model(model, target_modules=["q_prj"])


@pytest.mark.parametrize("r", [0, -4])
def test_rank_must_be_positive(base, r):
    family, path, model, processor = base
    with pytest.raises(ValueError, match=f"r={r}: expected a positive int"):
        FastVisionModel.get_peft_model(model, r=r)


def test_adapter_of_another_base_names_the_first_mismatch(base, tmp_path):
    family, path, model, processor = base
    adapted = FastVisionModel.get_peft_model(model, r=4, target_modules=["q_proj"])
    adapted.save_pretrained(str(tmp_path))
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = np.zeros((4, 48), np.float32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(key) + r" has shape \(4, 48\), the model expects \(4, 64\)"):
        load_adapter(model, str(tmp_path))


def test_trainable_parameter_count_matches_peft(base, capsys):
    from peft import LoraConfig, get_peft_model
    family, path, model, processor = base
    adapted = FastVisionModel.get_peft_model(model, r=8, layers_to_transform=[1], target_modules=["q_proj", "qkv"])
    adapted.print_trainable_parameters()
    ours = capsys.readouterr().out.strip()
    get_peft_model(build_hf_model(family), LoraConfig(r=8, target_modules=["q_proj", "qkv"],
                                                      layers_to_transform=[1])).print_trainable_parameters()
    assert ours == capsys.readouterr().out.strip()


def test_lora_dropout_drops_the_adapter_input_in_training_only(base):
    from jaxvlm import layers
    from jaxvlm.lora import LoRA
    family, path, model, processor = base
    with pytest.raises(ValueError, match="lora_dropout=1.0: expected a probability"):
        FastVisionModel.get_peft_model(model, r=4, lora_dropout=1.0)
    model = FastVisionModel.get_peft_model(model, r=4, lora_dropout=0.5)
    assert json.loads(model.peft_config)["lora_dropout"] == 0.5
    rng = np.random.default_rng(0)
    lora = LoRA(base=jnp.asarray(rng.standard_normal((6, 8)), jnp.float32),
                lora_A=jnp.asarray(rng.standard_normal((4, 8)), jnp.float32),
                lora_B=jnp.asarray(rng.standard_normal((6, 4)), jnp.float32), scale=2.0, dropout=0.5)
    x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    plain = lora.linear(x)  # no dropout_key: inference, no dropout
    np.testing.assert_allclose(plain, x @ lora.base.T + 2.0 * (x @ lora.lora_A.T) @ lora.lora_B.T, rtol=1e-5)
    drop = jax.jit(lambda k: _in_dropout(layers, k, lambda: lora.linear(x)))
    a, b = drop(jax.random.key(1)), drop(jax.random.key(2))
    assert not np.allclose(a, plain) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, drop(jax.random.key(1)))  # a key gives one mask
    # inverted dropout: the mean over masks is the undropped output
    mean = jnp.mean(jax.vmap(drop)(jax.random.split(jax.random.key(3), 4000)), axis=0)
    np.testing.assert_allclose(mean, plain, atol=0.1 * float(jnp.abs(plain).max()))
    # different layers of a scan draw different masks
    with layers.dropout_key(jax.random.key(0)):
        with layers.dropout_key(jax.random.fold_in(jax.random.key(0), 0)):
            k0 = layers.next_dropout_key()
        with layers.dropout_key(jax.random.fold_in(jax.random.key(0), 1)):
            k1 = layers.next_dropout_key()
    assert not np.array_equal(jax.random.key_data(k0), jax.random.key_data(k1))
    assert layers.next_dropout_key() is None


def _in_dropout(layers, key, fn):
    with layers.dropout_key(key):
        return fn()


@pytest.mark.parametrize("siblings", [False, True])  # w one weight, or a tuple stacked along out
def test_concat_linear_value_and_gradients_equal_the_two_products(siblings):
    # The fused LoRA product (one matmul over [x | xa]) and its hand-written backward pass against
    # autodiff of x @ w.T + xa @ b.T, for every argument (w included, should a base be trained).
    ks = jax.random.split(jax.random.key(0), 5)
    x, xa = jax.random.normal(ks[0], (2, 5, 12)), jax.random.normal(ks[1], (2, 5, 4))
    w, b = jax.random.normal(ks[2], (20, 12)), jax.random.normal(ks[3], (20, 4))
    w = (w[:12], w[12:16], w[16:]) if siblings else w
    g = jax.random.normal(ks[4], (2, 5, 20))

    def plain(x, xa, w, b):
        return x @ (jnp.concatenate(w) if siblings else w).T + xa @ b.T
    np.testing.assert_allclose(concat_linear(x, xa, w, b), plain(x, xa, w, b), rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda *a: jnp.sum(concat_linear(*a) * g), argnums=(0, 1, 2, 3))(x, xa, w, b)
    ref = jax.grad(lambda *a: jnp.sum(plain(*a) * g), argnums=(0, 1, 2, 3))(x, xa, w, b)
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for o, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scale", [2.0, "mask"])
def test_adapted_linear_value_and_gradients_equal_the_two_products(scale):
    # The square/narrowing LoRA product and its hand-written backward (dx as one matmul over [g | ds]) against
    # autodiff of x @ w.T + (scale * x @ a.T) @ b.T, for every argument; the scale a float, or a traced layer mask.
    ks = jax.random.split(jax.random.key(1), 5)
    x, w = jax.random.normal(ks[0], (2, 35, 24)), jax.random.normal(ks[1], (16, 24))
    a, b = jax.random.normal(ks[2], (4, 24)), jax.random.normal(ks[3], (16, 4))
    g = jax.random.normal(ks[4], (2, 35, 16))

    def run(product, x, w, a, b, m):
        s = 2.0 if scale != "mask" else 2.0 * m
        return jnp.sum(product(x, w, a, b, s) * g)

    def plain(x, w, a, b, s):
        return x @ w.T + ((x @ a.T) * s) @ b.T
    args = (x, w, a, b, jnp.float32(1.0))
    np.testing.assert_allclose(run(adapted_linear, *args), run(plain, *args), rtol=1e-5)
    ours = jax.grad(lambda *t: run(adapted_linear, *t), argnums=(0, 1, 2, 3))(*args)
    ref = jax.grad(lambda *t: run(plain, *t), argnums=(0, 1, 2, 3))(*args)
    for o, r in zip(ours, ref):
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows, nf4", [(70, False), (8, False), (70, True)])  # training, a decode step; NF4 bases
def test_sibling_linears_equal_each_linear(rows, nf4, monkeypatch):
    """q/k/v (or gate/up) with adapters, read from one x, as one product ([x | xa] @ [w | b_bd]^T, every adapter's
    x A^T in one pass): the outputs and the gradients of x and of every factor equal each Linear's own, with biases,
    per-sibling layer masks and ranks; the forward holds one product as wide as the three outputs."""
    from types import SimpleNamespace as NS

    from jaxvlm.layers import sibling_linears
    from jaxvlm.quant import quantize_nf4
    ks = iter(jax.random.split(jax.random.key(3), 14))
    shapes = ((24, 4, 1.0), (8, 4, 0.0), (8, 6, 1.0))  # (out, r, layer mask)
    bases = [(jax.random.normal(next(ks), (o, 24)), jax.random.normal(next(ks), (o,))) for o, _, _ in shapes]
    bases = [(quantize_nf4(w) if nf4 else w, c) for w, c in bases]
    factors = [(jax.random.normal(next(ks), (r, 24)), jax.random.normal(next(ks), (o, r))) for o, r, _ in shapes]
    x, g = jax.random.normal(next(ks), (2, rows // 2, 24)), jax.random.normal(next(ks), (2, rows // 2, 40))

    def run(setting, x, factors):
        monkeypatch.setattr("jaxvlm.layers.sibling_products", setting)
        modules = [NS(weight=NS(get_value=lambda w=LoRA(base=w, lora_A=a, lora_B=b, mask=jnp.float32(m), scale=2.0): w),
                      bias=NS(get_value=lambda c=c: c))
                   for (w, c), (a, b), (_, _, m) in zip(bases, factors, shapes)]
        return jnp.sum(jnp.concatenate(sibling_linears(x, modules), axis=-1) * g)

    for ours, ref in zip(jax.value_and_grad(lambda *t: run("on", *t), argnums=(0, 1))(x, factors),
                         jax.value_and_grad(lambda *t: run("off", *t), argnums=(0, 1))(x, factors)):
        for o, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-4)
    eqns, wide = list(jax.make_jaxpr(lambda x: run("on", x, factors))(x).jaxpr.eqns), 0
    while eqns:
        e = eqns.pop()
        eqns += [s for p in e.params.values() for s in getattr(getattr(p, "jaxpr", None), "eqns", [])]
        wide += e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] == 40
    assert wide == (1 if rows >= 24 else 0)


@pytest.mark.parametrize("out_f", [32, 64, 96])  # narrowing (k/v, down), square (q/o)
def test_a_narrowing_lora_forms_dx_in_one_product(out_f):
    """Over many rows (training), a narrowing adapted Linear's input gradient is one matmul over [g | ds] @ [w ; a]:
    autodiff's two products wrote the adapter's share of dx as its own [tokens, in] buffer beside the base's, the
    peak of the Qwen2-VL-2B step on an H200 (docs/BENCHMARKS.md). A square one, or few rows (decode), or rows fewer
    than the bytes rule asks (rows x (in - out) > out x in), keep the two products."""
    ks = jax.random.split(jax.random.key(2), 4)
    w, a, b = (jax.random.normal(ks[0], (out_f, 96)), jax.random.normal(ks[1], (16, 96)),
               jax.random.normal(ks[2], (out_f, 16)))
    lora = LoRA(base=w, lora_A=a, lora_B=b, scale=2.0)

    def dx_products(rows):
        x = jax.random.normal(ks[3], (rows, 96))
        y, backward = jax.vjp(lora.linear, x)
        eqns, found = list(jax.make_jaxpr(backward)(y).jaxpr.eqns), []  # the backward pass alone
        while eqns:
            e = eqns.pop()
            eqns += [s for p in e.params.values() for s in getattr(getattr(p, "jaxpr", None), "eqns", [])]
            if e.primitive.name == "dot_general" and e.outvars[0].aval.shape == x.shape:
                found.append([v.aval.shape for v in e.invars])
        return found
    # one product where rows x (in - out) > out x in, else the base's and the adapter's
    if out_f == 32:
        assert dx_products(70) == [[(70, 48), (48, 96)]]
    if out_f == 64:
        assert len(dx_products(70)) == 2 and dx_products(256) == [[(256, 80), (80, 96)]]  # 70 x 32 < 64 x 96
    if out_f == 96:
        assert len(dx_products(256)) == 2
    assert len(dx_products(8)) == 2  # a decode-sized product


def test_widened_bases_give_the_same_loss_and_gradients_with_no_weight_copy_in_place(monkeypatch):
    """The trainer's widened bases (lora.widen): gate/up (a module's SIBLINGS) in one `Widened` [w | b] buffer, a
    widening Linear (fc1) in its own, the narrowing one (down) left plain; the weights they were copied from are freed.
    A step that writes B into the buffers (fill_widened, a program of its own that updates the donated buffers in
    place) followed by a step that differentiates the LoRA factors gives the plain model's loss and gradients, and the
    step forms no [w | b] copy (the plain one forms one per widening product); unwiden gives the bases back bit for
    bit. A device without room for a buffer keeps its group as it was."""
    from jaxvlm import lora
    from jaxvlm.layers import GatedMLP, Linear
    from jaxvlm.train.trainer import split_trainable

    class Block(nnx.Module):
        def __init__(self):
            self.mlp = GatedMLP(32, 48, "silu", bias=False, dtype=jnp.float32)
            self.fc1 = Linear(32, 64, bias=True, dtype=jnp.float32)

        def __call__(self, x):
            return self.mlp(x) + self.fc1(x)[..., :32]

    ks = iter(jax.random.split(jax.random.key(5), 16))
    ranks = {"gate_proj": 8, "up_proj": 4, "down_proj": 8, "fc1": 8}
    shapes = {"gate_proj": (48, 32), "up_proj": (48, 32), "down_proj": (32, 48), "fc1": (64, 32)}
    weights = {n: (jax.random.normal(next(ks), s), 0.1 * jax.random.normal(next(ks), (ranks[n], s[1])),
                   0.1 * jax.random.normal(next(ks), (s[0], ranks[n]))) for n, s in shapes.items()}
    x = jax.random.normal(next(ks), (2, 40, 32))

    def block():
        b = Block()
        for name, (w, a, bb) in weights.items():
            module = b.fc1 if name == "fc1" else getattr(b.mlp, name)
            module.weight.set_value(LoRA(base=jnp.array(w, copy=True), lora_A=a, lora_B=bb, scale=2.0))
        return b

    def step(model):
        """The trainer's order: the buffers refreshed by a program of their own (donated), then the step."""
        trainable, frozen, rebuild, _ = split_trainable(model, lora.is_trainable_path)
        at = {id(leaf): i for i, leaf in enumerate(frozen)}
        positions = [at[id(buf)] for buf in lora.widened_buffers(model)]

        def with_wide(wide):
            return [wide[positions.index(i)] if i in positions else leaf for i, leaf in enumerate(frozen)]
        refresh = jax.jit(lambda t, wide: lora.fill_widened(rebuild(t, with_wide(wide))), donate_argnums=1)
        wide = [frozen[i] for i in positions]
        refreshed = refresh.lower(trainable, wide).compile()
        filled = refreshed(trainable, wide)

        def run(trainable, frozen):
            return jax.value_and_grad(lambda t: jnp.sum(jnp.tanh(rebuild(t, frozen)(x))))(trainable)
        compiled = jax.jit(run).lower(trainable, with_wide(filled)).compile()
        return compiled(trainable, with_wide(filled)), compiled.as_text(), refreshed.as_text(), \
            lambda: rebuild(trainable, with_wide(filled))

    (ref, ref_grads), ref_hlo, _, _ = step(block())
    model = block()
    bases = {n: weakref.ref(m.weight.get_value().base)
             for n, m in [("gate", model.mlp.gate_proj), ("up", model.mlp.up_proj), ("down", model.mlp.down_proj),
                          ("fc1", model.fc1)]}
    assert lora.widen(model) == 2
    jax.block_until_ready(lora.widened_buffers(model))  # the last copy done (it holds its input till then)
    assert {n for n, r in bases.items() if r() is not None} == {"down"}, "a widened group's weights were not freed"
    sites = lora._sites(model)
    assert sorted(s[0].weight.get_value().base.buf.shape for s in sites) == [(64, 40), (96, 44)]
    assert isinstance(model.mlp.up_proj.weight.get_value().base, lora_matmul.InSibling)
    assert isinstance(model.mlp.down_proj.weight.get_value().base, jax.Array)
    (value, grads), hlo, refresh_hlo, trained = step(model)
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    for o, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-5)

    def wb_copies(text):  # concatenations that form a [w | b] operand: gate/up's [96, 44], fc1's [64, 40]
        return len(re.findall(r"f32\[(?:96,44|64,40)\]\{[0-9,]*\} concatenate\(", text))
    assert wb_copies(ref_hlo) >= 2 and wb_copies(hlo) == 0, (wb_copies(ref_hlo), wb_copies(hlo))
    header = refresh_hlo.splitlines()[0]  # input_output_alias: the outputs that reuse the donated buffers' memory
    donated = {int(p) for p in re.findall(r"\{\d+\}: \((\d+), \{\}, may-alias\)", header)}
    assert len(donated) == 2 and len(re.findall(r" dynamic-update-slice\(", refresh_hlo)) == 2, header

    trained = trained()
    # Fewer rows than fc1's input (a small batch): the widened fc1 still takes [x | xa] @ [w | b]^T over its buffer
    # (any other product would copy w out of it), with the plain model's output.
    few = x[:1, :8]
    widened_out = jax.jit(lambda m: m(few)).lower(trained).compile()
    assert not re.findall(r"f32\[64,32\]\{[0-9,]*\} (?:slice|fusion)\(", widened_out.as_text())
    np.testing.assert_allclose(widened_out(trained), jax.jit(lambda m: m(few))(block()), rtol=1e-5, atol=1e-4)
    def assert_plain_bases(model):
        for name, (w, _, _) in weights.items():
            module = model.fc1 if name == "fc1" else getattr(model.mlp, name)
            np.testing.assert_array_equal(np.asarray(module.weight.get_value().base), np.asarray(w), err_msg=name)
    lora.unwiden(trained)
    assert_plain_bases(trained)

    monkeypatch.setattr(lora, "_room", lambda nbytes, w: False)
    model = block()
    assert lora.widen(model) == 0
    assert_plain_bases(model)
