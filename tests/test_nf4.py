"""NF4 weights against bitsandbytes on the CPU: the same codes, statistics and dequantized values.

References come from bitsandbytes.functional (quantize_4bit / dequantize_4bit) and from a tiny Llama
that transformers quantizes with bitsandbytes and saves.
"""
import json
import math

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jaxvlm.quant import NF4, dequantize_nf4, nf4_from_bnb, nf4_to_bnb, quantize_nf4
from jaxvlm.quant.nf4 import DYNAMIC_8BIT_TABLE, NF4_TABLE, quantize_blockwise

TORCH_DTYPES = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}


def normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ties(shape, seed=0):
    """Values on the midpoints between NF4 table values, where the rounding rule decides the code.

    Full blocks: table values and midpoints (and their float neighbours) times a power of two that is
    also the block's absmax, so that the scaled values land exactly on the midpoints. The partial last
    block: absmax 1.3 and values within an ulp of 1.3 * midpoint, where dividing by the absmax (as
    bitsandbytes does for that block) and multiplying by its reciprocal (as for full blocks) can round
    to different codes.
    """
    rng = np.random.default_rng(seed)
    midpoints = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / np.float32(2)
    pool = np.concatenate([NF4_TABLE, midpoints, np.nextafter(midpoints, 2), np.nextafter(midpoints, -2)])
    n_full, n_partial = divmod(math.prod(shape), 64)
    blocks = rng.choice(pool, (n_full, 64)).astype(np.float32)
    blocks[:, 0] = rng.choice([-1.0, 1.0], n_full)
    blocks *= np.exp2(rng.integers(-3, 4, (n_full, 1))).astype(np.float32)
    absmax = np.float32(1.3)
    near = ((midpoints * absmax).view(np.int32)[:, None] + np.arange(-1, 2, dtype=np.int32)).view(np.float32)
    partial = np.concatenate([[absmax], near.reshape(-1)])
    assert n_partial == len(partial), f"ties() needs {len(partial)} values in the partial block of {shape}"
    return np.concatenate([blocks.reshape(-1), partial]).astype(np.float32).reshape(shape)


def outliers(shape, seed=0):
    """Small weights with a few huge ones, a block of tiny ones and a block of zeros."""
    w = 0.02 * normal(shape, seed)
    w.reshape(-1)[[5, 700, 701, 9000]] = [1e3, -4e3, 2.5e3, 7e2]
    w.reshape(-1)[128:192] *= 1e-28
    w.reshape(-1)[256:320] = 0
    return w


def zero_blocks(shape, seed=0):
    """A zero first block and a zero partial last block around a normal one."""
    w = normal(shape, seed)
    w.reshape(-1)[:64] = 0
    w.reshape(-1)[128:] = 0
    return w


# (shape, dtype, weights). Shapes whose last dimension is a multiple of 16 but not of 64 are left out
# here: see test_blocks_run_across_rows.
CASES = {
    "64x64-f32": ((64, 64), jnp.float32, normal),
    "96x200-f32": ((96, 200), jnp.float32, normal),
    "300x64-bf16": ((300, 64), jnp.bfloat16, normal),
    "7x13-f32-odd": ((7, 13), jnp.float32, normal),
    "130x1000-bf16": ((130, 1000), jnp.bfloat16, normal),
    "48x72-f16": ((48, 72), jnp.float16, normal),
    "29x70-f32-ties": ((29, 70), jnp.float32, ties),
    "64x256-f32-outliers": ((64, 256), jnp.float32, outliers),
    "3x50-f32-zero-blocks": ((3, 50), jnp.float32, zero_blocks),
    "128x64-f32-all-zero": ((128, 64), jnp.float32, lambda shape: np.zeros(shape, np.float32)),
}


def to_jax(w, dtype):
    return jnp.asarray(w).astype(dtype)


def to_torch(w, dtype):
    return torch.from_numpy(np.array(to_jax(w, dtype).astype(jnp.float32))).to(TORCH_DTYPES[dtype])


def bnb_tensors(packed, state):
    """A bitsandbytes quantization as the checkpoint tensors of one weight, keyed by suffix."""
    tensors = {"": packed.numpy()}
    tensors.update({"." + k: v.numpy() for k, v in state.as_dict(packed=True).items()})
    return tensors


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """The weights of a case, quantized by bitsandbytes and by us, with and without double quantization."""
    shape, dtype, make = CASES[request.param]
    w = make(shape)
    out = {"w": to_jax(w, dtype)}
    for nested in (True, False):
        packed, state = bnbf.quantize_4bit(to_torch(w, dtype), quant_type="nf4", blocksize=64, compress_statistics=nested)
        out["bnb", nested] = packed, state
        out["ours", nested] = quantize_nf4(out["w"], compress_statistics=nested)
    return out


def test_tables_are_bitsandbytes_tables():
    assert np.array_equal(NF4_TABLE, bnbf.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(DYNAMIC_8BIT_TABLE, bnbf.create_dynamic_map().numpy())


def test_codes_match_bnb(case):
    packed, _ = case["bnb", True]
    assert case["ours", True].codes.dtype == jnp.uint8
    np.testing.assert_array_equal(case["ours", True].codes, packed.numpy().reshape(-1))
    np.testing.assert_array_equal(case["ours", False].codes, packed.numpy().reshape(-1))


def test_float_absmax_matches_bnb(case):
    _, state = case["bnb", False]
    assert case["ours", False].absmax.dtype == jnp.float32
    np.testing.assert_array_equal(case["ours", False].absmax, state.absmax.numpy())


def test_offset_is_the_mean_absmax_within_a_few_ulps(case):
    """Both offsets are float32 sums of the same block absmax over their count; torch adds in an order
    that depends on the CPU's vector width and threads, we add pairwise. Each is within a few ulps of
    the exact mean, so they agree to 4 ulps (2^-21 relative)."""
    _, state = case["bnb", True]
    exact_mean = np.mean(np.asarray(case["ours", False].absmax, np.float64))
    np.testing.assert_allclose(case["ours", True].offset, state.offset.item(), rtol=2 ** -21, atol=0)
    np.testing.assert_allclose(case["ours", True].offset, exact_mean, rtol=2 ** -21, atol=0)


def test_nested_absmax_matches_bnb_given_its_offset(case):
    """The 8-bit codes of (absmax - offset) and the scale of each 256 of them, bit for bit."""
    _, state = case["bnb", True]
    codes, nested_absmax = quantize_blockwise(case["ours", False].absmax - np.float32(state.offset.item()))
    np.testing.assert_array_equal(codes, state.absmax.numpy())
    np.testing.assert_array_equal(nested_absmax, state.state2.absmax.numpy())


def test_bfloat16_weights_quantize_bit_for_bit():
    """bfloat16 block absmax have 8 significant bits, so for a weight of ordinary range their float32
    sum is exact in any order and the offset, hence everything, equals bitsandbytes'."""
    w = normal((130, 1000), seed=1)
    packed, state = bnbf.quantize_4bit(to_torch(w, jnp.bfloat16), quant_type="nf4", blocksize=64,
                                       compress_statistics=True)
    theirs = nf4_from_bnb(bnb_tensors(packed, state))
    ours = quantize_nf4(to_jax(w, jnp.bfloat16))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)


def test_dequantize_matches_bnb(case):
    for nested in (True, False):
        packed, state = case["bnb", nested]
        ours = dequantize_nf4(nf4_from_bnb(bnb_tensors(packed, state)))
        theirs = bnbf.dequantize_4bit(packed, state)
        assert ours.dtype == case["w"].dtype and ours.shape == case["w"].shape
        np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), theirs.float().numpy())


def test_dequantize_to_compute_dtype_matches_bnb():
    """An fp32 weight dequantized straight to bfloat16: one rounding of the float32 product."""
    packed, state = bnbf.quantize_4bit(torch.from_numpy(normal((96, 200))), quant_type="nf4", blocksize=64,
                                       compress_statistics=True)
    ours = dequantize_nf4(nf4_from_bnb(bnb_tensors(packed, state)), jnp.bfloat16)
    state.dtype = torch.bfloat16
    theirs = bnbf.dequantize_4bit(packed, state)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), theirs.float().numpy())


def test_blocks_run_across_rows():
    """Blocks of 64 run over the flattened weight, across rows. bitsandbytes' AVX-512 CPU kernel reads
    the absmax per row instead when the last dimension is a multiple of 16 but not of 64, unlike its own
    quantizer and its other kernels; so the reference is bitsandbytes dequantizing the flat tensor."""
    w = normal((10, 96))
    packed, state = bnbf.quantize_4bit(torch.from_numpy(w), quant_type="nf4", blocksize=64,
                                       compress_statistics=True)
    ours = dequantize_nf4(nf4_from_bnb(bnb_tensors(packed, state)))
    state.shape = torch.Size([w.size])
    theirs = bnbf.dequantize_4bit(packed, state).reshape(w.shape)
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_quantize_runs_inside_jit():
    w = jnp.asarray(normal((96, 200)))
    q = jax.jit(lambda w: quantize_nf4(w))(w)
    assert isinstance(q, NF4) and q.shape == (96, 200) and q.dtype == jnp.float32 and q.blocksize == 64
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(quantize_nf4(w))):
        np.testing.assert_array_equal(a, b)


def test_dequantized_weight_is_close_to_the_original():
    """NF4 keeps about 3 bits of a normally distributed weight: an RMS error under 10% of its scale."""
    w = jnp.asarray(normal((96, 200)))
    assert float(jnp.sqrt(jnp.mean((quantize_nf4(w).dequantize() - w) ** 2))) < 0.1


def stack(layers):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)


def test_stack_of_layers_scans_layer_by_layer():
    layers = [quantize_nf4(jnp.asarray(normal((48, 72), seed=i))) for i in range(3)]
    stacked = stack(layers)
    assert stacked.codes.shape == (3, 48 * 72 // 2) and stacked.offset.shape == (3,)

    def step(carry, layer):
        return carry, dequantize_nf4(layer)

    _, weights = jax.lax.scan(step, None, stacked)
    for i, layer in enumerate(layers):
        np.testing.assert_array_equal(weights[i], dequantize_nf4(layer))


def test_stack_dequantizes_under_vmap():
    layers = [quantize_nf4(jnp.asarray(normal((48, 72), seed=i)), compress_statistics=False) for i in range(3)]
    weights = jax.vmap(dequantize_nf4)(stack(layers))
    for i, layer in enumerate(layers):
        np.testing.assert_array_equal(weights[i], dequantize_nf4(layer))


def test_memory_is_half_a_byte_per_param_plus_statistics():
    """Qwen2-VL-2B's MLP weight: codes n/2, absmax codes n/64, a float32 per 256 of those, the 256-entry
    table of the absmax codes and the offset."""
    shape = (1536, 8960)
    q = jax.eval_shape(quantize_nf4, jax.ShapeDtypeStruct(shape, jnp.bfloat16))
    n = math.prod(shape)
    expected = n // 2 + n // 64 + math.ceil(n / 64 / 256) * 4 + 256 * 4 + 4
    assert sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(q)) == expected == 7_100_708
    assert expected / n < 0.516


# A tiny Llama, quantized by transformers + bitsandbytes and saved.

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(fp32 dir, NF4 dir, NF4 tensors, the quantized transformers model)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    fp32_dir, nf4_dir = tmp_path_factory.mktemp("fp32"), tmp_path_factory.mktemp("nf4")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(fp32_dir)
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(fp32_dir, quantization_config=bnb_config, dtype=torch.float32)
    model.save_pretrained(nf4_dir)
    return fp32_dir, nf4_dir, load_file(nf4_dir / "model.safetensors"), model


def weight_keys(tensors):
    return sorted(k[: -len(".absmax")] for k in tensors if k.endswith(".absmax"))


def parts(tensors, key):
    """The tensors of the weight `key`, keyed by the suffix after it."""
    return {k[len(key):]: v for k, v in tensors.items() if k == key or k.startswith(key + ".")}


def bnb_weight(model, key):
    param = model.get_submodule(key[: -len(".weight")]).weight
    return bnbf.dequantize_4bit(param.data, param.quant_state)


def test_checkpoint_has_the_tensors_we_read(saved):
    *_, tensors, _ = saved
    assert len(weight_keys(tensors)) == 14  # 7 Linear layers per decoder layer
    blob = tensors["model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"]
    assert set(json.loads(blob.tobytes())) == {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                                              "nested_dtype", "nested_offset"}


def test_checkpoint_dequantizes_as_bnb(saved):
    *_, tensors, model = saved
    for key in weight_keys(tensors):
        ours = dequantize_nf4(nf4_from_bnb(parts(tensors, key), key))
        np.testing.assert_array_equal(ours, bnb_weight(model, key).numpy(), err_msg=key)


def test_to_bnb_writes_the_checkpoint_bytes(saved):
    *_, tensors, _ = saved
    for key in weight_keys(tensors):
        written = nf4_to_bnb(nf4_from_bnb(parts(tensors, key), key))
        read = parts(tensors, key)
        assert written.keys() == read.keys()
        for suffix in read:
            assert written[suffix].dtype == read[suffix].dtype and written[suffix].shape == read[suffix].shape
            assert written[suffix].tobytes() == read[suffix].tobytes(), key + suffix


def test_our_export_loads_in_transformers(saved, tmp_path):
    """Our quantization of the fp32 weights, written in bnb's format, loads in transformers + bitsandbytes,
    which then dequantizes exactly our weights."""
    from transformers import AutoModelForCausalLM
    fp32_dir, nf4_dir, tensors, _ = saved
    originals = load_file(fp32_dir / "model.safetensors")
    exported, ours = dict(tensors), {}
    for key in weight_keys(tensors):
        ours[key] = quantize_nf4(jnp.asarray(originals[key]))
        exported.update({key + suffix: v for suffix, v in nf4_to_bnb(ours[key]).items()})
    save_file(exported, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((nf4_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for key, q in ours.items():
        np.testing.assert_array_equal(dequantize_nf4(q), bnb_weight(model, key).numpy(), err_msg=key)


# Bad input.

KEY = "model.layers.0.mlp.up_proj.weight"


def valid_parts():
    return nf4_to_bnb(quantize_nf4(jnp.asarray(normal((128, 64)))))


def with_blob(fields_update=None, raw=None):
    tensors = valid_parts()
    suffix = ".quant_state.bitsandbytes__nf4"
    if raw is None:
        fields = json.loads(tensors[suffix].tobytes())
        fields.update(fields_update)
        raw = json.dumps(fields).encode()
    tensors[suffix] = np.frombuffer(raw, np.uint8)
    return tensors


def replaced(suffix, value):
    tensors = valid_parts()
    tensors[suffix] = value
    return tensors


def renamed(old, new):
    tensors = valid_parts()
    tensors[new] = tensors.pop(old)
    return tensors


def dropped(suffix):
    tensors = valid_parts()
    del tensors[suffix]
    return tensors


BAD_TENSORS = {
    "fp4 quant state": (renamed(".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"),
                        rf"{KEY}\.quant_state\.bitsandbytes__fp4: quant_type 'fp4' is not supported; expected 'nf4'"),
    "unknown quant_type": (with_blob({"quant_type": "int4"}),
                           rf"{KEY}\.quant_state\.bitsandbytes__nf4: quant_type 'int4' is not supported"),
    "blocksize 128": (with_blob({"blocksize": 128}),
                      rf"{KEY}\.quant_state\.bitsandbytes__nf4: block size 128 is not supported; expected 64"),
    "nested blocksize": (with_blob({"nested_blocksize": 128}), r"field 'nested_blocksize' is 128"),
    "unknown dtype": (with_blob({"dtype": "float8"}), rf"{KEY}\.quant_state.*field 'dtype' is 'float8'"),
    "no shape": (with_blob(raw=b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32"}'),
                 rf"{KEY}\.quant_state\.bitsandbytes__nf4: field 'shape' is missing"),
    "not utf-8": (with_blob(raw=b"\xff\xfe{"), rf"{KEY}\.quant_state\.bitsandbytes__nf4: not UTF-8 JSON"),
    "truncated json": (with_blob(raw=b'{"quant_type": "nf4", "blocksize"'), rf"{KEY}\.quant_state.*not UTF-8 JSON"),
    "json list": (with_blob(raw=b"[1, 2]"), rf"{KEY}\.quant_state.*a JSON list, expected a JSON object"),
    "blob not bytes": (replaced(".quant_state.bitsandbytes__nf4", np.zeros(4, np.float32)),
                       rf"{KEY}\.quant_state.*dtype float32, expected uint8"),
    "no quant state": (dropped(".quant_state.bitsandbytes__nf4"),
                       rf"{KEY}: expected one {KEY}\.quant_state\.bitsandbytes__nf4 tensor, found \[\]"),
    "absmax too short": (replaced(".absmax", np.zeros(127, np.uint8)),
                         rf"{KEY}\.absmax: got uint8 \[127\], expected uint8 \[128\]"),
    "float absmax with nested stats": (replaced(".absmax", np.zeros(128, np.float32)),
                                       rf"{KEY}\.absmax: got float32 \[128\], expected uint8 \[128\]"),
    "codes of another shape": (replaced("", np.zeros((2048, 1), np.uint8)),
                               rf"{KEY}: got uint8 \[2048, 1\], expected uint8 \[4096\]"),
    "nested absmax missing": (dropped(".nested_absmax"), rf"{KEY}: got tensors .* expected .*nested_absmax"),
    "stray tensor": (replaced(".SCB", np.zeros(1, np.float32)), rf"{KEY}: got tensors .*SCB"),
    "quant_map not nf4": (replaced(".quant_map", bnbf.get_4bit_type("fp4", device="cpu").numpy()),
                          rf"{KEY}\.quant_map: .* is not the NF4 table"),
}


@pytest.mark.parametrize("bad", list(BAD_TENSORS))
def test_bad_checkpoint_tensors_are_named(bad):
    tensors, message = BAD_TENSORS[bad]
    with pytest.raises(ValueError, match=message):
        nf4_from_bnb(tensors, KEY)


def test_quantize_rejects_other_block_sizes():
    with pytest.raises(ValueError, match="quantize_nf4: block size 128 is not supported; expected 64"):
        quantize_nf4(jnp.ones((64, 64)), blocksize=128)


def test_quantize_rejects_integer_weights():
    with pytest.raises(ValueError, match=r"quantize_nf4: weight dtype int32 is not supported; expected one of"):
        quantize_nf4(jnp.ones((64, 64), jnp.int32))


def test_dequantize_asks_for_one_layer_of_a_stack():
    stacked = stack([quantize_nf4(jnp.ones((8, 8)))] * 2)
    with pytest.raises(ValueError, match=r"codes have shape \(2, 32\), expected one weight's \[32\]; use jax.vmap"):
        dequantize_nf4(stacked)
