import numpy as np
import pytest

from engine.core.record import Sample, Source
from engine.evidence.category import (
    CATEGORIES,
    CATEGORY_PROMPTS,
    as_scores,
    category_of,
    category_probabilities,
    category_prototypes,
)
from engine.stages.category import Categorize
from engine.stages.embed import EMBED_VIEW

DIM = 16


class FakeEmbedder:
    """Each category's prompts point along their own axis; an image points along the axis of
    its red channel value (0 → photo, 1 → visual art, ...); a 1×1 image is 'corrupt'."""

    def __init__(self):
        self.axis = {t: i for i, group in enumerate(CATEGORY_PROMPTS.values()) for t in group}
        self.image_calls = 0

    def embed_texts(self, texts):
        return np.stack([np.eye(DIM)[self.axis[t]] + 0.01 for t in texts]).astype(np.float32)

    def embed_images(self, images):
        self.image_calls += 1
        if any(img.shape[0] == 1 for img in images):
            raise ValueError("corrupt")
        return np.stack([np.eye(DIM)[int(img[0, 0, 0])] for img in images]).astype(np.float32)


def test_prototypes_are_unit_vectors_one_per_category():
    prototypes = category_prototypes(FakeEmbedder())
    assert prototypes.shape == (len(CATEGORIES), DIM)
    assert np.allclose(np.linalg.norm(prototypes, axis=1), 1.0)


def test_probabilities_pick_the_nearest_category_and_sum_to_one():
    prototypes = category_prototypes(FakeEmbedder())
    p = category_probabilities(np.eye(DIM)[[3, 0]] * 5.0, prototypes)  # any norm: normalised first
    assert p.shape == (2, len(CATEGORIES)) and np.allclose(p.sum(axis=1), 1.0)
    assert [CATEGORIES[i] for i in p.argmax(axis=1)] == [CATEGORIES[3], "photo"]
    assert category_of(as_scores(p[0])) == CATEGORIES[3]
    assert category_of({"cov_tags": 1.0}) is None


def _sample(key, embedding=None, red=None, side=8):
    s = Sample(key=key, source=Source("0", "in.tar", key))
    s.embedding = embedding
    if red is not None:
        s.views[EMBED_VIEW.name] = np.full((side, side, 3), red, np.uint8)
    return s


def test_stage_uses_pass1_embeddings_and_embeds_the_rest():
    embedder = FakeEmbedder()
    stage = Categorize(lambda: embedder)
    stage.setup()
    batch = stage.process([
        _sample("pass1", embedding=np.eye(DIM)[2].astype(np.float32)),
        _sample("view", red=1),
        _sample("neither"),
    ])
    assert category_of(batch[0].scores) == CATEGORIES[2]
    assert category_of(batch[1].scores) == CATEGORIES[1] and batch[1].embedding is not None
    assert batch[2].status == "error" and "no decoded" in batch[2].reason
    assert embedder.image_calls == 1  # the pass-1 embedding was not recomputed
    assert all(EMBED_VIEW.name not in s.views for s in batch)
    assert sum(v for k, v in batch[0].scores.items() if k.startswith("category:")) == pytest.approx(1.0, abs=1e-3)


def test_a_bad_image_fails_alone():
    stage = Categorize(FakeEmbedder)
    stage.setup()
    batch = stage.process([_sample("good", red=0), _sample("bad", red=0, side=1)])
    assert category_of(batch[0].scores) == "photo"
    assert batch[1].status == "error" and "corrupt" in batch[1].reason
