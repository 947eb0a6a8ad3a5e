"""LoRA as a transform of the param tree: matched Linear weights become `LoRA(base, lora_A, lora_B)`.

Targets are chosen as Unsloth and PEFT choose them: a regex (Unsloth's `get_peft_regex` when
`target_modules` is None) fully matched against transformers' per-layer module names
(`model.language_model.layers.3.self_attn.q_proj`), or a list of names matched by suffix. Stacked
weights ([layers, out, in]) carry a per-layer `mask`, so a regex that picks some layers adapts only
those. Adapters save to and load from PEFT's adapter format (adapter_config.json +
adapter_model.safetensors, keys `base_model.model.<module>.lora_A.weight`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.converters.hf_import import path_key
from jaxvlm.layers import Linear, dense_weight, linear, next_dropout_key

VISION_TAGS = ("vision", "image", "visual", "patch")
LANGUAGE_TAGS = ("language", "text")
ATTENTION_TAGS = ("self_attn", "attention", "attn")
MLP_TAGS = ("mlp", "feed_forward", "ffn", "dense")


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA:
    """base [*stack, out, in] (array, NF4 or Int8, frozen) + scale * lora_B [*stack, out, r] @ lora_A [*stack, r, in].

    `mask [*stack]` is 1.0 on the layers the adapter applies to (None for an unstacked weight). The LoRA
    factors are fp32; products are formed in the input's dtype. `dropout` applies to the adapter's input
    inside `layers.dropout_key` (the trainer's step), never in inference.
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
        xa = linear(xd, self.lora_A.astype(x.dtype)) * scale  # [..., r]: scaled here, B's product stays plain
        b = self.lora_B.astype(x.dtype)
        # Widening (qkv, fc1, gate/up) over many rows (training, prefill): one matmul over [x | xa];
        # copying the narrow input into the concatenation costs less than a second pass over the wide
        # output. Square or narrowing (q/o, k/v, proj, fc2, down), or few rows (a decode step, where
        # copying the weight into [w | b] would cost more than the product): two products and an add
        # (docs/BENCHMARKS.md, "LoRA product").
        rows = math.prod(x.shape[:-1])
        if x.shape[-1] < b.shape[0] and rows >= x.shape[-1]:
            return concat_linear(x, xa, dense_weight(self.base, x.dtype), b)
        return linear(x, self.base) + linear(xa, b)

    def dequantize(self, dtype=None) -> jax.Array:
        """The merged weight base + scale * B @ A [out, in] of one layer, in `dtype`."""
        dtype = dtype or jnp.float32
        delta = self.scale * (self.lora_B @ self.lora_A)
        if self.mask is not None:
            delta = delta * self.mask
        return (dense_weight(self.base, jnp.float32) + delta).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Which modules: per-layer HF names of the model's Linear layers, and Unsloth's regex.


def linear_modules(model: nnx.Module) -> dict[str, tuple[str, int | None]]:
    """{HF module name: (our Linear's path, layer index or None)} for every Linear, layers expanded."""
    from jaxvlm.models import family_for
    stacked = family_for(model.config.model_type, "model.config").STACKED
    names = {}
    for path, module in model.iter_modules():
        if not isinstance(module, Linear):
            continue
        ours = ".".join(str(p) for p in path)
        prefix = next((p for p in stacked if ours.startswith(p + ".")), None)
        if prefix is None:
            names[ours] = (ours, None)
            continue
        n = jax.tree.leaves(module.weight.get_value())[0].shape[0]  # layers (any weight type)
        for i in range(n):
            names[f"{prefix}.{i}.{ours[len(prefix) + 1:]}"] = (ours, i)
    return names


def get_peft_regex(module_names, finetune_vision_layers=True, finetune_language_layers=True,
                   finetune_attention_modules=True, finetune_mlp_modules=True, target_modules=None) -> str:
    """Unsloth's target regex (unsloth_zoo's get_peft_regex) for the given Linear module names.

    Candidates are the leaf names occurring more than once (so lm_head and the merger's one-off
    projections are left out) or `target_modules`; a name must contain a selected part tag (vision /
    language) and component tag (attention / mlp) before the leaf; `model.layers.N.<component>.<leaf>`
    also matches for older language-model naming; without any vision part, part tags are dropped.
    """
    if not finetune_vision_layers and not finetune_language_layers:
        raise ValueError("no layers to finetune: set finetune_vision_layers and/or finetune_language_layers")
    if not finetune_attention_modules and not finetune_mlp_modules:
        raise ValueError("no modules to finetune: set finetune_attention_modules and/or finetune_mlp_modules")
    counts = Counter(name.rsplit(".", 1)[-1] for name in module_names)
    leaves = [leaf for leaf, n in counts.items() if n > 1] if target_modules is None else list(target_modules)
    parts = (VISION_TAGS if finetune_vision_layers else ()) + (LANGUAGE_TAGS if finetune_language_layers else ())
    components = (ATTENTION_TAGS if finetune_attention_modules else ()) + (MLP_TAGS if finetune_mlp_modules else ())
    leaf = "(?:" + "|".join(re.escape(x) for x in leaves) + ")"
    comp = "|".join(components)
    regex = r".*?(?:" + "|".join(parts) + r").*?(?:" + comp + r").*?" + leaf
    if finetune_language_layers:
        regex = r"(?:" + regex + r")|(?:\bmodel\.layers\.[\d]{1,}\.(?:" + comp + r")\.(?:" + leaf + r"))"
    if not any(re.fullmatch(regex, n) for n in module_names):
        regex = r".*?(?:" + comp + r").*?" + leaf
    if not any(re.fullmatch(regex, n) for n in module_names):
        raise ValueError(f"no Linear module matches target_modules={target_modules!r}"
                         if target_modules is not None else "no Linear module matches Unsloth's target regex")
    return regex


def select_modules(module_names, target_modules, layers_to_transform=None) -> list[str]:
    """The module names PEFT adapts for `target_modules`: a regex (fully matched), a list (exact or
    suffix after a dot), or "all-linear" (every Linear but lm_head)."""
    if target_modules == "all-linear":
        chosen = [n for n in module_names if n != "lm_head"]
    elif isinstance(target_modules, str):
        chosen = [n for n in module_names if re.fullmatch(target_modules, n)]
    else:
        targets = list(target_modules)
        chosen = [n for n in module_names if any(n == t or n.endswith("." + t) for t in targets)]
    if layers_to_transform is not None:
        layers = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        chosen = [n for n in chosen if (m := re.search(r"\.(\d+)\.", n)) and int(m.group(1)) in layers]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names})
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        close = sorted({c for t in wanted for c in difflib.get_close_matches(str(t), leaves, n=5, cutoff=0.3)})
        raise ValueError(f"target_modules={target_modules!r} matches no Linear module"
                         f"{'' if layers_to_transform is None else f' in layers {layers_to_transform}'}; "
                         f"close module names: {', '.join(close) or '-'}; all: {', '.join(leaves)}")
    return chosen


# ----------------------------------------------------------------------------------------------
# The transform.


def _init_a(key, shape, init, r):
    if init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / r
    bound = 1.0 / math.sqrt(shape[-1])  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def add_lora(model, chosen: list[str], r: int, scale: float, init_lora_weights=True, random_state: int = 3407,
             dropout: float = 0.0):
    """The model with the Linear weights of `chosen` HF module names wrapped in LoRA (B = 0)."""
    modules = linear_modules(model)
    layers: dict[str, list[int | None]] = {}
    for name in chosen:
        ours, i = modules[name]
        layers.setdefault(ours, []).append(i)
    graphdef, state = nnx.split(model)
    flat = []
    key = jax.random.key(random_state)
    for index, (path, var) in enumerate(nnx.to_flat_state(state)):
        ours = path_key(path).removesuffix(".weight")
        if not path_key(path).endswith(".weight") or ours not in layers:
            flat.append((path, var))
            continue
        base = var.get_value()
        if isinstance(base, LoRA):
            raise ValueError(f"{ours} already has a LoRA adapter")
        shape = jax.eval_shape(lambda w: dense_weight(w, jnp.float32), base).shape
        *stack, out_f, in_f = shape
        a = _init_a(jax.random.fold_in(key, index), (*stack, r, in_f), init_lora_weights, r)
        mask = None
        if stack:
            mask = np.zeros(stack, np.float32)
            mask[[i for i in layers[ours]]] = 1.0
            mask = jnp.asarray(mask)
        flat.append((path, var.replace(LoRA(base=base, lora_A=a, lora_B=jnp.zeros((*stack, out_f, r), jnp.float32),
                                            mask=mask, scale=scale, dropout=dropout))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: int = 16, lora_dropout: float = 0.0,
                   bias: str = "none", finetune_vision_layers: bool = True, finetune_language_layers: bool = True,
                   finetune_attention_modules: bool = True, finetune_mlp_modules: bool = True,
                   layers_to_transform=None, layers_pattern=None, use_gradient_checkpointing="unsloth",
                   random_state: int = 3407, max_seq_length: int = 2048, use_rslora: bool = False,
                   modules_to_save=None, init_lora_weights=True, loftq_config={}, **kwargs):  # noqa: B006
    """Unsloth's `FastVisionModel.get_peft_model`: the model with LoRA on the chosen Linear weights.

    Only the LoRA factors (and `modules_to_save`) are trainable afterwards. `lora_dropout` drops the
    adapters' inputs in training steps (SFTTrainer), as PEFT does; Unsloth's default, and advice, is 0.
    """
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r}: expected a positive int")
    if bias != "none":
        raise NotImplementedError(f"bias={bias!r}: only 'none' is supported")
    if loftq_config:
        raise NotImplementedError("loftq_config is not supported")
    if init_lora_weights not in (True, "gaussian"):
        raise ValueError(f"init_lora_weights={init_lora_weights!r}: expected True or 'gaussian'")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={lora_dropout!r}: expected a probability in [0, 1)")
    modules = linear_modules(model)
    if target_modules is None:
        target_modules = get_peft_regex(list(modules), finetune_vision_layers, finetune_language_layers,
                                        finetune_attention_modules, finetune_mlp_modules)
    chosen = select_modules(list(modules), target_modules, layers_to_transform)
    scale = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
    model = add_lora(model, chosen, r, scale, init_lora_weights, random_state, float(lora_dropout))
    model.peft_config = _freeze({
        "peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "bias": bias,
        "target_modules": target_modules if isinstance(target_modules, str) else sorted(target_modules),
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


def _freeze(config: dict) -> str:
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
    from jaxvlm.export import model_dtype
    dtype = dtype or model_dtype(model)
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
# PEFT adapter directories.

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """PEFT's adapter state dict: lora_A / lora_B of the adapted layers and the modules_to_save weights."""
    from jaxvlm.models import family_for
    stacked = family_for(model.config.model_type, "model.config").STACKED
    keep = tuple(getattr(model, "modules_to_save", ()) or ())
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, value = path_key(path), var.get_value()
        prefix = next((p for p in stacked if key.startswith(p + ".")), None)
        if isinstance(value, LoRA):
            module = key.removesuffix(".weight")
            a, b = np.asarray(value.lora_A), np.asarray(value.lora_B)
            if value.mask is None:
                out[f"{_PREFIX}{module}.lora_A.weight"] = a
                out[f"{_PREFIX}{module}.lora_B.weight"] = b
                continue
            for i in np.flatnonzero(np.asarray(value.mask)):
                name = f"{prefix}.{i}.{module[len(prefix) + 1:]}"
                out[f"{_PREFIX}{name}.lora_A.weight"] = a[i]
                out[f"{_PREFIX}{name}.lora_B.weight"] = b[i]
        elif any(k in keep for k in key.split(".")):
            array = np.asarray(value)
            if prefix is None:
                out[f"{_PREFIX}{key}"] = array
            else:
                for i in range(array.shape[0]):
                    out[f"{_PREFIX}{prefix}.{i}.{key[len(prefix) + 1:]}"] = array[i]
    return out


def save_adapter(model, directory: str) -> None:
    """Writes adapter_config.json and adapter_model.safetensors (PEFT's format) into `directory`."""
    from safetensors.numpy import save_file
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapter to save: call get_peft_model first")
    config = json.loads(getattr(model, "peft_config", "{}"))
    config.setdefault("peft_type", "LORA")
    config["base_model_name_or_path"] = getattr(model, "name_or_path", None)
    config["inference_mode"] = True
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    save_file(adapter_tensors(model), os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model, directory: str):
    """The base `model` with the PEFT adapter in `directory` (ours or one PEFT wrote) applied.

    Raises ValueError naming the first adapter tensor that does not fit the model (key and both shapes).
    """
    from jaxvlm.converters.safetensors_io import Checkpoint
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: missing; expected a PEFT adapter directory")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type={config.get('peft_type')!r}, expected 'LORA'")
    if has_lora(model):
        raise ValueError("the model already has a LoRA adapter; load the adapter onto the base model")
    r, alpha = int(config["r"]), config.get("lora_alpha", config["r"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights}: missing")
    ckpt = Checkpoint.from_file(weights)
    modules = linear_modules(model)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    saved: dict[str, np.ndarray] = {}
    for key in ckpt.keys():
        m = re.fullmatch(re.escape(_PREFIX) + r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if m:
            if m.group(1) not in modules:
                raise ValueError(f"{weights}: {key} names module {m.group(1)!r}, which this model has no Linear "
                                 f"for (is it the adapter of another base model?)")
            pairs.setdefault(m.group(1), {})[m.group(2)] = ckpt.get(key)
        elif key.startswith(_PREFIX):
            saved[key[len(_PREFIX):]] = ckpt.get(key)
        else:
            raise ValueError(f"{weights}: unexpected tensor {key!r}")
    model = add_lora(model, sorted(pairs), r, scale, dropout=float(config.get("lora_dropout") or 0.0))
    model = _fill_lora(model, modules, pairs, weights)
    model = _fill_saved(model, saved, weights)
    config["base_model_name_or_path"] = config.get("base_model_name_or_path") or getattr(model, "name_or_path", None)
    model.peft_config = _freeze(config)
    model.modules_to_save = tuple(config.get("modules_to_save") or ())
    return model


def _fill_lora(model, modules, pairs, where):
    graphdef, state = nnx.split(model)
    by_param: dict[str, list[tuple[int | None, dict]]] = {}
    for name, ab in pairs.items():
        ours, i = modules[name]
        by_param.setdefault(ours + ".weight", []).append((i, ab, name))
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = path_key(path)
        if key not in by_param:
            flat.append((path, var))
            continue
        lora = var.get_value()
        a, b = np.array(lora.lora_A), np.array(lora.lora_B)
        for i, ab, name in by_param[key]:
            for part, target in (("lora_A", a), ("lora_B", b)):
                if part not in ab:
                    raise ValueError(f"{where}: {_PREFIX}{name}.{part}.weight is missing")
                dest = target if i is None else target[i]
                if ab[part].shape != dest.shape:
                    raise ValueError(f"{where}: {_PREFIX}{name}.{part}.weight has shape {tuple(ab[part].shape)}, "
                                     f"the model expects {tuple(dest.shape)}")
                dest[...] = ab[part]
        flat.append((path, var.replace(dataclasses.replace(lora, lora_A=jnp.asarray(a), lora_B=jnp.asarray(b)))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _fill_saved(model, saved, where):
    if not saved:
        return model
    from jaxvlm.models import family_for
    from jaxvlm.converters.hf_import import _split_stacked
    stacked = family_for(model.config.model_type, "model.config").STACKED
    graphdef, state = nnx.split(model)
    flat = dict((path_key(p), (p, v)) for p, v in nnx.to_flat_state(state))
    for name, array in saved.items():
        ours, i = _split_stacked(name, stacked)
        if ours not in flat:
            raise ValueError(f"{where}: {_PREFIX}{name} names a weight this model does not have")
        path, var = flat[ours]
        current = np.array(var.get_value())
        dest = current if i is None else current[i]
        if dest.shape != array.shape:
            raise ValueError(f"{where}: {_PREFIX}{name} has shape {tuple(array.shape)}, the model expects "
                             f"{tuple(dest.shape)}")
        dest[...] = array
        flat[ours] = (path, var.replace(jnp.asarray(current)))
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.values())))
