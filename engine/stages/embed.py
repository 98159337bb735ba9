"""Pass 1's model stage: one EVA-CLIP embedding per image, float32, unit norm."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.core.config import CurateConfig, RunConfig
from engine.core.models import resolve_model
from engine.core.placement import Need, count_params, vit_activations
from engine.core.record import Sample
from engine.core.stage import ImageView, Resources, Stage
from models.errors import ConfigError

# EVA02 CLIP models take 224 px crops of the shorter side; a 448 px longer side keeps the
# shorter side >= 224 for aspect ratios up to 2:1 without decoding more pixels than needed.
EMBED_VIEW = ImageView("embed", 448)


def fill_embeddings(embedder, samples: list[Sample], stage: str) -> None:
    """Embed, from their ``embed`` view, the samples that arrive without an embedding.

    Shared by pass 1's embedder and the pass-2 stages that read the embedding (category, CLIP
    tags), so an image is embedded at most once per run. A failing batch is retried one image
    at a time: one bad image fails alone.
    """
    missing = [s for s in samples if s.embedding is None]
    for sample in missing:
        if EMBED_VIEW.name not in sample.views:
            sample.fail(stage, f"no decoded '{EMBED_VIEW.name}' view and no embedding")
    ready = [s for s in missing if s.alive]
    try:
        vectors = embedder.embed_images([s.views[EMBED_VIEW.name] for s in ready]) if ready else []
    except Exception:  # noqa: BLE001 - find the bad image instead of losing the batch
        vectors = None
    for i, sample in enumerate(ready):
        try:
            vector = vectors[i] if vectors is not None else embedder.embed_images([sample.views[EMBED_VIEW.name]])[0]
        except Exception as exc:  # noqa: BLE001 - per-sample failure is data
            sample.fail(stage, f"{type(exc).__name__}: {exc}")
            continue
        # One NaN row would poison a k-means centroid, and every row compared with it after.
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm):
            sample.fail(stage, "the embedding is not finite (NaN or inf): the model overflowed on this image")
        elif abs(norm - 1.0) > 1e-3:
            sample.fail(stage, f"the embedding has norm {norm:.3g}, not 1 (an all-zero feature?)")
        else:
            sample.embedding = vector


def embedder_model(cfg: RunConfig) -> tuple[str, str]:
    """(path to load, what the embeddings are of) for pass 1's embedder, checked before any work.

    The identity is what a resumed embedding store must match: embeddings of two models do not mix.
    """
    from models.embedder import check_model

    ref = resolve_model("embed", cfg.curate.embed_model, cfg.runtime)
    if ref is None:
        raise ConfigError("--embed-model is empty: name an open_clip architecture, a folder or an 'hf-hub:' id")
    path = ref.resolve(Path(cfg.runtime.cache_dir))
    check_model(path, cfg.curate.embed_weights)
    return path, "tiny" if ref.is_tiny else f"{ref.name} ({cfg.curate.embed_weights})"


def embedder_factory(cfg: RunConfig) -> Callable[[], object]:
    """Pass 1's EVA-CLIP embedder, built in the worker thread that calls the factory; the
    category stage and the CLIP tagger share it so an image is embedded once."""
    from models.embedder import ClipEmbedder

    path, _ = embedder_model(cfg)
    curate = cfg.curate
    return lambda: ClipEmbedder(path, weights=curate.embed_weights, device=cfg.runtime.device,
                                image_onnx=curate.embed_onnx)


def build(cfg: RunConfig) -> Embed:
    path, _ = embedder_model(cfg)
    return Embed(cfg.curate, model=path, device=cfg.runtime.device)


class Embed(Stage):
    name = "embed"

    def __init__(self, cfg: CurateConfig, *, model: str, device: str):
        self.cfg = cfg
        self.model_name = model
        self.device = device
        self.embedder = None

    def resources(self) -> Resources:
        return Resources(batch_size=self.cfg.embed_batch, device=self.device)

    def views(self) -> tuple[ImageView, ...]:
        return (EMBED_VIEW,)

    def setup(self) -> None:
        from models.embedder import ClipEmbedder

        self.embedder = ClipEmbedder(self.model_name, weights=self.cfg.embed_weights, device=self.device,
                                     image_onnx=self.cfg.embed_onnx)

    def process(self, batch: list[Sample]) -> list[Sample]:
        fill_embeddings(self.embedder, batch, self.name)
        for sample in batch:
            sample.views.pop(EMBED_VIEW.name, None)  # pass 1 keeps no pixels past this point
        return batch

    def teardown(self) -> None:
        self.embedder = None

    def describe(self) -> str:
        return self.embedder.describe() if self.embedder else f"open_clip {self.model_name}"


@functools.lru_cache(maxsize=8)  # a meta-device build takes seconds (imports); plans for several GPU sizes share it
def embedder_need(model: str, batch: int) -> Need:
    """The embedding model's memory per replica (category, and the clip tagger's own copy)."""
    import torch

    try:
        import open_clip
    except ImportError:
        raise ConfigError("plan: counting the embedder's parameters needs open_clip (pip install open_clip_torch)") from None
    config_file = Path(model) / "open_clip_config.json"
    name = model
    if config_file.is_file():
        open_clip.add_model_config(str(config_file))
        name = config_file.stem
    if open_clip.get_model_config(name) is None:
        raise ConfigError(f"plan: --embed-model {model} is neither an open_clip architecture nor a folder with "
                          f"open_clip_config.json")
    from models.embedder import random_weights_meant

    with torch.device("meta"), random_weights_meant():
        net = open_clip.create_model(name, pretrained=None, device="meta")
    vision = open_clip.get_model_config(name)["vision_cfg"]
    trunk = getattr(net.visual, "trunk", None)
    if trunk is not None:  # timm towers (EVA02)
        tokens, hidden = trunk.patch_embed.num_patches + 1, trunk.embed_dim
    else:
        side, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
        tokens, hidden = (side // patch) ** 2 + 1, vision.get("width", 1024)
    return Need("category", f"{model} (open_clip)", count_params(net), 2 * count_params(net),
                vit_activations(batch, tokens, hidden), "meta-device architecture",
                "--stages without category")
