"""Tagging stage: ``sample.tags`` from RAM++ (its own 384 px view) or CLIP zero-shot.

The CLIP tagger reads the pass-1 embedding (``sample.embedding``); only a sample that
arrives without one is embedded here, from the ``embed`` view the embedder uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.core.config import ExpertsConfig, RunConfig
from engine.core.models import resolve_model
from engine.core.placement import Need, count_params, vit_activations
from engine.core.record import Sample
from engine.core.stage import ImageView, Resources, Stage
from engine.stages.embed import EMBED_VIEW, embedder_factory, embedder_need, fill_embeddings
from engine.stages.expert_cache import cached
from models.base import ModelRef
from models.errors import ConfigError

RAM_VIEW = ImageView("ram_plus", 384)


def build(cfg: RunConfig, *, make_embedder: Callable[[], object] | None = None) -> Stage:
    """The tagger the config names, behind the expert cache; ``make_embedder`` (clip tagger)
    gives the text/image embedder, by default pass 1's."""
    experts = cfg.experts
    ram_plus = resolve_model("ram_plus", experts.ram_plus_model, cfg.runtime)
    if experts.tagger == "ram_plus":
        if ram_plus is None:
            raise ConfigError("--tagger ram_plus (the default) needs --ram-plus-model (the "
                              "ram_plus_swin_large_14m.pth checkpoint or its folder); or use --tagger clip "
                              "--tag-vocab FILE (one tag a line; zero-shot from the embedding model)")
        stage: Stage = RamPlusTag(experts, model=ram_plus.resolve(Path(cfg.runtime.cache_dir)),
                                  device=cfg.runtime.device)
    else:
        stage = ClipTag(experts, vocabulary=tag_vocabulary(experts, ram_plus), cache_dir=cfg.runtime.cache_dir,
                        embedder_factory=make_embedder or embedder_factory(cfg), device=cfg.runtime.device)
    return cached(stage, cfg, "tags")


def tag_vocabulary(experts: ExpertsConfig, ram_plus: ModelRef | None) -> list[str]:
    """The clip tagger's tags: --tag-vocab, else RAM++'s list (the tiny model's own when tiny)."""
    from models.ram_plus import TINY_TAGS, read_lines, vocabulary_file

    if experts.tag_vocab:
        path = Path(experts.tag_vocab)
    elif ram_plus is not None and ram_plus.is_tiny:
        return list(TINY_TAGS)
    elif ram_plus is not None:
        path = vocabulary_file(ram_plus.name)
    else:
        raise ConfigError("--tagger clip needs a vocabulary: --tag-vocab FILE or --ram-plus-model (its ram_tag_list.txt)")
    if not path.is_file():
        raise ConfigError(f"tag vocabulary {path} does not exist")
    return read_lines(path)


class RamPlusTag(Stage):
    name = "tag"

    def __init__(self, cfg: ExpertsConfig, *, model: str, device: str):
        self.cfg = cfg
        self.model_name = model
        self.device = device
        self.model = None

    def resources(self) -> Resources:
        return Resources(batch_size=self.cfg.tag_batch, device=self.device)

    def views(self) -> tuple[ImageView, ...]:
        return (RAM_VIEW,)

    def setup(self) -> None:
        from models.ram_plus import load_tagger

        self.model = load_tagger(self.model_name, self.device)  # a checkpoint (torch) or an .onnx export

    def process(self, batch: list[Sample]) -> list[Sample]:
        images = [s.views.pop(RAM_VIEW.name) for s in batch]
        for sample, tags in zip(batch, self.model.tag(images), strict=True):
            sample.tags = tags[: self.cfg.max_tags]
        return batch

    def teardown(self) -> None:
        self.model = None

    def describe(self) -> str:
        runtime = f"onnxruntime {self.model.provider}" if hasattr(self.model, "provider") else self.device
        return f"tag: RAM++ {self.model_name} ({runtime})"


class ClipTag(Stage):
    """``embedder_factory()`` gives an object with ``embed_texts`` (and ``embed_images`` for
    samples without a pass-1 embedding), e.g. ``models.embedder.ClipEmbedder``."""

    name = "tag"

    def __init__(self, cfg: ExpertsConfig, *, vocabulary: list[str], embedder_factory: Callable[[], object],
                 cache_dir: str, device: str):
        self.cfg = cfg
        self.vocabulary = vocabulary
        self.embedder_factory = embedder_factory
        self.cache_dir = cache_dir
        self.device = device
        self.embedder = None
        self.tagger = None

    def resources(self) -> Resources:
        return Resources(batch_size=self.cfg.tag_batch, device=self.device)

    def views(self) -> tuple[ImageView, ...]:
        return (EMBED_VIEW,)

    def setup(self) -> None:
        from models.clip_tagger import ClipZeroShotTagger

        self.embedder = self.embedder_factory()
        self.tagger = ClipZeroShotTagger(
            self.embedder, self.vocabulary, template=self.cfg.clip_tag_template,
            threshold=self.cfg.clip_tag_threshold, top_k=self.cfg.clip_tag_top_k, cache_dir=Path(self.cache_dir),
        )

    def process(self, batch: list[Sample]) -> list[Sample]:
        fill_embeddings(self.embedder, batch, self.name)
        for sample in batch:
            sample.views.pop(EMBED_VIEW.name, None)
        ready = [s for s in batch if s.alive]
        if ready:
            vectors = np.stack([np.asarray(s.embedding, np.float32) for s in ready])
            for sample, tags in zip(ready, self.tagger.tag(vectors)):
                sample.tags = tags[: self.cfg.max_tags]
        return batch

    def teardown(self) -> None:
        self.embedder = self.tagger = None

    def describe(self) -> str:
        return f"tag: CLIP zero-shot over {len(self.vocabulary)} tags ({self.device})"


def tag_need(cfg: RunConfig) -> tuple[Need, ...]:
    """RAM++'s memory per replica; the clip tagger loads its own copy of the embedding model (its
    text tower too)."""
    experts = cfg.experts
    if experts.tagger == "ram_plus":
        return (ram_plus_need(experts.tag_batch),)
    return (dataclasses.replace(embedder_need(cfg.curate.embed_model, experts.tag_batch), stage="tag", leave_out=""),)


def ram_plus_need(batch: int) -> Need:
    import torch

    from models.ram_plus import RamPlus, RamPlusConfig

    config = RamPlusConfig()  # the released Swin-L 384 (a checkpoint loads strictly into it)
    with torch.device("meta"):
        net = RamPlus(config, [f"tag {i}" for i in range(config.num_classes)])
    stage1 = (config.image_size // 4) ** 2  # Swin's largest activations: stage 1, windows of 12x12
    return Need("tag", "RAM++ Swin-L 384", count_params(net), 2 * count_params(net),
                vit_activations(batch, stage1, config.embed_dim, config.num_heads[0], config.window_size**2),
                "meta-device architecture")  # the paper's tagger: the clip tagger loads an embedder instead
