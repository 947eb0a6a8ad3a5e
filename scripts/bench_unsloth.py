"""Unsloth peer of the LoRA training-step benchmark (PyTorch, CUDA), for a geometry of bench_common.

On the lent GPU machine (`.peers/` built by scripts/fetch_peers.sh and carried):

    PYTHONPATH=.peers/bnb:.peers/unsloth:. python scripts/bench_unsloth.py --geometry qwen3-vl-2b --batch 4 8 --q4 0 1
    PYTHONPATH=.peers/bnb:.peers/unsloth:. python scripts/bench_unsloth.py --geometry gemma3-4b --batch 4 8 --q4 0 1

Same workload as bench_train and bench_hf_peft: the geometry's model with random weights (bench_common.GEOMETRIES),
batch B of one 448x448 image (Qwen2-VL's 14-pixel patches: 32x32 patches, 256 merged tokens; Qwen3-VL's 16-pixel
ones: 28x28 patches, 196 tokens; Gemma 3: one 896x896 image, 64x64 patches pooled to 256 tokens, wrapped in
"\\n\\n<boi>" .. "<eoi>\\n\\n", token_type_ids 1 at them; Llama 3.2 Vision: 2 x 2 tiles of 560; LLaVA 1.5: one 336x336
image, 576 <image>; Pixtral-12B: one 448x448 image, 812 tokens with its rows' [IMG_BREAK] / [IMG_END]) plus 256
text tokens, labels masked on the image prefix, LoRA r=16 alpha=16 on vision + language attention + MLP, AdamW lr
1e-4; 3 warm-up steps, then the median of 10 timed steps, peak memory from torch.cuda.max_memory_allocated. The
model goes through Unsloth's public API: FastVisionModel.from_pretrained (bf16, or load_in_4bit=True for NF4),
get_peft_model, for_training.

The random model and an offline-built processor are saved once to MODEL_DIR (default /tmp/unsloth_bench_<geometry>)
by a separate process, so that each measured process imports unsloth before transformers and peft.

Needs unsloth, unsloth_zoo, trl, datasets and bitsandbytes importable (on the lent GPU machine:
PYTHONPATH=.peers/bnb:.peers/unsloth), and a GPU: without them each config prints its error line. Other uses:

    GEOMETRY=qwen3-vl-2b B=4 Q4=1 python scripts/bench_unsloth.py --child   # a single config in this process
    python scripts/bench_unsloth.py --geometry qwen3-vl-2b --prep DIR        # only write the model and processor
    python scripts/bench_unsloth.py --geometry gemma3-4b --tiny --prep DIR   # the same for the family's tiny config

One JSON line per config; a config that fails prints a JSON line with the error and the end of its traceback.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback

# The GPU machines are offline: no hub look-ups, no Unsloth usage statistics. JAX (imported with bench_common in
# the --prep process) stays on the CPU, so that it takes no GPU memory from torch.
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ["JAX_PLATFORMS"] = "cpu"
TXT = int(os.environ.get("TXT", 256))
IMG = int(os.environ.get("IMG", 448))
DEFAULT_GEOMETRY = "qwen2-vl-2b"

# Qwen2 special-token ids (as in the released Qwen2-VL and Qwen3-VL tokenizers).
_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
            "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649,
            "<|quad_start|>": 151650, "<|quad_end|>": 151651, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656}


def model_dir(geometry: str, tiny: bool = False) -> str:
    return os.environ.get("MODEL_DIR") or f"/tmp/unsloth_bench_{geometry}{'_tiny' if tiny else ''}"


def is_gemma3(hf_config) -> bool:
    """Whether a transformers config is Gemma 3's (fixed-size SigLIP images, token_type_ids)."""
    import transformers
    return isinstance(hf_config, transformers.Gemma3Config)


def is_mllama(hf_config) -> bool:
    """Whether a transformers config is Llama 3.2 Vision's (tiles, cross-attention)."""
    import transformers
    return isinstance(hf_config, transformers.MllamaConfig)


def is_llava(hf_config) -> bool:
    """Whether a transformers config is a `llava` (LLaVA 1.5's CLIP tower or Pixtral-12B's Pixtral tower)."""
    import transformers
    return isinstance(hf_config, transformers.LlavaConfig)


def save_processor(path, hf_config):
    """The family's offline processor (Qwen-VL's, Gemma 3's, Llama 3.2 Vision's or LLaVA's / Pixtral's), saved to
    `path`."""
    if is_gemma3(hf_config):
        return save_gemma3_processor(path, hf_config)
    if is_mllama(hf_config):
        return save_mllama_processor(path, hf_config)
    if is_llava(hf_config):
        return save_llava_processor(path, hf_config)
    return save_qwen_processor(path, hf_config)


def save_llava_processor(path, hf_config):
    """An offline processor of a `llava` config: a word-level tokenizer over the text vocabulary (plain ids are
    placeholders) with the geometry's special tokens at their ids (bench_common.llava_tokens: the released ones, or
    the tiny config's); with a CLIP tower LlavaProcessor (a CLIPImageProcessor of the tower's size, one <image> per
    patch, the class token dropped) and the llava family's chat template, with a Pixtral tower PixtralProcessor (a
    PixtralImageProcessor of images up to the tower's size in its patches, no merging, [IMG] / [IMG_BREAK] /
    [IMG_END]) and Mistral's (Pixtral-12B's checkpoint carries it)."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxvlm.models import model_class
    from jaxvlm.models.llava import Mistral3ForConditionalGeneration
    from scripts.bench_common import llava_tokens
    family = model_class(hf_config.model_type, path)
    cfg = family.config_from_hf(hf_config)
    special, _ = llava_tokens(cfg)
    template_family = Mistral3ForConditionalGeneration if cfg.pixtral else family
    taken = set(special.values())
    unk = "<unk>" if "<unk>" in special else "t0"
    vocab = {f"t{i}": i for i in range(cfg.text.vocab_size) if i not in taken}
    vocab.update(special)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    chat_template = template_family.TINY.chat_template
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, pad_token="[PAD]" if "[PAD]" in special else "<pad>",
        eos_token="</s>", bos_token="<s>", chat_template=chat_template)
    v, p = cfg.vision, cfg.vision.patch_size
    kw = dict(template_family.TINY.image_processor)
    kw.pop("image_processor_type", None)
    if cfg.pixtral:
        kw.update(size={"longest_edge": v.image_size}, patch_size={"height": p, "width": p})
        names = ("PixtralImageProcessor", "PixtralImageProcessorPil")
        extra = dict(patch_size=p, spatial_merge_size=1, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                     image_end_token="[IMG_END]")
    else:
        kw.update(size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size, "width": v.image_size})
        names = ("CLIPImageProcessor", "CLIPImageProcessorPil")
        extra = dict(patch_size=p, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                     image_token="<image>")
    try:  # the torchvision backend, else PIL's
        image_processor = getattr(transformers, names[0])(**kw)
    except Exception:
        image_processor = getattr(transformers, names[1])(**kw)
    name = "PixtralProcessor" if cfg.pixtral else "LlavaProcessor"
    try:
        getattr(transformers, name)(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                                    **extra).save_pretrained(path)
    except ImportError:  # PixtralProcessor needs torchvision: write the parts; AutoProcessor assembles them
        tokenizer.save_pretrained(path)
        image_processor.save_pretrained(path)
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(chat_template)
        with open(os.path.join(path, "processor_config.json"), "w") as f:
            json.dump({**extra, "processor_class": name}, f, indent=2)


# Llama 3.2 Vision's special tokens at the released tokenizer's ids (<|image|> comes from the config).
_MLLAMA_SPECIAL = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                   "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009}


def save_mllama_processor(path, hf_config):
    """An offline MllamaProcessor: a word-level tokenizer over the text vocabulary (plain ids are placeholders),
    the released special tokens' ids and <|image|> at the config's image_token_index, the family's chat template,
    and a MllamaImageProcessor of the config's tile size and tile count."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxvlm.models import model_class
    family = model_class(hf_config.model_type, path)
    special = dict(_MLLAMA_SPECIAL, **{"<|image|>": hf_config.image_token_index})
    taken = set(special.values())
    vocab = {f"t{i}": i for i in range(hf_config.text_config.vocab_size) if i not in taken}
    vocab.update(special)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", pad_token="<|finetune_right_pad_id|>", eos_token="<|eot_id|>",
        bos_token="<|begin_of_text|>", chat_template=family.TINY.chat_template)
    v = hf_config.vision_config
    kw = {**family.TINY.image_processor, "size": {"height": v.image_size, "width": v.image_size},
          "max_image_tiles": v.max_num_tiles}
    kw.pop("image_processor_type", None)
    try:  # the torchvision backend, else PIL's
        image_processor = transformers.MllamaImageProcessor(**kw)
    except Exception:
        from transformers import MllamaImageProcessorPil
        image_processor = MllamaImageProcessorPil(**kw)
    transformers.MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 chat_template=family.TINY.chat_template).save_pretrained(path)


# Gemma 3's special tokens at the released tokenizer's ids (the image ones come from the config).
_GEMMA_SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106}


def save_gemma3_processor(path, hf_config):
    """An offline Gemma3Processor: a word-level tokenizer over the config's whole vocabulary (plain ids are
    placeholders), Gemma's special tokens at the released ids and the image tokens (<start_of_image>,
    <end_of_image>, <image_soft_token>) at the config's, the family's chat template, and a Gemma3ImageProcessor of
    the tower's image size (mean = std = 0.5, as Gemma 3's) with image_seq_length = mm_tokens_per_image."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxvlm.models import model_class
    family = model_class(hf_config.model_type, path)
    special = dict(_GEMMA_SPECIAL, **{"<start_of_image>": hf_config.boi_token_index,
                                      "<end_of_image>": hf_config.eoi_token_index,
                                      "<image_soft_token>": hf_config.image_token_index})
    taken = set(special.values())
    if len(taken) != len(special) or max(taken) >= hf_config.text_config.vocab_size:
        raise ValueError(f"Gemma 3 special token ids {special} collide or leave the vocabulary")
    vocab = {f"t{i}": i for i in range(hf_config.text_config.vocab_size) if i not in taken}
    vocab.update(special)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        chat_template=family.TINY.chat_template, extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    size = hf_config.vision_config.image_size
    kw = dict(size={"height": size, "width": size}, resample=2, do_rescale=True, rescale_factor=1 / 255,
              do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False)
    try:  # the torchvision backend, else PIL's
        image_processor = transformers.Gemma3ImageProcessor(**kw)
    except Exception:
        from transformers import Gemma3ImageProcessorPil
        image_processor = Gemma3ImageProcessorPil(**kw)
    proc = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=family.TINY.chat_template,
                                        image_seq_length=hf_config.mm_tokens_per_image)
    proc.save_pretrained(path)


def save_qwen_processor(path, hf_config):
    """An offline processor of the config's family (Qwen2VLProcessor / Qwen3VLProcessor): a word-level tokenizer
    whose 151,643 plain ids are placeholders and whose special tokens sit at Qwen2's ids, the family's chat
    template, and image/video processors with the config's patch size (14 for Qwen2-VL, 16 for Qwen3-VL)."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxvlm.models import model_class
    family = model_class(hf_config.model_type, path)
    chat_template = family.TINY.chat_template  # the family's template (no tools)
    processor_name = family.INFO.processor_class(hf_config.model_type)  # Qwen2VLProcessor, Qwen3VLProcessor
    vision = hf_config.vision_config
    sizes = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                 temporal_patch_size=vision.temporal_patch_size)
    # Qwen3-VL normalises with mean = std = 0.5 (Qwen2-VL with CLIP's statistics, the processor's default).
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if hf_config.model_type.startswith("qwen3") else {}
    vocab = {f"t{i}": i for i in range(151643)}
    vocab.update(_SPECIAL)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", chat_template=chat_template)
    try:
        from transformers import Qwen2VLImageProcessor
        image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=IMG * IMG, **sizes, **norm)
    except Exception:
        from transformers import Qwen2VLImageProcessorPil
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=IMG * IMG, **sizes, **norm)
    processor_class = getattr(transformers, processor_name)
    try:  # the video processor needs torchvision
        video_class = getattr(transformers, processor_name.replace("Processor", "VideoProcessor"))
        proc = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_class(**sizes, **norm), chat_template=chat_template)
    except Exception:
        try:
            proc = processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
        except Exception:  # no torchvision at all: write the parts; AutoProcessor assembles them
            tokenizer.save_pretrained(path)
            image_processor.save_pretrained(path)
            with open(os.path.join(path, "chat_template.jinja"), "w") as f:
                f.write(chat_template)
            return
    proc.save_pretrained(path)


def prep(path, geometry, tiny=False):
    """Saves the geometry's random bf16 model and the processor to `path` (no unsloth in this process)."""
    from scripts.bench_common import hf_geometry, save_random_hf_model
    save_random_hf_model(geometry, path, tiny)
    save_processor(path, hf_geometry(geometry, tiny))
    open(os.path.join(path, "DONE"), "w").close()


def ensure_model_dir(geometry, tiny=False):
    path = model_dir(geometry, tiny)
    if not os.path.exists(os.path.join(path, "DONE")):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--prep", path, "--geometry", geometry,
                        *(["--tiny"] if tiny else [])], check=True)
    return path


def workload(config):
    """(patches per side, merged image tokens, patch_dim) of one IMG x IMG image for a transformers config, as
    bench_common.image_tokens counts them for the jaxvlm side."""
    v = config.vision_config
    grid = IMG // v.patch_size
    return grid, grid * grid // v.spatial_merge_size**2, v.in_channels * v.temporal_patch_size * v.patch_size**2


def qwen_batch(cfg, B, device):
    """(forward keyword arguments, labels, seq, image side, image tokens) of Qwen-VL's workload: <vision_start>,
    one IMG x IMG image, <vision_end>, TXT random tokens; labels masked on the image part."""
    import torch
    grid, n_img_tok, patch_dim = workload(cfg)
    seq = n_img_tok + TXT + 2
    torch.manual_seed(0)
    ids = torch.randint(0, 150000, (B, seq), device=device)
    ids[:, 0] = cfg.vision_start_token_id
    ids[:, 1:1 + n_img_tok] = cfg.image_token_id
    ids[:, 1 + n_img_tok] = cfg.vision_end_token_id
    pix = torch.randn(B * grid * grid, patch_dim, device=device, dtype=torch.bfloat16)
    thw = torch.tensor([[1, grid, grid]] * B, device=device)
    mm = torch.zeros_like(ids); mm[ids == cfg.image_token_id] = 1
    labels = ids.clone(); labels[:, :2 + n_img_tok] = -100
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix, image_grid_thw=thw,
              mm_token_type_ids=mm)
    return kw, labels, seq, IMG, n_img_tok


def gemma3_batch(cfg, B, device):
    """The same for Gemma 3 (bench_common's layout): "\\n\\n<boi>" (the "\\n\\n" a random text id), the image's
    mm_tokens_per_image tokens, "<eoi>\\n\\n", TXT random tokens; one image of the tower's size per sample,
    token_type_ids 1 at the image tokens."""
    import torch
    n_img_tok, size = cfg.mm_tokens_per_image, cfg.vision_config.image_size
    seq = n_img_tok + 4 + TXT
    torch.manual_seed(0)
    special = min(cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token_index)
    ids = torch.randint(0, special, (B, seq), device=device)
    ids[:, 1] = cfg.boi_token_index
    ids[:, 2:2 + n_img_tok] = cfg.image_token_index
    ids[:, 2 + n_img_tok] = cfg.eoi_token_index
    pix = torch.randn(B, cfg.vision_config.num_channels, size, size, device=device, dtype=torch.bfloat16)
    labels = ids.clone(); labels[:, :4 + n_img_tok] = -100
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix,
              token_type_ids=(ids == cfg.image_token_index).long())
    return kw, labels, seq, size, n_img_tok


def mllama_batch(cfg, B, device):
    """The same for Llama 3.2 Vision (bench_common's layout): "<|image|>", TXT random tokens; one image as 2 x 2
    tiles of the tower's size, aspect ratio id 6, every text token seeing the 4 tiles."""
    import torch
    v = cfg.vision_config
    size, tiles = v.image_size, v.max_num_tiles
    seq = 1 + TXT
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.text_config.vocab_size - 256, (B, seq), device=device)
    ids[:, 0] = cfg.image_token_index
    pix = torch.zeros(B, 1, tiles, v.num_channels, size, size, device=device, dtype=torch.bfloat16)
    pix[:, :, :4] = torch.randn(B, 1, 4, v.num_channels, size, size, device=device, dtype=torch.bfloat16)
    mask = torch.zeros(B, 1, tiles, device=device, dtype=torch.long)
    mask[..., :4] = 1
    labels = ids.clone(); labels[:, :1] = -100
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix,
              aspect_ratio_ids=torch.full((B, 1), 6, device=device, dtype=torch.long), aspect_ratio_mask=mask,
              cross_attention_mask=mask[:, None].expand(B, seq, 1, tiles).contiguous())
    return kw, labels, seq, size, 1


def llava_batch(cfg, B, device):
    """The same for `llava`, bench_common's workload itself: one image as the checkpoints' processors lay it out
    (LLaVA 1.5: 576 <image> for a 336-pixel image; Pixtral-12B: a 448-pixel image as 28 rows of 28 [IMG], each
    row ended by [IMG_BREAK], the last by [IMG_END], with image_sizes), TXT random tokens; labels masked on the
    image part."""
    from jaxvlm.models import model_class
    from scripts.bench_common import hf_inputs, image_prefix, image_tokens, raw_batch, workload_image
    jcfg = model_class(cfg.model_type, "bench_unsloth").config_from_hf(cfg)
    image = workload_image(jcfg)
    kw = hf_inputs(jcfg, raw_batch(jcfg, B, TXT, image), device)
    prefix = image_prefix(jcfg, image)
    labels = kw["input_ids"].clone(); labels[:, :prefix] = -100
    return kw, labels, prefix + TXT, image, image_tokens(jcfg, image)[1]


def child():
    B = int(os.environ.get("B", 4))
    Q4 = os.environ.get("Q4", "0") == "1"
    geometry = os.environ.get("GEOMETRY", DEFAULT_GEOMETRY)
    tiny = os.environ.get("TINY", "0") == "1"
    impl = "unsloth nf4" if Q4 else "unsloth bf16"
    res = dict(bench="train", impl=impl, geometry=geometry, weights="nf4" if Q4 else "bf16", B=B)
    try:
        path = ensure_model_dir(geometry, tiny)
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", "/tmp/unsloth_compiled_cache")
        import unsloth  # before transformers and peft
        from unsloth import FastVisionModel
        import torch
        res["unsloth"] = unsloth.__version__
        from scripts.bench_common import peer_versions
        res["versions"] = peer_versions()
        res["device"] = torch.cuda.get_device_name()
        t0 = time.perf_counter()
        model, processor = FastVisionModel.from_pretrained(
            path, load_in_4bit=Q4, dtype=torch.bfloat16, use_gradient_checkpointing="unsloth")
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=True, finetune_language_layers=True, finetune_attention_modules=True,
            finetune_mlp_modules=True, r=16, lora_alpha=16, lora_dropout=0, bias="none")
        FastVisionModel.for_training(model)
        res["load_s"] = time.perf_counter() - t0
        res["params"] = sum(p.numel() for p in model.parameters())
        res["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if Q4:
            import bitsandbytes as bnb
            res["n_linear4bit"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        cfg = model.config
        batch_of = (gemma3_batch if is_gemma3(cfg) else mllama_batch if is_mllama(cfg) else
                    llava_batch if is_llava(cfg) else qwen_batch)
        kw, labels, seq, img, n_img_tok = batch_of(cfg, B, "cuda")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            out = model(**kw, labels=labels)
            out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            return out.loss

        losses = [float(step().detach()) for _ in range(3)]
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(10):
            torch.cuda.synchronize(); t = time.perf_counter(); loss = step(); torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
        times.sort(); med = times[len(times) // 2]
        res.update(seq=seq, img=img, image_tokens=n_img_tok, step_s=med, tokens_per_s=B * seq / med,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30, losses=[round(x, 4) for x in losses])
    except BaseException as e:
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        res["traceback"] = traceback.format_exc().splitlines()[-25:]
    print(json.dumps(res), flush=True)


def main():
    from scripts.bench_common import GEOMETRIES
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default=DEFAULT_GEOMETRY, choices=sorted(GEOMETRIES))
    ap.add_argument("--batch", type=int, nargs="+", default=[4])
    ap.add_argument("--q4", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--child", action="store_true", help="run the config in env GEOMETRY, B, Q4 in this process")
    ap.add_argument("--prep", metavar="DIR", help="only save the random model and processor to DIR")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per config")
    ap.add_argument("--log", help="append each child's full output to this file")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the family's tiny config (CPU checks)
    args = ap.parse_args()
    if args.prep:
        return prep(args.prep, args.geometry, args.tiny)
    if args.child:
        return child()
    try:
        path = ensure_model_dir(args.geometry, args.tiny)
    except Exception as e:
        print(json.dumps(dict(bench="train", impl="unsloth", geometry=args.geometry,
                              error=f"model prep failed: {e}")), flush=True)
        return
    for q4 in args.q4:
        for b in args.batch:
            env = dict(os.environ, B=str(b), Q4=str(q4), GEOMETRY=args.geometry, MODEL_DIR=path,
                       TINY="1" if args.tiny else "0", **({"IMG": os.environ.get("IMG", "64")} if args.tiny else {}))
            impl = "unsloth nf4" if q4 else "unsloth bf16"
            try:
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                                   capture_output=True, text=True, timeout=args.timeout)
                out, err, rc = p.stdout, p.stderr, p.returncode
            except subprocess.TimeoutExpired as e:
                out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
                rc = "timeout"
            if args.log:
                with open(args.log, "a") as f:
                    f.write(f"===== {impl} {args.geometry} B={b} rc={rc}\n--- stdout\n{out}\n--- stderr\n{err}\n")
            line = None
            for ln in reversed(out.splitlines()):
                if ln.startswith("{") and '"impl"' in ln:
                    line = ln; break
            if line is None:
                tail = (out + "\n" + err).strip().splitlines()[-25:]
                line = json.dumps(dict(bench="train", impl=impl, geometry=args.geometry, B=b,
                                       error=f"child exited rc={rc} without a result", traceback=tail))
            print(line, flush=True)


if __name__ == "__main__":
    main()
