"""EVA-CLIP image (and text) embeddings through open_clip, L2-normalised.

A model is named by one string:

* a local folder holding ``open_clip_config.json`` and the weights (what ``tiny`` builds),
* ``hf-hub:<org>/<repo>`` (open_clip's own hub loader),
* a built-in open_clip architecture name (``EVA02-L-14``) together with ``weights``: a
  checkpoint file (state dict), one of open_clip's pretrained tags, or ``random`` (random
  weights, for throughput measurements only: they cost exactly what real weights cost).

Preprocessing is the model's own (size, mean, std, shortest-side resize, centre crop), done
on tensors from the decoded view so that on a GPU it runs there, in fp16, with the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import ConfigError
from models.onnx_session import open_session

RANDOM_WEIGHTS = "random"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

# A random-weight EVA02 of the real family: timm's EVA02-tiny vision tower, a 2-layer text
# tower on the CLIP tokenizer's vocabulary. Small enough to build and run in a test.
TINY_CONFIG = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": 224,
            "timm_model_name": "eva02_tiny_patch14_224",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        "custom_text": True,
    },
    "preprocess_cfg": {
        "size": 224,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def build_tiny(folder: Path, seed: int = 0) -> Path:
    """Write a random-weight tiny EVA02-CLIP to ``folder`` in open_clip's local-dir layout."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in TINY_CONFIG["model_cfg"].items() if k != "custom_text"}
    model = open_clip.CustomTextCLIP(**cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(TINY_CONFIG, indent=2))
    return folder


@contextlib.contextmanager
def random_weights_meant() -> Iterator[None]:
    """open_clip warns on the root logger whenever it builds a model without weights ("No
    pretrained weights loaded ... initialized randomly"); around a build meant to be random (a
    meta-device count, ``--embed-weights random``) that warning is noise and is dropped. Any
    other build keeps it: there it says the weights are missing."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


@dataclass(frozen=True)
class Preprocess:
    """The model's own image preprocessing, as numbers we can apply to tensors."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear"


class ClipEmbedder:
    """Batched, L2-normalised EVA-CLIP embeddings of images (uint8 HWC arrays) and texts."""

    def __init__(self, model: str, *, weights: str = "", device: str = "cpu",
                 fp16: bool | None = None, image_onnx: str = "") -> None:
        import open_clip
        import torch

        self.device = device
        self.fp16 = device.startswith("cuda") if fp16 is None else fp16
        precision = "fp16" if self.fp16 else "fp32"
        name, pretrained = _open_clip_name(model, weights)
        with random_weights_meant() if weights == RANDOM_WEIGHTS else contextlib.nullcontext():
            self.model = open_clip.create_model(
                name, pretrained=pretrained, precision=precision, device=device, load_weights=True
            ).eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        cfg = self.model.visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.preprocess = Preprocess(size, tuple(cfg["mean"]), tuple(cfg["std"]),
                                     cfg.get("interpolation", "bicubic"))
        self.name = model
        self._dtype = torch.float16 if self.fp16 else torch.float32
        self.dim = int(self.embed_texts(["a"]).shape[1])  # open_clip keeps it in no single place
        # The image tower exported by `python -m models.export onnx --target embed`, run by ONNX
        # Runtime (TensorRT or CUDA on a GPU); the text tower stays in torch (it runs once per vocabulary).
        self.image_session = open_session(image_onnx, device, flag="--embed-onnx") if image_onnx else None

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float32, unit norm, for RGB uint8 HWC arrays of any size."""
        import torch

        if not images:
            return np.zeros((0, self.dim), np.float32)
        pixels = torch.stack([self._to_pixels(img) for img in images])
        if self.image_session is not None:
            name = self.image_session.get_inputs()[0].name
            features = self.image_session.run(None, {name: pixels.float().cpu().numpy()})[0]
            return _normalise(torch.from_numpy(features))
        with torch.inference_mode():
            features = self.model.encode_image(pixels, normalize=False)
        return _normalise(features)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32, unit norm: CLIP text embeddings in the same space as the images."""
        import torch

        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode():
            features = self.model.encode_text(tokens, normalize=False)
        return _normalise(features)

    def _to_pixels(self, image: np.ndarray):
        """Shortest side to ``size`` (antialiased), centre crop, scale, normalise: on the device."""
        import torch.nn.functional as F

        from models.preprocess import normalise, to_tensor

        p = self.preprocess
        x = to_tensor(image, self.device).float()
        h, w = x.shape[-2:]
        scale = p.size / min(h, w)
        new_h, new_w = max(p.size, round(h * scale)), max(p.size, round(w * scale))
        mode = "bicubic" if p.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
        top, left = (new_h - p.size) // 2, (new_w - p.size) // 2
        x = x[:, :, top:top + p.size, left:left + p.size].clamp_(0, 255)
        return normalise(x, p.mean, p.std, self._dtype)[0]

    def describe(self) -> str:
        if self.image_session is not None:
            return f"open_clip {self.name}, image tower on onnxruntime {self.image_session.get_providers()[0]}"
        return f"open_clip {self.name} ({'fp16' if self.fp16 else 'fp32'}, {self.device})"


def _normalise(features) -> np.ndarray:

    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return features.cpu().numpy().astype(np.float32, copy=False)


def check_model(model: str, weights: str) -> None:
    """Fail before any work starts when the embedding model cannot be loaded as named: an unknown
    name, or weights that are neither here nor on a reachable hub (open_clip would retry for minutes)."""
    name, pretrained = _open_clip_name(model, weights)
    problem = _weights_problem(name, pretrained)
    if problem:
        raise ConfigError(problem)


def _weights_problem(name: str, pretrained: str | None) -> str | None:
    """Where open_clip would fetch the weights from, checked: an 'hf-hub:' id or a pretrained tag
    (which names a hub repository, or for a few older tags a URL)."""
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    from models.hub import hub_problem

    if name.startswith("hf-hub:"):
        return hub_problem(name.removeprefix("hf-hub:"), "embedding model", (CONFIG_FILE,))
    if not pretrained or Path(pretrained).is_file():
        return None
    source = open_clip.get_pretrained_cfg(name, pretrained)
    what = f"embedding weights {pretrained!r} of {name}: hub repository"
    if source.get("hf_hub"):
        repo, filename = source["hf_hub"].rstrip("/"), ""
        if not source["hf_hub"].endswith("/"):
            repo, filename = repo.rsplit("/", 1)
        files = (filename, str(Path(filename).with_suffix(".safetensors"))) if filename else \
            (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
        return hub_problem(repo, what, files, "pass a checkpoint file to --embed-weights")
    from huggingface_hub import is_offline_mode

    cached = Path("~/.cache/clip").expanduser() / Path(source.get("url", "")).name
    if is_offline_mode() and not cached.is_file():
        return f"{what} is not in {cached.parent} and HF_HUB_OFFLINE is set: pass a checkpoint file to --embed-weights"
    return None


def _open_clip_name(model: str, weights: str) -> tuple[str, str | None]:
    """Map our model naming onto open_clip's (model_name, pretrained)."""
    import open_clip

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"embedding model folder {path} has no {CONFIG_FILE}")
        return f"local-dir:{path}", None
    if model.startswith("hf-hub:"):
        return model, None
    if model not in open_clip.list_models():
        raise ConfigError(
            f"embedding model {model!r} is neither a folder with {CONFIG_FILE}, an 'hf-hub:' id, "
            f"nor an open_clip architecture (e.g. EVA02-L-14)"
        )
    if not weights:
        raise ConfigError(
            f"embedding model {model} needs --embed-weights: a checkpoint file, an open_clip "
            f"pretrained tag, or '{RANDOM_WEIGHTS}' (random weights, for benchmarks)"
        )
    if weights == RANDOM_WEIGHTS:
        return model, None
    if Path(weights).expanduser().is_file():
        return model, str(Path(weights).expanduser())
    if weights in open_clip.list_pretrained_tags_by_model(model):
        return model, weights
    raise ConfigError(f"--embed-weights {weights!r}: no such file, and not a pretrained tag of {model}")
