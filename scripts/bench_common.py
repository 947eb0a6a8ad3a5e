"""What the benchmarks share: the model geometries (Qwen2-VL 2B / 7B, Qwen3-VL 2B, Qwen3-VL-30B-A3B, Gemma 3 4B /
27B, Llama 3.2 11B Vision, LLaVA-1.5-7B, Pixtral-12B), random-weight models drawn on the device, and the workload's
batches (one image + text per sample).

The workload per family (the functions below dispatch on the type of jaxvlm's config: Gemma3Config, MllamaConfig,
LlavaConfig, else Qwen-VL's):
  Qwen-VL   <vision_start>, one image x image picture (448: 256 merged tokens of Qwen2-VL's 14-pixel patches,
            196 of Qwen3-VL's 16-pixel ones), <vision_end>, then the text tokens;
  Gemma 3   one picture of the SigLIP tower's fixed size (896: 64 x 64 patches pooled to 256 tokens), wrapped as
            Gemma3Processor expands <start_of_image>: "\\n\\n<boi>" + 256 image tokens + "<eoi>\\n\\n", then the
            text tokens; token_type_ids 1 exactly at the image tokens.
  mllama    one 1120 x 1120 picture as 2 x 2 tiles of 560 (aspect ratio id 6, every tile real: 4 x 1601 vision
            tokens), "<|image|>" then the text tokens, every text token seeing the image's tiles (cross_attention_mask
            all ones). JAXVLM_BENCH_MLLAMA_TILES (default "4") gives the tile counts of the samples in turn, e.g.
            "4,2": every second sample a 560 x 1120 picture, 1 x 2 tiles (aspect ratio id 2), its other two tiles off
            as a processor pads them (a batch of real pictures' mixed aspect ratios).
  llava     one picture, then the text tokens, as the checkpoints' processors lay it out: LLaVA 1.5 (CLIP tower)
            a picture of the tower's size (336: 24 x 24 patches) as 576 "<image>" tokens (the tower's class token
            dropped, "default"); Pixtral-12B (`llava` with a Pixtral tower) a 448 x 448 picture (28 x 28 patches
            of 16) as PixtralProcessor expands it: 28 rows of 28 "[IMG]" each followed by "[IMG_BREAK]", the last
            row's break "[IMG_END]" (812 tokens), with image_sizes.

`load_geometry(name, tiny=True)` gives the family's tiny config instead (the scripts' hidden `--tiny`), so that
the benchmarks' code paths run on a CPU in under a minute each (mostly compilation).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.models import qwen2_vl
from jaxvlm.models.gemma3 import Gemma3Config
from jaxvlm.models.llava import LlavaConfig, LlavaForConditionalGeneration, Mistral3ForConditionalGeneration
from jaxvlm.models.mllama import MllamaConfig
from jaxvlm.paths import path_key, stacked_prefix
from jaxvlm.quantize import quantize, quantized_weight_keys

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


def qwen2_5_vl_72b_hf_config():
    """transformers' config of the Qwen2.5-VL-72B geometry (text 8192 wide, 80 layers, 64 heads, 8 kv heads, MLP
    29568, untied; vision 1280 wide, 32 blocks, SwiGLU 3456, 112-pixel windows, full attention at 7/15/23/31)."""
    from transformers import Qwen2_5_VLConfig
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=152064, rope_theta=1e6, max_position_embeddings=128000,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3456, num_heads=16, out_hidden_size=8192,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2),
        tie_word_embeddings=False)


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


def qwen3_vl_30b_a3b_hf_config():
    """transformers' config of the Qwen3-VL-30B-A3B geometry (text 2048 wide, 48 sparse MoE layers of 128 experts,
    8 per token, expert MLP 768, 32 heads of 128, 4 kv heads, untied lm_head; vision 1152 wide, 27 blocks,
    16-pixel patches, deepstack 8/16/24), as Qwen/Qwen3-VL-30B-A3B-Instruct's config.json gives it (from memory:
    the values below are also transformers' Qwen3VLMoe*Config defaults where those exist).

    Less sure: text `intermediate_size` 6144 (no dense MLP layer uses it here), `max_position_embeddings`
    262144 (read only for generation's position warning), and the untied lm_head (Qwen3-30B-A3B's is untied;
    tied would drop 0.31 B parameters)."""
    from transformers import Qwen3VLMoeConfig
    return Qwen3VLMoeConfig(
        text_config=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                         moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
                         max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu",
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                           num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                           hidden_act="gelu_pytorch_tanh"),
        tie_word_embeddings=False)


def _gemma3_hf_config(hidden, intermediate, layers, heads, kv_heads, head_dim, query_pre_attn_scalar):
    """transformers' Gemma3Config of a Gemma 3 vision geometry: the given language model (sliding window 1024,
    5 sliding layers then 1 global, repeated: transformers' default sliding_window_pattern 6; rotary base 1e4 on
    the sliding layers, 1e6 with linear scaling 8 on the global ones; vocabulary 262,208, tied embeddings) and
    the SigLIP tower all Gemma 3 vision models share (1152 wide, 27 layers, 16 heads, 896-pixel images of
    14-pixel patches, no pooling head), 256 tokens per image."""
    from transformers import Gemma3Config as HFGemma3Config
    return HFGemma3Config(
        text_config=dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=1024,
                         layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                      for i in range(layers)],
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                          "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                             "rope_theta": 1000000.0}},
                         vocab_size=262208, max_position_embeddings=131072, rms_norm_eps=1e-6,
                         hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           num_channels=3, image_size=896, patch_size=14, layer_norm_eps=1e-6,
                           hidden_act="gelu_pytorch_tanh", vision_use_head=False),
        mm_tokens_per_image=256, boi_token_index=255999, eoi_token_index=256000, image_token_index=262144,
        tie_word_embeddings=True)


def gemma3_4b_hf_config():
    """transformers' config of the Gemma-3-4B geometry (text 2560 wide, 34 layers, 8 heads of 256, 4 kv heads,
    MLP 10240, query_pre_attn_scalar 256; the SigLIP tower at 896 pixels)."""
    return _gemma3_hf_config(2560, 10240, 34, 8, 4, 256, 256)


def gemma3_27b_hf_config():
    """transformers' config of the Gemma-3-27B geometry (text 5376 wide, 62 layers, 32 heads of 128, 16 kv heads,
    MLP 21504, query_pre_attn_scalar 168 = 5376 / 32; the SigLIP tower at 896 pixels)."""
    return _gemma3_hf_config(5376, 21504, 62, 32, 16, 128, 168)


def mllama_11b_hf_config():
    """transformers' config of the Llama-3.2-11B-Vision geometry: text 4096 wide, 40 layers of which 8 are
    cross-attention layers (3, 8, ..., 38), 32 heads of 128, 8 kv heads, MLP 14336, vocabulary 128,256 (+8 rows),
    llama3 rope (theta 5e5, factor 8), untied lm_head; vision 1280 wide, 32 local + 8 global layers, 16 heads,
    560-pixel tiles of 14-pixel patches, up to 4 tiles, features of layers 3, 7, 15, 23, 30 (output 7680)."""
    from transformers import MllamaConfig as HFMllamaConfig
    return HFMllamaConfig(
        text_config=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                         num_attention_heads=32, num_key_value_heads=8, cross_attention_layers=[3, 8, 13, 18, 23, 28,
                                                                                                33, 38],
                         rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         pad_token_id=128004, bos_token_id=128000, eos_token_id=128009),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                           attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4, num_channels=3,
                           intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680, norm_eps=1e-5),
        image_token_index=128256)


# The special tokens of the llava geometries' tokenizers, at the released ids: llava-hf/llava-1.5-7b-hf's (Llama's
# <unk> <s> </s>, then <image> and <pad> appended after the 32,000 ids of Llama's vocabulary) and Pixtral-12B's
# (Mistral's tekken: ids below 1000 are control tokens; [IMG] 10, [PAD] 11, [IMG_BREAK] 12, [IMG_END] 13).
LLAVA_1_5_TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}
PIXTRAL_12B_TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[IMG]": 10, "[PAD]": 11,
                      "[IMG_BREAK]": 12, "[IMG_END]": 13}


def llava_1_5_7b_hf_config():
    """transformers' config of the LLaVA-1.5-7B geometry (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14 at 336 pixels
    (1024 wide, MLP 4096, 24 layers, 16 heads, 14-pixel patches: 24 x 24 = 576 patches and the class token,
    quick_gelu, eps 1e-5, projection_dim 768) read at its second-to-last layer (vision_feature_layer -2: 23 of the
    24 layers run) without the class token ("default": 576 image tokens per image); the projector 1024 -> 4096 ->
    4096 (gelu, biases); Llama text 4096 wide, MLP 11008, 32 layers, 32 heads of 128, 32 kv heads, vocabulary
    32,064, default rope theta 1e4, 4096 positions, rms eps 1e-5, untied lm_head; <image> 32000, <pad> 32001."""
    from transformers import LlavaConfig as HFLlavaConfig
    t = LLAVA_1_5_TOKENS
    return HFLlavaConfig(
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                         pad_token_id=t["<pad>"], bos_token_id=t["<s>"], eos_token_id=t["</s>"]),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, num_channels=3, image_size=336,
                           patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768),
        image_token_id=t["<image>"], image_seq_length=576, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=False, pad_token_id=t["<pad>"])


def pixtral_12b_hf_config():
    """transformers' config of the Pixtral-12B geometry (mistral-community/pixtral-12b: `llava` with a Pixtral
    tower): Pixtral vision 1024 wide, MLP 4096, 24 layers, 16 heads of 64, images up to 1024 pixels in 16-pixel
    patches, silu, 2-D rotary theta 1e4, read at its last layer with every patch ("full"; no class token); the
    projector 1024 -> 5120 -> 5120 (gelu, biases); Mistral text 5120 wide, MLP 14336, 40 layers, 32 heads of 128,
    8 kv heads, vocabulary 131,072, rope theta 1e9, 1,024,000 positions, rms eps 1e-5, no sliding window, untied
    lm_head; [IMG] 10 ([IMG_BREAK] 12 and [IMG_END] 13 are text)."""
    from transformers import LlavaConfig as HFLlavaConfig
    t = PIXTRAL_12B_TOKENS
    return HFLlavaConfig(
        text_config=dict(model_type="mistral", hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                         max_position_embeddings=1024000, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e9}, tie_word_embeddings=False,
                         pad_token_id=t["[PAD]"], bos_token_id=t["<s>"], eos_token_id=t["</s>"]),
        vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, head_dim=64, num_channels=3, image_size=1024, patch_size=16,
                           hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": 10000.0}),
        image_token_id=t["[IMG]"], vision_feature_layer=-1, vision_feature_select_strategy="full",
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False)


def pixtral_12b_tiny_hf_config():
    """pixtral-12b's tiny config: `llava` with the Pixtral tower of Mistral3ForConditionalGeneration's tiny config
    (56-pixel images of 7-pixel patches) read at its last layer ("full"), that config's Mistral text model, the
    projector with biases (as tests/test_llava.py's build_llava_pixtral)."""
    from transformers import LlavaConfig as HFLlavaConfig
    m3 = Mistral3ForConditionalGeneration.tiny_config("mistral3")
    return HFLlavaConfig(
        text_config=m3.text_config.to_dict(), vision_config=m3.vision_config.to_dict(),
        image_token_id=Mistral3ForConditionalGeneration.TINY.special_tokens["[IMG]"], vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=False)


GEOMETRIES = {"qwen2-vl-2b": qwen2_vl_2b_hf_config, "qwen2-vl-7b": qwen2_vl_7b_hf_config,
              "qwen2.5-vl-72b": qwen2_5_vl_72b_hf_config,
              "qwen3-vl-2b": qwen3_vl_2b_hf_config, "qwen3-vl-30b-a3b": qwen3_vl_30b_a3b_hf_config,
              "gemma3-4b": gemma3_4b_hf_config, "gemma3-27b": gemma3_27b_hf_config,
              "mllama-11b": mllama_11b_hf_config, "llava-1.5-7b": llava_1_5_7b_hf_config,
              "pixtral-12b": pixtral_12b_hf_config}
# The geometries whose tiny config is not their registered family's `tiny_config` (llava's is the CLIP one).
TINY_GEOMETRIES = {"pixtral-12b": pixtral_12b_tiny_hf_config}


PEER_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "unsloth", "unsloth_zoo")


def peer_versions() -> dict[str, str]:
    """The versions of the PyTorch peers' packages that this process would import (read from their metadata on
    sys.path, nothing imported), for the peers' raw lines: which transformers a peer ran with is not otherwise
    recorded on a machine where a newer one may be carried beside the installed one."""
    from importlib import metadata
    found = {}
    for name in PEER_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def hf_geometry(name: str, tiny: bool = False):
    """transformers' config of a named geometry; with `tiny`, its family's tiny test config instead."""
    if tiny and name in TINY_GEOMETRIES:
        return TINY_GEOMETRIES[name]()
    hf = GEOMETRIES[name]()
    if tiny:
        from jaxvlm.models import model_class
        hf = model_class(hf.model_type, name).tiny_config(hf.model_type)
    return hf


def load_geometry(name: str, tiny: bool = False):
    """(model class, config) of a named geometry, the class found by the registry as from_pretrained does."""
    from jaxvlm.models import model_class
    hf = hf_geometry(name, tiny)
    model_cls = model_class(hf.model_type, name)
    return model_cls, model_cls.config_from_hf(hf)


def save_random_hf_model(name: str, path: str, tiny: bool = False) -> str:
    """`path`, holding a random-weight bf16 transformers model of geometry `name` (save_pretrained), for the peers
    that load with from_pretrained (bitsandbytes quantizes while loading); written once (marker MODEL_DONE), on the
    GPU when there is one. Needs the model's bf16 size on disk (4.3 GB for the 2B geometries)."""
    if not os.path.exists(os.path.join(path, "MODEL_DONE")):
        import torch
        from transformers import AutoModelForImageTextToText
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForImageTextToText.from_config(hf_geometry(name, tiny), dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        open(os.path.join(path, "MODEL_DONE"), "w").close()
    return path


def is_gemma3(cfg) -> bool:
    """Whether `cfg` (a jaxvlm config) is Gemma 3's: fixed-size SigLIP images, token_type_ids, no image_grid_thw."""
    return isinstance(cfg, Gemma3Config)


def is_mllama(cfg) -> bool:
    """Whether `cfg` (a jaxvlm config) is Llama 3.2 Vision's: tiles, cross-attention, one <|image|> token."""
    return isinstance(cfg, MllamaConfig)


def is_llava(cfg) -> bool:
    """Whether `cfg` (a jaxvlm config) is a LLaVA composition's (the workload lays out model_type `llava`: a CLIP
    tower, LLaVA 1.5's, or a Pixtral one, Pixtral-12B's)."""
    return isinstance(cfg, LlavaConfig)


def llava_tokens(cfg) -> tuple[dict[str, int], range]:
    """(special tokens, the range of the workload's random text ids) of a llava config: LLaVA-1.5-7B's below
    <image> (32000), Pixtral-12B's from 1000 (above Mistral's control tokens) to the vocabulary's end; the tiny
    configs' (their families' TINY tokens, at 285 and up) below the special tokens."""
    if cfg.model_type != "llava":
        raise NotImplementedError(f"the benchmark workload lays out model_type 'llava' only, not {cfg.model_type!r}")
    image = "[IMG]" if cfg.pixtral else "<image>"
    released = PIXTRAL_12B_TOKENS if cfg.pixtral else LLAVA_1_5_TOKENS
    if cfg.image_token_id == released[image]:
        return released, range(1000 if cfg.pixtral else 0, cfg.text.vocab_size if cfg.pixtral else released[image])
    tokens = (Mistral3ForConditionalGeneration if cfg.pixtral else LlavaForConditionalGeneration).TINY.special_tokens
    if cfg.image_token_id != tokens[image]:
        raise ValueError(f"image_token_id={cfg.image_token_id}: neither the released {image} id ({released[image]}) "
                         f"nor the tiny config's ({tokens[image]})")
    return tokens, range(0, min(tokens.values()))


def vision_tower(cfg):
    """The vision blocks' config (Qwen3-VL nests it beside its position table and deepstack indexes)."""
    return getattr(cfg.vision, "tower", cfg.vision)


def workload_image(cfg, tiny: bool = False) -> int:
    """The workload's image side in pixels: Gemma 3's SigLIP takes one fixed size (896; the tiny config's 28),
    as LLaVA 1.5's CLIP does (336; tiny 28); the Qwen-VL families take any, and the benchmark gives them 448 (64
    with `tiny`); the Pixtral tower any up to its image_size, and the benchmark gives it 448 (the tiny tower's 56)."""
    if is_gemma3(cfg) or is_mllama(cfg) or (is_llava(cfg) and not cfg.pixtral):
        return cfg.vision.image_size  # mllama: the side of one tile
    if is_llava(cfg):
        return min(448, cfg.vision.image_size)
    return 64 if tiny else 448


def image_tokens(cfg, image: int) -> tuple[int, int]:
    """(patches per side, image tokens) of one `image` x `image` picture: Qwen2-VL's 14-pixel patches make
    448 -> 32 x 32 patches, 256 merged tokens; Qwen3-VL's 16-pixel ones 28 x 28 patches, 196 tokens; Gemma 3's
    SigLIP 896 -> 64 x 64 patches, average-pooled to mm_tokens_per_image (256) tokens; LLaVA 1.5's CLIP 336 ->
    24 x 24 patches, 576 tokens (the class token dropped); Pixtral's 448 -> 28 x 28 patches, 784 [IMG] tokens (the
    rows' [IMG_BREAK] / [IMG_END] are counted by image_prefix)."""
    vision = vision_tower(cfg)
    grid = image // vision.patch_size
    if is_llava(cfg):
        if not cfg.pixtral and image != vision.image_size:
            raise ValueError(f"the CLIP tower takes {vision.image_size}-pixel images, not {image}")
        return grid, grid * grid + (1 if cfg.keep_class_token and not cfg.pixtral else 0)
    if is_mllama(cfg):  # the image is one <|image|> token in the text; its tiles enter by cross-attention
        return grid, 1
    if is_gemma3(cfg):
        if image != vision.image_size:
            raise ValueError(f"Gemma 3's vision tower takes {vision.image_size}-pixel images, not {image}")
        return grid, cfg.mm_tokens_per_image
    return grid, grid * grid // vision.spatial_merge_size**2


def image_prefix(cfg, image: int) -> int:
    """Tokens of a sample's image part (before its text; the labels are -100 there): the image tokens and their
    wrapper, <vision_start> .. <vision_end> for Qwen-VL, "\\n\\n<boi>" .. "<eoi>\\n\\n" for Gemma 3, each patch
    row's [IMG_BREAK] (the last one's [IMG_END]) for Pixtral, none for LLaVA 1.5."""
    if is_mllama(cfg):
        return 1
    if is_llava(cfg):
        grid, n_img = image_tokens(cfg, image)
        return n_img + (grid if cfg.pixtral else 0)
    return image_tokens(cfg, image)[1] + (4 if is_gemma3(cfg) else 2)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "nf4"))
def _draw(key, shape, dtype, nf4):
    """0.02 x normal of `shape`, as NF4 (one per trailing [out, in] matrix) with `nf4`."""
    w = 0.02 * jax.random.normal(key, shape, dtype)
    return quantize(w, "nf4") if nf4 else w


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "nf4"), donate_argnums=0)
def _draw_layer(stack, key, layer, shape, dtype, nf4):
    """`stack` (donated: written in place) with row `layer` of every leaf replaced by a fresh `_draw`."""
    return jax.tree.map(lambda s, x: s.at[layer].set(x), stack, _draw(key, shape, dtype, nf4))


def _draw_stacked(key, shape, dtype, nf4):
    """A stacked weight `[layers, *shape[1:]]` drawn (and with `nf4` quantized) one layer at a time into a
    preallocated stack: its 16-bit form never exists whole (48 x 128 x 1536 x 2048 experts would be 38 GB),
    and no second copy of the stack is made (as stacking a list of layers would)."""
    layer_shape = tuple(shape[1:])
    layer = jax.eval_shape(functools.partial(_draw, shape=layer_shape, dtype=dtype, nf4=nf4), key)
    stack = jax.tree.map(lambda a: jnp.zeros((shape[0], *a.shape), a.dtype), layer)
    for i, k in enumerate(jax.random.split(key, shape[0])):
        stack = _draw_layer(stack, k, i, layer_shape, dtype, nf4)
    return jax.block_until_ready(stack)


def random_model(cfg, dtype, seed=0, nf4=False, model_cls=MODEL, mesh=None):
    """Random weights drawn on the device; with `nf4`, the weights load_in_4bit quantizes (Linear weights and
    experts, less `INFO.quant_skip`) are quantized as they are drawn, and stacked weights (under
    `INFO.stacked`) are drawn one layer at a time, so that no 16-bit stacked weight exists whole. With a `mesh`
    (jaxvlm.sharding), each weight is drawn straight into its shards (a model larger than one device)."""
    abstract = nnx.eval_shape(lambda: model_cls(cfg, dtype))
    targets = quantized_weight_keys(abstract, model_cls.INFO.quant_skip) if nf4 else set()
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    if mesh is not None:
        from jaxvlm.sharding import tree_shardings
        placed = nnx.to_flat_state(tree_shardings(state, mesh, abstract.stacks(), abstract.sharding_rules()))
        shardings = [s.get_value() for _, s in placed]
        filled = [(p, v.replace(jax.jit(_draw, static_argnums=(1, 2, 3), out_shardings=sh)(
            k, tuple(v.get_value().shape), v.get_value().dtype, path_key(p) in targets)))
            for (p, v), k, sh in zip(flat, keys, shardings)]
        return nnx.merge(graphdef, nnx.from_flat_state(filled))
    filled = []
    for (p, v), k in zip(flat, keys):
        name, a = path_key(p), v.get_value()
        if stacked_prefix(name, model_cls.INFO.stacked) is None:
            w = jax.block_until_ready(_draw(k, tuple(a.shape), a.dtype, name in targets))
        else:
            w = _draw_stacked(k, tuple(a.shape), a.dtype, name in targets)
        filled.append((p, v.replace(w)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def raw_batch(cfg, batch, text, image) -> dict[str, np.ndarray]:
    """What a processor would return for `batch` samples of <vision_start>, one image x image, <vision_end>,
    `text` random tokens (below the special tokens' ids): input_ids, attention_mask, pixel_values (float32
    `[patches, patch_dim]`), image_grid_thw. Gemma 3: "\\n\\n<boi>", the image's tokens, "<eoi>\\n\\n" (the
    two "\\n\\n" random text ids), `text` random tokens: input_ids, attention_mask, pixel_values (float32
    `[batch, 3, image, image]`), token_type_ids (1 at the image tokens). llava: the image's tokens (see the module
    docstring), `text` random tokens: input_ids, attention_mask, pixel_values (float32 `[batch, 3, image,
    image]`), and for a Pixtral tower image_sizes."""
    if is_gemma3(cfg):
        return _gemma3_raw_batch(cfg, batch, text, image)
    if is_mllama(cfg):
        return _mllama_raw_batch(cfg, batch, text, image)
    if is_llava(cfg):
        return _llava_raw_batch(cfg, batch, text, image)
    grid, n_img = image_tokens(cfg, image)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(150000, cfg.vision_start_token_id), (batch, n_img + text + 2))
    ids[:, 0] = cfg.vision_start_token_id
    ids[:, 1:1 + n_img] = cfg.image_token_id
    ids[:, 1 + n_img] = cfg.vision_start_token_id + 1
    pix = rng.standard_normal((batch * grid * grid, vision_tower(cfg).patch_dim)).astype(np.float32)
    thw = np.array([[1, grid, grid]] * batch)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pix, image_grid_thw=thw)


def _gemma3_raw_batch(cfg, batch, text, image) -> dict[str, np.ndarray]:
    _, n_img = image_tokens(cfg, image)
    rng = np.random.default_rng(0)
    special = min(cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id)
    ids = rng.integers(0, special, (batch, n_img + 4 + text))
    ids[:, 1] = cfg.boi_token_id
    ids[:, 2:2 + n_img] = cfg.image_token_id
    ids[:, 2 + n_img] = cfg.eoi_token_id
    pix = rng.standard_normal((batch, cfg.vision.num_channels, image, image)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pix,
                token_type_ids=(ids == cfg.image_token_id).astype(np.int64))


def _mllama_raw_batch(cfg, batch, text, image) -> dict[str, np.ndarray]:
    v = cfg.vision
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.text.vocab_size - 256, (batch, 1 + text))  # below the special tokens
    ids[:, 0] = cfg.image_token_id
    # The tile layouts by count: their ids in transformers' default supported_aspect_ratios for 4 tiles, (1, 1),
    # (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), ... numbered from 1.
    ratio_ids = {1: 1, 2: 2, 3: 3, 4: 6}
    counts = [int(c) for c in os.environ.get("JAXVLM_BENCH_MLLAMA_TILES", "4").split(",")]
    if any(c not in ratio_ids or c > v.max_num_tiles for c in counts):
        raise ValueError(f"JAXVLM_BENCH_MLLAMA_TILES={counts}: tile counts in 1..{min(4, v.max_num_tiles)} expected")
    counts = [counts[i % len(counts)] for i in range(batch)]
    pix = np.zeros((batch, 1, v.max_num_tiles, v.num_channels, image, image), np.float32)
    tiles = np.zeros((batch, 1, v.max_num_tiles), np.int64)
    for i, n in enumerate(counts):
        pix[i, :, :n] = rng.standard_normal((1, n, v.num_channels, image, image))
        tiles[i, :, :n] = 1
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pix,
                aspect_ratio_ids=np.array([[ratio_ids[n]] for n in counts], np.int64), aspect_ratio_mask=tiles,
                cross_attention_mask=np.broadcast_to(tiles[:, None], (batch, ids.shape[1], 1, v.max_num_tiles)).copy())


def _llava_raw_batch(cfg, batch, text, image) -> dict[str, np.ndarray]:
    tokens, text_ids = llava_tokens(cfg)
    grid, _ = image_tokens(cfg, image)
    prefix = image_prefix(cfg, image)
    rng = np.random.default_rng(0)
    ids = rng.integers(text_ids.start, text_ids.stop, (batch, prefix + text))
    if cfg.pixtral:  # PixtralProcessor's rows: `grid` [IMG] then [IMG_BREAK]; the last row's break is [IMG_END]
        rows = np.full((grid, grid + 1), cfg.image_token_id)
        rows[:, -1] = tokens["[IMG_BREAK]"]
        rows[-1, -1] = tokens["[IMG_END]"]
        ids[:, :prefix] = rows.reshape(-1)
    else:  # LlavaProcessor: the image's tokens, all <image>
        ids[:, :prefix] = cfg.image_token_id
    pix = rng.standard_normal((batch, cfg.vision.num_channels, image, image)).astype(np.float32)
    out = dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pix)
    if cfg.pixtral:
        out["image_sizes"] = np.array([[image, image]] * batch)
    return out


def hf_inputs(cfg, raw: dict, device):
    """transformers' forward / generate keyword arguments (torch tensors on `device`; pixels bf16) of a
    `raw_batch`: input_ids, attention_mask, pixel_values and the family's own (Qwen-VL: image_grid_thw,
    mm_token_type_ids; Gemma 3: token_type_ids; mllama: the tiles' arrays; llava with a Pixtral tower:
    image_sizes)."""
    import torch
    ids = torch.tensor(raw["input_ids"], device=device, dtype=torch.long)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
              pixel_values=torch.tensor(raw["pixel_values"], device=device, dtype=torch.bfloat16))
    if is_gemma3(cfg):
        kw["token_type_ids"] = torch.tensor(raw["token_type_ids"], device=device, dtype=torch.long)
    elif is_mllama(cfg):
        kw.update({k: torch.tensor(raw[k], device=device, dtype=torch.long)
                   for k in ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")})
    elif is_llava(cfg):
        if "image_sizes" in raw:
            kw["image_sizes"] = torch.tensor(raw["image_sizes"], device=device, dtype=torch.long)
    else:
        kw.update(image_grid_thw=torch.tensor(raw["image_grid_thw"], device=device),
                  mm_token_type_ids=(ids == cfg.image_token_id).long())
    return kw


def batch_inputs(cfg, batch, text, image, model_cls=MODEL):
    """prepare_inputs arrays of `raw_batch` (the family's image part, then `text` tokens) for `model_cls`."""
    model = nnx.eval_shape(lambda: model_cls(cfg, np.float32))  # prepare_inputs reads only the config
    return model.prepare_inputs(**raw_batch(cfg, batch, text, image))
