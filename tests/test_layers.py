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
