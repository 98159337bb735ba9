"""Image preprocessing on tensors, shared by the vision experts.

Decoded views arrive as RGB uint8 HWC arrays; these helpers move them to the model's
device first, so on a GPU the resize and normalisation run there, and keep the batch in
uint8 until the one conversion to float. Host→GPU copies go through pinned (page-locked)
memory with ``non_blocking``: the copy is queued on the calling thread's stream (a replica's
own, see ``engine/core/runtime.py``) and overlaps the host's next work instead of a blocking
pageable copy; PyTorch's caching host allocator reuses the pinned buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def to_device(tensor, device, dtype=None):
    """``tensor`` on ``device`` (and ``dtype``); from a CPU tensor to a GPU through pinned memory,
    without blocking. On the CPU, what ``.to`` does."""

    if str(device).startswith("cuda") and tensor.device.type == "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, dtype) if dtype is not None else tensor.to(device)


def to_tensor(image: np.ndarray, device):
    """(1, 3, H, W) uint8 on ``device``."""
    import torch

    if not image.flags.writeable:  # torch wants writable memory (views from PIL are read-only)
        image = image.copy()
    return to_device(torch.from_numpy(np.ascontiguousarray(image)), device).permute(2, 0, 1)[None]


def resize(t, size: tuple[int, int]):
    """Bilinear with antialiasing (what PIL does when shrinking), uint8 in, uint8 out."""
    import torch.nn.functional as F

    if tuple(t.shape[-2:]) == tuple(size):
        return t
    out = F.interpolate(t.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(t.dtype)


class Letterbox:
    """Longer side → ``side``, padded bottom/right with 0 (black) to a square, normalised.

    Padding after the resize gives the geometry of OWLv2's pad-then-resize at a fraction of
    the pixels; a box at ``u`` of the square is at ``u * side / scale`` original pixels.
    The batch is assembled channels-last in uint8 (row copies), then converted once into a
    float buffer; both buffers are kept between calls, because on the CPU allocating and
    first-touching a fresh batch costs more than the arithmetic. The returned tensor is
    therefore only valid until the next call. Without ``mean``/``std`` the values stay 0–255.
    """

    def __init__(self, side: int, device, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        import torch

        self.side = side
        self.device = device
        mean, std = mean or (0.0, 0.0, 0.0), std or (1 / 255, 1 / 255, 1 / 255)
        self.scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, 3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, 3, 1, 1)
        self._u8 = self._out = None

    def __call__(self, images: Sequence[np.ndarray]):
        """((B, 3, side, side) float32, per-image scale factors)."""
        import torch

        n, s = len(images), self.side
        if self._u8 is None or self._u8.shape[0] < n:
            self._u8 = torch.empty(n, s, s, 3, dtype=torch.uint8, device=self.device)
            self._out = torch.empty(n, 3, s, s, device=self.device)
        u8, out = self._u8[:n], self._out[:n]
        u8.zero_()
        scales = []
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            scale = s / max(h, w)
            nh, nw = max(1, min(s, round(h * scale))), max(1, min(s, round(w * scale)))
            if (nh, nw) == (h, w):
                u8[i, :h, :w] = to_device(torch.from_numpy(image if image.flags.writeable else image.copy()), self.device)
            else:
                u8[i, :nh, :nw] = resize(to_tensor(image, self.device), (nh, nw))[0].permute(1, 2, 0)
            scales.append(scale)
        out.copy_(u8.permute(0, 3, 1, 2))
        return out.mul_(self.scale).add_(self.shift), scales


def normalise(batch, mean: Sequence[float], std: Sequence[float], dtype):
    """uint8 (B, 3, H, W) → ((x / 255) - mean) / std in ``dtype``, in two passes over the batch."""
    import torch

    scale = torch.tensor([1 / (255 * s) for s in std], device=batch.device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=batch.device).view(1, 3, 1, 1)
    return batch.float().mul_(scale).add_(shift).to(dtype)
