"""The decode stage: one decode per image, one view per consumer (helpers in engine/image/decode.py).

PIL on a thread pool on a CPU; DALI or torchvision's nvJPEG take the plain JPEGs of a batch on a GPU.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from engine.core.config import DecodeConfig, FilterConfig, RunConfig
from engine.core.placement import Need
from engine.core.record import Sample
from engine.core.stage import ImageView, Resources, Stage
from engine.image.decode import decode_views
from models.errors import ConfigError

VERIFY_VIEW = ImageView("_verify", 64)


def build(cfg: RunConfig, views: tuple[ImageView, ...] = ()) -> Decode:
    """One decode serving ``views``: those the stages after it declare (pipeline.build_stages)."""
    return Decode(cfg.decode, cfg.filter, views, cfg.runtime.device)


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
            from engine.image.decode_dali import DaliDecoder

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
            from engine.image.decode_gpu import decode_jpegs_on_gpu

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


def decode_need(cfg: RunConfig) -> tuple[Need, ...]:
    """GPU JPEG decode (DALI or nvJPEG) on GPU 0: a batch of decoded originals (~4 MP) and its views."""
    batch = cfg.decode.decode_batch
    return (Need("decode", "nvJPEG / DALI", 0, 0, batch * 4_000_000 * 3 * 2, "none: no weights"),)
