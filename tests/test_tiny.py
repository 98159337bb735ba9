"""Tiny models: built once, atomically, deterministically, and loadable like real checkpoints."""

import numpy as np
import pytest
import torch

from models import tiny
from models.base import ModelRef
from models.errors import ConfigError


def test_roles_registered():
    assert {"caption", "clip", "owlv2"} <= set(tiny.roles())


def test_ensure_builds_once_and_reuses(tmp_path):
    folder = tiny.ensure("clip", tmp_path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure("clip", tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no scratch folder left behind


def test_builds_are_deterministic(tmp_path):
    a = (tiny.ensure("clip", tmp_path / "a") / "model.safetensors").read_bytes()
    b = (tiny.ensure("clip", tmp_path / "b") / "model.safetensors").read_bytes()
    assert a == b


def test_unknown_role_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no tiny model for role 'nope'"):
        tiny.ensure("nope", tmp_path)


def test_model_ref_resolves_tiny(tmp_path):
    path = ModelRef("tiny", "clip").resolve(tmp_path)
    assert path == str(tmp_path / "tiny" / f"clip-v{tiny.BUILD_VERSION}")


def test_clip_loads_through_auto_classes(tmp_path):
    from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

    folder = tiny.ensure("clip", tmp_path)
    processor = AutoImageProcessor.from_pretrained(folder)
    model = CLIPVisionModelWithProjection.from_pretrained(folder)
    images = [np.zeros((90, 70, 3), np.uint8), np.full((40, 200, 3), 200, np.uint8)]
    with torch.no_grad():
        embeds = model(**processor(images=images, return_tensors="pt")).image_embeds
    assert embeds.shape == (2, 32)


def test_owlv2_queries_are_not_masked(tmp_path):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    folder = tiny.ensure("owlv2", tmp_path)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(folder).eval()
    inputs = processor(
        text=[["a dog", "a red ball"]], images=[np.zeros((100, 80, 3), np.uint8)], return_tensors="pt"
    )
    assert (inputs["input_ids"][:, 0] != 0).all()
    with torch.no_grad():
        logits = model(**inputs).logits
    # a masked query gets the dtype's minimum as its logit everywhere
    assert logits.shape[-1] == 2 and (logits > -1e6).all()
