"""LoRA as a transform of the param tree: chosen Linear weights become `LoRA(base, lora_A, lora_B)`.

Targets are the per-layer HF module names of the model's Linear layers (`linear_modules`), chosen as
Unsloth and PEFT choose them (jaxvlm.targets), and the per-layer HF parameter names of mixture-of-experts
weights (`expert_params`, PEFT's `target_parameters`). Stacked weights ([layers, out, in]) carry a
per-layer `mask`, so a choice of some layers adapts only those. Nothing here reads or writes files: PEFT
adapter directories are jaxvlm.converters.peft_adapter.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
from flax import nnx

from jaxvlm.kernels import lora_matmul, one_device_on
from jaxvlm.kernels.lora_matmul import InSibling, Widened
from jaxvlm.layers import Experts, Linear, dense_weight, grouped_linear, linear, next_dropout_key
from jaxvlm.paths import layer_key, path_key, stacked_prefix
from jaxvlm.quant import NF4, Int8, quantize_int8, quantize_nf4
from jaxvlm.targets import get_peft_regex, moe_target_parameters, select_modules, select_parameters


# Rows from which a narrowing adapted Linear may take lora_matmul.adapted_linear (training, prefill); fewer (a decode
# step) keep `linear`'s own paths for the base product (its one-row reduction, the NF4 decode kernel).
ADAPTED_MIN_ROWS = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA:
    """base [*stack, out, in] (array, NF4 or Int8, frozen) + scale * lora_B [*stack, out, r] @ lora_A [*stack, r, in].

    `mask [*stack]` is 1.0 on the layers the adapter applies to (None for an unstacked weight). The LoRA
    factors are fp32; products are formed in the input's dtype. `dropout` applies to the adapter's input
    inside `layers.dropout_key` (the trainer's step), never in inference.

    On the experts of a mixture (layers.Experts: base [*stack, experts, out, in]) the experts axis is one more
    stack axis: each expert has its own A [r, in] and B [out, r] (PEFT's ParamWrapper; its adapter files
    hold them interleaved, converters.peft_adapter), `mask [*stack, experts]`, and `grouped_linear` forms
    the product.
    """

    base: Any
    lora_A: jax.Array
    lora_B: jax.Array
    mask: jax.Array | None = None
    scale: float = dataclasses.field(metadata={"static": True})
    dropout: float = dataclasses.field(default=0.0, metadata={"static": True})

    @property
    def stack_ndim(self) -> int:
        return self.lora_A.ndim - 2

    def linear(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out] for one layer (inside the layer scan)."""
        xd = x
        key = next_dropout_key() if self.dropout else None
        if key is not None:  # training: dropout on the adapter's input, as PEFT applies it
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            xd = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        scale = self.scale if self.mask is None else self.scale * self.mask.astype(x.dtype)
        rows = math.prod(x.shape[:-1])
        in_f, out_f = x.shape[-1], self.lora_B.shape[0]
        if key is None and rows >= ADAPTED_MIN_ROWS and rows * (in_f - out_f) > out_f * in_f:
            # Narrowing (k/v, fc2, down) where the adapter's own share of dx (rows x in, written and read once
            # more) outweighs what forming dx in one matmul copies (the weight, out x in, and the output's
            # cotangent, rows x out): the two products, with that backward (lora_matmul.adapted_linear). Never a
            # square Linear (q/o, proj), nor a wide one over few rows (docs/BENCHMARKS.md, "The adapter's share").
            return lora_matmul.adapted_linear(x, dense_weight(self.base, x.dtype), self.lora_A, self.lora_B, scale)
        # Many rows (training, prefill), a count XLA would pad: the adapter's skinny products by the Pallas kernels.
        skinny = lora_matmul.kernels_for(rows)
        a, b = self.lora_A.astype(x.dtype), self.lora_B.astype(x.dtype)
        xa = (lora_matmul.lora_in(xd, a) if skinny else linear(xd, a)) * scale  # [..., r]: scaled here
        # Widening (qkv, fc1, gate/up) over many rows (training, prefill): one matmul over [x | xa];
        # copying the narrow input into the concatenation costs less than a second pass over the wide
        # output. Few rows (a decode step, where copying the weight into [w | b] would cost more than the
        # product), or dropout on the adapter's input: two products and an add (docs/BENCHMARKS.md, "LoRA
        # product").
        # A base the trainer keeps as [w | b] (`widen`) takes it whatever the rows: any other product would copy w out.
        widened = isinstance(self.base, Widened)
        if widened or (in_f < out_f and rows >= in_f):
            return lora_matmul.concat_linear(x, xa, self.base if widened else dense_weight(self.base, x.dtype), b)
        return linear(x, self.base) + (lora_matmul.lora_out(xa, b) if skinny else linear(xa, b))

    def sibling_linear(self, x: jax.Array, siblings: list) -> list[jax.Array] | None:
        """x [..., in] through this adapted Linear and the others of `siblings` (this one first) that read the same x
        (q/k/v, gate/up), as one widening product: [x | xa] @ [w | b_bd]^T with w the weights stacked along out, xa =
        x [A_1; A_2; ...]^T (one pass over x for every adapter; scaled per sibling) and b_bd the B's block-diagonal
        [out_1 + out_2 + ..., r_1 + r_2 + ...]. Its backward forms dx (base and adapters') and every dxa from one
        product over g, and every dA from one pass over x. None where it does not apply (layers.sibling_linears then
        forms each product on its own): a sibling without an adapter, dropout on the adapters' input, fewer rows
        than `in` (a decode step), or outputs narrower in all than the input. Siblings whose bases the trainer keeps
        in one `Widened` buffer (`widen`) always take this product, over that buffer."""
        rows, in_f = math.prod(x.shape[:-1]), x.shape[-1]
        widened = isinstance(self.base, Widened) and len(self.base.parts) > 1
        if widened and len(self.base.parts) != len(siblings):
            raise ValueError(f"a widened base of {len(self.base.parts)} sibling Linears called with {len(siblings)}: "
                             f"the module's SIBLINGS must name the Linears it passes to layers.sibling_linears")
        if not widened and (not all(isinstance(w, LoRA) and not w.dropout and w.lora_A.ndim == 2 for w in siblings)
                or rows < in_f or sum(w.lora_B.shape[0] for w in siblings) <= in_f):
            return None
        ranks = [w.lora_A.shape[0] for w in siblings]
        scales = [w.scale if w.mask is None else w.scale * w.mask for w in siblings]
        scale = jnp.concatenate([jnp.broadcast_to(jnp.asarray(s, x.dtype), (r,)) for s, r in zip(scales, ranks)])
        a = jnp.concatenate([w.lora_A for w in siblings]).astype(x.dtype)
        b = jax.scipy.linalg.block_diag(*(w.lora_B.astype(x.dtype) for w in siblings))
        weights = self.base if widened else tuple(dense_weight(w.base, x.dtype) for w in siblings)
        xa = (lora_matmul.lora_in(x, a) if lora_matmul.kernels_for(rows) else linear(x, a)) * scale
        y = lora_matmul.concat_linear(x, xa, weights, b)
        return jnp.split(y, np.cumsum([w.lora_B.shape[0] for w in siblings])[:-1], axis=-1)

    def grouped_linear(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """x [m, in] (rows sorted by expert) -> [m, out] for one layer's experts: base, plus each expert's
        scale * x A^T B^T, as two more grouped products (never the [experts, out, in] delta)."""
        scale = self.scale if self.mask is None else self.scale * self.mask.astype(x.dtype)[:, None, None]
        a = (self.lora_A.astype(x.dtype) * scale).astype(x.dtype)
        return (grouped_linear(x, self.base, group_sizes)
                + grouped_linear(grouped_linear(x, a, group_sizes), self.lora_B.astype(x.dtype), group_sizes))

    def dequantize(self, dtype=None) -> jax.Array:
        """The merged weight base + scale * B @ A [out, in] of one layer, in `dtype`."""
        dtype = dtype or jnp.float32
        delta = self.scale * (self.lora_B @ self.lora_A)
        if self.mask is not None:
            delta = delta * self.mask
        return (dense_weight(self.base, jnp.float32) + delta).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Which modules.


def linear_modules(model: nnx.Module) -> dict[str, tuple[str, int | None]]:
    """{HF module name: (our Linear's path, layer index or None)} for every Linear, layers expanded."""
    stacked = model.stacks()
    names = {}
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, Linear):
            continue
        ours = path_key(path)
        prefix = stacked_prefix(ours, stacked)
        if prefix is None:
            names[ours] = (ours, None)
            continue
        n = jax.tree.leaves(module.weight.get_value())[0].shape[0]  # layers (any weight type)
        for i in range(n):
            names[layer_key(ours, i, stacked)] = (ours, i)
    return names


def expert_params(model: nnx.Module) -> dict[str, tuple[str, int | None]]:
    """{HF parameter name: (our param path, layer index or None)} for the weights of every layers.Experts
    (`model.language_model.layers.3.mlp.experts.gate_up_proj`), layers expanded, in the order of
    Experts.WEIGHTS within each module (the order PEFT nests its wrappers in)."""
    stacked = model.stacks()
    names = {}
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, Experts):
            continue
        ours = path_key(path)
        prefix = stacked_prefix(ours, stacked)
        n = None if prefix is None else jax.tree.leaves(module.gate_up_proj.get_value())[0].shape[0]
        for i in [None] if n is None else range(n):
            module_name = layer_key(ours, i, stacked)
            for w in Experts.WEIGHTS:
                names[f"{module_name}.{w}"] = (f"{ours}.{w}", i)
    return names


def lora_targets(model: nnx.Module) -> dict[str, tuple[str, int | None]]:
    """{HF name: (our param path, layer)} of everything LoRA can adapt: Linear modules by module name (their
    `.weight`), expert weights by parameter name."""
    targets = {name: (f"{ours}.weight", i) for name, (ours, i) in linear_modules(model).items()}
    targets.update(expert_params(model))
    return targets


# ----------------------------------------------------------------------------------------------
# The transform.

# PEFT's init_lora_weights values this implements. True: A as nn.Linear's default init (kaiming
# uniform), B = 0. False: A and B both as nn.Linear's default (the adapter is not the identity: people
# use it to test adapters). "gaussian": A ~ N(0, 1/r^2), B = 0. "pissa": A, B from the top-r SVD of the
# base weight, the base keeps the residual (PEFT refuses quantized bases). "olora": A, B from the QR
# of the base weight, residual base (a quantized base is dequantized, then the residual re-quantized).
INIT_LORA_WEIGHTS = (True, False, "gaussian", "pissa", "olora")


def _uniform(rng: np.random.Generator, shape, fan_in) -> jax.Array:
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return jnp.asarray((rng.random(shape, np.float32) * 2 - 1) * np.float32(bound))


def _pissa(w: jax.Array, r: int, scale: float):
    """(A [r, in], B [out, r]) with scale * B @ A the best rank-r part of w [out, in] (PEFT's pissa_init)."""
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:r] / scale)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def _olora(w: jax.Array, r: int, scale: float):
    """(A [r, in], B [out, r]) = (R[:r], Q[:, :r]) of w's reduced QR (PEFT's olora_init)."""
    q, rr = jnp.linalg.qr(w)
    return rr[:r], q[:, :r]


def _init_factors(rng, base, stack, out_f, in_f, r, scale, init, layer_mask, where, b_fan_in=None):
    """(lora_A, lora_B, base) for one weight; `base` changes only for pissa / olora (the residual).
    `b_fan_in`: the fan-in of B's default init (r; PEFT's expert wrappers hold B as one [out, r * experts]).
    The random factors are drawn on the host (`rng`, numpy) and sent to the device: drawn with jax.random, each
    factor shape compiled a program of its own, a few seconds of a training script's start."""
    zeros = lambda: jnp.asarray(np.zeros((*stack, out_f, r), np.float32))  # noqa: E731
    if init in (True, False):
        a = _uniform(rng, (*stack, r, in_f), in_f)
        b = _uniform(rng, (*stack, out_f, r), b_fan_in or r) if init is False else zeros()
        return a, b, base
    if init == "gaussian":
        return jnp.asarray(rng.standard_normal((*stack, r, in_f), np.float32) / np.float32(r)), zeros(), base
    if init == "pissa" and isinstance(base, (NF4, Int8)):
        raise ValueError(f"init_lora_weights='pissa' on {where}: its base weight is quantized. As in PEFT, "
                         f"PiSSA needs a float base: load with load_in_4bit=False (and load_in_8bit=False), "
                         f"initialise, then quantize the residual model")
    factor = jax.jit(jax.vmap(_pissa if init == "pissa" else _olora, in_axes=(0, None, None)),
                     static_argnums=(1, 2))
    w = dense_weight(base, jnp.float32).reshape(-1, out_f, in_f)
    a, b = factor(w, r, scale)
    a, b = a.reshape(*stack, r, in_f), b.reshape(*stack, out_f, r)
    delta = scale * jnp.einsum("...or,...ri->...oi", b, a)
    if layer_mask is not None:  # only the chosen layers carry an adapter, so only theirs lose its part
        delta = delta * layer_mask[:, None, None]
    residual = dense_weight(base, jnp.float32) - delta
    if isinstance(base, NF4):
        quantize = quantize_nf4
        for _ in stack:
            quantize = jax.vmap(quantize)
        residual = quantize(residual.astype(base.dtype))
    elif isinstance(base, Int8):
        residual = quantize_int8(residual.astype(base.dtype))
    else:
        residual = residual.astype(base.dtype)
    return a, b, residual


def add_lora(model, chosen: list[str], r: int, scale: float, init_lora_weights=True, random_state: int = 3407,
             dropout: float = 0.0):
    """The model with the weights of `chosen` HF names (lora_targets: Linear module names, expert parameter
    names) wrapped in LoRA."""
    if init_lora_weights not in INIT_LORA_WEIGHTS or isinstance(init_lora_weights, int) and not isinstance(
            init_lora_weights, bool):
        raise ValueError(f"init_lora_weights={init_lora_weights!r}: expected one of "
                         f"{', '.join(map(repr, INIT_LORA_WEIGHTS))} (loftq, eva, corda and the other PEFT "
                         f"initialisations are not supported)")
    targets = lora_targets(model)
    experts = {ours for ours, _ in expert_params(model).values()}
    layers: dict[str, list[int | None]] = {}
    for name in chosen:
        ours, i = targets[name]
        layers.setdefault(ours, []).append(i)
    if dropout and experts & set(layers):
        raise ValueError(f"lora_dropout={dropout}: LoRA on expert weights ({', '.join(sorted(experts & set(layers)))}) "
                         f"needs lora_dropout=0, as in PEFT (the dropped input cannot be factored out of the experts' "
                         f"grouped product)")
    graphdef, state = nnx.split(model)
    flat = []
    for index, (path, var) in enumerate(nnx.to_flat_state(state)):
        ours = path_key(path)
        if ours not in layers:
            flat.append((path, var))
            continue
        base = var.get_value()
        where = ours.removesuffix(".weight")
        if isinstance(base, LoRA):
            raise ValueError(f"{where} already has a LoRA adapter")
        shape = jax.eval_shape(lambda w: dense_weight(w, jnp.float32), base).shape
        *stack, out_f, in_f = shape
        groups = stack.pop() if ours in experts else None  # the experts axis: one more stack axis, never masked
        mask = None
        if stack:
            mask = np.zeros(stack, np.float32)
            mask[[i for i in layers[ours]]] = 1.0
        elif groups:
            mask = np.ones((), np.float32)
        if groups:
            if init_lora_weights in ("pissa", "olora"):
                raise ValueError(f"init_lora_weights={init_lora_weights!r} on the expert weight {where}: only True, "
                                 f"False and 'gaussian' initialise expert adapters (PEFT's too)")
            mask = np.broadcast_to(mask[..., None], (*stack, groups))
            stack.append(groups)
        mask = None if mask is None else jnp.asarray(mask)
        rng = np.random.default_rng((random_state, index))
        a, b, base = _init_factors(rng, base, tuple(stack), out_f, in_f, r, scale, init_lora_weights, mask, where,
                                   b_fan_in=r * groups if groups else None)
        flat.append((path, var.replace(LoRA(base=base, lora_A=a, lora_B=b, mask=mask, scale=scale,
                                            dropout=dropout))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: int = 16, lora_dropout: float = 0.0,
                   bias: str = "none", finetune_vision_layers: bool = True, finetune_language_layers: bool = True,
                   finetune_attention_modules: bool = True, finetune_mlp_modules: bool = True,
                   layers_to_transform=None, layers_pattern=None, use_gradient_checkpointing="unsloth",
                   random_state: int = 3407, max_seq_length: int = 2048, use_rslora: bool = False,
                   modules_to_save=None, init_lora_weights=True, loftq_config={},  # noqa: B006
                   target_parameters=None, **kwargs):
    """Unsloth's `FastVisionModel.get_peft_model`: the model with LoRA on the chosen Linear weights.

    Only the LoRA factors (and `modules_to_save`) are trainable afterwards. `lora_dropout` drops the
    adapters' inputs in training steps (SFTTrainer), as PEFT does; Unsloth's default, and advice, is 0.
    `init_lora_weights` takes PEFT's values listed in INIT_LORA_WEIGHTS.

    `target_parameters` (PEFT's): expert weights of a mixture of experts to adapt, by parameter name or
    suffix (`["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`); left None, Unsloth's choice
    (jaxvlm.targets.moe_target_parameters): the experts' weights whose MLP the targets ask for, `[]` for none.
    """
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r}: expected a positive int")
    if bias != "none":
        raise NotImplementedError(f"bias={bias!r}: only 'none' is supported")
    if loftq_config:
        raise NotImplementedError("loftq_config is not supported")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={lora_dropout!r}: expected a probability in [0, 1)")
    modules = linear_modules(model)
    params = list(expert_params(model))
    if target_parameters is None:
        target_parameters = moe_target_parameters(params, target_modules, finetune_language_layers,
                                                  finetune_mlp_modules)
    if target_modules is None:
        target_modules = get_peft_regex(list(modules), finetune_vision_layers, finetune_language_layers,
                                        finetune_attention_modules, finetune_mlp_modules)
    chosen = select_modules(list(modules), target_modules, layers_to_transform, allow_none=bool(target_parameters))
    chosen_params = select_parameters(params, target_parameters, layers_to_transform)
    if chosen_params and layers_to_transform is not None:
        # PEFT applies layers_to_transform to target_modules only: name each chosen parameter (as Unsloth does).
        target_parameters = chosen_params
    scale = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
    model = add_lora(model, chosen + chosen_params, r, scale, init_lora_weights, random_state, float(lora_dropout))
    model.peft_config = config_string({
        "peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "bias": bias,
        "target_modules": target_modules if isinstance(target_modules, str) else sorted(target_modules),
        "target_parameters": list(target_parameters) if target_parameters else None,
        "use_rslora": use_rslora, "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "layers_to_transform": layers_to_transform, "init_lora_weights": init_lora_weights,
        "base_model_name_or_path": getattr(model, "name_or_path", None), "task_type": None,
    })
    model.modules_to_save = tuple(modules_to_save or ())
    if modules_to_save:
        missing = [m for m in modules_to_save if not any(
            re.search(rf"(^|\.){re.escape(m)}(\.|$)", path_key(p)) for p, _ in nnx.to_flat_state(nnx.state(model)))]
        if missing:
            raise ValueError(f"modules_to_save: no module named {missing}")
    if use_gradient_checkpointing is not None:
        model.use_gradient_checkpointing = use_gradient_checkpointing
    return model


def config_string(config: dict) -> str:
    # Kept as a JSON string: module attributes must be hashable (they are part of the NNX graph).
    return json.dumps(config)


def has_lora(model) -> bool:
    return any(isinstance(v.get_value(), LoRA) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def is_trainable_path(path, modules_to_save=()) -> bool:
    """For a key path of the model's state pytree: a LoRA factor, or a param of a modules_to_save module."""
    names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    if names and names[-1] in ("lora_A", "lora_B"):
        return True
    return any(str(n) in modules_to_save for n in names)


def trainable_filter(model):
    """The predicate the trainer uses for `model`: LoRA factors plus modules_to_save."""
    keep = tuple(getattr(model, "modules_to_save", ()) or ())
    return lambda path: is_trainable_path(path, keep)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts as PEFT reports them: masked-out layers' factors not counted."""
    keep = tuple(getattr(model, "modules_to_save", ()) or ())
    trainable = total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        if isinstance(value, LoRA):
            n_layers = 1 if value.mask is None else int(np.asarray(value.mask).sum())
            per_layer = int(np.prod(value.lora_A.shape[-2:]) + np.prod(value.lora_B.shape[-2:]))
            trainable += per_layer * n_layers
            shape = jax.eval_shape(lambda w: dense_weight(w, jnp.float32), value.base).shape
            total += int(np.prod(shape)) + per_layer * n_layers
        else:
            n = int(np.prod(jax.eval_shape(lambda w: dense_weight(w, jnp.float32), value).shape))
            total += n
            if any(k in keep for k in path_key(path).split(".")):
                trainable += n
    return trainable, total


def print_trainable_parameters(model) -> None:
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


# ----------------------------------------------------------------------------------------------
# Merge and strip.


def merge(model, dtype=None):
    """The model with every LoRA folded into its weight: base + scale * B @ A, in `dtype` (default: the
    model's dtype); NF4 / Int8 bases come back as 16-bit weights."""
    dtype = dtype or model.dtype
    return _map_lora(model, lambda w: dense_weight(w, dtype))


def unmerge(model):
    """The model with every LoRA removed (its base weight back, untouched)."""
    return _map_lora(model, lambda w: w.base)


def _map_lora(model, fn):
    graphdef, state = nnx.split(model)
    flat = [(p, v.replace(fn(v.get_value())) if isinstance(v.get_value(), LoRA) else v)
            for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------------------------
# Widened bases: the trainer's in-place [w | b] operands.


def _sites(model) -> list[list[Linear]]:
    """Each group of adapted Linears whose bases one `Widened` buffer holds (the first Linear's base), in the model's
    module order: a module's SIBLINGS, then single Linears."""
    sites = []
    for _, module in nnx.iter_modules(model):
        groups = [[getattr(module, n) for n in names] for names in getattr(module, "SIBLINGS", ())]
        groups += [[module]] if isinstance(module, Linear) else []
        for linears in groups:
            first = linears[0].weight.get_value()
            if isinstance(first, LoRA) and isinstance(first.base, Widened) and len(first.base.parts) == len(linears):
                sites.append(linears)
    return sites


def _widenable(linears: list[Linear], siblings: bool) -> bool:
    """Adapted Linears over plain floating bases of one dtype, in a group whose product widens (outputs wider than the
    input: LoRA.linear's `concat_linear` case). Siblings besides: sibling products on, no dropout (LoRA.sibling_linear
    takes them together)."""
    from jaxvlm.layers import sibling_products
    weights = [m.weight.get_value() for m in linears]
    if not all(isinstance(w, LoRA) and isinstance(w.base, jax.Array) and jnp.issubdtype(w.base.dtype, jnp.floating)
               and w.base.dtype == weights[0].base.dtype for w in weights):
        return False
    if siblings and (not one_device_on(sibling_products) or any(w.dropout for w in weights)):
        return False
    return sum(w.base.shape[-2] for w in weights) > weights[0].base.shape[-1]


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _put_rows(buf: jax.Array, w: jax.Array, start: int) -> jax.Array:
    """buf with w [*stack, n, in] written at rows start.. and columns 0.. (in place: buf is donated)."""
    return jax.lax.dynamic_update_slice(buf, w.astype(buf.dtype), (0,) * (buf.ndim - 2) + (start, 0))


def _room(nbytes: int, w: jax.Array) -> bool:
    """Whether w's device has `nbytes` free beside what is in use (the buffer and the weights it is copied from
    live together while it is made); always where the backend reports no limit (the CPU)."""
    stats = [d.memory_stats() or {} for d in w.devices()]
    return all("bytes_limit" not in s or s["bytes_limit"] - s.get("bytes_in_use", 0) > nbytes for s in stats)


def widen(model, keep=()) -> int:
    """In place: the bases of `model`'s widening adapted Linears, and of its modules' adapted SIBLINGS, become
    `Widened` buffers [*stack, out, in + r] (one per group, in its first Linear; the others `InSibling`), their
    weights copied in group by group (a group's weights freed once it is copied, where nothing else holds them; a group
    whose buffer the device has no room for beside them stays as it is). The
    trainer's step writes the adapters' B into them (`fill_widened`); `unwiden` undoes it. Modules under a name of
    `keep` (modules_to_save: trained whole) stay as they are. Returns how many buffers."""
    done, count = set(), 0
    targets = []
    for path, module in nnx.iter_modules(model):
        if any(str(k) in keep for k in path):
            done.update(id(m) for _, m in nnx.iter_modules(module))
            continue
        for names in getattr(module, "SIBLINGS", ()):
            linears = [getattr(module, n) for n in names]
            if _widenable(linears, siblings=True):
                targets.append(linears)
                done.update(map(id, linears))
    targets += [[m] for _, m in nnx.iter_modules(model)
                if isinstance(m, Linear) and id(m) not in done and _widenable([m], siblings=False)]
    for linears in targets:
        loras = [m.weight.get_value() for m in linears]
        base = loras[0].base
        parts = tuple(w.base.shape[-2] for w in loras)
        shape = (*base.shape[:-2], sum(parts), base.shape[-1] + sum(w.lora_B.shape[-1] for w in loras))
        if not _room(math.prod(shape) * base.dtype.itemsize, base):
            continue
        buf = jnp.zeros(shape, base.dtype, device=base.sharding)
        start = 0
        for m, w in zip(linears, loras):
            buf = _put_rows(buf, w.base, start)
            m.weight.set_value(dataclasses.replace(w, base=InSibling(shape=tuple(w.base.shape))))
            start += w.base.shape[-2]
        widened = Widened(buf=buf, parts=parts, in_features=base.shape[-1])
        del base, loras  # the weights, freed here unless something else holds them
        linears[0].weight.set_value(dataclasses.replace(linears[0].weight.get_value(), base=widened))
        count += 1
    return count


def widened_buffers(model) -> list[jax.Array]:
    """The `Widened` buffers of `model`, in the order `fill_widened` returns them."""
    return [linears[0].weight.get_value().base.buf for linears in _sites(model)]


def _block_diag(bs: list[jax.Array]) -> jax.Array:
    """[*stack, sum out_i, sum r_i] with each b_i [*stack, out_i, r_i] on the diagonal."""
    block_diag = jax.scipy.linalg.block_diag
    for _ in range(bs[0].ndim - 2):
        block_diag = jax.vmap(block_diag)
    return block_diag(*bs)


def fill_widened(model) -> list[jax.Array]:
    """In `model` (traced by the trainer's refresh program, the buffers donated to it): each `Widened` buffer with its
    adapters' current B in its last columns, a dynamic_update_slice that XLA does in place. Returns the new buffers
    (`widened_buffers`' order)."""
    filled = []
    for linears in _sites(model):
        loras = [m.weight.get_value() for m in linears]
        wide = loras[0].base
        b = _block_diag([w.lora_B.astype(wide.buf.dtype) for w in loras])
        buf = jax.lax.dynamic_update_slice_in_dim(wide.buf, b, wide.in_features, axis=wide.buf.ndim - 1)
        linears[0].weight.set_value(dataclasses.replace(loras[0], base=dataclasses.replace(wide, buf=buf)))
        filled.append(buf)
    return filled


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _rows(buf: jax.Array, start: int, stop: int, in_features: int) -> jax.Array:
    return buf[..., start:stop, :in_features]


def unwiden(model) -> None:
    """In place: every `Widened` buffer of `model` back to its Linears' plain bases (`widen` undone)."""
    for linears in _sites(model):
        loras = [m.weight.get_value() for m in linears]
        wide, start = loras[0].base, 0
        for m, w, n in zip(linears, loras, wide.parts):
            m.weight.set_value(dataclasses.replace(w, base=_rows(wide.buf, start, start + n, wide.in_features)))
            start += n


def copy_bases(source, target) -> None:
    """In place: `target`'s widened bases (`Widened`, `InSibling`) replaced by `source`'s bases of the same Linears
    (shared, not copied): the model given to a trainer gets its weights back from the trained one."""
    targets = dict(nnx.iter_modules(target))
    for path, module in nnx.iter_modules(source):
        dest = targets.get(path)
        if not isinstance(module, Linear) or not isinstance(dest, Linear):
            continue
        w, d = module.weight.get_value(), dest.weight.get_value()
        if isinstance(d, LoRA) and isinstance(d.base, (Widened, InSibling)):
            dest.weight.set_value(dataclasses.replace(d, base=w.base))
