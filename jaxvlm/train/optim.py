"""AdamW with 8-bit moments, as bitsandbytes' AdamW8bit (`optim="adamw_8bit"`) keeps them.

Each moment of a tensor of at least 4096 elements is stored as one uint8 code per element and one fp32
absmax per block of 256 consecutive elements (row-major order, the last block possibly short): an
element's value is `absmax[its block] * MAP[code]`, and a value is stored as the code of the nearest map
entry to value / absmax. The map is bitsandbytes' "dynamic" 8-bit type (Dettmers, "8-Bit Approximations
for Parallelism in Deep Learning"): signed for the first moment, unsigned for the second. Tensors under
4096 elements keep fp32 moments, as bitsandbytes does (its `min_8bit_size`).

A step dequantizes both moments, updates them in fp32, takes the parameter update from those fp32
values, and quantizes them again: the quantization error enters only through the stored state, as in
bitsandbytes. Weight decay is decoupled and bias correction is AdamW's, so with exact moments this is
`optax.adamw`. The state takes 2 bytes + 8 / 256 bytes per element where fp32 Adam takes 8 (25.4%).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096


def dynamic_map(signed: bool) -> np.ndarray:
    """float32 [256], ascending: bitsandbytes' dynamic 8-bit map (`create_dynamic_map(signed)`).

    0, 1, and for each decade 1e-6 ... 1e0 the midpoints of equal steps over [0.1, 1] times the decade:
    more steps in the larger decades (2**d in decade d, twice that in the unsigned map, which spends the
    sign bit on resolution), and in the signed map each value also negated.
    """
    values = [np.float32(0.0), np.float32(1.0)]
    for decade in range(7):
        steps = 2 ** decade if signed else 2 ** (decade + 1)
        edges = np.linspace(0.1, 1.0, steps + 1, dtype=np.float32)
        scaled = np.float32(10.0 ** (decade - 6)) * ((edges[:-1] + edges[1:]) / np.float32(2))
        values += [*scaled, *(-scaled if signed else [])]
    return np.sort(np.array(values, np.float32))


# The nearest map entry is found by table lookup on the value's float32 bits: searching the map
# (jnp.searchsorted) made the step of 2B parameters on an H200 take 355 ms, the lookup 17 ms (fp32 AdamW:
# 14 ms). The key is the sign, the exponent and the top _KEY_MANTISSA_BITS bits of the mantissa; a key's
# values span under 0.4% of their magnitude, less than the finest relative distance between the map's
# midpoints (0.5%, near 1 in the unsigned map), so at most one midpoint falls inside a key.
_KEY_MANTISSA_BITS = 8
_KEYS = (127 << _KEY_MANTISSA_BITS) + 1  # magnitude keys up to that of 1.0


class _Map(NamedTuple):
    """A code map and its lookup tables: the nearest entry to v is lower[key(v)] + (split[key(v)] < v)."""
    values: np.ndarray  # float32 [256], ascending
    lower: np.ndarray  # uint8 [2 * _KEYS]: the nearest entry at the key's most negative value
    split: np.ndarray  # float32 [2 * _KEYS]: the midpoint between entries inside the key (inf if none)


def _lookup(values: np.ndarray) -> _Map:
    midpoints = (values[:-1] + values[1:]) / 2
    keys = np.arange(_KEYS, dtype=np.uint32)
    small = (keys << (23 - _KEY_MANTISSA_BITS)).view(np.float32)  # a key's magnitudes: [small, large)
    large = ((keys + 1) << (23 - _KEY_MANTISSA_BITS)).view(np.float32)
    # Entry i is the nearest to v when i midpoints lie below v; the positive values of a key are
    # [small, large), its negative ones (-large, -small].
    lower = np.concatenate([np.searchsorted(midpoints, small, "left"), np.searchsorted(midpoints, -large, "right")])
    upper = np.concatenate([np.searchsorted(midpoints, large, "left"), np.searchsorted(midpoints, -small, "right")])
    assert (upper - lower).max() <= 1, "a lookup key spans two midpoints: keep more mantissa bits"
    split = np.where(upper > lower, midpoints[np.minimum(lower, len(midpoints) - 1)], np.inf)
    return _Map(values, lower.astype(np.uint8), split.astype(np.float32))


_MAPS = {signed: _lookup(dynamic_map(signed)) for signed in (True, False)}


class Quantized(NamedTuple):
    """A tensor as blockwise 8-bit codes: value = absmax[its block] * map[code]."""
    codes: jax.Array  # uint8 [the tensor's shape]
    absmax: jax.Array  # float32 [ceil(size / block_size)]


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """[ceil(size / block_size), block_size]: x flattened, zero-padded to whole blocks."""
    flat = x.reshape(-1)
    return jnp.pad(flat, (0, -flat.size % block_size)).reshape(-1, block_size)


def quantize(x: jax.Array, signed: bool, block_size: int = BLOCK_SIZE) -> Quantized:
    """x (float) as the nearest entries of the signed or unsigned dynamic map, scaled per block (ties
    between two entries go to the lower)."""
    code_map = _MAPS[signed]
    blocks = _blocks(x.astype(jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = (blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]).reshape(-1)[:x.size]
    bits = jax.lax.bitcast_convert_type(scaled, jnp.uint32)
    key = jnp.minimum((bits & 0x7FFFFFFF) >> (23 - _KEY_MANTISSA_BITS), _KEYS - 1) + (bits >> 31) * _KEYS
    codes = jnp.asarray(code_map.lower)[key] + (jnp.asarray(code_map.split)[key] < scaled).astype(jnp.uint8)
    return Quantized(codes.reshape(x.shape), absmax)


def dequantize(q: Quantized, signed: bool, block_size: int = BLOCK_SIZE) -> jax.Array:
    """float32 [q.codes.shape]: the values that `q` stands for."""
    values = jnp.asarray(_MAPS[signed].values)[q.codes.astype(jnp.int32)]
    scaled = _blocks(values, block_size) * q.absmax[:, None]
    return scaled.reshape(-1)[:q.codes.size].reshape(q.codes.shape)


class ScaleByAdam8bitState(NamedTuple):
    count: jax.Array  # int32 []
    mu: optax.Updates  # per leaf: Quantized (signed map), or float32 under MIN_8BIT_SIZE elements
    nu: optax.Updates  # per leaf: Quantized (unsigned map), or float32 under MIN_8BIT_SIZE elements


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                       block_size: int = BLOCK_SIZE) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with the moments kept in blockwise 8 bits (see the module docstring)."""

    def zeros(p):
        if p.size < MIN_8BIT_SIZE:
            return jnp.zeros(p.shape, jnp.float32)
        return Quantized(jnp.zeros(p.shape, jnp.uint8), jnp.zeros(-(-p.size // block_size), jnp.float32))

    def init(params):
        return ScaleByAdam8bitState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                                    nu=jax.tree.map(zeros, params))

    def load(moment, signed):
        return dequantize(moment, signed, block_size) if isinstance(moment, Quantized) else moment

    def store(value, like, signed):
        return quantize(value, signed, block_size) if isinstance(like, Quantized) else value

    def update(grads, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        correction1, correction2 = 1 - b1**t, 1 - b2**t
        leaves, treedef = jax.tree.flatten(grads)
        out, mus, nus = [], [], []
        for g, mu, nu in zip(leaves, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)):
            g32 = g.astype(jnp.float32)
            m = b1 * load(mu, signed=True) + (1 - b1) * g32
            v = b2 * load(nu, signed=False) + (1 - b2) * g32 * g32
            out.append(((m / correction1) / (jnp.sqrt(v / correction2) + eps)).astype(g.dtype))
            mus.append(store(m, mu, signed=True))
            nus.append(store(v, nu, signed=False))
        return (jax.tree.unflatten(treedef, out),
                ScaleByAdam8bitState(count, jax.tree.unflatten(treedef, mus), jax.tree.unflatten(treedef, nus)))

    return optax.GradientTransformation(init, update)


def adamw_8bit(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-2, mask=None, block_size: int = BLOCK_SIZE) -> optax.GradientTransformation:
    """bitsandbytes' AdamW8bit as an optax transformation; `optax.adamw`'s arguments mean the same here."""
    return optax.chain(scale_by_adam_8bit(b1, b2, eps, block_size),
                       optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))
