import numpy as np

from models.clip_tagger import ClipZeroShotTagger, vocabulary_embeddings


class AxisEmbedder:
    """Embeds 'a photo of a <tag>.' as the unit vector of the tag's index in ``axes``."""

    def __init__(self, axes, name="fake-clip"):
        self.axes = axes
        self.name = name
        self.calls = 0

    def embed_texts(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), len(self.axes)), np.float32)
        for i, text in enumerate(texts):
            word = text.removeprefix("a photo of a ").removesuffix(".")
            out[i, self.axes.index(word)] = 2.0  # not unit norm: the tagger normalises
        return out


VOCAB = ["dog", "cat", "car", "tree"]


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_threshold_and_top_k_best_first():
    tagger = ClipZeroShotTagger(AxisEmbedder(VOCAB), VOCAB, threshold=0.3, top_k=2)
    images = np.stack([unit([0.8, 0.5, 0.3, 0.1]), unit([0.0, 0.0, 0.0, 1.0]), unit([0.1, 0.1, 0.1, 0.1])])
    tags = tagger.tag(images)
    # image 0: cosines 0.80/0.50/0.30/0.10 (norm 1): top 2 = dog, cat
    v0 = unit([0.8, 0.5, 0.3, 0.1])
    assert [t.name for t in tags[0]] == ["dog", "cat"]
    assert tags[0][0].score == round(float(v0[0]), 4)
    assert [t.name for t in tags[1]] == ["tree"]
    # image 2: all cosines 0.5 → top_k 2 of equal scores, all above threshold
    assert len(tags[2]) == 2
    assert ClipZeroShotTagger(AxisEmbedder(VOCAB), VOCAB, threshold=0.9).tag(images)[0] == []
    assert tagger.tag(np.zeros((0, 4), np.float32)) == []


def test_vocabulary_embedded_once_and_cached_on_disk(tmp_path):
    embedder = AxisEmbedder(VOCAB)
    first = vocabulary_embeddings(embedder, VOCAB, "a photo of a {}.", tmp_path, chunk=3)
    assert embedder.calls == 2  # 4 prompts in chunks of 3
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0)
    again = ClipZeroShotTagger(embedder, VOCAB, cache_dir=tmp_path)
    assert embedder.calls == 2 and np.array_equal(again.text, first)
    # another model or vocabulary is another cache entry
    ClipZeroShotTagger(AxisEmbedder(VOCAB, name="other-model"), VOCAB, cache_dir=tmp_path)
    ClipZeroShotTagger(embedder, VOCAB[:3], cache_dir=tmp_path)
    assert embedder.calls == 3
    assert len(list(tmp_path.glob("tagvocab-*.npy"))) == 3
