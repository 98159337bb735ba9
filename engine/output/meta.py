"""Meta-dataset mode (paper §3.2.2): GPT-4V captions that teach the caption engine.

A seeded random share of the curated selection is captioned through an OpenAI-compatible
endpoint with the GPT-4V template and the experts' information, written in the normal
output layout, then exported as supervised fine-tuning data in LLaVA's conversation format:
the human turn is the caption-engine template filled with the same evidence (what the engine
will see at inference), the gpt turn is GPT-4V's caption.

    python densefusion_local.py meta --shards ... --out OUT --api-base URL --api-model gpt-4o \\
        --subset-share 0.1          # then OUT/sft/densefusion_sft.json + OUT/sft/images/
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.evidence.prompt import PromptConfig, fusion_prompt
from models.records import Box, OcrLine


def caption_engine_prompt(annotations: dict[str, Any], config: PromptConfig | None = None) -> str:
    """The caption-engine prompt of a written sample, rebuilt from its ``<key>.json``; the
    run's prompt limits (decimals, lengths) apply, its template does not."""
    boxes = [Box(b["label"], b["score"], tuple(b["xyxy"]), b.get("source", ""))
             for b in annotations.get("boxes") or []]
    ocr = [OcrLine(o["text"], o["score"], tuple(o["xyxy"])) for o in annotations.get("ocr") or []]
    config = dataclasses.replace(config or PromptConfig(), prompt_template="caption_engine")
    return fusion_prompt(annotations.get("alt_text") or "", boxes, ocr, config=config)


META_SHARE = 0.1  # the paper: 100K GPT-4V captions for a 1M selection


def meta_overrides() -> dict[str, dict[str, Any]]:
    """What ``meta`` sets on top of the user's flags: the GPT-4V template and the remote
    backend (the share is :data:`META_SHARE` unless --subset-share says otherwise)."""
    return {"prompt": {"prompt_template": "gpt4v"}, "caption": {"caption_backend": "openai"}}
