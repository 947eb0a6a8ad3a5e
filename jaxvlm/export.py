"""Export back to Hugging Face: merged 16-bit safetensors, 4-bit, LoRA adapters, and hub uploads.

Unsloth's `save_pretrained_merged` / `push_to_hub_merged`. Files are written into a staging directory and
moved into the target at the end (jaxvlm.converters.files): saving into an existing directory replaces
the files it writes and leaves every other file there alone; a failure changes nothing.

A model sharded over a device mesh comes to the host one tensor at a time (a stacked param layer by layer) and is
written with the bytes the same model on one device writes; over several processes (jax.distributed) every process
calls the export and process 0 alone writes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.converters.files import staged_directory
from jaxvlm.converters.hf_export import hf_tensors, remove_stale_weights, write_safetensors
from jaxvlm.converters.hf_import import normalize_key
from jaxvlm.converters.peft_adapter import save_adapter
from jaxvlm.layers import dense_weight
from jaxvlm.lora import linear_modules
from jaxvlm.paths import split_layer
from jaxvlm.quant import nf4_to_bnb, quantize_nf4
from jaxvlm.quantize import linear_weight_keys

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")


def _copy_configs(model, out_dir: str, dtype, quantization_config: dict | None = None) -> None:
    src = getattr(model, "model_dir", None)
    if src is None:
        raise ValueError("the model has no model_dir (it was not loaded with from_pretrained): "
                         "cannot write its config.json")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    if quantization_config:
        config["quantization_config"] = quantization_config
    config["dtype"] = jnp.dtype(dtype).name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    gen = os.path.join(src, "generation_config.json")
    if os.path.exists(gen):
        shutil.copy(gen, out_dir)


# Jit'd once here, so that every export reuses the programs compiled for a weight's shapes and dtype.
_dense = jax.jit(dense_weight, static_argnums=1)
_quantize = jax.jit(quantize_nf4)


def _merged_current_names(model, dtype):
    """(current HF key, host array) of every weight with LoRA merged and NF4 dequantized, in `dtype`, one layer at a
    time (`hf_tensors`)."""
    yield from hf_tensors(model, model.stacks(), lambda v: _dense(v, dtype))


def merged_tensors(model, dtype):
    """(on-disk HF key, host array) of every weight with LoRA merged and NF4 dequantized, in `dtype`."""
    export_keys = type(model).INFO.export_keys
    for key, array in _merged_current_names(model, dtype):
        yield normalize_key(key, export_keys), array


def merged_4bit_tensors(model, dtype):
    """As merged_tensors, with the Linear weights (but the family's quant_skip modules) quantized to NF4
    and written as bitsandbytes writes them (`<key>`, `<key>.absmax`, ..., `.quant_state.bitsandbytes__nf4`)."""
    info = type(model).INFO
    targets = linear_weight_keys(model, info.quant_skip)
    for key, array in _merged_current_names(model, dtype):
        disk_key = normalize_key(key, info.export_keys)
        if split_layer(key, model.stacks())[0] not in targets:
            yield disk_key, array
            continue
        for suffix, tensor in nf4_to_bnb(_quantize(jnp.asarray(array))).items():
            yield disk_key + suffix, np.asarray(tensor)


def _quantization_config(model, dtype) -> dict:
    """config.json's quantization_config for a merged_4bit export, as transformers + bitsandbytes write it.

    llm_int8_skip_modules names every Linear written 16-bit by its full module name (transformers 5 matches
    a pattern from the start of a module's name or as its suffix, so `merger` alone would not keep
    `model.visual.merger.mlp.0` unquantized), then the family's short names (older transformers match
    substrings)."""
    quant_skip = type(model).INFO.quant_skip
    quantized = linear_weight_keys(model, quant_skip)
    kept = sorted(name for name, (ours, _) in linear_modules(model).items() if f"{ours}.weight" not in quantized)
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": jnp.dtype(dtype).name, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": kept + list(quant_skip), "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def save_pretrained_merged(model, save_directory: str, tokenizer=None, save_method: str = "merged_16bit",
                           max_shard_size="5GB", **kwargs) -> None:
    """Writes an HF model directory transformers loads: config.json, generation_config.json, safetensors
    (sharded with an index above `max_shard_size`), and the processor/tokenizer given as `tokenizer`.

    save_method: "merged_16bit" (LoRA merged into the base, stored in the model's dtype), "merged_4bit"
    (the same, then NF4 in bitsandbytes' format), or "lora" (the PEFT adapter only). Files already in
    `save_directory` that this save does not write stay, except weight shards of an earlier save.

    A model sharded over several processes (jax.distributed) is saved by every process calling this: each takes
    part in gathering the tensors, and process 0 alone writes.
    """
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r}: expected one of {', '.join(SAVE_METHODS)}")
    dtype = model.dtype
    if jax.process_index() != 0:
        _take_part(model, save_method, dtype, save_directory)
        return
    with staged_directory(save_directory) as stage:
        if save_method == "lora":
            save_adapter(model, stage)
        elif save_method == "merged_4bit":
            # Shard sizes are known only once quantized; 4-bit tensors are a quarter of the 16-bit ones.
            written = write_safetensors(_progress(merged_4bit_tensors(model, dtype)), stage, max_shard_size)
            _copy_configs(model, stage, dtype, quantization_config=_quantization_config(model, dtype))
        else:
            sizes = _sizes(model, dtype)
            written = write_safetensors(_progress(merged_tensors(model, dtype), len(sizes)), stage, max_shard_size,
                                        sizes=sizes)
            _copy_configs(model, stage, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
    if save_method != "lora":
        remove_stale_weights(save_directory, written)


def _take_part(model, save_method: str, dtype, save_directory: str) -> None:
    """A process other than process 0 in a multi-process save: it takes part in every gather (collectives, which
    need every process) and writes nothing."""
    if save_method == "lora":
        save_adapter(model, save_directory)
        return
    for _ in _merged_current_names(model, dtype):
        pass


def _progress(tensors, total: int | None = None):
    """`tensors` with a progress bar (shown on a terminal only)."""
    from tqdm.auto import tqdm
    return tqdm(tensors, total=total, desc="saving", unit="tensor", disable=None)


def _sizes(model, dtype) -> list[int]:
    """Bytes of each tensor `merged_tensors` will yield, without computing any (zero-stride views)."""
    def shape_only(v):
        return np.broadcast_to(np.empty((), dtype), jax.eval_shape(lambda w: dense_weight(w, dtype), v).shape)
    return [a.nbytes for _, a in hf_tensors(nnx.eval_shape(lambda: model), model.stacks(), shape_only)]


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit",
                       token: str | None = None, private: bool | None = None, max_shard_size="5GB",
                       commit_message: str = "Upload model trained with jaxvlm", **kwargs) -> str | None:
    """Saves as `save_pretrained_merged` does, then uploads the directory to the hub repo `repo_id`.

    Returns the repo URL. Raises ConnectionError when huggingface_hub is offline (HF_HUB_OFFLINE) or
    the hub cannot be reached. Over several processes every process calls this; process 0 alone uploads, and the
    others return None once they have taken part in the gathers.
    """
    from huggingface_hub import HfApi, constants
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(f"cannot push {repo_id!r}: huggingface_hub is offline (HF_HUB_OFFLINE=1)")
    with tempfile.TemporaryDirectory() as parent:
        folder = os.path.join(parent, "export")
        save_pretrained_merged(model, folder, tokenizer, save_method=save_method, max_shard_size=max_shard_size)
        if jax.process_index() != 0:
            return None
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message)
        except OSError as e:  # requests' and httpx' connection errors derive from OSError
            raise ConnectionError(f"cannot push {repo_id!r} to the hub: {e}") from e
    return str(url)
