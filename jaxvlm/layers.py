"""Building blocks shared by the model families: typed-weight `linear`, norms, rotary, attention.

Every module here holds its weights in HF's layout, optionally with leading "stack" axes (one per
scanned layer), so that a model's attribute paths and weight shapes mirror transformers' modules.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxvlm.kernels import decode_attention, flash_attention, grouped_matmul, kernel_on, nf4_matmul, one_device_on
from jaxvlm.quant.nf4 import NF4


def dense_weight(w, dtype) -> jax.Array:
    """The weight `w` as a plain array in `dtype`, whatever its type (array, NF4, ...).

    This is the one place that knows the weight types; kernels that avoid materialising the dense
    weight plug in here and in `linear`.
    """
    if hasattr(w, "dequantize"):
        dequantize = lambda q: q.dequantize(dtype)  # noqa: E731
        for _ in range(getattr(w, "stack_ndim", 0)):  # a stacked weight outside the layer scan
            dequantize = jax.vmap(dequantize)
        return dequantize(w)
    return w.astype(dtype)


# The Pallas NF4 decode kernel (jaxvlm.kernels.nf4_matmul): "on" (on a GPU, for the products it supports; inside
# unrolled_layers each layer's weight read in place from the stack), "interpret" (Pallas' interpreter on any backend:
# the tests) or "off". Read at trace time. Off by default: its second design decodes at par with XLA's fused
# reduction (H200, 2B geometry, batch 1: 500.1 vs 491.8 tokens/s; docs/BENCHMARKS.md, "NF4 decode kernel").
nf4_kernel = os.environ.get("JAXVLM_NF4_KERNEL", "off")


# A product with at most ROWS_PRODUCT_MAX rows of x (a batch-1 decode step) as a multiply + sum over `in` in float32
# rather than a dot: "auto" on a GPU, "on" everywhere (the tests), "off" never. XLA emits such a dot as a GEMM kernel
# that cannot read a layer's weight inside the stacked array of the layer scan, so it first copies the layer out (a
# whole extra write and read of the weights per token); a reduction reads the weight where it lies, and an NF4
# weight's dequantization fuses into it, so that the step reads the packed codes only. Qwen2-VL-2B geometry on an
# H200, decode tokens/s at batch 1: bf16 324 -> 591, NF4 268 -> 464; at batch 8 the reduction reads each weight once
# per row and loses (2,128 -> 1,135), hence one row (docs/BENCHMARKS.md, "Decode"). Read at trace time.
rows_product = os.environ.get("JAXVLM_ROWS_PRODUCT", "auto")
ROWS_PRODUCT_MAX = 1

def _nf4_kernel() -> bool:
    return kernel_on(nf4_kernel)


def _rows_product(x: jax.Array) -> bool:
    on = rows_product == "on" or (rows_product == "auto" and jax.default_backend() == "gpu")
    return on and int(np.prod(x.shape[:-1])) <= ROWS_PRODUCT_MAX


def linear(x: jax.Array, w, bias: jax.Array | None = None) -> jax.Array:
    """x @ w.T (+ bias) for `x: [..., in]` and `w: [out, in]` (HF layout), in x's dtype.

    `w` may be a plain array or a typed weight (NF4, LoRA); the type decides how the product is formed.
    One row of x (a batch-1 decode step) on a GPU: a float32 multiply + sum (see `rows_product`). With
    JAXVLM_NF4_KERNEL=on, an NF4 weight times a few rows goes through the Pallas kernel on a GPU.
    """
    stack = _in_place(w) if isinstance(w, NF4) and _nf4_kernel() else None
    if hasattr(w, "linear"):
        y = w.linear(x)
    elif stack is not None and nf4_matmul.supported(x, *stack):
        y = nf4_matmul.nf4_matmul(x, *stack, interpret=nf4_kernel == "interpret")
    elif _rows_product(x):
        y = _rows_sum(x, dense_weight(w, jnp.float32)).astype(x.dtype)
    else:
        w = dense_weight(w, x.dtype)
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def _rows_sum(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w.T for few rows of x as a float32 multiply + sum over `in` (w float32 [out, in]): see `rows_product`."""
    return jnp.sum(x.astype(jnp.float32)[..., None, :] * w, axis=-1)


def _param(shape, dtype) -> nnx.Param:
    # Zeros, not random: weights always come from a checkpoint, and models are built under
    # nnx.eval_shape so that no memory is spent before loading.
    return nnx.Param(jnp.zeros(shape, dtype))


class Linear(nnx.Module):
    """A Linear layer: `weight [*stack, out, in]`, optional `bias [*stack, out]`."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, stack: tuple = ()):
        self.weight = _param((*stack, out_features, in_features), dtype)
        self.bias = _param((*stack, out_features), dtype) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(x, self.weight.get_value(), None if self.bias is None else self.bias.get_value())


# Linears that read the same x (q/k/v, gate/up) as one product where their weight type forms one (LoRA.sibling_linear):
# "auto" in a process with one device (under a mesh the weights' output axes may be split over "tensor", and a
# concatenation along them would be gathered), "on" always, "off" never. Read at trace time. On an H200 it took 0.9-2.7%
# off every family's LoRA training step (docs/BENCHMARKS.md, "Sibling Linears as one product").
sibling_products = os.environ.get("JAXVLM_SIBLING_PRODUCTS", "auto")


def sibling_linears(x: jax.Array, modules) -> list[jax.Array]:
    """Each Linear of `modules` applied to the same `x`: as one product where the setting allows and the first
    weight's type forms one (a `sibling_linear` method returning the outputs, or None where it does not apply),
    else each by `linear`. Biases are added per output."""
    weights = [m.weight.get_value() for m in modules]
    biases = [None if m.bias is None else m.bias.get_value() for m in modules]
    ys = None
    if one_device_on(sibling_products):
        fused = getattr(weights[0], "sibling_linear", None)
        ys = fused(x, weights) if fused is not None else None
        if ys is None and _rows_product(x) and _rows_siblings_apply(weights):
            return _rows_siblings(x, weights, biases)
    if ys is None:
        ys = [linear(x, w) for w in weights]
    return [y if b is None else y + b.astype(y.dtype) for y, b in zip(ys, biases)]


# A one-row product of fewer weights than this (k/v of 2 kv heads: 256 x 1536 in Qwen2-VL-2B) reads them in less time
# than its kernel's launch and tail; its siblings' products take it in (`_rows_siblings`).
ROWS_SIBLING_SMALL = 1 << 20


def _rows_siblings_apply(weights) -> bool:
    """Plain weights of different output widths (q/k/v), one of them small (ROWS_SIBLING_SMALL). On an H200 (batch-1
    decode, docs/BENCHMARKS.md, "Decode's q/k/v as one reduction"): Qwen2-VL-2B +3.9% tokens/s; where k/v hold 1.8M
    weights or more (Qwen2-VL-7B, Qwen3-VL-2B, Gemma 3 4B) no gain (-1.3 to 0.0%). XLA forms same-width siblings'
    products (gate/up) as one multi-output reduction already; a concatenated gate/up, and NF4 codes concatenated,
    measured slower."""
    return (all(isinstance(w, jax.Array) for w in weights) and len({w.shape[-2] for w in weights}) > 1
            and min(w.size for w in weights) < ROWS_SIBLING_SMALL)


def _rows_siblings(x: jax.Array, weights, biases) -> list[jax.Array]:
    """One row of x through every weight of `weights` (plain arrays), biases added, as one multiply + sum over the
    weights concatenated along out, which XLA fuses into one reduction reading each weight where it lies (and adds
    the biases in its epilogue): q/k/v were two or three reductions and their bias adds, the k/v ones of a few hundred
    rows far from the memory's speed."""
    widths = [w.shape[-2] for w in weights]
    y = _rows_sum(x, jnp.concatenate([w.astype(jnp.float32) for w in weights]))
    if any(b is not None for b in biases):
        y = y + jnp.concatenate([jnp.zeros(n, jnp.float32) if b is None else b.astype(jnp.float32)
                                 for n, b in zip(widths, biases)])
    return jnp.split(y.astype(x.dtype), np.cumsum(widths)[:-1], axis=-1)


def grouped_linear(x: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
    """Each group's rows times its own weight: `x [m, in]` with rows sorted by group, `w [groups, out, in]`
    (one HF-layout weight per group; an array or a typed weight with a groups axis, e.g. an NF4 per
    group), `group_sizes [groups]` int32 summing to at most m (rows past the sum give zeros). Returns
    [m, out] in x's dtype: a ragged dot (jaxvlm.kernels.grouped_matmul: JAX's Mosaic GPU kernel on Hopper,
    else XLA's op), so no group is looped over. A typed weight with a `grouped_linear` method (LoRA on the
    experts) forms the product itself.
    """
    if hasattr(w, "grouped_linear"):
        return w.grouped_linear(x, group_sizes)
    return grouped_matmul.grouped_matmul(x, dense_weight(w, x.dtype), group_sizes)


class ConvWeight(nnx.Module):
    """A convolution's `weight [out, in, *kernel]` (HF layout); its callers apply it. Not a Linear:
    LoRA targets and 4-bit quantization leave it alone, as PEFT and bitsandbytes do with HF's Conv3d."""

    def __init__(self, shape: tuple[int, ...], *, dtype):
        self.weight = _param(shape, dtype)


class Embedding(nnx.Module):
    """Token embedding table `weight [vocab, hidden]`."""

    def __init__(self, num: int, features: int, *, dtype):
        self.weight = _param((num, features), dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight.get_value(), ids, axis=0)


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32, scaled after casting back (transformers' order of operations)."""

    def __init__(self, features: int, *, eps: float, dtype, stack: tuple = ()):
        self.weight = _param((*stack, features), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight.get_value().astype(x.dtype) * h.astype(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is zero-centred (scale 1 + weight), applied in fp32 before the cast back."""

    ZERO_CENTERED = True

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * (1.0 + self.weight.get_value().astype(jnp.float32))).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, statistics in fp32."""

    def __init__(self, features: int, *, eps: float, dtype, stack: tuple = ()):
        self.weight = _param((*stack, features), dtype)
        self.bias = _param((*stack, features), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        h = h * self.weight.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return h.astype(x.dtype)


# An activation's backward: "input" (the default) forms it from the activation's input alone, in one pass over it and
# the cotangent (float32 inside, the input's dtype out; `_input_only_backward`); "autodiff" differentiates the formula,
# which keeps the formula's intermediates as residuals (quick-GELU's sigmoid, a [tokens, 5120] array per vision block
# of the Qwen2-VL-2B step) and adds the cotangents of its terms in a pass of their own. Measured on an H200
# (docs/BENCHMARKS.md, "Activations differentiated from their input"): no step slower, every peak lower (Qwen2-VL-2B
# bf16 b8 -21 MB, NF4 -2.7% step, Gemma 3 4B -280 MB). Read at trace time.
activation_backward = os.environ.get("JAXVLM_ACTIVATION_BACKWARD", "input")


def _input_only_backward(f):
    """The elementwise `f`, with its backward formed from its input alone where `activation_backward` says so."""
    @jax.custom_vjp
    def fused(x):
        return f(x)

    def backward(x, g):
        _, vjp = jax.vjp(f, x.astype(jnp.float32))
        return (vjp(g.astype(jnp.float32))[0].astype(x.dtype),)

    fused.defvjp(lambda x: (f(x), x), backward)
    return lambda x: fused(x) if activation_backward == "input" else f(x)


ACTIVATIONS = {name: _input_only_backward(f) for name, f in {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}.items()}


class Activation(nnx.Module):
    """A parameter-free activation, so that Sequential-style lists keep HF's indices (mlp.0, mlp.2)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.name](x)


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): the gated MLP of Llama-style language models (and some vision towers)."""

    # The Linears a module passes together to `sibling_linears` (each tuple one call): jaxvlm.lora.widen keeps an
    # adapted group's bases in one buffer while training, which only that joint product reads.
    SIBLINGS = (("gate_proj", "up_proj"),)

    def __init__(self, hidden: int, intermediate: int, act: str, *, bias: bool, dtype, stack=()):
        self.gate_proj = Linear(hidden, intermediate, bias=bias, dtype=dtype, stack=stack)
        self.up_proj = Linear(hidden, intermediate, bias=bias, dtype=dtype, stack=stack)
        self.down_proj = Linear(intermediate, hidden, bias=bias, dtype=dtype, stack=stack)
        self.act = act

    def __call__(self, x):
        gate, up = sibling_linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(ACTIVATIONS[self.act](gate) * up)


class FeedForward(nnx.Module):
    """fc2(act(fc1(x))) with biases: the MLP of ViT-style vision encoders (SigLIP, Llama 3.2 Vision's)."""

    def __init__(self, hidden: int, intermediate: int, act: str, *, dtype, stack=()):
        self.fc1 = Linear(hidden, intermediate, bias=True, dtype=dtype, stack=stack)
        self.fc2 = Linear(intermediate, hidden, bias=True, dtype=dtype, stack=stack)
        self.act = act

    def __call__(self, x):
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class Experts(nnx.Module):
    """A mixture of gated-MLP experts as transformers 5 holds them (its `...Experts` modules): 3-D
    `gate_up_proj [*stack, experts, 2 * intermediate, hidden]` (gate rows, then up rows) and
    `down_proj [*stack, experts, hidden, intermediate]`, each expert's matrix in HF's (out, in) layout.
    Not a Linear: bitsandbytes leaves it alone, and LoRA reaches it only by parameter name (PEFT's
    `target_parameters`, jaxvlm.lora.expert_params); jaxvlm.quantize still stores it in NF4 (one NF4 per
    expert matrix) in 4-bit mode.
    """

    WEIGHTS = ("gate_up_proj", "down_proj")

    def __init__(self, experts: int, hidden: int, intermediate: int, act: str, *, dtype, stack: tuple = ()):
        self.gate_up_proj = _param((*stack, experts, 2 * intermediate, hidden), dtype)
        self.down_proj = _param((*stack, experts, hidden, intermediate), dtype)
        self.act = act

    def __call__(self, x: jax.Array, top_k_index: jax.Array, top_k_weights: jax.Array) -> jax.Array:
        """sum_j top_k_weights[:, j] * expert_{top_k_index[:, j]}(x) for `x [tokens, hidden]`, the routing
        `[tokens, k]`; one layer (inside the layer scan)."""
        n, k = top_k_index.shape
        gate_up, down = self.gate_up_proj.get_value(), self.down_proj.get_value()
        experts = jax.eval_shape(lambda w: dense_weight(w, x.dtype), gate_up).shape[0]
        # The n*k (token, expert) pairs, pair p = (token p // k, choice p % k), sorted by expert so that
        # each expert's rows are contiguous for the grouped matmul. The rows move by permutation gathers
        # (gather_rows), whose transposes are gathers too: no scatter-add in the forward or backward pass.
        choice = top_k_index.reshape(-1)
        order = jnp.argsort(choice, stable=True)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
        sizes = jnp.bincount(choice, length=experts)
        rows = gather_rows(jnp.repeat(x, k, axis=0), order, inverse)  # [n*k, hidden], by expert
        gate, up = jnp.split(grouped_linear(rows, gate_up, sizes), 2, axis=-1)
        out = grouped_linear(ACTIVATIONS[self.act](gate) * up, down, sizes)  # [n*k, hidden]
        out = gather_rows(out, inverse, order).reshape(n, k, -1)  # back in (token, choice) order
        # Weighted in the compute dtype, summed over the k choices in fp32 (as transformers' grouped_mm path).
        out = out * top_k_weights[..., None].astype(out.dtype)
        return jnp.sum(out.astype(jnp.float32), axis=1).astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [..., heads, head_dim]` by angles whose cos/sin are `[..., head_dim]` (fp32 math)."""
    xf = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


# Attention implementation: "auto" picks cuDNN's fused (flash) attention on a GPU for bf16/fp16 inputs
# (and for a long `CausalBlockMask` the Pallas kernel, jaxvlm.kernels.flash_attention), XLA's reference elsewhere;
# "xla" or "cudnn" force one (a CausalBlockMask then becomes a dense mask); "pallas" forces the Pallas kernel for
# a CausalBlockMask (interpret mode off the GPU), "auto" otherwise. Read at trace time.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
attention_implementation = os.environ.get("JAXVLM_ATTENTION", "auto")


def _cudnn_head_dim_limit() -> int:
    device = jax.devices()[0]
    return 256 if str(getattr(device, "compute_capability", "")).split(".")[0] in ("9", "10", "11", "12") else 128


def _use_cudnn(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> bool:
    impl = attention_implementation
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
    if impl == "xla":
        return False
    if impl == "pallas":
        impl = "auto"
    # cuDNN's flash attention: head_dim a multiple of 8 up to 128 (256 from Hopper on); its backward needs even
    # lengths (`attention` pads an odd one).
    supported = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and (
        q.shape[-1] <= 128 or jax.default_backend() == "gpu" and q.shape[-1] <= _cudnn_head_dim_limit()) and (
        q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)
    if impl == "cudnn":
        if not supported:
            raise ValueError(f"cuDNN attention needs bf16/fp16, head_dim a multiple of 8 up to 128 (256 on Hopper), "
                             f"and even lengths with a mask; got {q.dtype}, head_dim {q.shape[-1]}, lengths "
                             f"{q.shape[1]} x {k.shape[1]}{' with a mask' if mask is not None else ''}")
        return True
    # One query (a decode step) reads the cache once; XLA's plain product is as good there.
    return supported and q.shape[1] > 1 and jax.default_backend() == "gpu"


# Where attention's operands live while a program for a device mesh traces (`activation_layout`; None: one device).
# cuDNN's fused attention is partitioned by JAX's rule, which needs the queries, keys and values split alike (batch,
# heads) and a mask split over the batch as the queries are (a replicated one fails in cuDNN): the operands are
# pinned to that. Under a vmap over data-parallel shards (`vmapped`, the trainer's per-shard batches; the vmap's
# spmd_axis_name places the shard axis) JAX's batching rule folds the shard axis into the batch and cannot fold a
# mask broadcast over heads: the mask is widened to every head there.
_layout: dict = {"mesh": None, "batch": None, "heads": None, "vmapped": False}


@contextlib.contextmanager
def _setting(table: dict, **values):
    """`table` (one of this module's trace-time settings) holding `values` inside the context, as before after it."""
    saved = dict(table)
    table.update(values)
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


def activation_layout(mesh, batch=None, heads=None, vmapped: bool = False):
    """Within this context, programs traced lay attention out on `mesh` (None: one device, nothing pinned): the
    batch axis over the mesh axes `batch` (a name or tuple, None: not split), the heads over `heads`, each where it
    divides."""
    return _setting(_layout, mesh=mesh, batch=batch, heads=heads, vmapped=vmapped)


def _laid_out(q, k, v, mask, *lengths):
    """(q, k, v, mask, *lengths) pinned as `_layout` says (unchanged outside `activation_layout`)."""
    mesh = _layout["mesh"]
    if mesh is None:
        return q, k, v, mask, *lengths
    from jax.sharding import NamedSharding, PartitionSpec

    def size(axes):
        return 1 if axes is None else math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))

    batch = _layout["batch"] if q.shape[0] % size(_layout["batch"]) == 0 else None
    heads = _layout["heads"] if q.shape[2] % size(_layout["heads"]) == 0 and k.shape[2] % size(
        _layout["heads"]) == 0 else None

    def pin(x, *spec):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))
    q, k, v = (pin(x, batch, None, heads, None) for x in (q, k, v))
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if _layout["vmapped"]:
            mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], *mask.shape[2:]))
        mask = pin(mask, batch if mask.shape[0] == q.shape[0] else None,
                   heads if mask.shape[1] == q.shape[2] else None, None, None)
    return q, k, v, mask, *(None if n is None else pin(n, batch) for n in lengths)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CausalBlockMask:
    """A self-attention mask given by per-token arrays, not [T, T]: causal, except that the tokens of one image
    attend to each other both ways, padding keys masked, and in a sliding layer only keys less than `window`
    back (jaxvlm.kernels.flash_attention.dense_mask). `sliding` may be traced (a layer scan's per-layer flag)."""
    key_ok: jax.Array  # [batch, seq]: nonzero at real tokens
    blocks: jax.Array  # int32 [batch, seq]: the image run id of each token, -1 at text
    sliding: jax.Array | bool  # this layer is a sliding-window one
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def dense(self) -> jax.Array:
        """The bool mask [batch, 1, seq, seq]."""
        full = flash_attention.dense_mask(self.key_ok, self.blocks, None)
        if self.window is None:
            return full
        return full & jnp.where(self.sliding, flash_attention.dense_mask(self.key_ok, self.blocks, self.window), full)


# "auto" takes the Pallas kernel for a CausalBlockMask from this many tokens on (the dense mask's cost grows with
# their square). H200, Gemma-3-4B LoRA step, bf16: 516 tokens x 8, cuDNN with the dense mask 6,112 tokens/s, the
# kernel 6,055; 4,100 tokens x 2, 11,085 and 13,291 (docs/BENCHMARKS.md).
BLOCK_MASK_KERNEL_MIN_SEQ = 1024


def _block_mask_attention(q, k, v, mask: CausalBlockMask, scale):
    """Attention under a CausalBlockMask: the Pallas kernel on a GPU (bf16/fp16, at least BLOCK_MASK_KERNEL_MIN_SEQ
    queries) or when forced ("pallas"; interpret mode off the GPU), else `attention` with the dense mask."""
    impl = attention_implementation
    gpu = jax.default_backend() == "gpu"
    kernel = impl == "pallas" or (impl == "auto" and gpu and q.dtype in (jnp.bfloat16, jnp.float16)
                                  and q.shape[1] >= BLOCK_MASK_KERNEL_MIN_SEQ)
    if not kernel or q.shape[1] != k.shape[1]:
        return attention(q, k, v, mask.dense(), scale=scale)

    def run(window):
        return flash_attention.block_attention(q, k, v, mask.key_ok, mask.blocks, window=window, scale=scale,
                                               interpret=not gpu)

    if mask.window is None or mask.sliding is False:
        return run(None)
    if mask.sliding is True:
        return run(mask.window)
    return jax.lax.cond(mask.sliding, lambda: run(mask.window), lambda: run(None))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | CausalBlockMask | None = None, *,
              causal: bool = False, lengths: jax.Array | None = None, key_lengths: jax.Array | None = None,
              scale: float | None = None) -> jax.Array:
    """Softmax attention with grouped KV heads.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
    mask: bool, broadcastable to [batch, heads, q_len, kv_len] (True = attend), or a CausalBlockMask (self-attention,
    q_len = kv_len; the Pallas kernel on a GPU builds it tile by tile); causal: query i also
    attends only keys j <= i; lengths [batch]: only the first lengths[b] queries and keys of row b are
    real (the outputs of the other queries are unspecified: zeros off cuDNN); key_lengths [batch]: the keys' own
    count, when it is not the queries' (`lengths` then counts the queries; None: all of them); scale: of the logits
    (None: 1/sqrt(head_dim)).
    Returns [batch, q_len, heads, head_dim];
    logits and softmax in fp32. On a GPU this is cuDNN's flash attention (no [q_len, kv_len] scores in
    memory); elsewhere XLA's.
    """
    if isinstance(mask, CausalBlockMask):
        return _block_mask_attention(q, k, v, mask, scale)
    q, k, v, mask, lengths, key_lengths = _laid_out(q, k, v, mask, lengths, key_lengths)
    key_lengths = lengths if key_lengths is None else key_lengths
    if _use_cudnn(q, k, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, query_seq_lengths=lengths,
                                            key_value_seq_lengths=key_lengths, scale=scale, implementation="cudnn")
    if (mask is None and not causal and key_lengths is None and q.shape[1] > 1
            and (q.shape[1] % 2 or k.shape[1] % 2)):
        # An odd number of tokens without a mask (CLIP's 577, Llama 3.2 Vision's 1601 per tile): cuDNN on even lengths.
        padded = pad_to_even(q, k, v)
        if _use_cudnn(padded[0], padded[1]):
            return padded_attention(*padded, q.shape[1], scale, "cudnn")
    if key_lengths is not None:
        key_ok = jnp.arange(k.shape[1])[None, :] < key_lengths[:, None]
        key_ok = key_ok[:, None, None, :]
        mask = key_ok if mask is None else mask & key_ok
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, scale=scale, implementation="xla")
    if lengths is None:
        return out
    # The queries past `lengths` as zeros here, so that a caller reading them is seen off the GPU too.
    return jnp.where((jnp.arange(q.shape[1])[None, :] < lengths[:, None])[:, :, None, None], out, 0).astype(out.dtype)


def query_slots(t: int, index) -> jax.Array:
    """int32 `[batch or 1, t]`: the cache slot of each of a step's `t` queries, for a step written at `index`: an int
    (or a scalar array) shared by every row, or int32 `[batch]`, each row's own slot (the engine's slot cache,
    jaxvlm.engine). A cached step's masks compare key slots with these."""
    return jnp.arange(t, dtype=jnp.int32)[None, :] + jnp.reshape(jnp.asarray(index, jnp.int32), (-1, 1))


def write_step(cache: jax.Array, new: jax.Array, index, lead: tuple = ()) -> jax.Array:
    """`cache [*lead axes, batch, slots, ...]` with a step's `new [batch, t, ...]` written at entry `lead` (indices of
    the leading axes, e.g. a layer), slots index..index+t-1. `index`: an int or a scalar for every row (a prompt, or
    one token of an aligned batch), or int32 `[batch]`, each row's slot (then `t` is 1); a slot past the end is
    dropped."""
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        z = jnp.int32(0)
        return jax.lax.dynamic_update_slice(cache, new[(None,) * len(lead)],
                                            (*lead, z, jnp.asarray(index, jnp.int32), *(z,) * (new.ndim - 2)))
    if new.shape[1] != 1:
        raise ValueError(f"a step of {new.shape[1]} tokens with a slot per row: only one token per row is supported")
    return cache.at[(*lead, jnp.arange(new.shape[0]), index)].set(new[:, 0], mode="drop")


# A decode step's attention over the stacked cache (`cached_attention`) by the Pallas kernel
# jaxvlm.kernels.decode_attention (the cache writes and the attention in one kernel per layer): "auto" (the default),
# "on", "interpret" or "off", as `kernels.kernel_on` reads them; never under `activation_layout`'s mesh. Read at
# trace time.
decode_attention_kernel = os.environ.get("JAXVLM_DECODE_ATTENTION", "auto")


def _decode_kernel_takes(q, k_cache, layer, mask) -> bool:
    """Whether a step over entry `layer` of `k_cache` goes through the decode kernel: allowed by
    `decode_attention_kernel`, one device (no `activation_layout` mesh), a step the kernel supports."""
    return (kernel_on(decode_attention_kernel) and _layout["mesh"] is None
            and decode_attention.supported(q, k_cache, layer, mask))


def cached_attention(q, k, v, kv, index, layer, mask, scale: float | None = None):
    """A cached step's attention: `k, v [batch, t, kv_heads, head_dim]` written into the stacked cache `kv = (k, v)`
    (each `[layers, batch, slots, kv_heads, head_dim]`) at entry `layer`, slots `index`.. (see `write_step`), and `q
    [batch, t, heads, head_dim]` attending that entry's slots under `mask` (broadcastable to [batch, heads, t, slots]).
    Returns (out [batch, t, heads, head_dim], kv). A one-token step with a static layer goes through the Pallas kernel
    where `decode_attention_kernel` allows it (the writes and the attention in one kernel)."""
    if _decode_kernel_takes(q, kv[0], layer, mask):
        out, kc, vc = decode_attention.decode_attention(q, k, v, kv[0], kv[1], int(layer), index, mask, scale=scale,
                                                        interpret=decode_attention_kernel == "interpret")
        return out, (kc, vc)
    return cached_attention_xla(q, k, v, kv, index, layer, mask, scale)


def cache_attention(q, kv, layer, mask, scale: float | None = None):
    """`q [batch, t, heads, head_dim]` attending entry `layer` of stacked caches `kv = (k, v)` (each `[layers, batch,
    slots, kv_heads, head_dim]`) under `mask`, the caches only read: keys and values cached once per prompt, as
    cross-attention's image keys. A one-token step with a static layer reads the entry in place by the decode kernel
    (`decode_attention.attend`) where `decode_attention_kernel` allows it; else `attention` over the entry (on a GPU
    XLA lays that entry out again for its products: a copy of it every step)."""
    if _decode_kernel_takes(q, kv[0], layer, mask):
        return decode_attention.attend(q, kv[0], kv[1], int(layer), mask, scale=scale,
                                       interpret=decode_attention_kernel == "interpret")
    return attention(q, kv[0][layer], kv[1][layer], mask, scale=scale)


def cached_attention_xla(q, k, v, kv, index, layer, mask, scale: float | None = None):
    """`cached_attention` by XLA: the writes (`write_step`) and `attention` over entry `layer` of the caches (`layer`
    None: caches without the layer axis). The decode kernel's reference."""
    lead = () if layer is None else (layer,)
    kv = (write_step(kv[0], k, index, lead), write_step(kv[1], v, index, lead))
    keys, values = kv if layer is None else (kv[0][layer], kv[1][layer])
    return attention(q, keys, values, mask, scale=scale), kv


def pad_to_even(q, k, v):
    """(q, k, v, query lengths, key lengths) with one zero token appended to an odd query axis and to an odd key
    axis, the lengths `[batch]` the real ones (cuDNN masks the added key by them, without a bias array): cuDNN's
    backward takes even lengths only."""
    def pad(x):
        return jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))
    b = q.shape[0]
    return (pad(q), pad(k), pad(v), jnp.full((b,), q.shape[1], jnp.int32), jnp.full((b,), k.shape[1], jnp.int32))


def padded_attention(q, k, v, q_lengths, kv_lengths, n_queries: int, scale, implementation: str) -> jax.Array:
    """Attention over `pad_to_even`'s arrays: the first `n_queries` rows (the added query's dropped)."""
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, query_seq_lengths=q_lengths,
                                       key_value_seq_lengths=kv_lengths, implementation=implementation)
    return out[:, :n_queries]


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """`x [n, ...]` with a zero row appended, taken at `index [*idx]` -> `[*idx, ...]`.

    `inverse [n]` is where each row of x sits in the flattened index (x's rows appear there at most once;
    `index.size` for a row that does not appear). The transpose is then a gather as well, rather than
    the scatter-add that autodiff would make of it.
    """
    return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])[index]


def _gather_rows_fwd(x, index, inverse):
    return gather_rows(x, index, inverse), (index, inverse)


def _gather_rows_bwd(res, g):
    index, inverse = res
    flat = index.reshape(-1)
    return gather_rows(g.reshape(flat.shape[0], *g.shape[index.ndim:]), inverse, flat), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def scatter_rows(h: jax.Array, pos: jax.Array, rows: jax.Array) -> jax.Array:
    """`h [b, t, d]` with `rows [n, d]` written at the flat token indices `pos [n]` (the image features at the image
    tokens). Every index at most once; those from b * t on (a collator's padding rows) are dropped. Declared unique
    to the scatter: autodiff of a scatter that may overlap scatters a uint32 id per element (`[b * t, d]`, to tell
    which update won) and keeps the ids through the backward (25 MB at the peak of the Qwen2-VL-2B batch-8 step)."""
    b, t, d = h.shape
    return h.reshape(b * t, d).at[pos].set(rows.reshape(-1, d).astype(h.dtype), mode="drop",
                                           unique_indices=True).reshape(b, t, d)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array, *,
                      contiguous: bool = False) -> jax.Array:
    """Attention of packed tokens `q, k, v [tokens, heads, head_dim]` within segments only.

    index [segments, length]: the token positions of each segment (each token in one segment), padded
    at the end with `tokens` (out of range). Tokens are gathered into one padded row per segment,
    attended with the row's length, and gathered back, so the cost is the sum of the segments' squared
    lengths rather than the square of all tokens. `contiguous`: the caller guarantees that the rows are
    consecutive runs of positions, in order (as `qwen_vision.segment_index` builds them); then, when the
    segments fill all tokens at equal length (same-size images), the gathers are reshapes.
    """
    n = q.shape[0]
    if contiguous and index.shape[0] * index.shape[1] == n:
        out = attention(*(x.reshape(*index.shape, *x.shape[1:]) for x in (q, k, v)))
        return out.reshape(q.shape)
    flat = index.reshape(-1)
    inverse = jnp.full((n,), flat.shape[0], jnp.int32).at[flat].set(
        jnp.arange(flat.shape[0], dtype=jnp.int32), mode="drop")
    lengths = jnp.sum(index < n, axis=-1).astype(jnp.int32)
    rows = [gather_rows(x, index, inverse) for x in (q, k, v)]
    out = attention(*rows, lengths=lengths)  # [segments, length, heads, head_dim]
    return gather_rows(out.reshape(flat.shape[0], *q.shape[1:]), inverse, flat)


# Randomness of a training step (LoRA dropout). The trainer opens `dropout_key(key)` around the loss;
# each draw takes its own key: the step's key, folded with the layer index inside a layer scan and with
# a counter of the draws traced so far (the same in the forward pass and in its rematerialization).
_dropout: dict = {"key": None, "draws": 0}


def dropout_key(key: jax.Array | None):
    """Within this context, `next_dropout_key()` gives fresh keys derived from `key` (None: no dropout)."""
    return _setting(_dropout, key=key, draws=0)


def next_dropout_key() -> jax.Array | None:
    """A key for one dropout draw, or None outside `dropout_key` (inference, evaluation)."""
    if _dropout["key"] is None:
        return None
    _dropout["draws"] += 1
    return jax.random.fold_in(_dropout["key"], _dropout["draws"])


# Rematerialization of scanned blocks (jax.checkpoint per block):
#   full: keep only each block's input, recompute the rest in the backward pass;
#   attention: also keep each fused attention's output and softmax statistics, so that the backward pass runs no
#     attention forward again (one [tokens, heads x head_dim] array and a float32 [heads, tokens] per layer);
#   dots: also keep matmul outputs (less recompute, more memory);
#   offload: keep block inputs in pinned host memory (Unsloth's use_gradient_checkpointing="unsloth").
REMAT_POLICIES = ("full", "attention", "dots", "offload")
# The primitives that cuDNN's fused attention (jax.nn.dot_product_attention, implementation="cudnn") binds in its
# forward rule: their outputs are the attention's output and its softmax statistics, the backward's residuals.
# jaxvlm.kernels.flash_attention names its own (flash_attention.RESIDUAL_NAME).
CUDNN_ATTENTION_FORWARD = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd")


def _attention_forward(prim, *_, **__) -> bool:
    return prim.name in CUDNN_ATTENTION_FORWARD


def checkpoint_policy(name: str):
    """The jax.checkpoint policy of a REMAT_POLICIES name (blocks name their input "block_input")."""
    policies = jax.checkpoint_policies
    if name == "full":
        return policies.nothing_saveable
    if name == "attention":
        return policies.save_from_both_policies(_attention_forward,
                                                policies.save_only_these_names(flash_attention.RESIDUAL_NAME))
    if name == "dots":
        return policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=["block_input"],
            offload_src="device", offload_dst="pinned_host")
    raise ValueError(f"remat policy {name!r}: expected one of {REMAT_POLICIES}")


# "layers": while unrolled, each layer's NF4 weight (a static slice of the stacked one) by the id of its codes ->
# (those codes, the stacked NF4, the layer), so that the NF4 kernel reads the layer in place: a slice that feeds a
# custom call is copied out first (twice the codes' traffic). The codes are held, so that no id is reused meanwhile.
_unroll = {"on": False, "layers": None}


def unrolled_layers():
    """While a program traces inside it, `scan_blocks` unrolls its loop over the layers (generation's decode step:
    the layers' weights become static slices, and XLA schedules the step's few hundred small kernels as one
    sequence; 2B geometry, batch 1: 591 -> 643 decode tokens/s in bf16, 464 -> 506 in NF4)."""
    return _setting(_unroll, on=True, layers={})


def unrolling() -> bool:
    """Whether a program tracing now is inside `unrolled_layers` (a family with its own layer loop unrolls it too)."""
    return _unroll["on"] and _dropout["key"] is None


def _in_place(w: NF4) -> tuple[NF4, int | None]:
    """(the stacked NF4, the layer) that `w` was sliced from by an unrolled `scan_blocks`; else (w, None)."""
    entry = (_unroll["layers"] or {}).get(id(w.codes))
    if entry is None or entry[0] is not w.codes:
        return w, None
    return entry[1], entry[2]


def _unrolled_scan(stack: nnx.Module, carry, fn, per_layer: tuple):
    """scan_blocks' loop unrolled in Python: layer i's module holds static slices of the stacked params (each NF4
    weight's slice noted in `_unroll["layers"]`)."""
    graphdef, state = nnx.split(stack)
    n = jax.tree.leaves(state)[0].shape[0]

    def layer(value, i):
        if isinstance(value, NF4):
            sliced = jax.tree.map(lambda a: a[i], value)
            _unroll["layers"][id(sliced.codes)] = (sliced.codes, value, i)
            return sliced
        return value[i]

    ys = []
    for i in range(n):
        block = nnx.merge(graphdef, jax.tree.map(lambda v: layer(v, i), state, is_leaf=lambda v: isinstance(v, NF4)))
        carry, y = fn(block, carry, *(jax.tree.map(lambda a: a[i], p) for p in per_layer))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def scan_blocks(stack: nnx.Module, carry, fn, *per_layer, remat: str | None = None):
    """Runs `carry, y = fn(block, carry, *per_layer_slices)` over the leading (layer) axis of a stacked
    module; returns the final carry and the per-layer outputs stacked (pytrees are fine for both).
    With `remat` (a REMAT_POLICIES name) each block is rematerialized in the backward pass; inside
    `unrolled_layers()` the loop is unrolled."""
    body = fn
    if remat is not None:
        def named(block, c, *xs):
            return fn(block, checkpoint_name(c, "block_input"), *xs)
        body = nnx.remat(named, policy=checkpoint_policy(remat), prevent_cse=False)

    if unrolling() and remat is None:
        return _unrolled_scan(stack, carry, fn, per_layer)
    # With dropout, each layer folds its index into the step's key, so layers draw different masks.
    key = _dropout["key"]
    index = () if key is None else (jnp.arange(jax.tree.leaves(nnx.state(stack))[0].shape[0]),)

    @nnx.scan(in_axes=(0, nnx.Carry, *(0,) * (len(index) + len(per_layer))), out_axes=(nnx.Carry, 0),
              unroll=True if _unroll["on"] else 1)
    def step(block, c, *xs):
        if key is None:
            return body(block, c, *xs)
        with dropout_key(jax.random.fold_in(key, xs[0])):
            return body(block, c, *xs[1:])
    return step(stack, carry, *index, *per_layer)
