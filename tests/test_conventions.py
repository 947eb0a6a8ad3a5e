"""The conventions users bring from Unsloth, transformers and PEFT: dtypes, processors without a named
class, PEFT's init_lora_weights, saving into existing directories, and bad generation arguments."""
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxvlm import FastVisionModel
from jaxvlm.fast_vision_model import compute_dtype
from jaxvlm.layers import dense_weight
from jaxvlm.lora import LoRA
from jaxvlm.processing import load_processor
from jaxvlm.quant import NF4
from tests.conftest import chat, random_image, save_tiny_model
from tests.test_qwen2_vl_parity import encode, load


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("conventions")
    hf_model = save_tiny_model(path, "qwen2_vl")
    return str(path), hf_model


@pytest.fixture(scope="module")
def base(tiny_dir):
    return load(tiny_dir[0])


def batch_for(processor):
    return encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])


# -- dtype -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given,expected", [
    (None, "bfloat16"), (jnp.float32, "float32"), (jnp.bfloat16, "bfloat16"), (jnp.float16, "float16"),
    (np.float32, "float32"), (np.dtype("float16"), "float16"), ("float32", "float32"), ("bfloat16", "bfloat16"),
    ("float16", "float16"), (torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
    ("torch.bfloat16", "bfloat16")])
def test_dtype_takes_what_users_pass(given, expected):
    assert compute_dtype(given) == jnp.dtype(expected)


@pytest.mark.parametrize("bad", ["int8", jnp.int8, np.uint8, torch.int8, "float64x", 3, "fp8"])
def test_dtype_that_is_not_a_float_is_refused(bad):
    with pytest.raises(ValueError, match=r"dtype=.*expected None, float32, bfloat16 or float16"):
        compute_dtype(bad)


def test_from_pretrained_with_a_jnp_dtype(tiny_dir):
    model, _ = FastVisionModel.from_pretrained(tiny_dir[0], dtype=jnp.float32, load_in_4bit=False)
    assert model.dtype == jnp.float32
    assert model.model.language_model.embed_tokens.weight.get_value().dtype == jnp.float32


# -- the processor -----------------------------------------------------------------------------------


def test_processor_without_a_named_class_comes_from_the_model_type(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir[0], tmp_path, dirs_exist_ok=True)
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        file = tmp_path / name
        if file.exists():
            config = json.loads(file.read_text())
            config.pop("processor_class", None)
            file.write_text(json.dumps(config))
    processor = load_processor(str(tmp_path))
    assert type(processor).__name__ == "Qwen2VLProcessor"
    _, reference = load(tiny_dir[0])
    prompt = reference.apply_chat_template(chat("what is this", 1), tokenize=False, add_generation_prompt=True)
    image = random_image(56, 84)
    ours, theirs = (p(text=[prompt], images=[image], return_tensors="np") for p in (processor, reference))
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["pixel_values"], theirs["pixel_values"])
    model, loaded = FastVisionModel.from_pretrained(str(tmp_path), dtype="float32", load_in_4bit=False)
    assert type(loaded).__name__ == "Qwen2VLProcessor"


# -- init_lora_weights -------------------------------------------------------------------------------


def loras(model):
    from flax import nnx
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))
            if isinstance(v.get_value(), LoRA)}


def test_init_false_draws_b_too_so_the_adapter_is_not_the_identity(base):
    model, processor = base
    adapted = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    for lora in loras(adapted).values():
        r, n_in = lora.lora_A.shape[-2:]
        assert np.abs(np.asarray(lora.lora_B)).max() > 0
        assert np.abs(np.asarray(lora.lora_B)).max() <= 1 / np.sqrt(r)  # nn.Linear(r, out)'s default init
        assert np.abs(np.asarray(lora.lora_A)).max() <= 1 / np.sqrt(n_in)
    batch = batch_for(processor)
    assert np.abs(np.asarray(adapted(**batch)) - np.asarray(model(**batch))).max() > 1e-3


def test_init_gaussian_draws_a_with_std_one_over_r(base):
    model, _ = base
    adapted = FastVisionModel.get_peft_model(model, r=4, init_lora_weights="gaussian")
    a = np.concatenate([np.asarray(x.lora_A).ravel() for x in loras(adapted).values()])
    assert abs(a.std() - 1 / 4) < 0.01
    assert all(not np.asarray(x.lora_B).any() for x in loras(adapted).values())


def peft_init(hf_model, init, module="model.language_model.layers.1.mlp.up_proj"):
    """(PEFT's residual base weight, scale * B @ A) for one module after PEFT's `init`."""
    import copy

    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj"],
                                                                     init_lora_weights=init))
    layer = peft_model.base_model.model.get_submodule(module)
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    return layer.base_layer.weight.detach().numpy(), delta.detach().numpy()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_equal_peft_and_keep_the_model(base, tiny_dir, init):
    model, processor = base
    adapted = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["up_proj"],
                                             init_lora_weights=init)
    lora = loras(adapted)["model.language_model.layers.mlp.up_proj.weight"]
    residual, delta = peft_init(tiny_dir[1], init)
    ours_delta = lora.scale * np.asarray(lora.lora_B[1] @ lora.lora_A[1])
    np.testing.assert_allclose(ours_delta, delta, atol=2e-5)
    np.testing.assert_allclose(np.asarray(lora.base[1]), residual, atol=2e-5)
    batch = batch_for(processor)  # base residual + adapter = the original weight
    np.testing.assert_allclose(np.asarray(adapted(**batch)), np.asarray(model(**batch)), atol=2e-4)


def test_olora_on_an_nf4_base_requantizes_the_residual(tiny_dir):
    model, _ = FastVisionModel.from_pretrained(tiny_dir[0], dtype="float32", load_in_4bit=True)
    before = model.model.language_model.layers.mlp.up_proj.weight.get_value()
    adapted = FastVisionModel.get_peft_model(model, r=4, target_modules=["up_proj"], init_lora_weights="olora")
    lora = loras(adapted)["model.language_model.layers.mlp.up_proj.weight"]
    assert isinstance(lora.base, NF4)
    merged = np.asarray(dense_weight(lora, jnp.float32))
    original = np.asarray(dense_weight(before, jnp.float32))
    # NF4 rounding of the residual: within the quantization step of the original weights.
    assert np.abs(merged - original).max() < 0.25 * np.abs(original).max()


def test_pissa_on_an_nf4_base_is_refused_as_peft_refuses_it(tiny_dir):
    model, _ = FastVisionModel.from_pretrained(tiny_dir[0], dtype="float32", load_in_4bit=True)
    with pytest.raises(ValueError, match="PiSSA needs a float base"):
        FastVisionModel.get_peft_model(model, r=4, target_modules=["up_proj"], init_lora_weights="pissa")


@pytest.mark.parametrize("init", ["loftq", "eva", "corda", 1])
def test_unsupported_init_is_named(base, init):
    with pytest.raises(ValueError, match=r"init_lora_weights=.*expected one of True, False, 'gaussian'"):
        FastVisionModel.get_peft_model(base[0], r=4, init_lora_weights=init)


def test_string_target_modules_says_it_is_a_full_name_regex(base):
    with pytest.raises(ValueError, match=r"a string is a regex matched against the whole module name.*"
                                         r"target_modules=\['q_proj'\]"):
        FastVisionModel.get_peft_model(base[0], r=4, target_modules="q_proj")


# -- saving into existing directories ----------------------------------------------------------------


def users_files(folder):
    (folder / "notes.txt").write_text("mine")
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / "state.bin").write_bytes(b"x")


@pytest.mark.parametrize("method", ["lora", "merged_16bit", "merged_4bit"])
def test_saving_into_an_existing_directory_replaces_only_our_files(base, tmp_path, method):
    model, processor = base
    model = FastVisionModel.get_peft_model(model, r=4)
    out = tmp_path / "out"
    out.mkdir()
    users_files(out)
    model.save_pretrained_merged(str(out), processor, save_method=method)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    first = (out / weights).read_bytes()
    model.save_pretrained_merged(str(out), processor, save_method=method, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-3" / "state.bin").exists()
    assert (out / weights).read_bytes() == first
    assert not [n for n in os.listdir(out) if n.startswith(".") or n.endswith(".tmp")]
    assert not [n for n in os.listdir(tmp_path) if n != "out"], "no staging directory is left behind"


def test_save_pretrained_overwrite_deletes_nothing_of_the_users(base, tmp_path):
    model, processor = base
    model = FastVisionModel.get_peft_model(model, r=4)
    users_files(tmp_path)
    model.save_pretrained(str(tmp_path), processor, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "checkpoint-3" / "state.bin").exists()
    assert (tmp_path / "adapter_config.json").exists()


def test_saving_onto_a_regular_file_is_refused_and_the_file_kept(base, tmp_path):
    model, processor = base
    model = FastVisionModel.get_peft_model(model, r=4)
    target = tmp_path / "model"
    target.write_text("a file of the user's")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        model.save_pretrained(str(target), processor)
    assert target.read_text() == "a file of the user's"


def test_saved_files_follow_the_umask(base, tmp_path):
    model, processor = base
    old = os.umask(0o022)
    try:
        model.save_pretrained_merged(str(tmp_path / "out"), processor)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_an_unsharded_save_over_a_sharded_one_removes_the_old_shards(base, tmp_path):
    model, processor = base
    model.save_pretrained_merged(str(tmp_path), processor, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model.save_pretrained_merged(str(tmp_path), processor)
    assert sorted(n for n in os.listdir(tmp_path) if "safetensors" in n) == ["model.safetensors"]


# -- generation arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_new_tokens_must_be_a_positive_int(base, bad):
    model, processor = base
    batch = processor(text=["what is this"], return_tensors="np")
    with pytest.raises(ValueError, match=rf"max_new_tokens={bad!r}: expected a positive int"):
        model.generate(**batch, max_new_tokens=bad)


def test_generating_past_max_position_embeddings_warns(tiny_dir):
    import dataclasses
    model, processor = load(tiny_dir[0])
    model.config = dataclasses.replace(model.config, max_position_embeddings=12)
    batch = processor(text=["what is this picture of"], return_tensors="np")
    with pytest.warns(UserWarning, match="past the model's max_position_embeddings=12"):
        model.generate(**batch, max_new_tokens=8, max_seq_length=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(**batch, max_new_tokens=1, max_seq_length=None)
    jax.clear_caches()
