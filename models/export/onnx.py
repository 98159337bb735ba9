"""Torch module → ONNX with a dynamic batch axis, then a parity check with ONNX Runtime."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ExportTarget:
    """What to export: a module taking one image tensor, and how to call it."""

    name: str
    module: object  # torch.nn.Module in eval mode, on the CPU
    example: object  # torch.Tensor (B, 3, H, W)
    input_name: str
    output_names: tuple[str, ...]
    preprocess: dict  # what a runtime must do to an image before the exported graph
    sidecars: tuple[tuple[str, str], ...] = ()  # (file name, text) the engine reads beside the .onnx


@dataclass(frozen=True)
class ExportReport:
    target: str
    onnx_path: str
    opset: int
    input_shape: list[int]
    outputs: list[str]
    max_abs_diff: float  # ONNX Runtime vs torch, on a batch size that differs from the traced one
    seconds: float
    preprocess: dict


def export_onnx(target: ExportTarget, out_dir: Path, *, opset: int = 18) -> ExportReport:
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{target.name}.onnx"
    start = time.perf_counter()
    axes = {target.input_name: {0: "batch"}, **{name: {0: "batch"} for name in target.output_names}}
    with torch.inference_mode():
        # The TorchScript exporter: minutes faster than the dynamo one on these models and
        # exact for them (the parity check below is what vouches for any export).
        torch.onnx.export(target.module, (target.example,), str(path), input_names=[target.input_name],
                          output_names=list(target.output_names), dynamic_axes=axes, opset_version=opset,
                          dynamo=False)
    for name, text in target.sidecars:
        (out_dir / name).write_text(text, encoding="utf-8")
    diff = parity(target, path)
    report = ExportReport(target.name, str(path), opset, list(target.example.shape), list(target.output_names),
                          diff, round(time.perf_counter() - start, 2), target.preprocess)
    (out_dir / f"{target.name}.export.json").write_text(json.dumps(asdict(report), indent=2))
    return report


def parity(target: ExportTarget, path: Path) -> float:
    """Largest absolute difference between ONNX Runtime and torch on a new batch size."""
    import onnxruntime as ort
    import torch

    batch = target.example.shape[0] + 1  # a different batch size proves the batch axis is dynamic
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn((batch, *target.example.shape[1:]), generator=generator)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {target.input_name: pixels.numpy()})
    with torch.inference_mode():
        want = target.module(pixels)
    want = want if isinstance(want, (tuple, list)) else (want,)
    return float(max(np.abs(g - w.float().numpy()).max() for g, w in zip(got, want)))
