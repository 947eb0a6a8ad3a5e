"""Shared layers against their plain references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.layers import attention, scatter_rows, segment_attention
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


@pytest.mark.parametrize("kind, outs, small, sums", [("plain", (128, 64, 64), 64 * 192 + 1, 1),
                                                     ("plain", (128, 64, 64), 64 * 192, 3),  # k/v not small
                                                     ("plain", (96, 96), 1 << 20, 2),
                                                     ("nf4", (128, 64, 64), 1 << 20, 3)])
def test_one_row_q_k_v_are_one_sum_that_equals_each_product(kind, outs, small, sums, monkeypatch):
    """A batch-1 decode step's q/k/v (plain weights of different widths, small k/v, biases) as one multiply + sum over
    the weights concatenated along out, so that XLA forms one reduction: each output equals its own Linear's.
    Siblings none of them small, same-width siblings (gate/up, which XLA fuses itself) and NF4 weights keep a sum
    each; so does everything with the siblings' products off."""
    from types import SimpleNamespace as NS

    from jaxvlm import layers
    from jaxvlm.quant.nf4 import quantize_nf4
    k = iter(jax.random.split(jax.random.key(4), 2 * len(outs) + 1))
    modules = []
    for out in outs:
        w, b = jax.random.normal(next(k), (out, 192)), jax.random.normal(next(k), (out,))
        w = quantize_nf4(w) if kind == "nf4" else w
        modules.append(NS(weight=NS(get_value=lambda w=w: w), bias=NS(get_value=lambda b=b: b)))
    x = jax.random.normal(next(k), (1, 1, 192))
    monkeypatch.setattr(layers, "rows_product", "on")
    monkeypatch.setattr(layers, "ROWS_SIBLING_SMALL", small)

    def run(setting):
        monkeypatch.setattr(layers, "sibling_products", setting)
        eqns = jax.make_jaxpr(lambda x: layers.sibling_linears(x, modules))(x).jaxpr.eqns
        return layers.sibling_linears(x, modules), sum(e.primitive.name == "reduce_sum" for e in eqns)
    (ys, on), (each, off) = run("on"), run("off")
    assert (on, off) == (sums, len(outs))
    for y, m, ref in zip(ys, modules, each):
        want = np.asarray(layers.linear(x, m.weight.get_value(), m.bias.get_value()))
        assert y.shape == want.shape == (1, 1, m.bias.get_value().shape[0])
        for got in (y, ref):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_unrolled_layers_hand_the_nf4_kernel_each_layer_of_the_stack_in_place(monkeypatch):
    """Inside unrolled_layers (generation's decode step) scan_blocks unrolls in Python and the NF4 kernel is given the
    stacked weight and the layer (read in place, no slice copied out); the result equals the scanned XLA product."""
    from flax import nnx

    from jaxvlm import layers
    from jaxvlm.kernels import nf4_matmul
    from jaxvlm.quant.nf4 import quantize_nf4
    k = jax.random.split(jax.random.key(2), 2)
    stack = nnx.eval_shape(lambda: layers.Linear(128, 128, bias=True, dtype=jnp.float32, stack=(3,)))
    weight = jax.vmap(quantize_nf4)(jax.random.normal(k[0], (3, 128, 128), jnp.float32) * 0.1)
    stack.weight.set_value(weight)
    stack.bias.set_value(jnp.arange(3 * 128, dtype=jnp.float32).reshape(3, 128) / 100)
    x = jax.random.normal(k[1], (1, 1, 128), jnp.float32)

    def run(unrolled):
        def body(block, c):
            y = block(c)
            return y, y[0, 0, 0]
        if unrolled:
            with layers.unrolled_layers():
                return layers.scan_blocks(stack, x, body)
        return layers.scan_blocks(stack, x, body)

    calls = []
    kernel = nf4_matmul.nf4_matmul

    def spy(x, w, layer=None, **kw):
        calls.append((w.codes.ndim, layer))
        return kernel(x, w, layer, **kw)
    monkeypatch.setattr(nf4_matmul, "nf4_matmul", spy)
    monkeypatch.setattr(layers, "rows_product", "off")
    want = run(False)
    monkeypatch.setattr(layers, "nf4_kernel", "interpret")
    got = run(True)
    assert calls == [(2, 0), (2, 1), (2, 2)]  # the whole stack's codes, one layer each
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    assert layers._unroll["layers"] is None  # the noted slices let go after the trace


def test_scatter_rows_places_rows_drops_padding_and_keeps_no_ids_for_the_backward():
    """The image features written at their tokens' flat indices, a collator's padding rows (indices from b * t on)
    dropped; the gradient routes g's rows back to the features and zeroes them in h's. Declared unique, the
    backward keeps no `[b * t, d]` scatter of integer ids (autodiff's rule for a scatter that may overlap)."""
    ks = jax.random.split(jax.random.key(3), 3)
    h, rows, g = (jax.random.normal(ks[0], (2, 5, 8)), jax.random.normal(ks[1], (4, 8)),
                  jax.random.normal(ks[2], (2, 5, 8)))
    pos = jnp.array([7, 1, 10, 11])  # two features, two padding rows out of range
    want = np.asarray(h).reshape(10, 8).copy()
    want[[7, 1]] = rows[:2]
    np.testing.assert_array_equal(scatter_rows(h, pos, rows), want.reshape(2, 5, 8))
    dh, drows = jax.grad(lambda h, r: jnp.sum(scatter_rows(h, pos, r) * g), argnums=(0, 1))(h, rows)
    flat = np.asarray(g).reshape(10, 8)
    np.testing.assert_array_equal(drows, np.concatenate([flat[[7, 1]], np.zeros((2, 8))]))
    flat = flat.copy()
    flat[[7, 1]] = 0
    np.testing.assert_array_equal(dh, flat.reshape(2, 5, 8))
    jaxpr = jax.make_jaxpr(jax.grad(lambda r: jnp.sum(scatter_rows(h, pos, r) * g)))(rows)
    ints = [e for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("scatter")
            and jnp.issubdtype(e.outvars[0].aval.dtype, jnp.integer)]
    assert not ints, ints


@pytest.mark.parametrize("name", ["silu", "gelu", "quick_gelu", "gelu_pytorch_tanh"])
def test_activations_differentiate_from_their_input_alone(name, monkeypatch):
    """With JAXVLM_ACTIVATION_BACKWARD=input each activation's gradient is autodiff's of its formula (transformers'
    definitions), formed from the input alone: the backward keeps only x (autodiff kept the sigmoid or tanh of x
    beside it, a [tokens, 5120] array per Qwen2-VL vision block). bf16 in and out, float32 inside: closer to the
    float32 gradient than bf16 autodiff is."""
    from jaxvlm import layers
    monkeypatch.setattr(layers, "activation_backward", "input")
    formulas = {"silu": lambda x: x * jax.nn.sigmoid(x), "gelu": lambda x: 0.5 * x * (1 + jax.scipy.special.erf(
        x / float(np.sqrt(2)))), "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "gelu_pytorch_tanh": lambda x: 0.5 * x * (1 + jnp.tanh(float(np.sqrt(2 / np.pi)) * (x + 0.044715 * x ** 3)))}
    act, ref = layers.ACTIVATIONS[name], formulas[name]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((32, 48)) * 3, jnp.float32)
    loss = lambda f, x: jnp.sum(jnp.sin(f(x).astype(jnp.float32)))  # noqa: E731
    np.testing.assert_allclose(act(x), ref(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: loss(act, x))(x), jax.grad(lambda x: loss(ref, x))(x), rtol=1e-5,
                               atol=1e-6)
    xb = x.astype(jnp.bfloat16)
    _, vjp = jax.vjp(act, xb)
    assert [(r.shape, r.dtype) for r in jax.tree.leaves(vjp) if hasattr(r, "shape")] == [(xb.shape, xb.dtype)]
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.bfloat16)
    exact = jax.vjp(ref, xb.astype(jnp.float32))[1](cot.astype(jnp.float32))[0]
    (g,), (g_autodiff,) = vjp(cot), jax.vjp(ref, xb)[1](cot)
    assert g.dtype == jnp.bfloat16
    err, err_autodiff = (jnp.abs(a.astype(jnp.float32) - exact) for a in (g, g_autodiff))
    np.testing.assert_allclose(g.astype(jnp.float32), exact, rtol=2 ** -8, atol=1e-3)  # float32's, rounded once
    assert float(jnp.mean(err)) < float(jnp.mean(err_autodiff))
