"""The block-mask flash-attention kernels (jaxvlm.kernels.flash_attention) against the dense XLA reference, in
Pallas interpret mode on the CPU."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.kernels import flash_attention as fa

B, T, H, KH, D = 2, 45, 4, 2, 32
BLOCK = 16  # T = 45 spans three query and key blocks
WINDOW = 7


def _inputs(seed=0, dtype=jnp.float32, d=D, images=True):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, H, d)), dtype)
    k = jnp.asarray(rng.standard_normal((B, T, KH, d)), dtype)
    v = jnp.asarray(rng.standard_normal((B, T, KH, d)), dtype)
    key_ok = np.ones((B, T), bool)
    key_ok[0, 40:] = False  # right padding
    key_ok[1, :5] = False  # left padding: queries 0..4 of row 1 have no allowed key
    blocks = np.full((B, T), -1, np.int32)
    if images:
        blocks[0, 10:22] = 0  # crosses the query-block boundary at 16, longer than the window
        blocks[0, 30:34] = 1
        blocks[1, 12:27] = 0  # 15 tokens, across the boundary at 16
    return q, k, v, jnp.asarray(key_ok), jnp.asarray(blocks)


def _kernel(window, **kw):
    kw = {"block_q": BLOCK, "block_k": BLOCK, **kw}
    return functools.partial(fa.block_attention, window=window, interpret=True, **kw)


def _reference(window):
    return functools.partial(fa.block_attention_reference, window=window)


def _grads(attend, q, k, v, key_ok, blocks, cotangent):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, key_ok, blocks).astype(jnp.float32) * cotangent)  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def test_dense_mask_definition():
    key_ok = jnp.asarray([[1, 1, 1, 1, 1, 0]])
    blocks = jnp.asarray([[-1, 0, 0, 0, -1, -1]])
    m = np.asarray(fa.dense_mask(key_ok, blocks, None))[0, 0]
    assert m.shape == (6, 6)
    assert m[1, 3] and m[3, 1]  # one image: both ways
    assert not m[0, 1] and not m[4, 5]  # text is causal; key 5 is padding
    assert m[4, 0] and not m[5, 5]
    w = np.asarray(fa.dense_mask(key_ok, blocks, 2))[0, 0]
    assert w[3, 2] and not w[3, 1] and w[1, 3]  # the window cuts only backwards


@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("images", [False, True])
def test_forward_matches_reference(window, images):
    q, k, v, key_ok, blocks = _inputs(images=images)
    blocks = blocks if images else None
    out = _kernel(window)(q, k, v, key_ok, blocks)
    ref = _reference(window)(q, k, v, key_ok, blocks)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)  # padding queries too
    np.testing.assert_array_equal(np.asarray(out)[1, :5], 0.0)  # no allowed key: zeros


@pytest.mark.parametrize("window", [None, WINDOW])
def test_gradients_match_reference(window):
    q, k, v, key_ok, blocks = _inputs(seed=1)
    ct = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
    got = _grads(_kernel(window), q, k, v, key_ok, blocks, ct)
    want = _grads(_reference(window), q, k, v, key_ok, blocks, ct)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")
    assert float(jnp.abs(got[1][1, :5]).max()) == 0.0  # padding keys get no gradient


def test_uneven_blocks_and_head_dim():
    """block_q != block_k, a head dim that is no power of two (padded to 32), no grouping, a given scale."""
    rng = np.random.default_rng(3)
    q, _, _, key_ok, blocks = _inputs(d=24)
    k = jnp.asarray(rng.standard_normal((B, T, H, 24)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, H, 24)), jnp.float32)
    attend = _kernel(WINDOW, block_q=32, block_k=16, scale=0.3)
    ref = functools.partial(_reference(WINDOW), scale=0.3)
    np.testing.assert_allclose(attend(q, k, v, key_ok, blocks), ref(q, k, v, key_ok, blocks), atol=1e-5, rtol=1e-5)
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    for a, b in zip(_grads(attend, q, k, v, key_ok, blocks, ct), _grads(ref, q, k, v, key_ok, blocks, ct)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_bf16_close_to_fp32_reference():
    q, k, v, key_ok, blocks = _inputs(seed=4, dtype=jnp.bfloat16)
    out = _kernel(None)(q, k, v, key_ok, blocks)
    assert out.dtype == jnp.bfloat16
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = fa.block_attention_reference(*f32, key_ok, blocks)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2)
    ct = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
    got = _grads(_kernel(None), q, k, v, key_ok, blocks, ct)
    want = _grads(fa.block_attention_reference, *f32, key_ok, blocks, ct)
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=6e-2, rtol=6e-2)


def test_query_without_keys_is_finite():
    """A row whose keys are all padding: every query has no allowed key. Output and gradients zero, no NaN."""
    q, k, v, key_ok, blocks = _inputs(seed=6)
    key_ok = key_ok.at[0].set(False)
    out = _kernel(WINDOW)(q, k, v, key_ok, blocks)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(out)[0], 0.0)
    np.testing.assert_allclose(out, _reference(WINDOW)(q, k, v, key_ok, blocks), atol=1e-5, rtol=1e-5)
    ct = jnp.ones(q.shape, jnp.float32)
    grads = _grads(_kernel(WINDOW), q, k, v, key_ok, blocks, ct)
    ref_grads = _grads(_reference(WINDOW), q, k, v, key_ok, blocks, ct)
    for a, b in zip(grads, ref_grads):
        assert np.isfinite(np.asarray(a)).all() and np.isfinite(np.asarray(b)).all()
        np.testing.assert_array_equal(np.asarray(a)[0], 0.0)
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Block skipping: the loop bounds.


def _bounds(window, key_ok, blocks, block_q=BLOCK, block_k=BLOCK):
    """Per query block its key-block range, per key block its query-block range, as the kernels compute them
    (on the padded arrays, T a multiple of the blocks)."""
    tp = -(-T // max(block_q, block_k)) * max(block_q, block_k)
    key_ok = jnp.pad(key_ok.astype(jnp.int32), ((0, 0), (0, tp - T)))
    blocks = jnp.pad(blocks, ((0, 0), (0, tp - T)), constant_values=-1)
    reach, first = (np.asarray(x) for x in fa._reach_first(key_ok, blocks))
    keys = [[tuple(int(x) for x in fa._key_block_range(i, reach[b, i:i + block_q].max(), block_k=block_k,
                                                          window=window)) for i in range(0, tp, block_q)]
            for b in range(B)]
    queries = [[tuple(int(x) for x in fa._query_block_range(
        j, first[b, j:j + block_k].min(), block_q=block_q, block_k=block_k, window=window,
        num_q_blocks=tp // block_q)) for j in range(0, tp, block_k)] for b in range(B)]
    mask = np.asarray(fa.dense_mask(key_ok, blocks, window))[:, 0]
    return reach, first, keys, queries, mask


def test_reach_and_first():
    _, _, _, key_ok, blocks = _inputs()
    reach, first, *_ = _bounds(None, key_ok, blocks)
    assert reach[0, 3] == 3 and reach[0, 10] == 21 and reach[0, 21] == 21 and reach[0, 30] == 33
    assert first[0, 21] == 10 and first[0, 10] == 10 and first[0, 25] == 25 and first[0, 33] == 30
    assert first[0, 40] == 48 and first[1, 0] == 48  # padding keys: no query
    assert reach[1, 12] == 26 and first[1, 26] == 12


@pytest.mark.parametrize("window", [None, WINDOW])
def test_block_ranges_cover_the_mask_and_skip(window):
    _, _, _, key_ok, blocks = _inputs()
    _, _, keys, queries, mask = _bounds(window, key_ok, blocks)
    n = mask.shape[-1] // BLOCK
    tiles = mask.reshape(B, n, BLOCK, n, BLOCK).any(axis=(2, 4))  # [b, query block, key block]: any allowed
    visited_fwd = np.zeros_like(tiles)
    visited_bwd = np.zeros_like(tiles)
    for b in range(B):
        for i, (lo, hi) in enumerate(keys[b]):
            visited_fwd[b, i, lo:hi] = True
        for j, (lo, hi) in enumerate(queries[b]):
            visited_bwd[b, lo:hi, j] = True
    assert not (tiles & ~visited_fwd).any() and not (tiles & ~visited_bwd).any()  # nothing allowed is skipped
    assert visited_fwd.sum() < B * n * n and visited_bwd.sum() < B * n * n  # something is
    # The image of row 0 (tokens 10..21) reaches from query block 0 into key block 1.
    assert keys[0][0] == (0, 2)
    assert keys[1][0] == (0, 2)  # row 1's image 12..26
    if window is None:
        assert keys[0][1] == (0, 3)  # image 30..33 crosses into key block 2
        assert keys[1][1] == (0, 2) and keys[1][2] == (0, 3)
        assert queries[0][2] == (1, 3)  # keys 32, 33 belong to image 30..33: its queries 30, 31 see them
        assert queries[1][2] == (2, 3)  # text keys 32..47: causal queries only
        assert queries[1][0] == (0, 3)
    else:
        # Queries 32..47 see keys > 32 - 7: key blocks 1 and 2; keys 0..15 are seen by queries up to 15 + 6.
        assert keys[0][2] == (1, 3)
        assert queries[1][0] == (0, 2)


def test_key_block_range_skips():
    # Causal text: query block 0 of three sees key block 0 alone.
    assert tuple(map(int, fa._key_block_range(0, 15, block_k=16, window=None))) == (0, 1)
    # Window 7: queries 32..47 start at key 26, in block 1; an image reaching key 40 extends the end to block 2.
    assert tuple(map(int, fa._key_block_range(32, 47, block_k=16, window=7))) == (1, 3)
    assert tuple(map(int, fa._key_block_range(0, 21, block_k=16, window=7))) == (0, 2)
    # A long window covers the start; bounds for other block sizes.
    assert tuple(map(int, fa._key_block_range(64, 100, block_k=32, window=1000))) == (0, 4)
    # Query ranges: window 7, keys 0..15 are seen by queries up to 21 (blocks 0 and 1); padding keys by none.
    assert tuple(map(int, fa._query_block_range(0, 0, block_q=16, block_k=16, window=7, num_q_blocks=3))) == (0, 2)
    assert tuple(map(int, fa._query_block_range(16, 10, block_q=16, block_k=16, window=None,
                                                num_q_blocks=3))) == (0, 3)
    lo, hi = (int(x) for x in fa._query_block_range(32, 48, block_q=16, block_k=16, window=None, num_q_blocks=3))
    assert lo >= hi  # an empty loop


def test_the_attention_remat_policy_keeps_the_forward():
    """remat "attention" (layers.checkpoint_policy) keeps the kernel's output and statistics: the compiled gradient of
    a rematerialized block runs the forward kernel once (its loops once fewer than under "full"), and equals
    "full"'s."""
    from jaxvlm import layers

    q, k, v, key_ok, blocks = _inputs(3)
    w = jnp.asarray(np.random.default_rng(4).standard_normal((H * D, H * D)) * 0.1, jnp.float32)

    def block(q, w):
        out = _kernel(WINDOW)(q, k, v, key_ok, blocks)
        return jnp.tanh(out.reshape(B, T, H * D) @ w)

    def loops(fn, *args):  # the interpreted kernels' grid loops in the compiled program
        return jax.jit(fn).lower(*args).compile().as_text().count(" while(")

    grads, counts = {}, {}
    for policy in ("full", "attention"):
        loss = lambda q, w, policy=policy: jnp.sum(jax.checkpoint(block, policy=layers.checkpoint_policy(policy))(
            q, w) ** 2)
        counts[policy] = loops(jax.grad(loss, argnums=(0, 1)), q, w)
        grads[policy] = jax.grad(loss, argnums=(0, 1))(q, w)
    forward = loops(block, q, w)
    assert forward > 0 and counts["full"] - counts["attention"] == forward
    for a, b in zip(grads["full"], grads["attention"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_the_cudnn_forward_primitives_are_jaxs():
    """The primitive names the "attention" policy keeps are those cuDNN's fused attention binds (a rename in JAX
    would make the policy keep nothing on the GPU, silently)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    from jaxvlm import layers

    assert {cudnn._dot_product_attention_fwd_p_wrapper.name, cudnn._dot_product_attention_fwd_p.name} == set(
        layers.CUDNN_ATTENTION_FORWARD)
