"""LoRA's widening product as one matmul with a hand-written backward (see jaxvlm.lora.LoRA.linear)."""
import jax
import jax.numpy as jnp


@jax.custom_vjp
def concat_linear(x: jax.Array, xa: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x @ w.T + xa @ b.T as one matmul, [x | xa] @ [w | b].T (K = in + r): the base product and the
    adapter's B product share the pass over the output. x [..., in], xa [..., r], w [out, in], b [out, r].
    The backward pass reads the output's cotangent g once for dx and dxa together (g @ [w | b]); dw
    (g.T @ x) is formed only if w is differentiated (a frozen base's is dropped as dead code)."""
    xc = jnp.concatenate([x, xa], axis=-1)
    wc = jnp.concatenate([w, b], axis=-1)
    return jax.lax.dot_general(xc, wc, (((x.ndim - 1,), (1,)), ((), ())))


def _concat_linear_fwd(x, xa, w, b):
    return concat_linear(x, xa, w, b), (x, xa, w, b)


def _concat_linear_bwd(res, g):
    x, xa, w, b = res
    n = w.shape[1]
    gc = jax.lax.dot_general(g, jnp.concatenate([w, b], axis=-1), (((g.ndim - 1,), (0,)), ((), ())))
    lead = tuple(range(g.ndim - 1))
    dw = jax.lax.dot_general(g, x, ((lead, lead), ((), ())))
    db = jax.lax.dot_general(g, xa, ((lead, lead), ((), ())))
    return gc[..., :n], gc[..., n:], dw, db


concat_linear.defvjp(_concat_linear_fwd, _concat_linear_bwd)
