"""The fusion prompt: the experts' outputs written into the paper's templates (appendix C.2).

Two templates, worded character for character as the paper prints them (the released caption
engine was trained on the first; the second built its GPT-4V meta dataset):

- ``caption_engine``: the short instruction the DenseFusion caption engine was fine-tuned on;
- ``gpt4v``: the long policy prompt for GPT-4V (or any OpenAI-compatible model).

Layout (the paper's text is a PDF extraction, so whitespace is ours): the fixed instruction comes
first and never varies, so every prompt's text starts the same; blocks are separated by a blank
line, lines inside a section by one newline; the prompt ends with the template's ``[IMAGE]:``
label. The request is this prompt, then the image, in the caption checkpoint's own chat template
(``models/caption/chat.py``, the same on every backend): where the image lands is that template's
choice (llava-hf's LLaVA-NeXT templates put it before the text, as LLaVA's training does).

Empty sections keep their label with nothing under it: the template is a fixed scaffold with
every label always present, and inventing filler ("None") would be text the engine never saw.

Alt text, OCR lines and box labels are data, not instructions: they are collapsed to one line,
stripped of control characters, of the template's own section markers and of the ``<image>``
placeholder (which would add an image slot), and cut to a length limit.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from engine.core.config import PROMPT_TEMPLATES, PromptConfig
from engine.core.record import Sample
from engine.core.registry import evidence_kinds
from models.caption.instruction import CAPTION_ENGINE_INSTRUCTION
from models.records import Box, OcrLine

# The paper's list as extracted, typos ("DN NOT", "DD NOT") and numbering gaps included: the
# meta dataset was written under these exact words.
GPT4V_INSTRUCTION = "\n".join(  # noqa: FLY002 - one list item per line reads like the paper
    [
        (
            "You are the most powerful large multimodal model which is responsible for generating "
            "image description to help the blind people to understand the world. Since they cannot "
            "see, so you should describe the image as detailed as possible."
        ),
        "",
        "The description of image must abide by the following policies:",
        "",
        (
            "1. The generated caption must be comprehensive and detailed plain text, covering as many "
            "aspects / content / areas / contents of the image as possible."
        ),
        "2. You may describe the foreground / background / salient objects.",
        (
            "3. When describing objects, please endeavor to include as much of the following "
            "information:"
        ),
        (
            "3.1. textures / attributes / locations / presence / status / characteristics / numbers "
            "of objects"
        ),
        "3.2. relative positions between objects",
        "4. The composition / color / layout / texture of image should also be considered.",
        "5. You may describe the elements one by one with details.",
        (
            "6. If there are common sense or world knowledge, for example, species, celebrities, "
            "scenic spots and historical sites, you must state them explicitly instead of using "
            'phrases like "a person", "a place", etc.'
        ),
        (
            "7. Other objective and subjective details that can help understand and reproduce the "
            "image."
        ),
        (
            "8. Text contents must be appeared in the caption if there exists. Keep the original "
            "language of text content."
        ),
        "9. The description should be purely factual, with no subjective speculation.",
        (
            "10. If there are some statement are inferred, just state the conclusion. DO NOT add the "
            "evidence or thought chain."
        ),
        "DN NOT add description associated with aspects like mood or atmosphere.",
        (
            'DD NOT add any unnecessary speculation about the things that are not part of the image '
            'such as "the image is inspiring to viewers" or "seeing this makes you feel joy".'
        ),
        (
            'DD NOT add things such as "creates a unique and entertaining visual", as these '
            "descriptions are interpretations and not a part of the image itself."
        ),
        "15. DO NOT analyze the text content in the image, and only tell the content themselves.",
        "16. DO NOT add any further analysis to the image.",
        (
            '17. DO NOT use introductory phrases like "The image showcases", "The photo captures", '
            '"The image shows" and more.'
        ),
        "18. The caption should NO longer than 192 words.",
        (
            "Besides image, you are also provided with some external information to help you "
            "understanding the image including a short caption, detection results, ocr results, "
            "attributes, etc. The short caption might contains rich world knowledge which should be "
            "considered in the final caption but also may not have any relevance to the image. "
            "Besides, there might be some errors in the external information including detail "
            "missing or wrong details. If there are mistakes, you may ignore them. Note that external "
            "information like bounding box are just a reference information, some details like "
            "bounding box should not be presented in the final caption since it's not a common "
            "information in caption. If the external information is not used, DO NOT specify the "
            "reason of not using them."
        ),
    ]
)

TEMPLATES = dict(zip(PROMPT_TEMPLATES, (CAPTION_ENGINE_INSTRUCTION, GPT4V_INSTRUCTION), strict=True))

# Labels the templates use; data must never contain one (any case, any inner spacing).
_MARKER = re.compile(
    r"\[\s*(?:external\s+information|world\s+knowledge|detection\s+box|ocr|image|caption)\s*\]"
    r"|<\s*image\s*>",
    re.IGNORECASE,
)
_SPACES = re.compile(r"\s+")
DEFAULT_CONFIG = PromptConfig()


def sanitize(text: str, max_chars: int) -> str:
    """One line of data: no control characters, no section markers, at most ``max_chars``."""
    text = "".join(" " if unicodedata.category(ch)[0] in "CZ" else ch for ch in text)
    while True:  # removing one marker can join the pieces of another: "[OC[OCR]R]"
        stripped = _MARKER.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    text = _SPACES.sub(" ", text).strip()
    if len(text) > max_chars:
        text = text[:max_chars].rstrip()
    return text


def format_box(box: Box, decimals: int, max_label_chars: int) -> str:
    coords = ", ".join(f"{min(1.0, max(0.0, v)):.{decimals}f}" for v in box.xyxy)
    return f"{sanitize(box.label, max_label_chars)}: [{coords}]"


def fusion_prompt(
    alt_text: str,
    boxes: Sequence[Box],
    ocr: Sequence[OcrLine],
    /,
    *,
    config: PromptConfig = DEFAULT_CONFIG,
    plugins: Sequence[tuple[str, Sequence[str]]] = (),
) -> str:
    """The prompt for one image in the configured template. ``plugins``: (label, lines) of the
    plugins' evidence, each a section after the paper's (none without plugins: the paper's text)."""
    world = sanitize(alt_text, config.prompt_alt_text_chars)
    box_lines = [format_box(b, config.box_decimals, config.prompt_label_chars) for b in boxes]
    box_lines = [line for line in box_lines if not line.startswith(":")]  # label was all markup
    ocr_lines, budget = [], config.prompt_ocr_chars
    for line in ocr:
        text = sanitize(line.text, budget)
        if text:
            ocr_lines.append(text)
            budget -= len(text)
        if budget <= 0:
            break
    sections = [
        TEMPLATES[config.prompt_template],
        "[External Information]:",
        f"[World Knowledge]: {world}".rstrip(),
        "\n".join(["[Detection Box]:", *box_lines]),
        "\n".join(["[OCR]:", *ocr_lines]),
        *("\n".join([f"[{label}]:", *(text for line in lines if (text := sanitize(line, config.prompt_alt_text_chars)))])
          for label, lines in plugins),
        "[IMAGE]:",
    ]
    return "\n\n".join(sections)


def gpt4v_prompt(alt_text: str, boxes: Sequence[Box], ocr: Sequence[OcrLine], /, **limits) -> str:
    """The GPT-4V template (meta-dataset mode); ``limits`` override :class:`PromptConfig` fields."""
    config = PromptConfig(**{**limits, "prompt_template": "gpt4v"})
    return fusion_prompt(alt_text, boxes, ocr, config=config)


def sample_prompt(sample: Sample, config: PromptConfig) -> str:
    return fusion_prompt(sample.alt_text, sample.boxes, sample.ocr, config=config, plugins=plugin_sections(sample))


def plugin_sections(sample: Sample) -> list[tuple[str, list[str]]]:
    """The sections of the plugins' evidence the sample carries, in stage order (engine/core/registry.py)."""
    if not sample.evidence:
        return []
    return [(kind.prompt.label, kind.prompt.lines(sample.evidence[kind.name])) for kind in evidence_kinds().values()
            if kind.prompt is not None and kind.name in sample.evidence]
