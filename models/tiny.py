"""Tiny random-weight models of the real architectures, for tests, the demo and CPU benchmarks.

Each role is built from a config in code (no download), seeded so that every build is the same,
saved with ``save_pretrained`` (weights + processor/tokenizer) and then loaded by the stages
through the same ``from_pretrained`` code a real checkpoint goes through. Tiny models write
noise: they exercise the machinery, not the quality.

Other modules add roles with :func:`register`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from models.errors import ConfigError

# Bump when a builder changes, so cached folders from an older build are not reused.
BUILD_VERSION = 4
SEED = 0

Builder = Callable[[Path], None]
_BUILDERS: dict[str, Builder] = {}


def register(role: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(folder)`` writes the tiny model of ``role`` into an empty folder."""

    def add(builder: Builder) -> Builder:
        if role in _BUILDERS:
            raise ValueError(f"tiny model role {role!r} registered twice")
        _BUILDERS[role] = builder
        return builder

    return add


def roles() -> tuple[str, ...]:
    return tuple(sorted(_BUILDERS))


def ensure(role: str, root: Path) -> Path:
    """The folder of the tiny model for ``role`` under ``root``, built on first use.

    The build goes to a temporary folder that is renamed into place, so a crash or a concurrent
    build never leaves a half-written model behind.
    """
    if role not in _BUILDERS:
        raise ConfigError(f"no tiny model for role {role!r} (known: {', '.join(roles())})")
    root = Path(root)
    folder = root / f"{role}-v{BUILD_VERSION}"
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{role}-", dir=root))
    try:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            _BUILDERS[role](scratch)
        try:
            scratch.rename(folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def byte_bpe_tokenizer(corpus: Iterable[str], specials: list[str], vocab_size: int):
    """A byte-level BPE trained in memory: any text encodes, ids of ``specials`` are 0, 1, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def _printable(piece: str) -> bool:
    """Printable ASCII or plain whitespace (not the ASCII separators \\x1c-\\x1f, which str.strip() drops)."""
    return bool(piece) and piece.isascii() and all(c.isprintable() or c in " \t\n\r" for c in piece)


def _corpus() -> list[str]:
    from models.caption.instruction import CAPTION_ENGINE_INSTRUCTION

    words = (
        "The image shows a dog, a cat, a person, a car and a red ball on a wooden table. "
        "Text on the poster reads GRAND OPENING. [World Knowledge] [Detection Box] [OCR] [IMAGE]"
    )
    return [CAPTION_ENGINE_INSTRUCTION, words] * 4


# A small CLIP-like vision tower shared by the roles that contain one.
_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 64,
    "patch_size": 16,
}

# Mirrors the llava-hf vicuna template: "USER: <image>\n{text} ASSISTANT:" (images first).
_VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% else %}{{ message['role'].upper() }}: "
    "{% for c in message['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class LlavaNextSize:
    """The dimensions of a LLaVA-NeXT build; the tokenizer is always the small in-memory BPE."""

    vision: dict
    text: dict
    base: int  # the vision tower's input side: AnyRes tiles and the overview are this size
    pinpoints: tuple[tuple[int, int], ...]


TINY_LLAVA_NEXT = LlavaNextSize(
    vision=_VISION,
    text={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 4},
    base=64,
    pinpoints=((64, 128), (128, 64), (128, 128)),
)

# llava-hf/llava-v1.6-vicuna-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B (Llama-2 dims, full MHA).
LLAVA_NEXT_7B = LlavaNextSize(
    vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": 336, "patch_size": 14},
    text={"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
          "rms_norm_eps": 1e-5},
    base=336,
    pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
)


def llava_next_parts(size: LlavaNextSize):
    """``(LlavaNextConfig, LlavaNextProcessor)`` of the given dimensions, nothing allocated."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    _unk, bos, eos, pad, image = range(len(specials))
    bpe = byte_bpe_tokenizer(_corpus(), specials, vocab_size=512)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.chat_template = _VICUNA_CHAT_TEMPLATE
    text = LlamaConfig(
        **{"vocab_size": bpe.get_vocab_size(), **size.text},
        max_position_embeddings=4096,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    pinpoints = [list(p) for p in size.pinpoints]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**size.vision, projection_dim=768),
        text_config=text,
        image_token_index=image,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": size.base},
            crop_size={"height": size.base, "width": size.base},
            image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tokenizer,
        patch_size=size.vision["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, as in the llava-hf checkpoints
        chat_template=_VICUNA_CHAT_TEMPLATE,
    )
    return config, processor


@register("caption")
def build_llava_next(folder: Path) -> None:
    """LLaVA-NeXT: CLIP vision tower + Llama, AnyRes over a 64 px base with a 2×2 grid."""
    from transformers import LlavaNextForConditionalGeneration

    config, processor = llava_next_parts(TINY_LLAVA_NEXT)
    model = LlavaNextForConditionalGeneration(config).eval()
    generation = model.generation_config
    text = config.text_config
    generation.pad_token_id, generation.bos_token_id = text.pad_token_id, text.bos_token_id
    generation.eos_token_id = text.eos_token_id
    # random weights pick any token: keep to printable ASCII pieces so the noise stays text
    tokenizer = processor.tokenizer
    generation.suppress_tokens = [
        i
        for i in range(len(tokenizer))
        if i != text.eos_token_id
        and (i in tokenizer.all_special_ids or not _printable(tokenizer.decode([i])))
    ]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


@register("clip")
def build_clip_vision(folder: Path) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**_VISION, projection_dim=32)).eval()
    model.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
    ).save_pretrained(folder)


# --- the vision experts' roles -----------------------------------------------------------


@register("embed")
def build_eva_clip(folder: Path) -> None:
    from models.embedder import build_tiny

    build_tiny(folder)


@register("ram_plus")
def build_ram_plus(folder: Path) -> None:
    from models.ram_plus import build_tiny

    build_tiny(folder)


@register("detector")
def build_closed_detector(folder: Path) -> None:
    from models.detector import build_tiny

    build_tiny(folder)


@register("owlv2")
def build_owlv2(folder: Path) -> None:
    from models.owlv2 import build_tiny

    build_tiny(folder)


# Qwen2.5-VL's template (Qwen/Qwen2.5-VL-7B-Instruct), images only: its default system turn, then
# the user turn's parts in the order given, each image as <|vision_start|><|image_pad|><|vision_end|>.
_QWEN_TURN = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}" + _QWEN_TURN
)
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
_QWEN_PATCH = 14  # Qwen2.5-VL's vision patch; 2x2 patches merge into one image token (28x28 pixels)


@dataclass(frozen=True)
class VlSize:
    """The dimensions of a Qwen-VL or InternVL build: vision and language config keys, and the image
    budget (Qwen: min and max pixels; InternVL: min and max tiles). The tokenizer is always the small
    in-memory BPE; a real-size build's vocabulary is the checkpoint's (ids past the BPE's are never
    in a prompt)."""

    vision: dict
    text: dict
    budget: tuple[int, int]


_TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}
# head_dim 16: 8 rotary pairs, split over (time, height, width) by mrope_section
TINY_QWEN2_5_VL = VlSize(
    vision={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "window_size": 56,
            "out_hidden_size": 64, "fullatt_block_indexes": [1]},
    text={**_TINY_TEXT, "head_dim": 16,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
    budget=(4 * 28 * 28, 64 * 28 * 28),  # 4 to 64 image tokens
)
# Qwen/Qwen2.5-VL-7B-Instruct; the budget its model card suggests (max_pixels 1280x28x28; the
# processor's own default allows 16,384 tokens)
QWEN2_5_VL_7B = VlSize(
    vision={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "window_size": 112,
            "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31]},
    text={"vocab_size": 152064, "max_position_embeddings": 128000, "hidden_size": 3584,
          "intermediate_size": 18944, "num_hidden_layers": 28,
          "num_attention_heads": 28, "num_key_value_heads": 4, "head_dim": 128,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
    budget=(4 * 28 * 28, 1280 * 28 * 28),
)


def qwen_tokenizer(chat_template: str):
    """The tiny BPE with Qwen-VL's special tokens and ``chat_template``: ``(tokenizer, ids of the specials)``."""
    from transformers import PreTrainedTokenizerFast

    bpe = byte_bpe_tokenizer(_corpus(), _QWEN_SPECIALS, vocab_size=512)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    tokenizer.chat_template = chat_template
    return tokenizer, {token: i for i, token in enumerate(_QWEN_SPECIALS)}


def _text(tokenizer, ids: dict[str, int], size: VlSize) -> dict:
    """The language model's config keys: ``size``'s over the tokenizer's vocabulary and special ids."""
    return {"vocab_size": len(tokenizer), "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"], **size.text}


def _qwen_token_ids(ids: dict[str, int]) -> dict:
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}


def qwen2_5_vl_parts(size: VlSize = TINY_QWEN2_5_VL):
    """``(Qwen2_5_VLConfig, Qwen2_5_VLProcessor)`` of the given dimensions, nothing allocated."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer, ids = qwen_tokenizer(_QWEN_CHAT_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=_text(tokenizer, ids, size),
        vision_config={**size.vision, "patch_size": _QWEN_PATCH, "spatial_merge_size": 2,
                       "temporal_patch_size": 2},
        **_qwen_token_ids(ids),
    )
    min_pixels, max_pixels = size.budget
    budget = {"min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": _QWEN_PATCH,
              "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**budget),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**budget),
        chat_template=_QWEN_CHAT_TEMPLATE,
    )
    return config, processor


# Qwen3-VL's template (Qwen/Qwen3-VL-8B-Instruct), images only: no default system turn, then the
# user turn's parts in the order given, each image as <|vision_start|><|image_pad|><|vision_end|>.
_QWEN3_CHAT_TEMPLATE = "{% for message in messages %}" + _QWEN_TURN
_QWEN3_PATCH = 16  # Qwen3-VL's vision patch; 2x2 patches merge into one image token (32x32 pixels)
# DeepStack: the features of vision layer 0 also enter the language model's first layer
TINY_QWEN3_VL = VlSize(
    vision={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
    text={**_TINY_TEXT, "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                                            "mrope_section": [2, 3, 3], "mrope_interleaved": True}},
    budget=(4 * 32 * 32, 64 * 32 * 32),  # 4 to 64 image tokens
)
# Qwen/Qwen3-VL-8B-Instruct; the budget as for Qwen2.5-VL-7B: 1,280 tokens at most
QWEN3_VL_8B = VlSize(
    vision={"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
            "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]},
    text={"vocab_size": 151936, "max_position_embeddings": 262144, "hidden_size": 4096,
          "intermediate_size": 12288, "num_hidden_layers": 36,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
          "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                              "mrope_interleaved": True}},
    budget=(64 * 32 * 32, 1280 * 32 * 32),
)


def qwen3_vl_parts(size: VlSize = TINY_QWEN3_VL):
    """``(Qwen3VLConfig, Qwen3VLProcessor)`` of the given dimensions, nothing allocated."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer, ids = qwen_tokenizer(_QWEN3_CHAT_TEMPLATE)
    config = Qwen3VLConfig(
        text_config=_text(tokenizer, ids, size),
        vision_config={**size.vision, "patch_size": _QWEN3_PATCH, "spatial_merge_size": 2,
                       "temporal_patch_size": 2},
        **_qwen_token_ids(ids),
    )
    min_pixels, max_pixels = size.budget
    budget = {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "patch_size": _QWEN3_PATCH,
              "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**budget),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**budget),
        chat_template=_QWEN3_CHAT_TEMPLATE,
    )
    return config, processor


def _keep_to_text(model, tokenizer) -> None:
    """Random weights pick any token: keep generation to printable ASCII pieces (and the end
    token) so the noise stays text."""
    generation, text = model.generation_config, model.config.get_text_config()
    generation.pad_token_id, generation.bos_token_id = text.pad_token_id, text.bos_token_id
    generation.eos_token_id = text.eos_token_id
    generation.suppress_tokens = [
        i
        for i in range(len(tokenizer))
        if i != text.eos_token_id
        and (i in tokenizer.all_special_ids or not _printable(tokenizer.decode([i])))
    ]


@register("caption-qwen2_5_vl")
def build_qwen2_5_vl(folder: Path) -> None:
    """Qwen2.5-VL: windowed ViT with 2x2 patch merging + Qwen2 with M-RoPE, dynamic resolution."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config, processor = qwen2_5_vl_parts()
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _keep_to_text(model, processor.tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


@register("caption-qwen3_vl")
def build_qwen3_vl(folder: Path) -> None:
    """Qwen3-VL: ViT with learned + 2D rotary positions, DeepStack features into the language
    model's first layers, Qwen3 (q/k norms) with interleaved M-RoPE, dynamic resolution."""
    from transformers import Qwen3VLForConditionalGeneration

    config, processor = qwen3_vl_parts()
    model = Qwen3VLForConditionalGeneration(config).eval()
    _keep_to_text(model, processor.tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# InternVL3's template (OpenGVLab/InternVL3-1B-hf), images only: no default system turn, the user
# turn's parts in the order given, each image as <IMG_CONTEXT> and a newline (the processor expands it
# into <img>, its tiles' <IMG_CONTEXT> tokens and </img>).
_INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                      "<video>"]
_INTERNVL_TILE = 448  # every InternVL's tile (SGLang's InternVL processor tiles at 448 whatever the config says)
# Patches of 56 px: a tile is 8x8 patches, 4x4 = 16 tokens after the 0.5 pixel shuffle (real: 14 px, 256)
TINY_INTERNVL = VlSize(
    vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "patch_size": 56},
    text=_TINY_TEXT,
    budget=(1, 4),  # 1 to 4 tiles, plus the thumbnail when more than one
)
# OpenGVLab/InternVL3-8B-hf: InternViT-300M + Qwen2.5-7B, 1 to 12 tiles
INTERNVL3_8B = VlSize(
    vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "patch_size": 14},
    text={"vocab_size": 151674, "max_position_embeddings": 32768, "hidden_size": 3584,
          "intermediate_size": 18944, "num_hidden_layers": 28,
          "num_attention_heads": 28, "num_key_value_heads": 4},
    budget=(1, 12),
)


def internvl_parts(size: VlSize = TINY_INTERNVL):
    """``(InternVLConfig, InternVLProcessor)`` of the given dimensions (transformers' layout), nothing
    allocated."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVideoProcessor,
        PreTrainedTokenizerFast,
    )

    bpe = byte_bpe_tokenizer(_corpus(), _INTERNVL_SPECIALS, vocab_size=512)
    ids = {token: i for i, token in enumerate(_INTERNVL_SPECIALS)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    tokenizer.chat_template = _INTERNVL_CHAT_TEMPLATE
    tile_tokens = (_INTERNVL_TILE // size.vision["patch_size"]) ** 2 // 4
    config = InternVLConfig(
        vision_config={**size.vision, "image_size": _INTERNVL_TILE},
        text_config={"model_type": "qwen2", **_text(tokenizer, ids, size), "tie_word_embeddings": False},
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=tile_tokens, downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    tile = {"size": {"height": _INTERNVL_TILE, "width": _INTERNVL_TILE},
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}  # ImageNet's, as InternVL
    min_tiles, max_tiles = size.budget
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(**tile, crop_to_patches=True, min_patches=min_tiles,
                                              max_patches=max_tiles),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(**tile),
        image_seq_length=tile_tokens,
        chat_template=_INTERNVL_CHAT_TEMPLATE,
    )
    return config, processor


@register("caption-internvl")
def build_internvl(folder: Path) -> None:
    """InternVL 2.5/3 in transformers' own layout: InternViT + pixel-shuffle MLP projector + Qwen2,
    images as 448 px tiles plus a thumbnail."""
    from transformers import InternVLForConditionalGeneration

    config, processor = internvl_parts()
    model = InternVLForConditionalGeneration(config).eval()
    _keep_to_text(model, processor.tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    """``python -m models.tiny ROLE --root DIR``: build (once) and print the tiny model's folder,
    e.g. a tiny Qwen2.5-VL for ``run --caption-model``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m models.tiny", description=main.__doc__, allow_abbrev=False)
    parser.add_argument("role", choices=roles())
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache" / "densefusion" / "tiny",
                        help="where tiny models are kept (run's --cache-dir/tiny)")
    args = parser.parse_args(argv)
    print(ensure(args.role, args.root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
