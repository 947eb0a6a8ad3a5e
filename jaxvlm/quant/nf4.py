"""NF4 weights in JAX, bit-compatible with bitsandbytes' 4-bit NormalFloat format.

The algorithms are bitsandbytes 0.50's CPU path (`functional.quantize_4bit` with its default-backend
torch kernel, and the C kernels `quantize_cpu` / `dequantizeBlockwise*Cpu` for the 8-bit nested
statistics), so that a weight quantized here has bitsandbytes' codes and a bitsandbytes checkpoint
dequantizes here to bitsandbytes' values:

- A weight of n elements is flattened row-major and cut into blocks of 64; the last block may be
  partial. Each block is scaled by its absmax and every value gets the index of the nearest entry of
  the 16-value `NF4_TABLE`; a value exactly halfway between two entries gets the lower index.
- Two 4-bit codes share a byte: the even element in the high nibble. An odd n pads one 0.0 (code 7).
- Double quantization ("compress_statistics"): the float32 absmax of the blocks, minus their mean
  `offset`, is quantized to 8 bits with the signed dynamic table `DYNAMIC_8BIT_TABLE` in blocks of
  256, giving uint8 codes and a float32 `nested_absmax` per 256 blocks.
- Dequantization, in float32: absmax = table8[code] * nested_absmax + offset (two roundings),
  value = NF4_TABLE[code] * absmax, then one rounding to the output dtype.

Where the bits can differ:
- `offset`: torch sums the absmax in an order that depends on the CPU's vector width and thread count,
  so bitsandbytes itself gives different offsets on different machines. We sum pairwise; the offset
  then differs from torch's by a few float32 ulps, and so does every `nested_absmax` (the codes
  rarely). Everything else is exact given the offset, and a checkpoint stores the offset with the
  codes, so either side dequantizes the other's tensors exactly. bfloat16 weights of ordinary range
  have an exact absmax sum, hence bitsandbytes' offset too.
- On GPU, XLA's float32 division is not correctly rounded (measured on an H100, jax 0.11): a value
  within an ulp or two of the midpoint between two codes can get the other code, and the offset can
  move by an ulp. Dequantization has no division and is exact there too.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256

NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)
"""The 16 NF4 values, ascending (bitsandbytes' `get_4bit_type("nf4")`, saved as `weight.quant_map`)."""

# The decision boundaries of bitsandbytes' torch quantizer, rounded to float32 as it rounds them.
_NF4_MIDPOINTS = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / np.float32(2)

# bitsandbytes raises the absmax of the partial last block (of that block only) to at least 1e-38.
_PARTIAL_BLOCK_MIN_ABSMAX = np.float32(1e-38)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dynamic_8bit_table() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, f32 [256].

    Exponent level i (0..6) contributes +-10^(i-6) times the midpoints of 2^i + 1 points spaced evenly
    over [0.1, 1]; with 0 and 1 that makes 256 values. Computed in float32 as torch does: its linspace
    rounds start + step * k once (fused multiply-add), which the float64 product here reproduces.
    """
    values = [0.0, 1.0]
    for level in range(7):
        n_points = 2 ** level + 1
        start, end = np.float32(0.1), np.float32(1.0)
        step = (end - start) / np.float32(n_points - 1)
        k = np.arange(n_points)
        from_start = (np.float64(start) + np.float64(step) * k).astype(np.float32)
        from_end = (np.float64(end) - np.float64(step) * (n_points - 1 - k)).astype(np.float32)
        points = np.where(k < n_points // 2, from_start, from_end)
        means = (points[:-1] + points[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (level - 6)) * means
        values += list(scaled) + list(-scaled)
    return np.sort(np.array(values, np.float32))


DYNAMIC_8BIT_TABLE = _dynamic_8bit_table()
"""The signed dynamic 8-bit table of the nested absmax (saved as `weight.nested_quant_map`), f32 [256]."""

# bitsandbytes' CPU 8-bit quantizer does not search for the nearest table entry: it maps a scaled value
# in [-1, 1] to one of 65536 evenly spaced bins and looks the code up per bin. Near a midpoint this can
# pick the second-nearest entry, so we look codes up the same way.
_LUT_SIZE = 65536


def _dynamic_8bit_lut() -> np.ndarray:
    midpoints = np.float32(0.5) * (DYNAMIC_8BIT_TABLE[:-1] + DYNAMIC_8BIT_TABLE[1:])
    bins = np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(_LUT_SIZE - 1)
    return np.searchsorted(midpoints, bins, side="left").astype(np.uint8)


_DYNAMIC_8BIT_LUT = _dynamic_8bit_lut()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4:
    """An NF4-quantized weight: bitsandbytes' 4-bit codes and block statistics, as a JAX pytree.

    For a weight of `n = prod(shape)` elements in `n_blocks = ceil(n / 64)` blocks:
      codes: uint8 [ceil(n / 2)], two codes per byte, the even element in the high nibble.
      absmax: the absmax of each block; uint8 [n_blocks] codes of DYNAMIC_8BIT_TABLE when double
        quantized, else float32 [n_blocks].
      nested_absmax: float32 [ceil(n_blocks / 256)], the scale of each 256 absmax codes; or None.
      nested_table: float32 [256], the 8-bit table of the absmax codes; or None.
      offset: float32 [], the mean absmax, added back after dequantizing the absmax; or None.
    Static: shape and dtype of the original weight, and the block size (64).

    A stack of layers is an NF4 whose array leaves have a leading layer axis; `jax.lax.scan` over it
    hands each step one layer's NF4. The static fields are per layer and equal across the stack.
    """

    codes: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None = None
    nested_table: jax.Array | None = None
    offset: jax.Array | None = None
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: np.dtype = dataclasses.field(metadata={"static": True})
    blocksize: int = dataclasses.field(default=BLOCKSIZE, metadata={"static": True})

    @property
    def double_quantized(self) -> bool:
        return self.offset is not None

    @property
    def stack_ndim(self) -> int:
        """How many leading layer axes the array leaves carry (0 for one weight)."""
        return self.codes.ndim - 1

    def dequantize(self, dtype=None) -> jax.Array:
        """The weight, [*shape] in `dtype` (default: the original dtype); see `dequantize_nf4`."""
        return dequantize_nf4(self, dtype)


def _check_blocksize(blocksize, what: str):
    if blocksize != BLOCKSIZE:
        raise ValueError(f"{what}: block size {blocksize!r} is not supported; expected {BLOCKSIZE}")


def _pad_to_blocks(x: jax.Array, blocksize: int) -> jax.Array:
    """x: [n] -> [ceil(n / blocksize), blocksize], zero-padded."""
    n_blocks = -(-x.shape[0] // blocksize)
    return jnp.pad(x, (0, n_blocks * blocksize - x.shape[0])).reshape(n_blocks, blocksize)


# XLA rewrites float arithmetic in ways that change the last bit, which bitsandbytes does not: it fuses
# a multiply and a following add into one fused multiply-add (one rounding instead of two), and it
# turns a division by a scalar into a multiplication by its reciprocal (two roundings instead of one).
# A select that depends on the data (changing NaN only) hides the pattern from both rewrites.

def _round_before_add(x: jax.Array) -> jax.Array:
    """x, rounded on its own: a product passed through here is not fused into a following add."""
    return jnp.where(x == x, x, jnp.nan)


def _divide(x: jax.Array, divisor: jax.Array) -> jax.Array:
    """x / divisor (a scalar), divided element by element rather than multiplied by 1 / divisor."""
    return x / jnp.where(jnp.isnan(x), jnp.nan, divisor)


def _pairwise_sum(x: jax.Array) -> jax.Array:
    while x.shape[0] > 1:
        x = jnp.pad(x, (0, x.shape[0] % 2))
        x = x[0::2] + x[1::2]
    return x[0]


@jax.jit
def quantize_blockwise(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' CPU `quantize_blockwise` with DYNAMIC_8BIT_TABLE and blocks of 256.

    x: float32 [m]. Returns (codes uint8 [m], absmax float32 [ceil(m / 256)]).
    """
    blocks = _pad_to_blocks(x, NESTED_BLOCKSIZE)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    inverse = 1.0 / jnp.where(absmax == 0, 1.0, absmax)
    scaled = jnp.clip(blocks * inverse[:, None], -1.0, 1.0)
    # The bin index as the C kernel computes it: float32, in this order, truncated. Whether the last
    # multiply-add is fused (XLA:CPU fuses it) moves no value across a bin edge where the code changes:
    # checked for every float within 300 ulps of each such edge.
    bins = ((scaled + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).astype(jnp.int32)
    codes = jnp.asarray(_DYNAMIC_8BIT_LUT)[bins]
    # The kernel writes code 0 (-0.99, not 0.0) for an all-zero block; times absmax 0 it is still 0.
    codes = jnp.where(absmax[:, None] == 0, jnp.uint8(0), codes)
    return codes.reshape(-1)[: x.shape[0]], absmax


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array, table: jax.Array) -> jax.Array:
    """table[codes] * absmax of each 256-block: float32 [m] for codes uint8 [m]."""
    values = _pad_to_blocks(table[codes], NESTED_BLOCKSIZE) * absmax[:, None]
    return values.reshape(-1)[: codes.shape[0]]


def _quantize_codes(x: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """x: float32 [n] -> (codes uint8 [ceil(n / 2)], absmax float32 [n_blocks])."""
    n = x.shape[0]
    blocks = _pad_to_blocks(x, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # An all-zero block scales to zeros whatever the divisor; bitsandbytes divides by 1e-38 there, which
    # XLA's CPU backend flushes to zero (0 / 0 would give NaN).
    divisor = jnp.where(absmax == 0, 1.0, absmax)
    scaled = blocks * (1.0 / divisor)[:, None]
    if n % blocksize:
        # bitsandbytes divides a partial last block by its absmax instead of multiplying by the
        # reciprocal (the two can round apart), and stores that block's absmax clamped to 1e-38.
        scaled = scaled.at[-1].set(_divide(blocks[-1], divisor[-1]))
        absmax = absmax.at[-1].set(jnp.where(absmax[-1] == 0, _PARTIAL_BLOCK_MIN_ABSMAX, absmax[-1]))
    scaled = jnp.clip(scaled, -1.0, 1.0).reshape(-1)[: n + n % 2]
    # The number of midpoints below each value, as torch.bucketize(right=False): a tie takes the lower code.
    codes = sum((scaled > m).astype(jnp.uint8) for m in _NF4_MIDPOINTS)
    return (codes[0::2] << 4) | codes[1::2], absmax


@functools.partial(jax.jit, static_argnames=("blocksize", "compress_statistics"))
def quantize_nf4(w: jax.Array, blocksize: int = BLOCKSIZE, compress_statistics: bool = True) -> NF4:
    """The NF4 of `w` (any shape, float32/bfloat16/float16), as bitsandbytes' `quantize_4bit(w,
    quant_type="nf4", blocksize=64, compress_statistics=...)` makes it on the CPU.

    With compress_statistics the block absmax is double quantized (8-bit codes, a float32 per 256 blocks,
    and an offset); without it, it stays float32.
    """
    _check_blocksize(blocksize, "quantize_nf4")
    if jnp.dtype(w.dtype).name not in _DTYPES:
        raise ValueError(f"quantize_nf4: weight dtype {w.dtype} is not supported; expected one of {sorted(_DTYPES)}")
    codes, absmax = _quantize_codes(w.reshape(-1).astype(jnp.float32), blocksize)
    static = dict(shape=tuple(w.shape), dtype=jnp.dtype(w.dtype), blocksize=blocksize)
    if not compress_statistics:
        return NF4(codes=codes, absmax=absmax, **static)
    offset = _divide(_pairwise_sum(absmax), absmax.shape[0])
    absmax_codes, nested_absmax = quantize_blockwise(absmax - offset)
    return NF4(codes=codes, absmax=absmax_codes, nested_absmax=nested_absmax,
               nested_table=jnp.asarray(DYNAMIC_8BIT_TABLE), offset=offset, **static)


def block_absmax(q: NF4) -> jax.Array:
    """The float32 absmax of each 64-block of one weight, the nested statistics dequantized."""
    if not q.double_quantized:
        return q.absmax
    return _round_before_add(dequantize_blockwise(q.absmax, q.nested_absmax, q.nested_table)) + q.offset


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_nf4(q: NF4, dtype=None) -> jax.Array:
    """The weight of q, [*q.shape], in `dtype` (default q.dtype), computed in float32 as bitsandbytes does.

    q holds one weight; dequantize a stack with `jax.vmap(dequantize_nf4)` or one layer per scan step.
    """
    if q.codes.ndim != 1:
        raise ValueError(f"dequantize_nf4: codes have shape {q.codes.shape}, expected one weight's "
                         f"[{-(-int(np.prod(q.shape)) // 2)}]; use jax.vmap for a stack of layers")
    absmax = block_absmax(q)
    n = int(np.prod(q.shape))
    nibbles = jnp.stack([q.codes >> 4, q.codes & 0xF], axis=-1).reshape(-1)
    values = _pad_to_blocks(jnp.asarray(NF4_TABLE)[nibbles], q.blocksize) * absmax[:, None]
    return values.reshape(-1)[:n].reshape(q.shape).astype(q.dtype if dtype is None else dtype)


# bitsandbytes' serialized tensors of one weight, keyed by the suffix after the weight's own key.
_CODES, _ABSMAX, _QUANT_MAP = "", ".absmax", ".quant_map"
_NESTED_ABSMAX, _NESTED_QUANT_MAP = ".nested_absmax", ".nested_quant_map"
_QUANT_STATE = ".quant_state.bitsandbytes__"


def _tensor(tensors: Mapping[str, np.ndarray], suffix: str, name: str, dtype, shape: tuple) -> np.ndarray:
    t = np.asarray(tensors[suffix])
    if t.dtype != dtype or t.size != int(np.prod(shape)):
        raise ValueError(f"{name}{suffix}: got {t.dtype} {list(t.shape)}, expected {np.dtype(dtype)} {list(shape)}")
    return t.reshape(shape)


def _listing(suffixes, name: str) -> str:
    """The tensors of weight `name` by suffix, its packed codes by `name` itself: 'w, .absmax, .quant_map'."""
    return ", ".join(s or name for s in sorted(suffixes))


def _read_quant_state(tensors: Mapping[str, np.ndarray], name: str) -> tuple[str, dict]:
    """(suffix, fields) of the JSON blob `{name}.quant_state.bitsandbytes__<quant_type>`."""
    found = [s for s in tensors if s.startswith(_QUANT_STATE)]
    if not found:
        raise ValueError(f"{name}{_QUANT_STATE}nf4 is missing ({name}: expected one {name}{_QUANT_STATE}nf4 tensor, "
                         f"found []; got tensors {_listing(tensors, name)})")
    if len(found) > 1:
        raise ValueError(f"{name}: expected one {name}{_QUANT_STATE}nf4 tensor, found {[name + s for s in found]}")
    suffix = found[0]
    quant_type = suffix[len(_QUANT_STATE):]
    if quant_type != "nf4":
        raise ValueError(f"{name}{suffix}: quant_type {quant_type!r} is not supported; expected 'nf4'")
    blob = np.asarray(tensors[suffix])
    if blob.dtype != np.uint8:
        raise ValueError(f"{name}{suffix}: dtype {blob.dtype}, expected uint8 bytes of a JSON object")
    try:
        fields = json.loads(blob.tobytes().decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
        raise ValueError(f"{name}{suffix}: not UTF-8 JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{name}{suffix}: a JSON {type(fields).__name__}, expected a JSON object")
    return suffix, fields


def _field(fields: dict, key: str, where: str, valid):
    if key not in fields:
        raise ValueError(f"{where}: field {key!r} is missing")
    value = fields[key]
    if not valid(value):
        raise ValueError(f"{where}: field {key!r} is {value!r}, which is not valid here")
    return value


def nf4_from_bnb(tensors: Mapping[str, np.ndarray], name: str = "weight") -> NF4:
    """The NF4 held in bitsandbytes' serialized tensors of one weight (host numpy leaves).

    tensors: the checkpoint tensors of the weight keyed by the suffix after its key `name`: "" (uint8
      [ceil(n/2), 1] codes), ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4", and when double
      quantized ".nested_absmax" and ".nested_quant_map". `name` only labels errors.
    Raises ValueError naming the offending key for anything but an NF4 weight in 64-blocks.
    """
    suffix, fields = _read_quant_state(tensors, name)
    where = f"{name}{suffix}"
    quant_type = _field(fields, "quant_type", where, lambda v: isinstance(v, str))
    if quant_type != "nf4":
        raise ValueError(f"{where}: quant_type {quant_type!r} is not supported; expected 'nf4'")
    blocksize = _field(fields, "blocksize", where, lambda v: isinstance(v, int))
    _check_blocksize(blocksize, where)
    dtype = _field(fields, "dtype", where, lambda v: v in _DTYPES)
    shape = tuple(_field(fields, "shape", where, lambda v: isinstance(v, list) and all(
        isinstance(d, int) and d >= 0 for d in v)))
    double_quantized = "nested_offset" in fields
    expected = {_CODES, _ABSMAX, _QUANT_MAP, suffix}
    if double_quantized:
        expected |= {_NESTED_ABSMAX, _NESTED_QUANT_MAP}
    missing, extra = expected - set(tensors), set(tensors) - expected
    if missing or extra:
        # Whether the nested statistics belong is read from the blob, so say so when they are at issue.
        why = (f", as its quant_state has {'a' if double_quantized else 'no'} nested_offset"
               if {_NESTED_ABSMAX, _NESTED_QUANT_MAP} & (missing | extra) else "")
        if missing:
            raise ValueError(f"{name}{min(missing)} is missing ({name}: got tensors {_listing(tensors, name)}; "
                             f"expected also {_listing(missing, name)}{why})")
        raise ValueError(f"{name}{min(extra)} is unexpected ({name}: got tensors {_listing(tensors, name)}; "
                         f"expected only {_listing(expected, name)}{why})")

    n = int(np.prod(shape))
    n_blocks = -(-n // blocksize)
    codes = _tensor(tensors, _CODES, name, np.uint8, (-(-n // 2),))
    quant_map = _tensor(tensors, _QUANT_MAP, name, np.float32, (16,))
    if not np.array_equal(quant_map, NF4_TABLE):
        raise ValueError(f"{name}{_QUANT_MAP}: {quant_map.tolist()} is not the NF4 table {NF4_TABLE.tolist()}")
    static = dict(shape=shape, dtype=jnp.dtype(_DTYPES[dtype]), blocksize=blocksize)
    if not double_quantized:
        return NF4(codes=codes, absmax=_tensor(tensors, _ABSMAX, name, np.float32, (n_blocks,)), **static)

    _field(fields, "nested_blocksize", where, lambda v: v == NESTED_BLOCKSIZE)
    _field(fields, "nested_dtype", where, lambda v: v == "float32")
    offset = _field(fields, "nested_offset", where, lambda v: isinstance(v, (int, float)) and np.isfinite(v))
    return NF4(
        codes=codes,
        absmax=_tensor(tensors, _ABSMAX, name, np.uint8, (n_blocks,)),
        nested_absmax=_tensor(tensors, _NESTED_ABSMAX, name, np.float32, (-(-n_blocks // NESTED_BLOCKSIZE),)),
        nested_table=_tensor(tensors, _NESTED_QUANT_MAP, name, np.float32, (NESTED_BLOCKSIZE,)),
        offset=np.asarray(offset, np.float32),
        **static,
    )


def nf4_to_bnb(q: NF4) -> dict[str, np.ndarray]:
    """bitsandbytes' serialized tensors of q (as transformers saves them), keyed by the suffix after the
    weight's key: "", ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4", and when double
    quantized ".nested_absmax" and ".nested_quant_map". The inverse of `nf4_from_bnb`.
    """
    if np.ndim(q.codes) != 1:
        raise ValueError(f"nf4_to_bnb: codes have shape {np.shape(q.codes)}, expected one weight's "
                         f"[{-(-int(np.prod(q.shape)) // 2)}]; convert the layers of a stack one by one")
    # Field order and values as bitsandbytes' QuantState.as_dict(packed=True), so the bytes match.
    fields = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": np.dtype(q.dtype).name, "shape": list(q.shape)}
    tensors = {
        _CODES: np.asarray(q.codes).reshape(-1, 1),
        _ABSMAX: np.asarray(q.absmax),
        _QUANT_MAP: NF4_TABLE.copy(),
    }
    if q.double_quantized:
        fields.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                      nested_offset=float(np.asarray(q.offset, np.float32)))
        tensors[_NESTED_ABSMAX] = np.asarray(q.nested_absmax)
        tensors[_NESTED_QUANT_MAP] = np.asarray(q.nested_table)
    tensors[_QUANT_STATE + "nf4"] = np.frombuffer(json.dumps(fields).encode("utf-8"), np.uint8).copy()
    return tensors
