"""Qwen3-VL MoE through the family seam: the experts' grouped matmul against a dense reference, transformers' fp32
logits and greedy generation, both on-disk expert layouts, NF4 experts equal to bitsandbytes', LoRA targets and PEFT
adapters, merged 16-bit and 4-bit export, and the LoRA SFT losses against transformers + PEFT, on a tiny random model
(8 experts, 2 per token) built once for the module."""
import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jaxvlm import FastVisionModel
from jaxvlm.converters.safetensors_io import CheckpointError
from jaxvlm.layers import Experts, dense_weight
from jaxvlm.lora import LoRA, count_parameters, linear_modules
from jaxvlm.quant import NF4, quantize_nf4
from jaxvlm.targets import get_peft_regex, select_modules
from tests.conftest import chat, random_image
from tests.test_lora import _is_adapted, peft_adapted, with_random_b
from tests.test_quantized_import import bnb_dequantized, weight
from tests.test_qwen2_vl_parity import (assert_greedy_matches, assert_logits_match, encode, hf_logits,
                                        load)
# The tests and fixture imported from test_qwen3_vl run here again, on this module's MoE `tiny` and `loaded`.
from tests.test_qwen3_vl import (EOS, PAD, bnb_checkpoint, padded_batch,  # noqa: F401
                                 test_peft_adapter_loads_here_with_peft_logits,
                                 test_sampling_with_top_k_1_is_greedy_and_seeds_reproduce,
                                 test_train_and_generate_clis)
from tests.tiny import build_hf_model, save_tiny_processor

FAMILY = "qwen3_vl_moe"
EXPERTS = ("gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, transformers model) of the tiny Qwen3-VL MoE, saved once for this module. The router and the
    experts are scaled up from transformers' small init, so that routing is decisive (as in a trained model) and
    the experts' outputs weigh in the logits (a wrong expert or a wrong routing weight shows)."""
    path = tmp_path_factory.mktemp(FAMILY)
    hf_model = build_hf_model(FAMILY)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8.0)
            elif ".mlp.experts." in name:
                p.mul_(4.0)
    hf_model.save_pretrained(path)
    save_tiny_processor(path, FAMILY)
    return str(path), hf_model


@pytest.fixture(scope="module")
def loaded(tiny):
    path, hf_model = tiny
    model, processor = load(path)
    return model, processor, hf_model


def image_batch(processor):
    return encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])


def test_tiny_config_tells_the_expert_layouts_apart(tiny):
    path, hf_model = tiny
    text = hf_model.config.text_config
    assert text.num_experts == 8 and text.num_experts_per_tok == 2
    assert text.mlp_only_layers == [] and text.decoder_sparse_step == 1
    h, i = text.hidden_size, text.moe_intermediate_size
    assert len({h, i, 2 * i}) == 3, "the hub's and the in-memory expert layouts must differ in shape"
    experts = hf_model.model.language_model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (8, 2 * i, h) and tuple(experts.down_proj.shape) == (8, h, i)


# -- the experts' compute ---------------------------------------------------------------------------


def test_experts_equal_a_dense_reference_with_gradients_and_nf4():
    """Every token through every expert, weighted by a one-hot routing: the same outputs and input gradients as
    the grouped matmul (two experts get no token); with NF4 weights the same as with their dequantization."""
    n, k, e, hidden, inter = 13, 2, 8, 24, 10
    rng = np.random.default_rng(0)
    x, probe = rng.standard_normal((2, n, hidden), np.float32)
    first = rng.integers(0, e - 2, n)
    index = np.stack([first, (first + rng.integers(1, e - 2, n)) % (e - 2)], axis=1)  # distinct, 6 and 7 unused
    weights = rng.dirichlet(np.ones(k), n).astype(np.float32)
    gate_up, down = (0.3 * rng.standard_normal(s, np.float32) for s in ((e, 2 * inter, hidden), (e, hidden, inter)))

    @jax.jit
    def reference(x, gate_up, down):
        gate, up = jnp.split(jnp.einsum("th,eoh->teo", x, gate_up), 2, axis=-1)
        out = jnp.einsum("tei,ehi->teh", jax.nn.silu(gate) * up, down)  # [tokens, experts, hidden]
        dense_weights = jnp.sum(jax.nn.one_hot(index, e) * weights[..., None], axis=1)
        return jnp.einsum("teh,te->th", out, dense_weights)

    @jax.jit
    def ours_and_grad(x, gate_up, down):
        module = Experts(e, hidden, inter, "silu", dtype=jnp.float32)
        module.gate_up_proj.set_value(gate_up)
        module.down_proj.set_value(down)
        return jax.value_and_grad(lambda x: jnp.sum(module(x, index, weights) * probe))(x), module(x, index, weights)

    (_, grad), out = ours_and_grad(x, gate_up, down)
    np.testing.assert_allclose(out, reference(x, gate_up, down), rtol=1e-5, atol=1e-5)
    ref_grad = jax.jit(jax.grad(lambda x: jnp.sum(reference(x, gate_up, down) * probe)))(x)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)

    quantize = jax.jit(jax.vmap(quantize_nf4))
    q_gate_up, q_down = quantize(jnp.asarray(gate_up)), quantize(jnp.asarray(down))
    _, out = ours_and_grad(x, q_gate_up, q_down)
    dequantized = jax.jit(lambda ws: [dense_weight(w, jnp.float32) for w in ws])((q_gate_up, q_down))
    np.testing.assert_allclose(out, reference(x, *dequantized), rtol=1e-5, atol=1e-5)

    # LoRA on both NF4 expert weights (expert 2's adapter masked off): the grouped products equal the merged
    # weights' reference, and the merge equals base + scale * B @ A expert by expert.
    mask = jnp.ones(e).at[2].set(0.0)
    loras = [LoRA(base=q, lora_A=jnp.asarray(rng.standard_normal((e, 3, w.shape[-1]), np.float32)),
                  lora_B=jnp.asarray(rng.standard_normal((e, w.shape[-2], 3), np.float32)), mask=mask, scale=0.5)
             for q, w in ((q_gate_up, gate_up), (q_down, down))]
    merged = jax.jit(lambda ws: [dense_weight(w, jnp.float32) for w in ws])(loras)
    for lora, m, d in zip(loras, merged, dequantized):
        delta = 0.5 * np.einsum("eor,eri->eoi", lora.lora_B, lora.lora_A) * np.asarray(mask)[:, None, None]
        np.testing.assert_allclose(m, d + delta, rtol=1e-5, atol=1e-5)
    _, out = ours_and_grad(x, *loras)
    np.testing.assert_allclose(out, reference(x, *merged), rtol=1e-4, atol=1e-4)


# -- 1. logits --------------------------------------------------------------------------------------


def test_text_only(loaded):
    model, processor, hf_model = loaded
    batch = encode(processor, [chat("what is this digit")])
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_one_image(loaded):
    model, processor, hf_model = loaded
    batch = image_batch(processor)
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_of_two_with_images_of_different_sizes(loaded, side):
    model, processor, hf_model = loaded
    batch = padded_batch(processor, side)
    pad_column = 0 if side == "left" else -1
    assert (batch["attention_mask"][:, pad_column] == 0).any(), f"one prompt should be {side}-padded"
    assert not np.array_equal(*batch["image_grid_thw"])
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


# -- 2. generation ----------------------------------------------------------------------------------


def test_greedy_equals_transformers_for_a_left_padded_batch_with_images(loaded):
    model, processor, hf_model = loaded
    batch = padded_batch(processor, "left")
    assert_greedy_matches(model, hf_model, batch, eos=EOS, pad=PAD)


# -- 3. the experts' on-disk layouts ----------------------------------------------------------------


def _rewrite(src, dst, fn):
    """A copy of checkpoint dir `src` in `dst` with every tensor passed through fn(key, array)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    tensors = load_file(f"{src}/model.safetensors")
    save_file({k: np.ascontiguousarray(fn(k, v)) for k, v in tensors.items()}, f"{dst}/model.safetensors",
              metadata={"format": "pt"})


def test_hub_and_in_memory_expert_layouts_import_alike(loaded, tiny, tmp_path):
    """The hub stores the experts [E, H, 2I] / [E, I, H] (transformers transposes them as it loads); transformers'
    save_pretrained writes its in-memory [E, 2I, H] / [E, H, I] (the fixture's checkpoint). Both import here."""
    import transformers
    model, processor, hf_model = loaded
    path, _ = tiny
    swap = lambda k, v: np.swapaxes(v, 1, 2) if k.endswith(EXPERTS) else v  # noqa: E731
    _rewrite(path, tmp_path / "hub", swap)
    on_disk = load_file(f"{tmp_path}/hub/model.safetensors")["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert on_disk.shape == (8, 64, 72)
    # transformers reads this layout as the same model ...
    reference = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "hub", dtype=torch.float32)
    for key, value in hf_model.state_dict().items():
        assert torch.equal(reference.state_dict()[key], value), key
    # ... and so do we, with the same logits as from the in-memory layout.
    hub_model, _ = load(str(tmp_path / "hub"))
    batch = image_batch(processor)
    np.testing.assert_array_equal(np.asarray(hub_model(**batch)), np.asarray(model(**batch)))
    assert_logits_match(hub_model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_an_expert_tensor_in_neither_layout_is_named(tiny, tmp_path):
    path, _ = tiny
    key = "model.language_model.layers.1.mlp.experts.down_proj"
    _rewrite(path, tmp_path, lambda k, v: v[:, :-1] if k == key else v)
    with pytest.raises(CheckpointError, match=rf"{key}.*\(8, 63, 36\).*\(8, 64, 36\).*\(8, 36, 64\)"):
        load(str(tmp_path))


# -- 4. 4-bit ---------------------------------------------------------------------------------------


def test_load_in_4bit_quantizes_each_expert_matrix_as_bitsandbytes_does(tiny):
    """Each expert's [out, in] matrix is one NF4 with bitsandbytes' codes; the Linear weights are NF4 as for
    Qwen3-VL; the routers, lm_head and mergers stay 16-bit; the logits equal transformers' with bitsandbytes'
    dequantized weights."""
    import bitsandbytes.functional as F
    path, hf_model = tiny
    model, processor = load(path, load_in_4bit=True)
    reference = copy.deepcopy(hf_model)
    n_experts = 0
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith(EXPERTS):
                ours = weight(model, name)
                assert isinstance(ours, NF4) and ours.codes.shape[0] == p.shape[0], name
                for e in range(p.shape[0]):
                    packed, state = F.quantize_4bit(p.data[e].clone(), quant_type="nf4", compress_statistics=True,
                                                    blocksize=64)
                    np.testing.assert_array_equal(np.asarray(ours.codes[e]), packed.numpy().ravel())
                    p.data[e] = bnb_dequantized(type("W", (), {"data": packed, "quant_state": state}))
                    n_experts += 1
            elif name.endswith("mlp.gate.weight") or name == "lm_head.weight" or "merger" in name:
                assert not isinstance(weight(model, name), NF4), name
    assert n_experts == 3 * 2 * 8
    for name, module in reference.named_modules():  # Linear weights: NF4 but in quant_skip modules
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and "merger" not in name:
            assert isinstance(weight(model, name + ".weight"), NF4), name
            with torch.no_grad():
                packed, state = F.quantize_4bit(module.weight.data.clone(), quant_type="nf4", compress_statistics=True,
                                                blocksize=64)
                module.weight.copy_(bnb_dequantized(type("W", (), {"data": packed, "quant_state": state})))
    batch = image_batch(processor)
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])


def test_merged_4bit_export_loads_in_transformers_with_bitsandbytes(loaded, tmp_path):
    """bitsandbytes holds Linear weights only: the export's attention projections are 4-bit, the experts (3-D
    parameters) and the routers 16-bit, and transformers + bitsandbytes loads it as written."""
    import bitsandbytes as bnb
    import transformers
    model, processor, hf_model = loaded
    model.save_pretrained_merged(str(tmp_path / "q4"), processor, save_method="merged_4bit")
    exported = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "q4", dtype=torch.float32)
    assert type(exported).__name__ == "Qwen3VLMoeForConditionalGeneration"
    quantized = {n for n, m in exported.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert "model.language_model.layers.1.self_attn.q_proj" in quantized and "lm_head" not in quantized
    assert not [n for n in quantized if "merger" in n or "language_model" in n and ".mlp." in n]
    theirs, original = (m.model.language_model.layers[2].mlp.experts for m in (exported, hf_model))
    for name in EXPERTS:
        np.testing.assert_array_equal(getattr(theirs, name).detach().numpy(), getattr(original, name).detach().numpy())
    ours, _ = load(str(tmp_path / "q4"), load_in_4bit=True)  # a 4-bit checkpoint's 16-bit tensors stay 16-bit
    assert isinstance(weight(ours, "model.language_model.layers.1.self_attn.q_proj.weight"), NF4)
    assert not isinstance(weight(ours, "model.language_model.layers.1.mlp.experts.gate_up_proj"), NF4)


# -- 5. LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision,language,attention,mlp", [
    (True, True, True, True), (False, True, True, True), (True, True, False, True), (False, True, False, True),
    (True, False, True, True), (True, True, True, False)])
def test_adapted_modules_equal_peft_with_unsloths_regex(loaded, vision, language, attention, mlp):
    """The experts and routers are no Linear modules (in transformers neither): Unsloth's regex and PEFT's
    target_modules select attention and the vision tower's MLPs; the experts are adapted through PEFT's
    target_parameters, which Unsloth sets to both expert weights when the language MLPs are finetuned."""
    model, processor, hf_model = loaded
    flags = dict(finetune_vision_layers=vision, finetune_language_layers=language,
                 finetune_attention_modules=attention, finetune_mlp_modules=mlp)
    names = list(linear_modules(model))
    assert not [n for n in names if ".mlp." in n and "language_model" in n]
    regex = get_peft_regex(names, vision, language, attention, mlp)
    adapted = FastVisionModel.get_peft_model(model, r=8, **flags)
    ours = {name for name, (param, layer) in linear_modules(adapted).items() if _is_adapted(adapted, param, layer)}
    experts = json.loads(adapted.peft_config)["target_parameters"]
    assert experts == (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if language and mlp else None)
    peft_modules = peft_adapted(copy.deepcopy(hf_model), regex, target_parameters=experts or [])
    assert ours == set(select_modules(names, regex)) == {n for n in peft_modules if ".experts" not in n}
    assert ours or not (attention or vision)
    moe = adapted.model.language_model.layers.mlp
    assert not isinstance(moe.gate.weight.get_value(), LoRA)
    for name in EXPERTS:
        lora = getattr(moe.experts, name).get_value()
        assert isinstance(lora, LoRA) == bool(experts)
        if experts:  # every layer's every expert: its own A [r, in] and B [out, r]
            layers, e, out_f, in_f = lora.base.shape
            assert lora.lora_A.shape == (layers, e, 8, in_f) and lora.lora_B.shape == (layers, e, out_f, 8)
            assert lora.mask.shape == (layers, e) and np.all(lora.mask == 1)
    assert bool(experts) == any(".experts" in n for n in peft_modules)


def test_expert_lora_options_and_bad_input_match_peft(loaded):
    """A list of MLP leaves picks the expert weights Unsloth picks; layers_to_transform reaches the experts, each
    chosen layer named in target_parameters (PEFT applies layers_to_transform to target_modules only); the
    trainable count equals PEFT's; PEFT's refusals (lora_dropout, inits that need the weight) and unknown
    names are errors that name the parameter."""
    from peft import LoraConfig, get_peft_model
    model, processor, hf_model = loaded
    down = FastVisionModel.get_peft_model(model, r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1])
    experts = json.loads(down.peft_config)["target_parameters"]
    assert experts == ["model.language_model.layers.1.mlp.experts.down_proj"]
    lora = down.model.language_model.layers.mlp.experts.down_proj.get_value()
    assert isinstance(lora, LoRA) and np.array_equal(lora.mask.any(axis=-1), [False, True, False])
    assert not isinstance(down.model.language_model.layers.mlp.experts.gate_up_proj.get_value(), LoRA)
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=4, target_modules=["q_proj"], layers_to_transform=[1], target_parameters=experts))
    assert count_parameters(down)[0] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    assert json.loads(FastVisionModel.get_peft_model(model, r=4, target_modules=["gate_proj", "q_proj"]).peft_config)[
        "target_parameters"] == ["mlp.experts.gate_up_proj"]
    only = FastVisionModel.get_peft_model(model, r=4, target_modules=[], target_parameters=["experts.gate_up_proj"])
    assert not any(_is_adapted(only, p, i) for p, i in linear_modules(only).values())
    assert isinstance(only.model.language_model.layers.mlp.experts.gate_up_proj.get_value(), LoRA)
    with pytest.raises(ValueError, match=r"lora_dropout=0.1: LoRA on expert weights .*experts.gate_up_proj"):
        FastVisionModel.get_peft_model(model, r=4, lora_dropout=0.1)
    assert FastVisionModel.get_peft_model(model, r=4, lora_dropout=0.1, target_parameters=[])  # attention only
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' on the expert weight .*experts\.\w+_proj: only"):
        FastVisionModel.get_peft_model(copy.deepcopy(model), r=4, init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"target_parameters \['mlp.experts.up_proj'\] match no expert weight of "
                                         r"this model; it has mlp.experts.down_proj, mlp.experts.gate_up_proj"):
        FastVisionModel.get_peft_model(model, r=4, target_parameters=["mlp.experts.up_proj"])


@pytest.fixture(scope="module")
def adapted(loaded):
    """The tiny model with LoRA (random B) on Unsloth's default targets, and its logits for `image_batch`."""
    model, processor, hf_model = loaded
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=8, lora_alpha=16))
    batch = image_batch(processor)
    logits = np.asarray(adapted(**batch))
    assert np.abs(logits - hf_logits(hf_model, batch)).max() > 1e-2, "the adapter should change the logits"
    return adapted, batch, logits


def test_our_adapter_loads_in_peft_with_our_logits(loaded, adapted, tmp_path):
    """With the experts adapted too: PEFT's nested wrapper keys, its interleaved expert factors."""
    from peft import PeftModel
    model, processor, hf_model = loaded
    adapted, batch, logits = adapted
    adapted.save_pretrained(str(tmp_path / "adapter"), processor)
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.model.language_model.layers.1.mlp.experts.base_layer.lora_B.weight" in keys
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "adapter")).eval()
    assert_logits_match(logits, hf_logits(peft_model, batch), batch["attention_mask"])
    assert_logits_match(model.load_adapter(str(tmp_path / "adapter"))(**batch), logits, batch["attention_mask"])


@pytest.mark.parametrize("target_parameters,layers", [
    (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], None), (["mlp.experts.down_proj"], [1]),
    (["model.language_model.layers.0.mlp.experts.gate_up_proj"], None)])
def test_peft_expert_adapter_loads_here_with_peft_logits(loaded, tmp_path, target_parameters, layers):
    """Adapters PEFT made with target_parameters (random A and B): one wrapper or two nested, some layers only."""
    from peft import LoraConfig, get_peft_model
    model, processor, hf_model = loaded
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj"], layers_to_transform=layers,
        target_parameters=target_parameters, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".experts." in name and "lora_B" in name:
                p.mul_(30.0)  # B's default init is U(+-1/sqrt(r * experts)): make the experts' share show
    peft_model.save_pretrained(tmp_path)
    batch = image_batch(processor)
    ref = hf_logits(peft_model.eval(), batch)
    assert np.abs(np.asarray(model(**batch)) - ref).max() > 1e-2, "the adapter should change the logits"
    assert_logits_match(model.load_adapter(str(tmp_path))(**batch), ref, batch["attention_mask"])


def test_expert_lora_gradients_match_peft(loaded, tmp_path):
    """The gradients of every LoRA factor (attention, vision, both expert weights) equal PEFT's, key by key in
    PEFT's adapter layout."""
    from peft import PeftModel
    from jaxvlm.converters.peft_adapter import adapter_tensors
    from jaxvlm.kernels.cross_entropy import token_loss_sum
    from jaxvlm.train.trainer import split_trainable
    model, processor, hf_model = loaded
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4, lora_alpha=8))
    batch = encode(processor, [chat("describe the image in detail, " * 4, 1)], [random_image(56, 84)])
    labels = batch["input_ids"].copy()
    inputs = {k: jnp.asarray(v) for k, v in adapted.prepare_inputs(**batch).items() if k != "rope_deltas"}
    trainable, frozen, rebuild, paths = split_trainable(adapted, lambda p: p[-1].name in ("lora_A", "lora_B"))

    def loss(t):
        s, n = token_loss_sum(rebuild(t, frozen).forward(inputs), jnp.asarray(labels))
        return s / n
    grads = rebuild(jax.grad(loss)(trainable), frozen)  # the model with the gradients in place of the factors
    adapted.save_pretrained(str(tmp_path))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path), is_trainable=True)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    peft_model(**tensors, labels=torch.from_numpy(labels)).loss.backward()
    theirs = {n.replace(".default.", "."): p.grad.numpy() for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = adapter_tensors(grads)
    assert set(ours) == set(theirs)
    layers = hf_model.config.text_config.num_hidden_layers
    assert sum(".experts." in k for k in ours) == layers * 2 * 2  # every layer's 2 expert weights' A and B
    worst = max(np.abs(ours[k] - theirs[k]).max() / np.abs(ours[k]).max() for k in ours)
    assert worst < 1e-4, f"LoRA gradients differ from PEFT's by {worst:.2g} of their scale"


def test_merged_16bit_export_loads_in_transformers_with_our_logits(loaded, adapted, tmp_path):
    """The export holds what transformers' save_pretrained writes (the experts in its in-memory layout), the expert
    weights as PEFT's merge_and_unload of our adapter makes them."""
    import transformers
    from peft import PeftModel
    model, processor, hf_model = loaded
    adapted, batch, logits = adapted
    adapted.save_pretrained_merged(str(tmp_path / "out"), processor, save_method="merged_16bit")
    merged = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert_logits_match(logits, hf_logits(merged.eval(), batch), batch["attention_mask"])
    adapted.save_pretrained(str(tmp_path / "adapter"))
    peft_merged = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "adapter")).merge_and_unload()
    peft_merged.save_pretrained(tmp_path / "hf")
    theirs = load_file(str(tmp_path / "hf" / "model.safetensors"))
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for key in theirs:
        if key.endswith("mlp.gate.weight"):
            np.testing.assert_array_equal(ours[key], theirs[key])
        elif key.endswith(EXPERTS):
            assert np.abs(ours[key] - hf_model.state_dict()[key].numpy()).max() > 1e-3
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == FAMILY


# -- 6. training ------------------------------------------------------------------------------------


def test_lora_sft_losses_equal_transformers_and_peft_for_2_steps(tiny, tmp_path):
    """Our collator, SFTTrainer and LoRA on Unsloth's targets against transformers + PEFT + torch AdamW from the same
    init on the same batches: step 1's loss (the forward) and step 2's (after gradients through the experts)."""
    from peft import PeftModel
    from tests.test_trainer import make_trainer, train_and_compare_with_peft
    path, hf_model = tiny
    trainer = make_trainer(path, 2, tmp_path / "out", is_trainable=None)
    trainer.model = FastVisionModel.get_peft_model(trainer.model, r=8, lora_alpha=16, random_state=0)
    trainer.model.save_pretrained(str(tmp_path / "init"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "init"), is_trainable=True)
    train_and_compare_with_peft(trainer, peft_model, 2)


# -- the rows shared with Qwen3-VL dense, run here on the MoE model (this module's `tiny` and `loaded`) ----------


def test_bnb_4bit_checkpoint_imports_attention_as_nf4_and_experts_as_stored(bnb_checkpoint):  # noqa: F811
    """transformers + bitsandbytes quantize the Linear layers (attention, vision) and keep the 3-D experts and
    the router in float: the import keeps both as they are, with bitsandbytes' logits."""
    path, reference = bnb_checkpoint
    model, processor = load(path, load_in_4bit=True)
    for key in ("model.language_model.layers.1.self_attn.q_proj.weight", "model.visual.blocks.0.attn.qkv.weight"):
        assert isinstance(weight(model, key), NF4), key
    for key in ("model.language_model.layers.0.mlp.experts.gate_up_proj",
                "model.language_model.layers.0.mlp.gate.weight", "lm_head.weight"):
        assert not isinstance(weight(model, key), NF4), key
    batch = image_batch(processor)
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])
