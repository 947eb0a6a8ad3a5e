"""PEFT adapter directories <-> LoRA on the param tree: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's: `base_model.model.<HF module name>.lora_A.weight` (per layer), plus the full weights
of `modules_to_save`. Adapters written here load in `peft.PeftModel.from_pretrained`, and adapters PEFT
wrote load here.

Expert weights (PEFT's `target_parameters`) are adapted by PEFT's ParamWrapper, one per parameter, nested
in the module's parameter order (the first innermost): with both `gate_up_proj` and `down_proj` of
`...mlp.experts` targeted, gate_up_proj's factors are `...mlp.experts.base_layer.lora_A.weight` and
down_proj's `...mlp.experts.lora_A.weight`. Its factors hold the experts interleaved: lora_A
[experts * r, in] is A [experts, r, in] flattened, lora_B [out, r * experts] is B [experts, out, r] with
index (j, e) at column j * experts + e.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.converters import hf_export
from jaxvlm.converters.safetensors_io import Checkpoint
from jaxvlm.layers import Experts
from jaxvlm.lora import LoRA, add_lora, config_string, expert_params, has_lora, lora_targets
from jaxvlm.paths import layer_key, path_key, split_layer, stacked_prefix

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _factors(value: LoRA, layer: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A, lora_B) of `value` on the host; of its row `layer` alone when given (sliced on its devices)."""
    factors = (value.lora_A, value.lora_B)
    if layer is not None:
        factors = hf_export.take_layer(factors, layer)
    return hf_export.host_array(factors[0]), hf_export.host_array(factors[1])


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """PEFT's adapter state dict: lora_A / lora_B of the adapted layers and the modules_to_save weights.

    A stacked param comes to the host one layer at a time (`hf_export.take_layer`, then `hf_export.host_array`:
    over several processes every process calls this, and each gets the whole dict)."""
    stacked = model.stacks()
    keep = tuple(getattr(model, "modules_to_save", ()) or ())
    experts = {ours for ours, _ in expert_params(model).values()}
    out, expert_factors = {}, {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, value = path_key(path), var.get_value()
        prefix = stacked_prefix(key, stacked)
        if isinstance(value, LoRA) and key in experts:
            mask = hf_export.host_array(value.mask)
            if mask.ndim == 1:
                expert_factors[key] = _factors(value)
            for i in np.flatnonzero(mask.any(axis=-1)) if mask.ndim > 1 else []:
                expert_factors[layer_key(key, int(i), stacked)] = _factors(value, int(i))
        elif isinstance(value, LoRA):
            module = key.removesuffix(".weight")
            if value.mask is None:
                a, b = _factors(value)
                out[f"{_PREFIX}{module}.lora_A.weight"] = a
                out[f"{_PREFIX}{module}.lora_B.weight"] = b
                continue
            for i in np.flatnonzero(hf_export.host_array(value.mask)):
                name = layer_key(module, int(i), stacked)
                a, b = _factors(value, int(i))
                out[f"{_PREFIX}{name}.lora_A.weight"] = a
                out[f"{_PREFIX}{name}.lora_B.weight"] = b
        elif any(k in keep for k in key.split(".")):
            if prefix is None:
                out[f"{_PREFIX}{key}"] = hf_export.host_array(value)
            else:
                for i in range(hf_export.num_layers(value)):
                    out[f"{_PREFIX}{layer_key(key, i, stacked)}"] = hf_export.host_array(hf_export.take_layer(value, i))
    wrappers = _wrapper_keys(expert_factors)
    for name, (a, b) in expert_factors.items():
        experts_n, r, in_f = a.shape
        out[f"{_PREFIX}{wrappers[name]}.lora_A.weight"] = a.reshape(experts_n * r, in_f)
        out[f"{_PREFIX}{wrappers[name]}.lora_B.weight"] = b.transpose(1, 2, 0).reshape(b.shape[1], r * experts_n)
    return out


def _wrapper_keys(param_names) -> dict[str, str]:
    """{HF parameter name: the key of its PEFT wrapper}, for the adapted parameters `param_names`: PEFT nests
    the wrappers of one module's parameters in the module's parameter order, the first innermost."""
    by_module: dict[str, list[str]] = {}
    for name in param_names:
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, []).append(leaf)
    keys = {}
    for module, leaves in by_module.items():
        leaves.sort(key=Experts.WEIGHTS.index)
        for k, leaf in enumerate(leaves):
            keys[f"{module}.{leaf}"] = module + ".base_layer" * (len(leaves) - 1 - k)
    return keys


def save_adapter(model, directory: str) -> None:
    """Writes adapter_config.json and adapter_model.safetensors (PEFT's format) into `directory`.

    Over several processes (jax.distributed) every process calls this: each takes part in gathering the factors,
    and process 0 alone writes."""
    from safetensors.numpy import save_file
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapter to save: call get_peft_model first")
    tensors = adapter_tensors(model)
    if jax.process_index() != 0:
        return
    config = json.loads(getattr(model, "peft_config", "{}"))
    config.setdefault("peft_type", "LORA")
    config["base_model_name_or_path"] = getattr(model, "name_or_path", None)
    config["inference_mode"] = True
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model, directory: str):
    """The base `model` with the PEFT adapter in `directory` (ours or one PEFT wrote) applied.

    Raises ValueError naming the first adapter tensor that does not fit the model (key and both shapes).
    """
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
    targets = lora_targets(model)
    params = expert_params(model)
    wrapped = _wrapped_params(params, config.get("target_parameters") or [])
    pairs: dict[str, dict[str, np.ndarray]] = {}
    sources: dict[tuple[str, str], str] = {}  # (target name, lora_A / lora_B): the tensor's key in the file
    saved: dict[str, np.ndarray] = {}
    for key in ckpt.keys():
        m = re.fullmatch(re.escape(_PREFIX) + r"(.+?)((?:\.base_layer)*)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if m:
            module, depth, part = m.group(1), m.group(2).count(".base_layer"), m.group(3)
            if not depth and module in targets:
                pairs.setdefault(module, {})[part] = ckpt.get(key)
                sources[module, part] = key
                continue
            if module not in wrapped:
                raise ValueError(f"{weights}: {key} names module {module!r}, which this model has no Linear "
                                 f"for, nor expert weights that target_parameters="
                                 f"{config.get('target_parameters')} in {config_path} name (is it the adapter of "
                                 f"another base model?)")
            leaves = wrapped[module]
            if depth >= len(leaves):
                raise ValueError(f"{weights}: {key} is nested {depth} wrappers deep, but target_parameters in "
                                 f"{config_path} name only {[f'{module}.{w}' for w in leaves]}")
            name = f"{module}.{leaves[len(leaves) - 1 - depth]}"
            pairs.setdefault(name, {})[part] = _from_peft_experts(ckpt.get(key), part, r, key, weights)
            sources[name, part] = key
        elif key.startswith(_PREFIX):
            saved[key[len(_PREFIX):]] = ckpt.get(key)
        else:
            raise ValueError(f"{weights}: unexpected tensor {key!r}")
    model = add_lora(model, sorted(pairs), r, scale, dropout=float(config.get("lora_dropout") or 0.0))
    model = _fill_lora(model, targets, pairs, sources, weights)
    model = _fill_saved(model, saved, weights)
    config["base_model_name_or_path"] = config.get("base_model_name_or_path") or getattr(model, "name_or_path", None)
    model.peft_config = config_string(config)
    model.modules_to_save = tuple(config.get("modules_to_save") or ())
    return model


def _wrapped_params(params, target_parameters) -> dict[str, list[str]]:
    """{expert module name: the leaves of its parameters that `target_parameters` wrap, in nesting order}."""
    wrapped: dict[str, list[str]] = {}
    for name in params:
        if any(name == t or name.endswith("." + t) for t in target_parameters):
            module, _, leaf = name.rpartition(".")
            wrapped.setdefault(module, []).append(leaf)
    for leaves in wrapped.values():
        leaves.sort(key=Experts.WEIGHTS.index)
    return wrapped


def _from_peft_experts(array: np.ndarray, part: str, r: int, key: str, where: str) -> np.ndarray:
    """PEFT's interleaved expert factor -> ours: lora_A [experts * r, in] -> [experts, r, in];
    lora_B [out, r * experts] -> [experts, out, r]."""
    n = array.shape[0] if part == "lora_A" else array.shape[1]
    if array.ndim != 2 or n % r:
        raise ValueError(f"{where}: {key} has shape {tuple(array.shape)}; expected a 2-D expert factor with "
                         f"experts x r={r} {'rows' if part == 'lora_A' else 'columns'}")
    if part == "lora_A":
        return array.reshape(n // r, r, array.shape[1])
    return array.reshape(array.shape[0], r, n // r).transpose(2, 0, 1)


def _fill_lora(model, targets, pairs, sources, where):
    graphdef, state = nnx.split(model)
    by_param: dict[str, list[tuple[int | None, dict]]] = {}
    for name, ab in pairs.items():
        ours, i = targets[name]
        by_param.setdefault(ours, []).append((i, ab, name))
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
                    other = sources[name, "lora_B" if part == "lora_A" else "lora_A"]
                    raise ValueError(f"{where}: {other} has no {part} beside it (the {part} factor of {name})")
                dest = target if i is None else target[i]
                if ab[part].shape != dest.shape:
                    raise ValueError(f"{where}: {sources[name, part]} has shape {tuple(ab[part].shape)}, the model "
                                     f"expects {tuple(dest.shape)}")
                dest[...] = ab[part]
        flat.append((path, var.replace(dataclasses.replace(lora, lora_A=jnp.asarray(a), lora_B=jnp.asarray(b)))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _fill_saved(model, saved, where):
    if not saved:
        return model
    stacked = model.stacks()
    graphdef, state = nnx.split(model)
    flat = dict((path_key(p), (p, v)) for p, v in nnx.to_flat_state(state))
    for name, array in saved.items():
        ours, i = split_layer(name, stacked)
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
