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
from pathlib import Path

from engine.errors import ConfigError

# Bump when a builder changes, so cached folders from an older build are not reused.
BUILD_VERSION = 1
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


def _corpus() -> list[str]:
    from engine.prompt import CAPTION_ENGINE_INSTRUCTION

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


@register("caption")
def build_llava_next(folder: Path) -> None:
    """LLaVA-NeXT: CLIP vision tower + Llama, AnyRes over a 64 px base with a 2×2 grid."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    unk, bos, eos, pad, image = range(len(specials))
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
        vocab_size=bpe.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    pinpoints = [[64, 128], [128, 64], [128, 128]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_VISION, projection_dim=32),
        text_config=text,
        image_token_index=image,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = eos
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": 64},
            crop_size={"height": 64, "width": 64},
            image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tokenizer,
        patch_size=_VISION["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, as in the llava-hf checkpoints
        chat_template=_VICUNA_CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


@register("clip")
def build_clip_vision(folder: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**_VISION, projection_dim=32)).eval()
    model.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
    ).save_pretrained(folder)


@register("owlv2")
def build_owlv2(folder: Path) -> None:
    """OWLv2 with a CLIP-style tokenizer whose BOS id is 1: OWLv2 drops queries starting with 0."""
    from tokenizers import processors
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<|startoftext|>", "<|endoftext|>"]
    pad, bos, eos = range(len(specials))
    bpe = byte_bpe_tokenizer(_corpus(), specials, vocab_size=400)
    bpe.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    max_query_tokens = 16
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        model_max_length=max_query_tokens,
    )
    hidden = 32  # projection_dim must equal the text hidden size (OWLv2's box/class heads)
    config = Owlv2Config(
        text_config={
            "vocab_size": bpe.get_vocab_size(),
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": max_query_tokens,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
        },
        vision_config=_VISION,
        projection_dim=hidden,
    )
    Owlv2ForObjectDetection(config).eval().save_pretrained(folder)
    Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer
    ).save_pretrained(folder)
