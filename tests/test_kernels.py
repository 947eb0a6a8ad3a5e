"""Fused/chunked computations against their plain references (CPU; Pallas kernels in interpret mode)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import layers
from jaxvlm.kernels.cross_entropy import IGNORE_INDEX, chunked_token_loss_sum, token_loss_sum


@pytest.mark.parametrize("skip", ["off", "on"])  # JAXVLM_LOSS_SKIP_IGNORED
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_matches_full_logits(chunk, skip, monkeypatch):
    monkeypatch.setattr("jaxvlm.kernels.cross_entropy.skip_ignored", skip)
    rng = np.random.default_rng(chunk)
    b, t, d, v = 3, 11, 16, 50
    h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((v, d)), jnp.float32)
    labels = rng.integers(0, v, (b, t))
    labels[0, :4] = IGNORE_INDEX
    labels[2, -3:] = IGNORE_INDEX
    labels = jnp.asarray(labels)
    logits_fn = lambda w, x: x @ w.T  # noqa: E731

    def ref(h, w):
        return token_loss_sum(logits_fn(w, h), labels)

    def chunked(h, w):
        return chunked_token_loss_sum(lambda x: logits_fn(w, x), h, labels, chunk)

    (s_ref, n_ref), (s, n) = ref(h, w), jax.jit(chunked)(h, w)
    assert int(n) == int(n_ref) == int(np.sum(np.asarray(labels)[:, 1:] != IGNORE_INDEX))
    np.testing.assert_allclose(s, s_ref, rtol=1e-5)
    g_ref = jax.grad(lambda h, w: ref(h, w)[0], argnums=(0, 1))(h, w)
    g = jax.jit(jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1)))(h, w)
    for a, b_ in zip(g, g_ref):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g[0][0, :3]).max()) == 0.0  # positions whose next label is ignored get no gradient


@pytest.mark.parametrize("skip, devices, products", [("off", 1, 5), ("on", 1, 2), ("auto", 1, 2), ("auto", 8, 5),
                                                    ("on", 8, 2)])
def test_chunks_without_a_trained_token_skip_the_lm_head(skip, devices, products, monkeypatch):
    """With the skip on (JAXVLM_LOSS_SKIP_IGNORED=on, or auto, the default, in a process with one device) the 10 trained
    tokens of 33 (chunks of 7: 5 chunks) go first, and only the two chunks that hold them form logits, in the forward
    and in the backward; the loss, the count and the gradients (of the hidden states and of the lm_head, as when it is
    trained) stay the reference's."""
    monkeypatch.setattr("jaxvlm.kernels.cross_entropy.skip_ignored", skip)
    monkeypatch.setattr(jax, "device_count", lambda: devices)  # auto: off under a mesh, where it is not measured
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((3, 12, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((20, 8)), jnp.float32)
    labels = np.full((3, 12), IGNORE_INDEX)
    labels[0, 5:9], labels[2, 1:7] = rng.integers(0, 20, 4), rng.integers(0, 20, 6)  # 10 targets, spread
    labels = jnp.asarray(labels)
    calls = []

    def logits(h, w):
        def fn(x):
            jax.debug.callback(lambda: calls.append(1))
            return x @ w.T
        return chunked_token_loss_sum(fn, h, labels, 7)
    s, n = jax.jit(logits)(h, w)
    assert len(calls) == products and int(n) == 10
    s_ref, _ = token_loss_sum(h @ w.T, labels)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5)
    calls.clear()
    g = jax.jit(jax.grad(lambda h, w: logits(h, w)[0], argnums=(0, 1)))(h, w)
    assert len(calls) == products  # differentiated: each chunk's logits once (the forward forms their gradient)
    g_ref = jax.grad(lambda h, w: token_loss_sum(h @ w.T, labels)[0], argnums=(0, 1))(h, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    per_shard = jax.vmap(jax.grad(lambda h: logits(h, w)[0]))(jnp.stack([h, 2 * h]))  # the trainer's shards
    np.testing.assert_allclose(per_shard[1], jax.grad(lambda h: token_loss_sum(h @ w.T, labels)[0])(2 * h),
                               rtol=1e-4, atol=1e-6)


def test_skipping_chunks_copies_no_lm_head_weight(monkeypatch):
    """What the skip adds to XLA's temporaries of the gradient is at most the hidden states in their new order and
    their gradient (4.2 MB each here; 4.2 MB measured), no copy of the lm_head weight (16.8 MB) nor zeros of its
    shape: a first form, a lax.cond per chunk, returned the weight from both branches as a residual and added 51.4 MB
    here (335 MB at the Qwen2-VL-2B step on an H200). float32, so that the CPU's bf16 dots convert no weight."""
    from jaxvlm.kernels import cross_entropy
    v, d, b = 8192, 512, 4
    w = jnp.full((v, d), 0.01, jnp.float32)
    h = jnp.ones((b, 514, d), jnp.float32)
    labels = np.full((b, 514), IGNORE_INDEX)
    labels[:, 300:] = 5
    temp = {}
    for skip in ("off", "on"):
        monkeypatch.setattr(cross_entropy, "skip_ignored", skip)
        loss = lambda h, w: chunked_token_loss_sum(lambda x: x @ w.T, h, jnp.asarray(labels), 512)[0]  # noqa: E731
        temp[skip] = jax.jit(jax.grad(loss)).lower(h, w).compile().memory_analysis().temp_size_in_bytes
    assert temp["on"] - temp["off"] <= 2 * h.nbytes + 2**20, (temp, h.nbytes)


def test_nll_gradient_is_one_pass_in_the_logits_dtype():
    """nll_sum's gradient equals autodiff's of the same formula in less working memory: one elementwise pass writes
    the logits' dtype where autodiff formed fp32 [n, V] arrays (on the CPU: one fp32 copy of the logits instead of
    two; on a GPU the remaining cast fuses into the reductions that read it)."""
    from jaxvlm.kernels.cross_entropy import nll_sum
    rng = np.random.default_rng(0)
    n, v = 64, 4096
    logits = jnp.asarray(rng.standard_normal((n, v)) * 3, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, v, n)).at[:5].set(IGNORE_INDEX)

    def autodiff(logits, targets):
        f = logits.astype(jnp.float32)
        valid = targets != IGNORE_INDEX
        picked = jnp.take_along_axis(f, jnp.where(valid, targets, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(valid, jax.nn.logsumexp(f, axis=-1) - picked, 0.0))

    np.testing.assert_allclose(nll_sum(logits, targets), autodiff(logits, targets), rtol=1e-6)
    ours, ref = (jax.jit(jax.grad(f))(logits, targets) for f in (nll_sum, autodiff))
    assert ours.dtype == jnp.bfloat16 and float(jnp.abs(ours[:5]).max()) == 0.0
    np.testing.assert_allclose(ours.astype(jnp.float32), ref.astype(jnp.float32), atol=1e-3)
    temp = {f: jax.jit(jax.grad(f)).lower(logits, targets).compile().memory_analysis().temp_size_in_bytes
            for f in (nll_sum, autodiff)}
    assert temp[nll_sum] < temp[autodiff] - n * v * 2, temp


def _reference_attention(q, k, v, allowed):
    """float64 softmax attention with an explicit [b, q, k] boolean mask; grouped kv heads repeated."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_attention_causal_with_key_padding_and_lengths():
    rng = np.random.default_rng(0)
    b, t, h, kvh, d = 2, 9, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32) for n in (h, kvh, kvh))
    # causal + key padding on the left (a generation prompt): every real query sees >= 1 key
    real = np.ones((b, t), bool)
    real[1, :3] = False
    causal = np.tril(np.ones((t, t), bool))
    allowed = causal[None] & real[:, None, :]
    out = layers.attention(q, k, v, jnp.asarray(real[:, None, None, :]), causal=True)
    ref = _reference_attention(q, k, v, allowed)
    np.testing.assert_allclose(np.asarray(out)[1, 3:], ref[1, 3:], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out)[0], ref[0], atol=1e-5)
    # lengths: rows padded at the end; outputs of real queries only
    lengths = np.array([9, 5])
    out = layers.attention(q, k, v, lengths=jnp.asarray(lengths))
    allowed = np.arange(t)[None, None, :] < lengths[:, None, None]
    ref = _reference_attention(q, k, v, np.broadcast_to(allowed, (b, t, t)))
    np.testing.assert_allclose(np.asarray(out)[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out)[1, :5], ref[1, :5], atol=1e-5)


def test_attention_implementation_choice(monkeypatch):
    q = jnp.zeros((1, 4, 2, 80), jnp.bfloat16)
    mask = jnp.ones((1, 1, 4, 4), bool)
    monkeypatch.setattr(layers, "attention_implementation", "auto")
    assert layers._use_cudnn(q, q) == (jax.default_backend() == "gpu")
    assert layers._use_cudnn(q, q, mask) == (jax.default_backend() == "gpu")
    assert not layers._use_cudnn(q.astype(jnp.float32), q)  # fp32: XLA, also on a GPU
    odd = jnp.zeros((1, 5, 2, 80), jnp.bfloat16)
    assert not layers._use_cudnn(odd, odd, jnp.ones((1, 1, 5, 5), bool))  # a mask with odd lengths: XLA
    assert not layers._use_cudnn(jnp.zeros((1, 4, 2, 256), jnp.bfloat16), q) or jax.default_backend() == "gpu"
    monkeypatch.setattr(layers, "attention_implementation", "xla")
    assert not layers._use_cudnn(q, q)
    monkeypatch.setattr(layers, "attention_implementation", "cudnn")
    with pytest.raises(ValueError, match="head_dim"):
        layers._use_cudnn(jnp.zeros((1, 4, 2, 81), jnp.bfloat16), q)
    with pytest.raises(ValueError, match="even lengths with a mask; .* lengths 5 x 5 with a mask"):
        layers._use_cudnn(odd, odd, jnp.ones((1, 1, 5, 5), bool))
    monkeypatch.setattr(layers, "attention_implementation", "fast")
    with pytest.raises(ValueError, match="expected one of"):
        layers._use_cudnn(q, q)


def _nf4_stack(rng, layers, n, k, double_quantized=True):
    """A stack of `layers` NF4 weights [n, k] (leaves with a leading layer axis) and its layers."""
    from jaxvlm.quant import quantize_nf4
    ws = [quantize_nf4(jnp.asarray(rng.standard_normal((n, k)), jnp.float32), compress_statistics=double_quantized)
          for _ in range(layers)]
    return jax.tree.map(lambda *a: jnp.stack(a), *ws), ws


def _nf4_close(got, want):
    """The kernel's tolerance: float32 sums in another order, relative to the product's scale."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("rows,n,k,double_quantized,config", [
    (1, 64, 128, True, {}),
    (3, 96, 320, True, dict(block_n=32, block_k=1, split_k=5)),
    (8, 256, 448, True, dict(block_n=64, block_k=1, split_k=7)),
    (1, 256, 1536, True, dict(block_n=16, block_k=4, split_k=3)),
    (8, 96, 1536, False, dict(block_n=32, block_k=8, split_k=1)),
    (3, 64, 448, False, {}),
])
def test_nf4_matmul_kernel_matches_xla_reference(rows, n, k, double_quantized, config):
    """The Pallas NF4 kernel (interpret mode) against XLA's dequantize-then-multiply, float32: one weight, and
    layer 1 of a stack of three read in place."""
    from jaxvlm.kernels.nf4_matmul import nf4_matmul, nf4_matmul_reference, supported
    rng = np.random.default_rng(rows * n + k)
    stack, ws = _nf4_stack(rng, 3, n, k, double_quantized)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    assert supported(x, ws[0]) and supported(x, stack, 1)
    want = nf4_matmul_reference(x, ws[1])
    _nf4_close(nf4_matmul(x, ws[1], interpret=True, **config), want)
    _nf4_close(nf4_matmul(x, stack, 1, interpret=True, **config), want)
    _nf4_close(nf4_matmul_reference(x, stack, 1), want)
    x3 = x.reshape(rows, 1, k)  # a decode step's [batch, 1, K]
    _nf4_close(nf4_matmul(x3, stack, 1, interpret=True, **config), want.reshape(rows, 1, n))


@pytest.mark.parametrize("double_quantized", [True, False])
def test_nf4_matmul_kernel_is_exact_per_element(double_quantized):
    """One-hot rows of x pick single columns of W: the kernel's value times absmax (its double-quantized absmax
    decoded in the kernel) is dequantize_nf4's, bit for bit. Blocks past the first 256-group check the nested
    absmax's index."""
    from jaxvlm.kernels.nf4_matmul import nf4_matmul
    from jaxvlm.quant import dequantize_nf4
    rng = np.random.default_rng(5)
    stack, ws = _nf4_stack(rng, 2, 64, 1536, double_quantized)
    cols = np.array([0, 1, 62, 63, 64, 777, 1500, 1535])
    x = jnp.asarray(np.eye(1536, dtype=np.float32)[cols])
    got = nf4_matmul(x, stack, 1, interpret=True, block_n=16, block_k=2, split_k=4)
    np.testing.assert_array_equal(got, dequantize_nf4(ws[1], jnp.float32)[:, cols].T)


def test_nf4_matmul_kernel_check_catches_swapped_values(monkeypatch):
    """The comparison's tolerance is tight enough to see a wrong decode: two neighbouring NF4 values swapped fail it."""
    from jaxvlm.kernels import nf4_matmul as module
    rng = np.random.default_rng(9)
    stack, ws = _nf4_stack(rng, 2, 32, 192, True)
    x = jnp.asarray(rng.standard_normal((2, 192)), jnp.float32)
    want = module.nf4_matmul_reference(x, ws[1])
    monkeypatch.setattr(module, "VALUES", module.VALUES[[*range(9), 10, 9, *range(11, 16)]])
    try:
        with pytest.raises(AssertionError):
            _nf4_close(module.nf4_matmul(x, stack, 1, interpret=True, block_n=16, block_k=1, split_k=3), want)
    finally:
        jax.clear_caches()  # the traced kernel holds the swapped values


def test_nf4_matmul_kernel_refuses_unsupported_products():
    from jaxvlm.kernels.nf4_matmul import nf4_matmul, supported
    from jaxvlm.quant import quantize_nf4
    w = quantize_nf4(jnp.ones((32, 100), jnp.float32))  # rows of 100: not whole 64-blocks
    assert not supported(jnp.ones((1, 100)), w)
    with pytest.raises(ValueError, match="not a supported product"):
        nf4_matmul(jnp.ones((1, 100)), w, interpret=True)
    w = quantize_nf4(jnp.ones((32, 128), jnp.float32))
    assert not supported(jnp.ones((9, 128)), w)  # more rows than a decode step: XLA's path
    assert not supported(jnp.ones((1, 128)), w, 0)  # a layer of an unstacked weight
    stack = jax.tree.map(lambda a: jnp.stack([a, a]), w)
    assert not supported(jnp.ones((1, 128)), stack) and not supported(jnp.ones((1, 128)), stack, 2)
    with pytest.raises(ValueError, match="do not tile"):
        nf4_matmul(jnp.ones((1, 128)), w, block_k=4, interpret=True)  # 2 blocks of 64 along K


def test_gather_rows_transpose_is_the_scatter_add():
    """gather_rows' custom transpose (a gather by the inverse index) equals autodiff's scatter-add."""
    rng = np.random.default_rng(1)
    n = 10
    perm = rng.permutation(n)
    index = np.full((3, 5), n, np.int32)  # segments of 4, 3 and 3 tokens in a shuffled order, padded
    index[0, :4], index[1, :3], index[2, :3] = perm[:4], perm[4:7], perm[7:]
    flat = index.reshape(-1)
    inverse = np.full(n, flat.size, np.int32)
    inverse[flat[flat < n]] = np.flatnonzero(flat < n)
    x = jnp.asarray(rng.standard_normal((n, 2, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 5, 2, 3)), jnp.float32)

    def plain(x):
        return jnp.concatenate([x, jnp.zeros((1, 2, 3))])[index]

    np.testing.assert_array_equal(layers.gather_rows(x, jnp.asarray(index), jnp.asarray(inverse)), plain(x))
    g = jax.grad(lambda x: jnp.sum(layers.gather_rows(x, jnp.asarray(index), jnp.asarray(inverse)) * w))(x)
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(plain(x) * w))(x), rtol=1e-6)
    # and back: segment_attention's output equals per-segment attention done by hand
    q, k, v = (jnp.asarray(rng.standard_normal((n, 2, 8)), jnp.float32) for _ in range(3))
    out = layers.segment_attention(q, k, v, jnp.asarray(index))
    for row, length in zip(index, (4, 3, 3)):
        toks = row[:length]
        ref = _reference_attention(q[toks][None], k[toks][None], v[toks][None], np.ones((1, length, length), bool))
        np.testing.assert_allclose(np.asarray(out)[toks], ref[0], atol=1e-5)


def test_grouped_matmul_vjp_wiring_with_the_kernel_interface():
    """The custom VJP around the Mosaic GPU ragged dots (which need a Hopper GPU) with stand-in kernels of the
    same interfaces, widths padded as on the GPU: outputs, input and weight gradients equal XLA's
    ragged_dot_general, empty groups included; a frozen weight's gradient is never formed."""
    from jaxvlm.kernels import grouped_matmul as gm

    def stand_in(lhs, rhs, sizes, transpose_rhs):  # rhs [g, n, k] transposed, or [g, k, n]
        assert lhs.shape[1] % gm.WIDTH == 0 and rhs.shape[1] % gm.WIDTH == 0 == rhs.shape[2] % gm.WIDTH
        rhs = rhs if transpose_rhs else jnp.swapaxes(rhs, 1, 2)
        return gm.xla_grouped_matmul(lhs, rhs, sizes)

    weight_calls = []

    def weight_stand_in(dy, x, sizes):  # [g, out, in]: each group's dy rows^T x rows
        weight_calls.append(dy.shape)
        starts = jnp.cumsum(sizes) - sizes
        rows = jnp.arange(x.shape[0])
        member = (rows[None] >= starts[:, None]) & (rows[None] < (starts + sizes)[:, None])  # [g, m]
        return jnp.einsum("gm,mo,mi->goi", member.astype(x.dtype), dy, x)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((11, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 5, 6)), jnp.float32)
    sizes = jnp.array([3, 0, 6, 2], jnp.int32)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, sizes)))  # noqa: E731
    kernel = gm.padded(gm.with_kernel(stand_in, weight_stand_in))
    ours = jax.value_and_grad(loss(kernel), argnums=(0, 1))(x, w)
    ref = jax.value_and_grad(loss(gm.xla_grouped_matmul), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert weight_calls == [(11, gm.WIDTH)]
    np.testing.assert_allclose(jax.grad(loss(kernel))(x, w), ref[1][0], rtol=1e-5, atol=1e-5)  # w frozen
    assert weight_calls == [(11, gm.WIDTH)], "the frozen weight's gradient should not be formed"
    assert not gm.use_kernel(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))  # no Hopper GPU here: XLA's op


def _decode_step(rng, batch, heads, kv_heads, d, slots, layers_, index, dtype=jnp.float32, holes=True):
    """A decode step's operands: q, k, v, a stacked cache (None layers: unstacked) and the mask the text models
    build (slots up to each row's own, minus padding holes)."""
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)
    lead = () if layers_ is None else (layers_,)
    q, k, v = normal(batch, 1, heads, d), normal(batch, 1, kv_heads, d), normal(batch, 1, kv_heads, d)
    kc, vc = normal(*lead, batch, slots, kv_heads, d), normal(*lead, batch, slots, kv_heads, d)
    key_ok = rng.random((batch, slots)) > (0.3 if holes else 0.0)
    key_ok[np.arange(batch), np.broadcast_to(np.asarray(index) % slots, (batch,))] = True  # the slot written
    mask = (np.arange(slots)[None] <= np.reshape(index, (-1, 1))) & key_ok
    return q, k, v, kc, vc, jnp.asarray(mask[:, None, None, :])


@pytest.mark.parametrize("batch, heads, kv_heads, d, slots, layer, index, splits", [
    (2, 6, 2, 16, 128, 1, [5, 100], None),  # per-row slots (the engine's), a stacked cache
    (2, 4, 4, 32, 64, 0, 37, None),  # one slot for all rows (generate's), no grouping
    (1, 7, 1, 16, 512, 2, 300, None),  # batch 1: the default splits the slots (partial sums combined by XLA)
    (3, 6, 2, 16, 256, None, [0, 255, 17], 4),  # an unstacked cache, the first and last slots, forced splits
    (1, 4, 2, 16, 448, 1, 440, 3),  # 7 loop steps in 3 ranges (3, 3, 1): the last range's tail masked
])
def test_decode_attention_kernel_matches_xla(batch, heads, kv_heads, d, slots, layer, index, splits):
    """The decode kernel (interpret mode) writes the step's key and value exactly where write_step does, leaves the
    rest of the cache (other layers, rows, slots) untouched, and attends as XLA's attention does."""
    from jaxvlm.kernels import decode_attention as da
    rng = np.random.default_rng(slots + batch)
    index = np.asarray(index, np.int32)
    q, k, v, kc, vc, mask = _decode_step(rng, batch, heads, kv_heads, d, slots, None if layer is None else 3, index)
    out, (kr, vr) = layers.cached_attention_xla(q, k, v, (kc, vc), jnp.asarray(index), layer, mask)
    ref = (out, kr, vr)
    got = da.decode_attention(q, k, v, kc, vc, layer, jnp.asarray(index), mask, splits=splits, interpret=True)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[2], ref[2])
    written = np.asarray(got[1] != kc)
    assert written.any() and written.sum() <= batch * kv_heads * d  # one slot per row, nothing else


@pytest.mark.parametrize("batch, heads, kv_heads, slots, splits, dtype", [
    (2, 8, 2, 320, None, jnp.float32),  # 5 loop steps of 64 slots; the default ranges
    (1, 4, 1, 448, 2, jnp.float32),  # 7 steps in ranges of 4 and 3
    (3, 4, 2, 128, 1, jnp.bfloat16),  # one range, bf16
])
def test_decode_attention_kernel_reads_a_cache_entry_as_attention_does(batch, heads, kv_heads, slots, splits, dtype):
    """`attend` (a step over keys and values cached once, nothing written: cross-attention's image keys): the
    attention XLA forms over the entry, with rows that see only some slots, one that sees none of them (zeros, as
    the masked row of `attention` over zero values gives), and the caches not among the outputs."""
    from jaxvlm.kernels import decode_attention as da
    rng = np.random.default_rng(slots + batch)
    q, _, _, kc, vc, _ = _decode_step(rng, batch, heads, kv_heads, 16, slots, 3, 0, dtype)
    vc = vc.at[2, -1].set(0)  # the last row's values zero: its attention over none of them is zero either way
    sees = rng.random((batch, slots)) > 0.5
    sees[-1] = False
    mask = jnp.asarray(sees[:, None, None, :])
    got = da.attend(q, kc, vc, 2, mask, splits=splits, interpret=True)
    ref = layers.attention(q, kc[2], vc[2], mask)
    assert got.shape == q.shape and got.dtype == dtype
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(got[-1], np.float32), 0)


def test_decode_attention_kernel_bf16_and_a_slot_past_the_end():
    """bf16 operands (the cache's dtype kept), and a row whose slot lies past the cache (the engine's finished rows):
    nothing is written for it, as write_step drops it."""
    from jaxvlm.kernels import decode_attention as da
    rng = np.random.default_rng(7)
    index = np.asarray([64, 9], np.int32)
    q, k, v, kc, vc, mask = _decode_step(rng, 2, 4, 2, 16, 64, 2, index, jnp.bfloat16)
    out, (kr, vr) = layers.cached_attention_xla(q, k, v, (kc, vc), jnp.asarray(index), 1, mask)
    ref = (out, kr, vr)
    got = da.decode_attention(q, k, v, kc, vc, 1, jnp.asarray(index), mask, interpret=True)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[1][:, 0], kc[:, 0])  # row 0's slot 64 is past the end: its row unchanged
    np.testing.assert_allclose(np.asarray(got[0][1], np.float32), np.asarray(ref[0][1], np.float32), rtol=2e-2,
                               atol=2e-2)


def test_decode_attention_kernel_takes_only_what_it_supports():
    from jaxvlm.kernels import decode_attention as da
    q, cache = jnp.zeros((2, 1, 6, 16)), jnp.zeros((3, 2, 64, 2, 16))
    assert da.supported(q, cache, 1) and da.supported(q, cache, np.int64(2))
    assert not da.supported(q, cache, jnp.int32(1))  # a traced layer (the layer scan): XLA's path
    assert not da.supported(jnp.zeros((2, 2, 6, 16)), cache, 1)  # two queries per row
    assert not da.supported(jnp.zeros((2, 1, 6, 20)), jnp.zeros((3, 2, 64, 2, 20)), 1)  # head_dim not a power of 2
    assert not da.supported(q, jnp.zeros((3, 2, 40, 2, 16)), 1)  # slots not a multiple of 16
    assert not da.supported(jnp.zeros((2, 1, 5, 16)), cache, 1)  # heads not a multiple of the kv heads
    with pytest.raises(ValueError, match="not a supported step"):
        two = jnp.zeros((2, 2, 6, 16))
        da.decode_attention(two, two[:, :, :2], two[:, :, :2], cache, cache, 1, 0, jnp.ones((2, 1, 1, 64), bool))
