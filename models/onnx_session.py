"""ONNX Runtime sessions for the exported experts, on the best provider this machine has.

On a GPU: TensorRT where onnxruntime-gpu finds it (fp16; engines cached in a ``tensorrt``
folder beside the ``.onnx`` file, so only the first run builds them), then CUDA, then the
CPU. onnxruntime itself moves down that list when a provider cannot start (TensorRT
libraries missing, for one) and says so in a warning.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.errors import ConfigError


def providers(device: str, model_path: str | Path) -> list:
    """Execution providers, best first, for ``device`` ("cpu", "cuda" or "cuda:N")."""
    import onnxruntime as ort

    chosen: list = []
    if device.startswith("cuda"):
        available = ort.get_available_providers()
        device_id = int(device.partition(":")[2] or 0)
        if "TensorrtExecutionProvider" in available:
            cache = Path(model_path).parent / "tensorrt"
            writable = os.access(cache.parent, os.W_OK)
            chosen.append(("TensorrtExecutionProvider", {
                "device_id": device_id,
                "trt_fp16_enable": True,
                "trt_engine_cache_enable": writable,
                **({"trt_engine_cache_path": str(cache)} if writable else {}),
            }))
        if "CUDAExecutionProvider" in available:
            chosen.append(("CUDAExecutionProvider", {"device_id": device_id}))
    return [*chosen, "CPUExecutionProvider"]


def open_session(path: str | Path, device: str, *, flag: str, threads: int = 0):
    """An ``InferenceSession`` for ``path``; ``flag`` names the option that gave the path;
    ``threads``: CPU threads per call (0: onnxruntime's default, one per core)."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise ConfigError(f"{flag} {path} does not exist: export it with `python -m models.export onnx ...`")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers(device, path))
