"""Decode: one decode per image, resized for every view a later stage asked for.

CPU path: PIL on a thread pool (PIL releases the GIL while decoding), with JPEG draft mode
(the DCT-domain 1/2, 1/4, 1/8 reduction) when the largest view is much smaller than the
image. Batch paths (DALI, or torchvision's nvJPEG) take the plain RGB/grey JPEGs, which are
nearly all of a web crawl; PIL takes everything else, so every mode is handled one way.
Every mode (CMYK, 16-bit, palette, alpha, animated) ends as RGB uint8; EXIF orientation is
applied; the pixel limit guards against decompression bombs.
"""

from __future__ import annotations

import importlib.util
import io
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from engine.config import DecodeConfig, FilterConfig
from engine.errors import ConfigError
from engine.record import Sample
from engine.stage import ImageView, Resources, Stage

VERIFY_VIEW = ImageView("_verify", 64)


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


class Decode(Stage):
    name = "decode"

    def __init__(self, cfg: DecodeConfig, filter_cfg: FilterConfig, views: tuple[ImageView, ...],
                 device: str = "cpu"):
        self.cfg, self.max_pixels, self.device = cfg, filter_cfg.max_pixels, device
        # With no consumer of pixels the decode still runs, on a thumbnail (cheap with JPEG
        # draft), so a corrupt image is rejected here rather than written as good.
        self.image_views = _merge_views(views) or (VERIFY_VIEW,)
        self.backend = _pick_backend(cfg.decoder, device)
        self._pool: ThreadPoolExecutor | None = None

    def resources(self) -> Resources:
        return Resources(batch_size=self.cfg.decode_batch, device=self.device)

    def setup(self) -> None:
        self._pool = ThreadPoolExecutor(self.cfg.decode_threads, thread_name_prefix="decode")
        if self.backend == "dali":
            from engine.decode_dali import DaliDecoder

            self._dali = DaliDecoder(self.image_views, self.cfg.decode_batch, self.cfg.decode_threads, self.device)

    def process(self, batch: list[Sample]) -> list[Sample]:
        pending = self._decode_batched(batch) if self.backend != "pil" else batch
        results = self._pool.map(self._decode_one, pending) if self._pool else map(self._decode_one, pending)
        for sample, (views, error) in zip(pending, results):
            if error:
                sample.fail(self.name, error)
            else:
                sample.views.update(views)
        for sample in batch:
            sample.views.pop(VERIFY_VIEW.name, None)
        return batch

    def _decode_one(self, sample: Sample) -> tuple[dict[str, np.ndarray], str]:
        try:
            return decode_views(sample.image_bytes, self.image_views, self.max_pixels), ""
        except Image.DecompressionBombError as exc:
            return {}, f"decompression bomb: {exc}"
        except Exception as exc:  # noqa: BLE001 - corrupt or truncated pixel data is per-sample
            return {}, f"cannot decode {sample.image_format or 'image'}: {type(exc).__name__}: {exc}"

    def _decode_batched(self, batch: list[Sample]) -> list[Sample]:
        """Decode the plain JPEGs of the batch in one call; return the samples left for PIL."""
        plain = [s for s in batch if s.image_format == "JPEG" and s.image_mode in ("RGB", "L")]
        left = [s for s in batch if not (s.image_format == "JPEG" and s.image_mode in ("RGB", "L"))]
        if not plain:
            return left
        if self.backend == "dali":
            try:
                decoded = self._dali.decode([s.image_bytes for s in plain], [(s.width, s.height) for s in plain])
            except RuntimeError:  # DALI fails the whole batch for one bad file: PIL sorts them out
                return batch
        else:
            from engine.decode_gpu import decode_jpegs_on_gpu

            decoded = decode_jpegs_on_gpu([s.image_bytes for s in plain], self.image_views, self.device)
        for sample, views in zip(plain, decoded):
            if views is None:
                left.append(sample)
            else:
                sample.views.update(views)
        return left

    def teardown(self) -> None:
        if self._pool:
            self._pool.shutdown()

    def describe(self) -> str:
        views = ", ".join(f"{v.name}≤{v.max_side}" for v in self.image_views)
        return f"decode ({self.backend}, {self.cfg.decode_threads} threads; views {views or 'none'})"


def _merge_views(views: tuple[ImageView, ...]) -> tuple[ImageView, ...]:
    merged: dict[str, int] = {}
    for view in views:
        merged[view.name] = max(merged.get(view.name, 0), view.max_side)
    return tuple(ImageView(name, side) for name, side in merged.items())


def _pick_backend(decoder: str, device: str) -> str:
    dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    if decoder == "auto":
        if not device.startswith("cuda"):
            return "pil"
        return "dali" if dali else "torchvision"
    if decoder == "dali" and not dali:
        raise ConfigError("--decoder dali needs NVIDIA DALI: pip install -e '.[dali]' (or use --decoder auto)")
    return decoder
