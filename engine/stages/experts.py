"""Building the expert stages from the run config: model names resolved (``tiny`` included),
misconfiguration raised before any work, and each stage wrapped in the expert cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from engine.core.config import ExpertsConfig, RunConfig
from engine.core.errors import ConfigError
from engine.core.stage import Stage
from engine.io.expert_cache import fingerprint
from engine.stages.detect import Detect
from engine.stages.expert_cache import CachedExpert
from engine.stages.tag import ClipTag, RamPlusTag
from models.base import ModelRef

# Options that do not change an expert's output: left out of its cache fingerprint.
_NOT_OUTPUT = {"tag_batch", "detect_batch", "expert_cache"}
_TAG_FIELDS = {"tagger", "ram_plus_model", "max_tags", "tag_vocab", "clip_tag_template", "clip_tag_threshold",
               "clip_tag_top_k"}


def model_path(name: str, role: str, cfg: RunConfig) -> str:
    """``name`` (or ``tiny`` for every model when ``--models tiny``) as a loadable path/hub id."""
    if not name:
        return ""
    ref = ModelRef("tiny" if cfg.runtime.models == "tiny" else name, role)
    ref.check()
    return ref.resolve(Path(cfg.runtime.cache_dir))


def cache_path(cfg: RunConfig) -> Path | None:
    setting = cfg.experts.expert_cache
    if setting == "off":
        return None
    return Path(setting) if setting else Path(cfg.runtime.cache_dir) / "experts.sqlite"


def _options(experts: ExpertsConfig, names: set[str]) -> dict:
    return {k: v for k, v in dataclasses.asdict(experts).items() if k in names}


def tag_fingerprint(cfg: RunConfig) -> str:
    embedder = (cfg.curate.embed_model, cfg.curate.embed_weights) if cfg.experts.tagger == "clip" else None
    return fingerprint("tag", _options(cfg.experts, _TAG_FIELDS), embedder, cfg.runtime.models)


def pass1_embedder(cfg: RunConfig):
    """A factory of the pass-1 EVA-CLIP embedder (built in the worker thread that calls it)."""
    from engine.stages.embed import embed_model_path
    from models.embedder import ClipEmbedder

    path = embed_model_path(cfg.curate, cfg.runtime.models, cfg.runtime.cache_dir)
    return lambda: ClipEmbedder(path, weights=cfg.curate.embed_weights, device=cfg.runtime.device,
                                image_onnx=cfg.curate.embed_onnx)


def build_tag(cfg: RunConfig, *, embedder_factory=None) -> Stage:
    """``embedder_factory`` (clip tagger): gives the text/image embedder; default: pass 1's."""
    experts, device = cfg.experts, cfg.runtime.device
    ram_plus = experts.ram_plus_model or ("tiny" if cfg.runtime.models == "tiny" else "")
    if experts.tagger == "ram_plus":
        if not ram_plus:
            raise ConfigError("--tagger ram_plus needs --ram-plus-model (the ram_plus_swin_large_14m.pth "
                              "checkpoint or its folder); or use --tagger clip")
        if ram_plus != "tiny" and cfg.runtime.models != "tiny" and not Path(ram_plus).expanduser().exists():
            raise ConfigError(f"--ram-plus-model {ram_plus} does not exist: give the local "
                              f"ram_plus_swin_large_14m.pth (or its folder) with ram_tag_list.txt beside it")
        stage: Stage = RamPlusTag(experts, model=model_path(ram_plus, "ram_plus", cfg), device=device)
    else:
        stage = ClipTag(experts, vocabulary=tag_vocabulary(cfg, ram_plus), cache_dir=cfg.runtime.cache_dir,
                        embedder_factory=embedder_factory or pass1_embedder(cfg), device=device)
    return _cached(stage, cfg, tag_fingerprint(cfg), ("tags",))


def tag_vocabulary(cfg: RunConfig, ram_plus: str) -> list[str]:
    from models.ram_plus import TAG_LIST_NAME, TINY_TAGS, checkpoint_path

    if cfg.experts.tag_vocab:
        path = Path(cfg.experts.tag_vocab)
    elif cfg.runtime.models == "tiny" or ram_plus == "tiny":
        return list(TINY_TAGS)
    elif ram_plus:
        path = checkpoint_path(ram_plus).parent / TAG_LIST_NAME
    else:
        raise ConfigError("--tagger clip needs a vocabulary: --tag-vocab FILE or --ram-plus-model (its ram_tag_list.txt)")
    if not path.is_file():
        raise ConfigError(f"tag vocabulary {path} does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_detect(cfg: RunConfig) -> Stage:
    experts = cfg.experts
    owlv2 = model_path(experts.owlv2_model, "owlv2", cfg)
    # with --models tiny every expert runs, the closed-set detector too (it is off by default)
    closed_name = experts.closed_detector or ("tiny" if cfg.runtime.models == "tiny" else "")
    closed = model_path(closed_name, "detector", cfg)
    stage = Detect(experts, cfg.boxes, owlv2_model=owlv2, closed_model=closed, device=cfg.runtime.device,
                   owlv2_side=_owlv2_side(owlv2), closed_side=_closed_side(closed, experts))
    # boxes depend on the tags (OWLv2's queries), so the tagger's fingerprint is part of theirs
    print_ = fingerprint("detect", _options(experts, set(dataclasses.asdict(experts)) - _NOT_OUTPUT - _TAG_FIELDS),
                         cfg.boxes, tag_fingerprint(cfg), cfg.runtime.models)
    return _cached(stage, cfg, print_, ("boxes",))


def _owlv2_side(model: str) -> int:
    """The view OWLv2 needs: its input side (960 for base, 1008 for large) from config.json."""
    config = Path(model) / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["vision_config"].get("image_size", 960))
    return 960


def _closed_side(model: str, experts: ExpertsConfig) -> int:
    """The view the closed-set detector needs: its processor's longest edge (DETR: 1333)."""
    if experts.closed_input_size:
        return experts.closed_input_size
    processor = Path(model) / "preprocessor_config.json"
    if model and not model.endswith(".onnx") and processor.is_file():
        size = json.loads(processor.read_text()).get("size", {})
        return int(size.get("longest_edge") or max(size.get("height", 0), size.get("width", 0)) or 1333)
    return 1333


def _cached(stage: Stage, cfg: RunConfig, expert: str, fields: tuple[str, ...]) -> Stage:
    path = cache_path(cfg)
    return stage if path is None else CachedExpert(stage, path, expert, fields)
