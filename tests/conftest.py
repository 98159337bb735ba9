"""Shared test helpers: images and shards made in memory."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def jpeg(width: int, height: int, color=(200, 50, 50), **kwargs) -> bytes:
    return encode(Image.new("RGB", (width, height), color), "JPEG", **kwargs)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, image: bytes, alt: str = "alt", ext: str = "jpg", **meta) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", image), (f"{key}.txt", alt.encode()),
            (f"{key}.json", json.dumps({"url": f"http://x/{key}", **meta}).encode())]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One cache folder for tiny models across the whole test session (built once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def demo_output(tmp_path_factory, tiny_cache) -> Path:
    """One `demo` run shared by every test that inspects a full output (it is the slow part)."""
    import densefusion_local

    out = tmp_path_factory.mktemp("demo") / "out"
    # a few tokens per caption: the tiny engine writes noise, its length only costs CI time
    code = densefusion_local.main(["demo", "--out", str(out), "--no-progress", "--cache-dir", str(tiny_cache),
                                   "--max-new-tokens", "12"])
    assert code == 0
    return out
