"""CLIP zero-shot tagging from the pass-1 image embedding: no second image forward pass.

The vocabulary's text embeddings (``template.format(tag)``) are computed once per
(text model, template, vocabulary) and kept on disk as ``.npy``, so a run over millions of
images embeds the 4,585 tags once. An image's tags are the vocabulary entries whose cosine
similarity to its embedding reaches the threshold, at most ``top_k``, best first.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from models.records import Tag


class TextEmbedder(Protocol):
    """What the tagger needs of an embedding model (``models.embedder.ClipEmbedder`` fits)."""

    name: str

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32, unit norm, in the same space as the image embeddings."""
        ...


def vocabulary_key(model_name: str, template: str, vocabulary: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for part in (model_name, template, *vocabulary):
        digest.update(part.encode("utf-8") + b"\0")
    return digest.hexdigest()[:24]


def vocabulary_embeddings(
    embedder: TextEmbedder, vocabulary: Sequence[str], template: str, cache_dir: Path | None,
    chunk: int = 256,
) -> np.ndarray:
    """Unit-norm (V, D) text embeddings of the vocabulary, read from / written to the cache."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"tagvocab-{vocabulary_key(embedder.name, template, vocabulary)}.npy"
        if path.exists():
            cached = np.load(path)
            if cached.shape[0] == len(vocabulary):
                return cached
    prompts = [template.format(tag) for tag in vocabulary]
    parts = [np.asarray(embedder.embed_texts(prompts[i:i + chunk]), np.float32) for i in range(0, len(prompts), chunk)]
    table = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    table /= np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    if path is not None:
        _save_atomic(path, table)
    return table


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


class ClipZeroShotTagger:
    def __init__(self, embedder: TextEmbedder, vocabulary: Sequence[str], *, template: str = "a photo of a {}.",
                 threshold: float = 0.2, top_k: int = 10, cache_dir: Path | None = None):
        if not vocabulary:
            raise ValueError("the tag vocabulary is empty")
        self.vocabulary = list(vocabulary)
        self.threshold = threshold
        self.top_k = top_k
        self.text = vocabulary_embeddings(embedder, self.vocabulary, template, cache_dir)

    def tag(self, image_embeddings: np.ndarray) -> list[list[Tag]]:
        """(N, D) unit-norm image embeddings → per image, tags with cosine >= threshold, best first."""
        if len(image_embeddings) == 0:
            return []
        sims = np.asarray(image_embeddings, np.float32) @ self.text.T  # N, V
        k = min(self.top_k, sims.shape[1])
        if k <= 0:
            return [[] for _ in sims]
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out = []
        for row, idx in zip(sims, top):
            idx = idx[np.argsort(-row[idx], kind="stable")]
            out.append([Tag(self.vocabulary[i], round(float(row[i]), 4)) for i in idx if row[i] >= self.threshold])
        return out
