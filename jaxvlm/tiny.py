"""Tiny Qwen2-VL / Qwen2.5-VL models for tests and first tries, made offline (no hub, no torch).

The configs are transformers config objects; the tokenizer is a word-level vocab of 300 ids holding the
Qwen special tokens at the ids the configs name, with a Qwen-style chat template; the image processor
keeps images small.
"""
import json
import os


VOCAB = 300
IMAGE_TOKEN_ID = 290
VIDEO_TOKEN_ID = 291
VISION_START_ID = 288
VISION_END_ID = 289

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, rope_theta=1e6, max_position_embeddings=1024,
             rms_norm_eps=1e-6, bos_token_id=285, eos_token_id=287,
             rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
# "demo": twice as wide and deeper, still seconds per hundred steps on a CPU (scripts/demo.py).
_DEMO_TEXT = dict(_TEXT, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
_TOKENS = dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
               vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID)
SIZES = ("test", "demo")


def qwen2_vl_config(size="test", **text_overrides):
    from transformers import Qwen2VLConfig
    text = _DEMO_TEXT if size == "demo" else _TEXT
    return Qwen2VLConfig(
        text_config={**text, **text_overrides},
        vision_config=dict(depth=2, embed_dim=32 if size == "test" else 64, hidden_size=text["hidden_size"],
                           mlp_ratio=2, num_heads=2 if size == "test" else 4, in_channels=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        **_TOKENS)


def qwen2_5_vl_config(size="test", **text_overrides):
    from transformers import Qwen2_5_VLConfig
    text = _DEMO_TEXT if size == "demo" else _TEXT
    width = 32 if size == "test" else 64
    return Qwen2_5_VLConfig(
        text_config={**text, **text_overrides},
        vision_config=dict(depth=4, hidden_size=width, intermediate_size=48 if size == "test" else 128,
                           num_heads=2 if size == "test" else 4, out_hidden_size=text["hidden_size"],
                           in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=56, fullatt_block_indexes=[1, 3], hidden_act="silu"),
        **_TOKENS)


CONFIGS = {"qwen2_vl": qwen2_vl_config, "qwen2_5_vl": qwen2_5_vl_config}


_SPECIAL_TOKENS = {"<|endoftext|>": 285, "<|im_start|>": 286, "<|im_end|>": 287, "<|vision_start|>": VISION_START_ID,
                   "<|vision_end|>": VISION_END_ID, "<|image_pad|>": IMAGE_TOKEN_ID, "<|video_pad|>": VIDEO_TOKEN_ID}
_WORDS = ["<unk>", "\n", *"abcdefghijklmnopqrstuvwxyz0123456789", *".,?!:;'\"-()/", *"""
    you are helpful assistant system user what is this that the image picture photo describe digit number
    in of to and it how many there color red green blue black white one two three four five six seven eight
    nine zero answer question write please shows show see do does which where who can with on for from""".split()]

# Qwen2-VL's template, minus tools and vision ids: a default system turn, then each message with its
# images/videos as <|vision_start|><|image_pad|><|vision_end|> in content order.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_tokenizer():
    """A word-level tokenizer whose ids cover 0..VOCAB-1, the Qwen special tokens at the configs' ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(_WORDS)}
    vocab.update(_SPECIAL_TOKENS)
    # Fill the unused ids so that any id a random model generates decodes to something.
    used = set(vocab.values())
    vocab.update({f"tok{i}": i for i in range(VOCAB) if i not in used})
    assert len(vocab) == VOCAB and max(vocab.values()) == VOCAB - 1, "tiny vocab overlaps the special ids"
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Words, single punctuation marks and newlines are tokens; other whitespace only separates them.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


_PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def save_tiny_processor(path, family):
    """Writes the tiny tokenizer and a small-image Qwen2-VL image processor config into directory `path`.

    The files are laid out as in the Qwen checkpoints on the hub (tokenizer files, chat template,
    preprocessor_config.json), built offline. Image limits are small: a 56-wide, 84-high image becomes a 6x4
    grid of 14-pixel patches, 6 image tokens.
    """
    os.makedirs(path, exist_ok=True)
    _tiny_tokenizer().save_pretrained(path)
    image_processor = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": _PROCESSOR_CLASSES[family],
        "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
        "min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(image_processor, f, indent=2)


def save_random_model(path, family="qwen2_vl", seed=0, std=0.02, size="test"):
    """Writes a tiny random-weight model of `family` (config.json, model.safetensors, processor) to `path`.

    Needs neither torch nor the hub: the weights are drawn for the shapes jaxvlm's own model has and
    written under transformers' key names, so transformers loads the directory too.
    """
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from safetensors.numpy import save_file

    from jaxvlm.converters.hf_export import hf_tensors
    from jaxvlm.models import family_for

    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {SIZES}")
    hf_config = CONFIGS[family](size)
    module = family_for(hf_config.model_type, "jaxvlm.tiny")
    model = nnx.eval_shape(lambda: module.build(module.from_hf(hf_config), jnp.float32))
    rng = np.random.default_rng(seed)
    shapes = [(k, v.shape) for k, v in hf_tensors(_zeros_like(model), module.STACKED)]
    tensors = {}
    for key, shape in shapes:
        # Norm scales near 1, everything else small: the forward then behaves like a trained model's.
        base = 1.0 if key.endswith("norm.weight") or "norm1" in key or "norm2" in key or "ln_q.weight" in key else 0.0
        tensors[key] = (base + std * rng.standard_normal(shape)).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    hf_config.save_pretrained(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    save_tiny_processor(path, family)


def _zeros_like(abstract):
    """A concrete model of zeros with the abstract model's shapes (tiny models only)."""
    import jax.numpy as jnp
    from flax import nnx
    graphdef, state = nnx.split(abstract)
    flat = [(p, v.replace(jnp.zeros(v.get_value().shape, v.get_value().dtype))) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
