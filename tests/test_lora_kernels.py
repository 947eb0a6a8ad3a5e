"""The LoRA skinny-product kernels (jaxvlm.kernels.lora_matmul) in Pallas' interpreter against XLA's dots, and a
LoRA Linear's value and gradients with them against the XLA path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.kernels import lora_matmul
from jaxvlm.lora import LoRA


def _rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, dtype)


@pytest.mark.parametrize("kr", [False, True])
@pytest.mark.parametrize("m, k, r, splits", [(200, 96, 16, 3), (64, 48, 8, 1), (130, 32, 40, 2)])
def test_narrow_equals_the_dot(m, k, r, splits, kr):
    # Ragged rows (200, 130: not a multiple of the 64-row block) and ranks padded to the kernel's width (8, 40); the
    # narrow operand as [r, K] or, kr, as [K, r] (B in the backward), in bfloat16 (cast to x's dtype in the kernel).
    x, a = _rand(0, (2, m // 2, k)), _rand(1, (r, k)).astype(jnp.bfloat16)
    ours = lora_matmul.narrow(x, a.T if kr else a, kr=kr, block_m=64, block_k=16, splits=splits, interpret=True)
    assert ours.shape == (2, m // 2, r) and ours.dtype == x.dtype
    np.testing.assert_allclose(ours, jnp.einsum("bmk,rk->bmr", x, a.astype(x.dtype)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m, p, r, splits", [(200, 96, 16, None), (70, 32, 8, 3), (129, 48, 40, 2)])
def test_tall_equals_the_dot(m, p, r, splits):
    u, v = _rand(2, (m, p)), _rand(3, (m, r))
    ours = lora_matmul.tall(u, v, block_m=32, block_p=16, splits=splits, interpret=True)
    assert ours.shape == (p, r) and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, u.T @ v, rtol=1e-5, atol=1e-4)


def test_unsupported_shapes_are_refused():
    with pytest.raises(ValueError, match="narrow"):
        lora_matmul.narrow(jnp.zeros((8, 20)), jnp.zeros((4, 20)), interpret=True)
    with pytest.raises(ValueError, match="narrow"):  # [K, r] given without kr
        lora_matmul.narrow(jnp.zeros((8, 32)), jnp.zeros((32, 4)), interpret=True)
    with pytest.raises(ValueError, match="tall"):
        lora_matmul.tall(jnp.zeros((8, 16)), jnp.zeros((7, 4)), interpret=True)


@pytest.mark.parametrize("in_f, out_f", [(32, 96), (96, 32)])  # widening (concat_linear), narrowing (lora_out)
def test_lora_linear_with_the_kernels_equals_xla(monkeypatch, in_f, out_f):
    x = _rand(4, (3, 70, in_f))
    w, a, b = _rand(5, (out_f, in_f)), _rand(6, (16, in_f)), _rand(7, (out_f, 16))
    g = _rand(8, (3, 70, out_f))

    def loss(x, a, b):
        return jnp.sum(LoRA(base=w, lora_A=a, lora_B=b, scale=2.0).linear(x) * g)

    monkeypatch.setattr(lora_matmul, "lora_kernel", "off")
    want = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, a, b)
    calls = []
    for name in ("narrow", "tall"):
        fn = getattr(lora_matmul, name)
        monkeypatch.setattr(lora_matmul, name,
                            lambda *args, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*args, **kw))
    monkeypatch.setattr(lora_matmul, "lora_kernel", "interpret")
    ours = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, a, b)
    # Forward: x A^T by narrow; backward: dA and dB by tall (and dxa by narrow where B's product is its own).
    assert calls.count("narrow") == (1 if in_f < out_f else 2) and calls.count("tall") == 2, calls
    np.testing.assert_allclose(ours[0], want[0], rtol=1e-5)
    for o, e in zip(ours[1], want[1]):
        np.testing.assert_allclose(o, e, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("in_f, out_f", [(32, 96), (96, 32)])  # widening (lora_in), narrowing (adapted_linear)
def test_the_backward_reads_b_in_place_and_ties_da_to_dx(monkeypatch, in_f, out_f):
    """The two placements that set the 2B step's peak on an H200 (docs/BENCHMARKS.md, "Where the LoRA kernels' peak
    memory went"): B [out, r] goes to `narrow` as it is (a transposed B became a float32 copy of the whole stacked B,
    hoisted out of the layer loop and live through the backward), and dA is tied by an optimization barrier to what
    dx's product reads (so x, its last read, dies before dx's users run): dx itself where dx = dxa A, the cotangent
    of x A^T where dx is one product over [g | ds]."""
    x, w, a, b = _rand(4, (3, 70, in_f)), _rand(5, (out_f, in_f)), _rand(6, (16, in_f)), _rand(7, (out_f, 16))
    monkeypatch.setattr(lora_matmul, "lora_kernel", "interpret")
    jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(LoRA(base=w, lora_A=a, lora_B=b, scale=2.0).linear(x)),
                                    argnums=(0, 1)))(a, b).jaxpr
    transposed = [e.invars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "transpose"]
    assert b.shape not in transposed, transposed
    barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    tied = x.shape if in_f < out_f else (*x.shape[:-1], 16)
    assert len(barriers) == 1 and [v.aval.shape for v in barriers[0].invars] == [tied, a.shape]


def test_auto_keeps_xla_off_a_gpu(monkeypatch):
    # "auto" (the default) picks the kernels only in a one-GPU process; the CPU (CI) runs XLA's dots.
    monkeypatch.setattr(lora_matmul, "lora_kernel", "auto")
    assert lora_matmul.kernels_on() == (jax.default_backend() == "gpu" and jax.device_count() == 1)
    monkeypatch.setattr(lora_matmul, "lora_kernel", "off")
    assert not lora_matmul.kernels_on()


def test_the_kernels_take_ragged_token_counts_only(monkeypatch):
    """A multiple of 64 tokens, which XLA's GEMMs take without padding, stays with XLA: on an H200 the kernels were
    no faster there and cost Gemma 3's step 2.5% (docs/BENCHMARKS.md, "LoRA kernels per family")."""
    monkeypatch.setattr(lora_matmul, "lora_kernel", "interpret")
    assert [lora_matmul.kernels_for(n) for n in (40, 4096, 4112, 4128, 32768)] == [False, False, True, True, False]
    calls = []
    narrow = lora_matmul.narrow
    monkeypatch.setattr(lora_matmul, "narrow", lambda *args, **kw: calls.append(args[0].shape) or narrow(*args, **kw))
    w, a, b = _rand(5, (32, 96)), _rand(6, (16, 96)), _rand(7, (32, 16))
    for rows in (128, 130):
        LoRA(base=w, lora_A=a, lora_B=b, scale=2.0).linear(_rand(4, (2, rows // 2, 96)))
    assert calls == [(2, 65, 96)], calls  # x A^T of the 130 rows alone
    monkeypatch.setattr(lora_matmul, "lora_kernel", "off")
    assert not lora_matmul.kernels_for(4112)
