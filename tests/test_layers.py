"""Shared layers against their plain references."""
import jax
import jax.numpy as jnp
import numpy as np

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
