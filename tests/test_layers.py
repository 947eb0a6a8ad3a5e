"""Shared layers against their plain references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.layers import attention, segment_attention
from jaxvlm.models.qwen_vision import segment_index


def test_segment_attention_equals_dense_attention_with_a_block_diagonal_mask():
    seg = np.repeat(np.arange(5), [7, 1, 30, 12, 9])  # uneven segments, one of a single token
    n, heads, dim = len(seg), 3, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (n, heads, dim)) for i in range(3))
    index = segment_index(seg)
    assert index.shape == (6, 32) and (index[5] == n).all()  # both axes rounded up, padding out of range
    mask = jnp.asarray(seg[:, None] == seg[None, :])
    dense = attention(q[None], k[None], v[None], mask[None, None])[0]
    np.testing.assert_allclose(segment_attention(q, k, v, jnp.asarray(index)), dense, rtol=1e-5, atol=1e-6)


def test_segment_attention_of_equal_contiguous_segments_is_a_reshape_with_the_same_result():
    # Same-size images: segment_index's rows fill all tokens, so `contiguous=True` attends reshaped rows
    # (no gathers); the result equals the gathered path and the block-diagonal dense attention.
    seg = np.repeat(np.arange(4), 8)
    n, heads, dim = len(seg), 2, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (n, heads, dim)) for i in range(3))
    index = jnp.asarray(segment_index(seg))
    assert index.shape == (4, 8)
    fast = segment_attention(q, k, v, index, contiguous=True)
    mask = jnp.asarray(seg[:, None] == seg[None, :])
    dense = attention(q[None], k[None], v[None], mask[None, None])[0]
    np.testing.assert_allclose(fast, dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast, segment_attention(q, k, v, index), rtol=1e-6, atol=1e-6)


def test_odd_lengths_padded_to_even_give_the_same_attention_and_gradients():
    """cuDNN's backward takes even lengths only: `attention` runs an odd, unmasked one (CLIP's 577 tokens) padded by
    a zero token whose key is masked (by lengths) and whose query is dropped. The same arrays through XLA equal the unpadded
    attention, values and gradients."""
    from jaxvlm.layers import pad_to_even, padded_attention
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 9, 4, 8)) for i in range(3))

    def loss(fn, q, k, v):
        return (fn(q, k, v) ** 2).sum()

    plain = lambda q, k, v: attention(q, k, v)  # noqa: E731
    padded = lambda q, k, v: padded_attention(*pad_to_even(q, k, v), q.shape[1], None, "xla")  # noqa: E731
    qp, kp, _, q_lengths, kv_lengths = pad_to_even(q, k, v)
    assert qp.shape[1] == kp.shape[1] == 10 and q_lengths.tolist() == kv_lengths.tolist() == [9, 9]
    np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.grad(lambda *x: loss(padded, *x), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(lambda *x: loss(plain, *x), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "nf4"])
def test_a_one_row_product_is_a_sum_that_equals_the_dot(kind, monkeypatch):
    """A batch-1 decode step's Linear as a float32 multiply + sum (the GPU's default, forced here): the dot's
    result, bias included; two rows go through the dot."""
    from jaxvlm import layers
    from jaxvlm.quant.nf4 import quantize_nf4
    k = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(k[0], (96, 192), jnp.float32)
    w = quantize_nf4(w) if kind == "nf4" else w
    bias = jax.random.normal(k[1], (96,), jnp.float32)
    one_row, two_rows = jax.random.normal(k[2], (1, 1, 192)), jax.random.normal(k[3], (2, 1, 192))

    def ops(x):
        return {e.primitive.name for e in jax.make_jaxpr(lambda x: layers.linear(x, w, bias))(x).jaxpr.eqns}
    monkeypatch.setattr(layers, "rows_product", "off")
    want = layers.linear(one_row, w, bias)
    monkeypatch.setattr(layers, "rows_product", "on")
    got = layers.linear(one_row, w, bias)
    assert "dot_general" not in ops(one_row) and "dot_general" in ops(two_rows)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def nf4_reference(x, q, bias):
    """x @ W.T + bias in float64, W the weight of q dequantized to float32 by dequantize_nf4."""
    from jaxvlm.quant import dequantize_nf4
    w = np.asarray(dequantize_nf4(q, jnp.float32), np.float64)
    return np.asarray(x, np.float64) @ w.T + np.asarray(bias, np.float64)


@pytest.mark.parametrize("double_quantized", [True, False], ids=["double-quantized", "float-absmax"])
@pytest.mark.parametrize("shape", [(96, 192), (40, 100)], ids=["whole-blocks", "blocks-across-rows"])
@pytest.mark.parametrize("formulation", ["table", "select", "blocksum", "blocksum-select"])
def test_each_nf4_one_row_formulation_equals_the_dequantized_product(formulation, shape, double_quantized,
                                                                     monkeypatch):
    """JAXVLM_NF4_ROWS's formulations of a one-row product over an NF4 weight: the float32 dequantized weight's product,
    bias included. A row of 100 does not hold whole 64-blocks (they run across rows): the blocksums fall back."""
    from jaxvlm import layers
    from jaxvlm.quant.nf4 import quantize_nf4
    k = jax.random.split(jax.random.key(0), 3)
    q = quantize_nf4(jax.random.normal(k[0], shape, jnp.float32), compress_statistics=double_quantized)
    bias = jax.random.normal(k[1], (shape[0],), jnp.float32)
    x = jax.random.normal(k[2], (1, 1, shape[1]), jnp.float32)
    monkeypatch.setattr(layers, "rows_product", "on")
    monkeypatch.setattr(layers, "nf4_rows", formulation)
    got = jax.jit(lambda x, q, bias: layers.linear(x, q, bias))(x, q, bias)  # a new function: traced afresh
    want = nf4_reference(x, q, bias)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("formulation", ["select", "blocksum", "blocksum-select"])
def test_nf4_one_row_formulations_run_one_layer_per_scan_step(formulation, monkeypatch):
    """A stacked NF4 weight (a leading layer axis) scanned as the decoder's layers are: each step's product is its
    layer's."""
    from jaxvlm import layers
    from jaxvlm.quant.nf4 import quantize_nf4
    k = jax.random.split(jax.random.key(1), 5)
    per_layer = [quantize_nf4(jax.random.normal(k[i], (64, 128), jnp.float32)) for i in range(3)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)
    bias = jax.random.normal(k[3], (64,), jnp.float32)
    x = jax.random.normal(k[4], (1, 1, 128), jnp.float32)
    monkeypatch.setattr(layers, "rows_product", "on")
    monkeypatch.setattr(layers, "nf4_rows", formulation)
    _, got = jax.jit(lambda w: jax.lax.scan(lambda c, w: (c, layers.linear(x, w, bias)), None, w))(stacked)
    want = np.stack([nf4_reference(x, q, bias) for q in per_layer])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("shape, sums", [((96, 192), 2), ((40, 100), 1)])
def test_nf4_blocksum_sums_per_block_only_where_rows_hold_whole_blocks(shape, sums, monkeypatch):
    """"blocksum" is a sum over each 64-block then one over the blocks where `in % 64 == 0`; else the one sum."""
    from jaxvlm import layers
    from jaxvlm.quant.nf4 import quantize_nf4
    q = quantize_nf4(jnp.ones(shape, jnp.float32))
    monkeypatch.setattr(layers, "rows_product", "on")
    monkeypatch.setattr(layers, "nf4_rows", "blocksum")
    eqns = jax.make_jaxpr(lambda x: layers.linear(x, q))(jnp.ones((1, shape[1]))).jaxpr.eqns
    assert [e.primitive.name for e in eqns].count("reduce_sum") == sums


def test_nf4_select_formulation_compiles_without_a_gather(monkeypatch):
    """"select" looks no NF4 value up in memory: the compiled program of a one-row product over an NF4 weight with
    float absmax has no gather (the table formulation has one)."""
    from jaxvlm import layers
    from jaxvlm.quant.nf4 import quantize_nf4
    q = quantize_nf4(jnp.ones((96, 192), jnp.float32), compress_statistics=False)
    x = jnp.ones((1, 192), jnp.bfloat16)
    monkeypatch.setattr(layers, "rows_product", "on")

    def has_gather(formulation):
        monkeypatch.setattr(layers, "nf4_rows", formulation)
        return " gather(" in jax.jit(lambda x, q: layers.linear(x, q)).lower(x, q).compile().as_text()
    assert has_gather("table") and not has_gather("select")
