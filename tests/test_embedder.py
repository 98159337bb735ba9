"""The EVA-CLIP embedder on the tiny random-weight EVA02, loaded through the production path."""

import numpy as np
import pytest
import torch

from engine.core.config import CurateConfig
from engine.core.record import Sample, Source
from engine.stages.embed import EMBED_VIEW, Embed
from models.embedder import CONFIG_FILE, ClipEmbedder, check_model
from models.errors import ConfigError
from models.tiny import ensure


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.set_num_threads(1)
    return ensure("embed", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def embedder(tiny_folder):
    return ClipEmbedder(str(tiny_folder))


def test_tiny_is_built_once(tiny_folder):
    stamp = (tiny_folder / CONFIG_FILE).stat().st_mtime_ns
    assert ensure("embed", tiny_folder.parent) == tiny_folder
    assert (tiny_folder / CONFIG_FILE).stat().st_mtime_ns == stamp


def test_image_and_text_embeddings_are_unit_norm(embedder):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((300, 500), (448, 224), (97, 130))]
    vectors = embedder.embed_images(images)
    assert vectors.shape == (3, embedder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    texts = embedder.embed_texts(["a photo of a dog", "a red car"])
    assert texts.shape == (2, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(texts[0], texts[1])
    # batching does not change a result
    np.testing.assert_allclose(embedder.embed_images(images[:1])[0], vectors[0], atol=1e-4)


def test_tensor_preprocessing_matches_open_clip_transform(embedder, tiny_folder):
    import open_clip
    from PIL import Image

    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tiny_folder}")
    rng = np.random.default_rng(1)
    image = (rng.random((360, 540, 3)) * 255).astype(np.uint8)
    image[:, :270] //= 3  # structure, so resampling differences would show
    ours = embedder._to_pixels(image).float()
    theirs = transform(Image.fromarray(image))
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().mean() < 0.03  # antialiased bicubic on tensors vs PIL bicubic


def test_bad_model_names_fail_up_front(tmp_path):
    with pytest.raises(ConfigError, match="open_clip_config.json"):
        check_model(str(tmp_path), "")
    with pytest.raises(ConfigError, match="neither a folder"):
        check_model("no-such-arch", "")
    with pytest.raises(ConfigError, match="--embed-weights"):
        check_model("EVA02-L-14", "")
    check_model("EVA02-L-14", "random")  # architecture with random weights: for benchmarks


def test_embed_stage_fills_embedding_and_drops_the_view(tiny_folder):
    stage = Embed(CurateConfig(embed_batch=2), model=str(tiny_folder), device="cpu")
    assert stage.views() == (EMBED_VIEW,)
    stage.setup()
    good = Sample("a", Source("s", "p", "a.jpg"))
    good.views[EMBED_VIEW.name] = np.full((224, 300, 3), 128, np.uint8)
    missing = Sample("b", Source("s", "p", "b.jpg"))
    out = stage.process([good, missing])
    assert out == [good, missing]
    assert good.alive and good.embedding.shape == (64,) and not good.views
    assert abs(np.linalg.norm(good.embedding) - 1) < 1e-5
    assert missing.status == "error" and missing.stage == "embed"
