"""4-bit and 8-bit bases: bitsandbytes checkpoints import without a float copy, load_in_4bit / load_in_8bit
quantize as bitsandbytes does, and the logits match transformers with the same (de)quantized weights."""
import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jaxvlm.converters.safetensors_io import CheckpointError
from jaxvlm.quant import NF4, Int8
from tests.conftest import chat, random_image
from tests.test_qwen2_vl_parity import assert_logits_match, encode, hf_logits, load

PROCESSOR_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"]


def bnb_dequantized(weight):
    """bitsandbytes' dequantization of a Linear4bit weight, over the flattened weight: bnb 0.50's CPU kernel
    misreads absmax for rows whose length is a multiple of 16 but not of 64 (e.g. 32), against its own
    quantizer, which blocks the flattened weight."""
    import bitsandbytes.functional as F
    state = copy.copy(weight.quant_state)
    shape = state.shape
    state.shape = torch.Size([shape.numel()])
    return F.dequantize_4bit(weight.data, state).reshape(shape)


@pytest.fixture(scope="module")
def bnb_checkpoint(tiny, tmp_path_factory):
    """(family, dir of the tiny model quantized + saved by transformers + bitsandbytes, reference model)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    family, path, _ = tiny
    quantized = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, quantization_config=(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)))
    out = tmp_path_factory.mktemp(f"{family}-bnb4")
    quantized.save_pretrained(out)
    for name in PROCESSOR_FILES:
        shutil.copy(f"{path}/{name}", out)
    # bitsandbytes' CPU 4-bit matmul does not run at these sizes: the reference is the float model with
    # each 4-bit weight replaced by bitsandbytes' dequantization of it.
    reference = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(modules.get(name), bnb.nn.Linear4bit):
                module.weight.copy_(bnb_dequantized(modules[name].weight))
    return family, str(out), reference


def weight(model, hf_key):
    """Our param value (a layer's row of a stacked one) for a transformers key; the stacked layers are the
    family's (model.stacks(), e.g. model.language_model.layers, model.visual.blocks)."""
    from jaxvlm.paths import split_layer
    ours, row = split_layer(hf_key, model.stacks())
    module = model
    for part in ours.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    value = module.get_value()
    return value if row is None else __import__("jax").tree.map(lambda a: a[row], value)


def batch_for(processor):
    return encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])


def test_bnb_checkpoint_imports_as_nf4_with_bnb_logits(bnb_checkpoint):
    family, path, reference = bnb_checkpoint
    model, processor = load(path, load_in_4bit=True)
    assert isinstance(model.model.language_model.layers.mlp.down_proj.weight.get_value(), NF4)
    assert isinstance(model.model.visual.blocks.attn.qkv.weight.get_value(), NF4)
    batch = batch_for(processor)
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])


def test_bnb_checkpoint_loaded_in_16_bit_is_dequantized(bnb_checkpoint):
    family, path, reference = bnb_checkpoint
    model, processor = load(path, load_in_4bit=False)
    assert not isinstance(model.model.language_model.layers.mlp.down_proj.weight.get_value(), NF4)
    batch = batch_for(processor)
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])


def test_load_in_4bit_quantizes_linear_weights_as_bitsandbytes_does(tiny):
    import bitsandbytes.functional as F
    from transformers import AutoModelForImageTextToText
    family, path, _ = tiny
    model, processor = load(path, load_in_4bit=True)
    reference = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    kept = []
    with torch.no_grad():
        for name, module in reference.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            ours = weight(model, name + ".weight")
            if name == "lm_head" or ".merger." in name:
                assert not isinstance(ours, NF4)
                kept.append(name)
                continue
            assert isinstance(ours, NF4), name
            packed, state = F.quantize_4bit(module.weight.data.clone(), quant_type="nf4", compress_statistics=True,
                                            blocksize=64)
            np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().ravel())
            module.weight.copy_(bnb_dequantized(type("W", (), {"data": packed, "quant_state": state})))
    assert "lm_head" in kept and any(".merger." in k for k in kept)
    assert not isinstance(model.model.visual.patch_embed.proj.weight.get_value(), NF4)
    batch = batch_for(processor)
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])


def test_load_in_8bit_matches_bitsandbytes_int8(tiny):
    import bitsandbytes.functional as F
    from transformers import AutoModelForImageTextToText
    family, path, _ = tiny
    model, processor = load(path, load_in_4bit=False, load_in_8bit=True)
    reference = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head" and ".merger." not in name:
                ours = weight(model, name + ".weight")
                assert isinstance(ours, Int8), name
                codes, scale, _ = F.int8_vectorwise_quant(module.weight.data.clone())
                np.testing.assert_array_equal(np.asarray(ours.codes), codes.numpy())
                module.weight.copy_(F.int8_vectorwise_dequant(codes, scale))
    batch = batch_for(processor)
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])


def nf4_bytes(n: int) -> int:
    """codes n/2 + absmax codes n/64 + nested absmax per 256 blocks + nested table + offset."""
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4


def test_4bit_param_tree_has_the_expected_bytes(tiny):
    import jax
    from flax import nnx
    family, path, _ = tiny
    model16, _ = load(path, load_in_4bit=False)
    model4, _ = load(path, load_in_4bit=True)
    expected = quantized_params = 0
    for (p, v16), (_, v4) in zip(nnx.to_flat_state(nnx.state(model16, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(model4, nnx.Param))):
        a16, q = v16.get_value(), v4.get_value()
        if isinstance(q, NF4):
            layers = a16.shape[0] if a16.ndim == 3 else 1
            expected += layers * nf4_bytes(a16.size // layers)
            quantized_params += a16.size
        else:
            expected += a16.nbytes
    got = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model4, nnx.Param)))
    assert got == expected
    assert quantized_params > 0


def test_2b_geometry_stores_about_0_53_bytes_per_quantized_param():
    """The 2B geometry's NF4 tree, sized by shape evaluation alone (nothing is allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jaxvlm.quantize import linear_weight_keys
    from jaxvlm.models import qwen2_vl
    from jaxvlm.quant import quantize_nf4
    from scripts.bench_common import qwen2_vl_2b_config
    cfg = qwen2_vl_2b_config()
    model_cls = qwen2_vl.Qwen2VLForConditionalGeneration
    abstract = nnx.eval_shape(lambda: model_cls(cfg, jnp.bfloat16))
    targets = linear_weight_keys(abstract, model_cls.INFO.quant_skip)
    n_params = n_bytes = 0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        key, spec = ".".join(map(str, path)), var.get_value()
        if key in targets:
            q = jax.eval_shape(jax.vmap(quantize_nf4), spec)
            n_params += spec.size
            n_bytes += sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(q))
    assert n_params > 1.2e9  # the language model and vision blocks
    assert 0.5 < n_bytes / n_params < 0.53


@pytest.fixture
def bnb_copy(bnb_checkpoint, tmp_path):
    family, path, _ = bnb_checkpoint
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    return tmp_path


def edit_blob(path, key, fn):
    tensors = load_file(str(path / "model.safetensors"))
    blob_key = key + ".quant_state.bitsandbytes__nf4"
    fields = json.loads(bytes(tensors[blob_key]).decode())
    new = fn(fields)
    tensors[blob_key] = np.frombuffer(new if isinstance(new, bytes) else json.dumps(new).encode(), np.uint8).copy()
    save_file(tensors, str(path / "model.safetensors"))
    return blob_key


def drop_tensor(path, key):
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[key]
    save_file(tensors, str(path / "model.safetensors"))


BNB_STATISTICS = [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"]


@pytest.mark.parametrize("suffix", BNB_STATISTICS)
def test_missing_statistics_tensor_is_named(bnb_copy, suffix):
    key = "model.layers.0.mlp.up_proj.weight"
    drop_tensor(bnb_copy, key + suffix)
    with pytest.raises(CheckpointError) as e:
        load(str(bnb_copy), load_in_4bit=True)
    message = str(e.value)
    assert message.startswith(f"{bnb_copy}: {key}{suffix} is missing (")
    assert f"got tensors {key}, {', '.join(sorted(set(BNB_STATISTICS) - {suffix}))}" in message


def test_missing_packed_weight_is_named_not_called_unexpected(bnb_copy):
    key = "model.layers.1.self_attn.v_proj.weight"
    drop_tensor(bnb_copy, key)
    with pytest.raises(CheckpointError) as e:
        load(str(bnb_copy), load_in_4bit=True)
    assert str(e.value) == (f"{bnb_copy}: the packed 4-bit weight {key} is missing while its statistics "
                            f"({', '.join(sorted(BNB_STATISTICS))}) are present")


def test_unknown_quant_type_in_the_config(bnb_copy):
    cfg = json.loads((bnb_copy / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "int4"
    (bnb_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bnb_4bit_quant_type='int4' is not supported; expected 'nf4'"):
        load(str(bnb_copy), load_in_4bit=True)


def test_unknown_quant_type_in_a_tensor_blob(bnb_copy):
    key = edit_blob(bnb_copy, "model.layers.0.mlp.up_proj.weight", lambda f: {**f, "quant_type": "fp4"})
    with pytest.raises(ValueError, match=re.escape(key) + ".*quant_type 'fp4' is not supported"):
        load(str(bnb_copy), load_in_4bit=True)


def test_block_size_we_do_not_handle(bnb_copy):
    edit_blob(bnb_copy, "model.layers.1.self_attn.q_proj.weight", lambda f: {**f, "blocksize": 128})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight.*block size 128"):
        load(str(bnb_copy), load_in_4bit=True)


def test_corrupt_quant_state_blob(bnb_copy):
    edit_blob(bnb_copy, "model.layers.2.mlp.gate_proj.weight", lambda f: b"{not json")
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.gate_proj\.weight\.quant_state"):
        load(str(bnb_copy), load_in_4bit=True)
