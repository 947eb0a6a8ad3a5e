"""What the benchmarks share: the model geometries (Qwen2-VL 2B / 7B, Qwen3-VL 2B), random-weight models
drawn on the device, and the workload's batches (one image + text per sample)."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxvlm.models import qwen2_vl
from jaxvlm.paths import path_key
from jaxvlm.quant import quantize_nf4
from jaxvlm.quantize import linear_weight_keys

MODEL = qwen2_vl.Qwen2VLForConditionalGeneration


def _qwen2_vl_hf_config(hidden, intermediate, heads, kv_heads, vocab, tied):
    from transformers import Qwen2VLConfig
    return Qwen2VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=28,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, rope_theta=1e6,
                         max_position_embeddings=32768, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=hidden, mlp_ratio=4, num_heads=16, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=tied)


def qwen2_vl_2b_hf_config():
    """transformers' config of the Qwen2-VL-2B geometry (the benchmark workload)."""
    return _qwen2_vl_hf_config(1536, 8960, 12, 2, 151936, tied=True)


def qwen2_vl_7b_hf_config():
    """transformers' config of the Qwen2-VL-7B geometry (text 3584 wide, 28 layers, 28 heads, 4 kv heads)."""
    return _qwen2_vl_hf_config(3584, 18944, 28, 4, 152064, tied=False)


def qwen2_vl_2b_config():
    return qwen2_vl.from_hf(qwen2_vl_2b_hf_config())


def qwen3_vl_2b_hf_config():
    """transformers' config of the Qwen3-VL-2B geometry (text 2048 wide, 28 layers, 16 heads of 128, 8 kv
    heads, MLP 6144, tied embeddings; vision 1024 wide, 24 blocks, 16-pixel patches, deepstack 5/11/17)."""
    from transformers import Qwen3VLConfig
    return Qwen3VLConfig(
        text_config=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                           num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
                           hidden_act="gelu_pytorch_tanh"),
        tie_word_embeddings=True)


GEOMETRIES = {"qwen2-vl-2b": qwen2_vl_2b_hf_config, "qwen2-vl-7b": qwen2_vl_7b_hf_config,
              "qwen3-vl-2b": qwen3_vl_2b_hf_config}


def load_geometry(name: str):
    """(model class, config) of a named geometry, the class found by the registry as from_pretrained does."""
    from jaxvlm.models import model_class
    hf = GEOMETRIES[name]()
    model_cls = model_class(hf.model_type, name)
    return model_cls, model_cls.config_from_hf(hf)


def vision_tower(cfg):
    """The vision blocks' config (Qwen3-VL nests it beside its position table and deepstack indexes)."""
    return getattr(cfg.vision, "tower", cfg.vision)


def random_model(cfg, dtype, seed=0, nf4=False, model_cls=MODEL):
    """Random weights drawn on the device; with `nf4`, each Linear weight is quantized as soon as it is
    drawn (as load_in_4bit does), so the 16-bit model never exists whole."""
    abstract = nnx.eval_shape(lambda: model_cls(cfg, dtype))
    targets = linear_weight_keys(abstract, model_cls.INFO.quant_skip) if nf4 else set()
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    filled = []
    for (p, v), k in zip(flat, keys):
        w = 0.02 * jax.random.normal(k, v.get_value().shape, dtype)
        if path_key(p) in targets:
            w = jax.block_until_ready(jax.vmap(quantize_nf4)(w))
        filled.append((p, v.replace(w)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def batch_inputs(cfg, batch, text, image, model_cls=MODEL):
    """prepare_inputs arrays of `batch` samples: <vision_start>, one image x image, <vision_end>, `text` tokens."""
    vision = vision_tower(cfg)
    grid = image // vision.patch_size
    n_img = grid * grid // vision.spatial_merge_size**2
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150000, (batch, n_img + text + 2))
    ids[:, 0] = cfg.vision_start_token_id
    ids[:, 1:1 + n_img] = cfg.image_token_id
    ids[:, 1 + n_img] = cfg.vision_start_token_id + 1
    pix = rng.standard_normal((batch * grid * grid, vision.patch_dim)).astype(np.float32)
    thw = np.array([[1, grid, grid]] * batch)
    model = nnx.eval_shape(lambda: model_cls(cfg, np.float32))  # prepare_inputs reads only the config
    return model.prepare_inputs(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pix, image_grid_thw=thw)
