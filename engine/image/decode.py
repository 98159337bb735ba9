"""Decoding helpers: one decode per image, resized for every view a later stage asked for.

CPU path: PIL on a thread pool (PIL releases the GIL while decoding), with JPEG draft mode
(the DCT-domain 1/2, 1/4, 1/8 reduction) when the largest view is much smaller than the
image. Batch paths (DALI, or torchvision's nvJPEG) take the plain RGB/grey JPEGs, which are
nearly all of a web crawl; PIL takes everything else, so every mode is handled one way.
Every mode (CMYK, 16-bit, palette, alpha, animated) ends as RGB uint8; EXIF orientation is
applied; the pixel limit guards against decompression bombs.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps

from engine.core.stage import ImageView


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB; transparency is composited on white, 16-bit is scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side at most ``max_side``, aspect kept, never upscaled."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_views(data: bytes, views: tuple[ImageView, ...], max_pixels: int) -> dict[str, np.ndarray]:
    """Decode once at the smallest scale that serves the largest view; one array per view."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL raises DecompressionBombError above twice this
    with Image.open(io.BytesIO(data)) as image:
        largest = max((v.max_side for v in views), default=max(image.size))
        if image.format == "JPEG" and largest < max(image.size):
            scale = largest / max(image.size)
            image.draft("RGB", (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
        image.seek(0)  # animated images: the first frame
        rgb = to_rgb(ImageOps.exif_transpose(image))
    return resize_views(rgb, views)


def resize_views(rgb: Image.Image, views: tuple[ImageView, ...]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    # Largest first, each resized from the previous one: cheaper and equally sharp.
    current = rgb
    for view in sorted(views, key=lambda v: -v.max_side):
        size = fit_size(*rgb.size, view.max_side)
        if current.size != size:
            current = current.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
        out[view.name] = np.asarray(current)
    return out
