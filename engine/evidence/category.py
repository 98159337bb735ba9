"""Image category, zero-shot from the CLIP image embedding (paper §3.3, Fig. 4b).

The paper asks LLaVA-1.5 for the category; here the pass-1 CLIP embedding is compared with
text embeddings of a few prompts per category (CLIP's zero-shot recipe: mean of the
L2-normalised prompt embeddings, cosine similarity, softmax at CLIP's logit scale 100).
The categories follow the paper's Fig. 4 and §3.1 (photos, visual art, commercial design,
infographics; posters, product images and slides named in the text); the figure's full list
is not in the text we have, so this list is our reading of it.

Per sample the stage stores one probability per category in ``sample.scores`` under
``category:<name>``; the category is the most probable one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

CATEGORY_PROMPTS: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of a scene.", "a photograph taken with a camera.", "a snapshot of people or objects."),
    "visual art": ("a painting.", "a drawing or illustration.", "a work of digital art.", "a sketch."),
    "commercial design": ("a product photo for an online shop.", "an advertising poster.",
                          "a logo or a banner design.", "a flyer or a book cover."),
    "infographic": ("an infographic.", "a chart or a diagram.", "a map with labels."),
    "text document": ("a scanned page of text.", "a document with printed text.", "a page of a book."),
    "screenshot": ("a screenshot of a website or an app.", "a presentation slide.",
                   "a screenshot of a computer screen."),
}
CATEGORIES = tuple(CATEGORY_PROMPTS)
SCORE_PREFIX = "category:"
LOGIT_SCALE = 100.0  # CLIP's learnt temperature, fixed at its usual trained value


class TextEmbedder(Protocol):
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(len(texts), D) float array in the same space as the image embeddings."""


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def category_prototypes(embedder: TextEmbedder,
                        prompts: Mapping[str, tuple[str, ...]] = CATEGORY_PROMPTS) -> np.ndarray:
    """(C, D): per category the normalised mean of its normalised prompt embeddings."""
    texts = [text for group in prompts.values() for text in group]
    embedded = _unit(embedder.embed_texts(texts))
    rows, start = [], 0
    for group in prompts.values():
        rows.append(embedded[start : start + len(group)].mean(axis=0))
        start += len(group)
    return _unit(np.stack(rows))


def category_probabilities(image_embeddings: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """(N, C) softmax over categories of the scaled cosine similarities."""
    logits = LOGIT_SCALE * _unit(image_embeddings) @ prototypes.T
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def category_score_names(names: tuple[str, ...] = CATEGORIES) -> tuple[str, ...]:
    """The keys of ``sample.scores`` the category stage writes."""
    return tuple(f"{SCORE_PREFIX}{name}" for name in names)


def as_scores(probabilities: np.ndarray, names: tuple[str, ...] = CATEGORIES) -> dict[str, float]:
    return {key: round(float(p), 4) for key, p in zip(category_score_names(names), probabilities)}


def category_of(scores: Mapping[str, float]) -> str | None:
    """The most probable category stored in a sample's scores, or None when none were."""
    found = {k[len(SCORE_PREFIX):]: v for k, v in scores.items() if k.startswith(SCORE_PREFIX)}
    return max(found, key=found.get) if found else None
