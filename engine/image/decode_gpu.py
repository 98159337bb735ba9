"""Batched JPEG decode with torchvision (nvJPEG on a GPU) and antialiased resizes on the device.

Kept apart from ``engine/image/decode.py`` so the CPU path never imports torch.
"""

from __future__ import annotations

import numpy as np

from engine.core.stage import ImageView
from engine.image.decode import fit_size


def decode_jpegs_on_gpu(datas: list[bytes], views: tuple[ImageView, ...], device: str
                        ) -> list[dict[str, np.ndarray] | None]:
    """One dict of views per JPEG, or None where this decoder cannot read it (PIL will)."""
    if not datas:
        return []
    import torch
    import torchvision.io as tio

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        images = tio.decode_jpeg(tensors, mode=tio.ImageReadMode.RGB, device=device,
                                 apply_exif_orientation=True)
    except RuntimeError:  # one bad file fails the batch call: retry one by one
        images = [_decode_single(t, device) for t in tensors]
    return [None if image is None else _views(image, views) for image in images]


def _decode_single(tensor, device):
    import torchvision.io as tio

    try:
        return tio.decode_jpeg(tensor, mode=tio.ImageReadMode.RGB, device=device,
                               apply_exif_orientation=True)
    except RuntimeError:
        return None


def _views(image, views: tuple[ImageView, ...]) -> dict[str, np.ndarray]:
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    out = {}
    for view in views:
        w, h = fit_size(width, height, view.max_side)
        resized = image
        if (w, h) != (width, height):
            resized = F.interpolate(image[None].float(), size=(h, w), mode="bilinear",
                                    antialias=True, align_corners=False)[0]
            resized = resized.round_().clamp_(0, 255).byte()
        out[view.name] = resized.permute(1, 2, 0).contiguous().cpu().numpy()
    return out
