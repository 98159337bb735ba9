"""Built-in sample shards for ``demo`` and the tests, made in code (nothing to download).

Two img2dataset-style tar shards: photo-like scenes of shapes, posters and slides with
rendered English text (the text is kept in ``<key>.json`` as ``rendered_text`` so a test can
check that OCR found it), images under the resolution threshold, and broken members
(zero bytes, truncated JPEG, text with an image extension).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

POSTER_LINES = (
    ("GRAND OPENING", "FRESH BREAD DAILY"),
    ("SUMMER SALE", "HALF PRICE SHOES"),
    ("CITY MARATHON", "SUNDAY MORNING RUN"),
)
SLIDE_LINES = (
    ("Quarterly Results", "Revenue grew twelve percent"),
    ("Project Roadmap", "Launch planned for spring"),
)
ALT_TEXTS = (
    "red ball and blue box on a table",
    "abstract shapes stock photo",
    "colorful geometric pattern wallpaper",
    "",
)


@dataclass(frozen=True)
class DemoMember:
    key: str
    image: bytes
    ext: str
    alt_text: str
    meta: dict


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def shapes_image(rng: random.Random, width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), tuple(rng.randint(150, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 7)):
        x0, y0 = rng.randint(0, width - 40), rng.randint(0, height - 40)
        x1, y1 = x0 + rng.randint(20, width // 3), y0 + rng.randint(20, height // 3)
        color = tuple(rng.randint(0, 200) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    return image


def text_image(lines: tuple[str, ...], width: int, height: int, background, foreground) -> Image.Image:
    """Large, high-contrast, left-aligned lines (>= 24 px), as a poster or slide would have."""
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    size = max(40, height // 10)
    while size > 24 and max(draw.textlength(line, font=_font(size)) for line in lines) > width * 5 // 6:
        size -= 2  # shrink until every line fits inside the image, so all of it can be read
    y = height // 6
    for line in lines:
        draw.text((width // 12, y), line, font=_font(size), fill=foreground)
        y += int(size * 1.8)
    return image


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def demo_members(shard_index: int, seed: int = 0) -> list[DemoMember]:
    rng = random.Random(seed * 1000 + shard_index)
    members: list[DemoMember] = []

    def add(kind: str, image: bytes, ext: str = "jpg", alt: str = "", **meta) -> None:
        key = f"{shard_index:03d}{len(members):05d}"
        url = f"https://example.com/demo/{key}.{ext}"
        members.append(DemoMember(key, image, ext, alt, {"url": url, "kind": kind, **meta}))

    for _ in range(4):
        w, h = rng.choice([(800, 600), (640, 960), (1024, 576), (720, 720)])
        add("scene", _jpeg(shapes_image(rng, w, h)), alt=rng.choice(ALT_TEXTS))
    poster = POSTER_LINES[shard_index % len(POSTER_LINES)]
    add("poster", _jpeg(text_image(poster, 640, 900, (250, 240, 200), (20, 20, 80))),
        alt="poster " + poster[0].lower(), rendered_text=list(poster))
    slide = SLIDE_LINES[shard_index % len(SLIDE_LINES)]
    add("slide", _png(text_image(slide, 1024, 576, (255, 255, 255), (0, 0, 0))), ext="png",
        alt="presentation slide", rendered_text=list(slide))
    add("small", _jpeg(shapes_image(rng, 320, 240)), alt="thumbnail too small")
    add("broken", b"", alt="zero-byte file")
    add("broken", _jpeg(shapes_image(rng, 800, 600))[:900], alt="truncated jpeg")
    add("broken", b"<html>not an image</html>", alt="html saved as jpg")
    return members


def write_tar(path: Path, members: list[DemoMember]) -> None:
    with tarfile.open(path, "w") as tar:
        for member in members:
            files = {
                member.ext: member.image,
                "txt": member.alt_text.encode(),
                "json": json.dumps({"key": member.key, **member.meta}).encode(),
            }
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{member.key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_demo_shards(folder: Path, n_shards: int = 2, seed: int = 0) -> list[Path]:
    """Write (or reuse) the demo shards; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n_shards):
        path = folder / f"demo-{index:05d}.tar"
        if not path.exists():
            tmp = path.with_suffix(".tar.tmp")
            write_tar(tmp, demo_members(index, seed))
            tmp.replace(path)
        paths.append(path)
    return paths
