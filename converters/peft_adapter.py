"""PEFT adapter directories <-> LoRA on the param tree: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's: `base_model.model.<HF module name>.lora_A.weight` (per layer), plus the full weights
of `modules_to_save`. Adapters written here load in `peft.PeftModel.from_pretrained`, and adapters PEFT
wrote load here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.converters.safetensors_io import Checkpoint
from jaxvlm.lora import LoRA, add_lora, config_string, has_lora, linear_modules
from jaxvlm.paths import layer_key, path_key, split_layer, stacked_prefix

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """PEFT's adapter state dict: lora_A / lora_B of the adapted layers and the modules_to_save weights."""
    stacked = type(model).INFO.stacked
    keep = tuple(getattr(model, "modules_to_save", ()) or ())
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, value = path_key(path), var.get_value()
        prefix = stacked_prefix(key, stacked)
        if isinstance(value, LoRA):
            module = key.removesuffix(".weight")
            a, b = np.asarray(value.lora_A), np.asarray(value.lora_B)
            if value.mask is None:
                out[f"{_PREFIX}{module}.lora_A.weight"] = a
                out[f"{_PREFIX}{module}.lora_B.weight"] = b
                continue
            for i in np.flatnonzero(np.asarray(value.mask)):
                name = layer_key(module, int(i), stacked)
                out[f"{_PREFIX}{name}.lora_A.weight"] = a[i]
                out[f"{_PREFIX}{name}.lora_B.weight"] = b[i]
        elif any(k in keep for k in key.split(".")):
            array = np.asarray(value)
            if prefix is None:
                out[f"{_PREFIX}{key}"] = array
            else:
                for i in range(array.shape[0]):
                    out[f"{_PREFIX}{layer_key(key, i, stacked)}"] = array[i]
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
    model.peft_config = config_string(config)
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
    stacked = type(model).INFO.stacked
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
