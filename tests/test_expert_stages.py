import dataclasses

import numpy as np
import pytest
import torch

from engine.core.config import ExpertsConfig, FusionConfig, RunConfig, RuntimeConfig
from engine.core.record import Sample, Source
from engine.core.stage import Stage
from engine.evidence.kinds import BOXES
from engine.io.expert_cache import ExpertCache, fingerprint, image_digest
from engine.stages.detect import Detect
from engine.stages.expert_cache import CachedExpert
from engine.stages.tag import ClipTag, RamPlusTag, tag_vocabulary
from engine.stages.tag import build as build_tag
from models import ram_plus
from models.detector import build_tiny as build_tiny_detector
from models.errors import ConfigError
from models.owlv2 import build_tiny as build_tiny_owlv2
from models.records import Box, Tag


def sample(key, h=48, w=80, seed=0, **views):
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    s = Sample(key, Source("shard", "shard.tar", f"{key}.jpg"), image_bytes=img.tobytes(), width=w, height=h)
    s.views = {name: img for name in views}
    return s


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    ram = ram_plus.build_tiny(root / "ram")
    (ram / ram_plus.THRESHOLD_NAME).write_text("0.0\n" * len(ram_plus.TINY_TAGS))  # every tag on
    return {"ram": ram, "owlv2": build_tiny_owlv2(root / "owlv2"), "closed": build_tiny_detector(root / "closed")}


def test_ram_tags_drive_owlv2_and_boxes_are_fused(models):
    torch.set_num_threads(1)
    experts = ExpertsConfig(max_tags=4)
    tag = RamPlusTag(experts, model=str(models["ram"]), device="cpu")
    fusion = FusionConfig(open_min_score=0.0, closed_min_score=0.0, max_boxes=6)
    detect = Detect(experts, fusion, owlv2_model=str(models["owlv2"]), closed_model=str(models["closed"]),
                    device="cpu", owlv2_side=64, closed_side=96)
    assert {v.name for v in tag.views()} == {"ram_plus"} and {v.name for v in detect.views()} == {"owlv2", "closed"}
    batch = [sample("a", seed=1, ram_plus=1, owlv2=1, closed=1), sample("b", 60, 30, seed=2, ram_plus=1, owlv2=1, closed=1)]
    tag.setup()
    detect.setup()
    tag.process(batch)
    for s in batch:
        assert len(s.tags) == 4 and all(t.name in ram_plus.TINY_TAGS for t in s.tags)
        assert [t.score for t in s.tags] == sorted((t.score for t in s.tags), reverse=True)
    seen = []
    owl_detect = detect.owlv2.detect
    detect.owlv2.detect = lambda images, queries, **kw: seen.append(queries) or owl_detect(images, queries, **kw)
    detect.process(batch)
    assert seen == [[[t.name for t in s.tags] for s in batch]]  # OWLv2 is queried with each image's tags
    closed_labels = {"dog", "cat", "car"}
    for s in batch:
        assert s.alive and s.views == {}
        assert 0 < len(s.boxes) <= 6
        tags = {t.name for t in s.tags}
        for b in s.boxes:
            assert (b.source == "owlv2" and b.label in tags) or (b.source == "closed" and b.label in closed_labels) \
                or b.source == "fused"
            assert all(0.0 <= v <= 1.0 for v in b.xyxy)
    sources = {b.source for s in batch for b in s.boxes}
    assert "closed" in sources and ("owlv2" in sources or "fused" in sources)


def test_detect_with_no_tags_and_no_closed_detector_gives_no_boxes(models):
    detect = Detect(ExpertsConfig(), FusionConfig(open_min_score=0.0), owlv2_model=str(models["owlv2"]),
                    closed_model="", device="cpu", owlv2_side=64)
    detect.setup()
    s = sample("a", owlv2=1)
    detect.process([s])
    assert s.alive and s.boxes == [] and s.views == {}


def test_detect_bad_image_fails_alone(models):
    detect = Detect(ExpertsConfig(), FusionConfig(), owlv2_model=str(models["owlv2"]), closed_model="",
                    device="cpu", owlv2_side=64)
    detect.setup()
    good, bad = sample("good", owlv2=1), sample("bad", owlv2=1)
    good.tags = bad.tags = [Tag("dog", 0.9)]
    bad.views["owlv2"] = np.zeros((0, 5, 3), np.uint8)
    detect.process([good, bad])
    assert good.alive and bad.status == "error" and bad.stage == "detect"


class CountingTagger(Stage):
    name = "tag"

    def __init__(self):
        self.calls = []
        self.setups = 0

    def setup(self):
        self.setups += 1

    def process(self, batch):
        self.calls.append([s.key for s in batch])
        for s in batch:
            s.tags = [Tag(f"tag-{s.key}", 0.5)]
            if s.key == "broken":
                s.fail(self.name, "bad image")
        return batch


def test_cached_expert_skips_known_images_and_model_loading(tmp_path):
    path = tmp_path / "experts.sqlite"
    first = CountingTagger()
    stage = CachedExpert(first, path, fingerprint("tag", ExpertsConfig()), ("tags",))
    stage.setup()
    batch = [sample("a", seed=1), sample("b", seed=2), sample("broken", seed=3)]
    stage.process(batch)
    assert first.calls == [["a", "b", "broken"]]
    stage.teardown()
    # a second run (another caption engine, same experts): no model load, nothing recomputed
    again = CountingTagger()
    stage = CachedExpert(again, path, fingerprint("tag", ExpertsConfig()), ("tags",))
    stage.setup()
    batch2 = [sample("a2", seed=1), sample("c", seed=4), sample("broken", seed=3)]
    batch2[0].views["x"] = np.zeros(1)
    stage.process(batch2)
    assert batch2[0].tags == [Tag("tag-a", 0.5)]  # same bytes as "a": its tags
    assert again.calls == [["c", "broken"]]  # the failed sample was not cached
    assert stage.hits == 1
    # another expert config is another entry
    other = CachedExpert(CountingTagger(), path, fingerprint("tag", ExpertsConfig(max_tags=3)), ("tags",))
    other.setup()
    other.process([sample("a", seed=1)])
    assert other.inner.calls == [["a"]]


def test_cache_roundtrips_boxes(tmp_path):
    cache = ExpertCache(tmp_path / "c.sqlite")
    box = Box("dog", 0.5, (0.1, 0.2, 0.3, 0.4), "fused")
    cache.put_many({"h1": {"boxes": [dataclasses.asdict(box)]}}, "detect:x")
    found = cache.get_many(["h1", "h2"], "detect:x")
    assert set(found) == {"h1"} and BOXES.decode(found["h1"]["boxes"]) == [box]
    assert cache.get_many(["h1"], "detect:y") == {}
    assert image_digest(sample("a", seed=1)) == image_digest(sample("other", seed=1))


class FakeEmbedder:
    name = "fake"

    def __init__(self):
        self.images = 0

    def embed_texts(self, texts):
        out = np.zeros((len(texts), len(ram_plus.TINY_TAGS)), np.float32)
        for i, t in enumerate(texts):
            out[i, ram_plus.TINY_TAGS.index(t.removeprefix("a photo of a ").removesuffix("."))] = 1
        return out

    def embed_images(self, images):
        self.images += len(images)
        return np.tile(np.eye(len(ram_plus.TINY_TAGS), dtype=np.float32)[1], (len(images), 1))  # "cat"


def test_clip_tag_uses_pass1_embedding_and_embeds_only_the_missing(tmp_path):
    embedder = FakeEmbedder()
    stage = ClipTag(ExpertsConfig(clip_tag_threshold=0.5), vocabulary=list(ram_plus.TINY_TAGS),
                    embedder_factory=lambda: embedder, cache_dir=str(tmp_path), device="cpu")
    stage.setup()
    with_embedding, without = sample("a", embed=1), sample("b", embed=1)
    with_embedding.embedding = np.eye(len(ram_plus.TINY_TAGS), dtype=np.float32)[0]  # "dog"
    stage.process([with_embedding, without])
    assert [t.name for t in with_embedding.tags] == ["dog"]
    assert [t.name for t in without.tags] == ["cat"] and embedder.images == 1
    assert with_embedding.views == {} and without.views == {}


def test_build_tag_misconfiguration_fails_up_front(tmp_path):
    cfg = RunConfig(runtime=RuntimeConfig(out=str(tmp_path), cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="--ram-plus-model"):
        build_tag(cfg)
    missing = dataclasses.replace(cfg, experts=ExpertsConfig(ram_plus_model=str(tmp_path / "nope.pth")))
    with pytest.raises(ConfigError, match="does not exist"):
        build_tag(missing)
    clip = dataclasses.replace(cfg, experts=ExpertsConfig(tagger="clip"))
    with pytest.raises(ConfigError, match="vocabulary"):
        tag_vocabulary(clip.experts, None)
    vocab = tmp_path / "tags.txt"
    vocab.write_text("dog\ncat\n\n")
    clip = dataclasses.replace(cfg, experts=ExpertsConfig(tagger="clip", tag_vocab=str(vocab)))
    assert tag_vocabulary(clip.experts, None) == ["dog", "cat"]
    stage = build_tag(clip, make_embedder=FakeEmbedder)
    assert isinstance(stage, CachedExpert) and isinstance(stage.inner, ClipTag)
    off = dataclasses.replace(clip, experts=dataclasses.replace(clip.experts, expert_cache="off"))
    assert isinstance(build_tag(off, make_embedder=FakeEmbedder), ClipTag)


def test_end_to_end_tags_to_owlv2_to_prompt_detection_boxes(tmp_path):
    """Tiny models through the production factories: RAM++ tags query OWLv2, the closed-set
    detector adds its boxes, the fused boxes are what the prompt's [Detection Box] lists."""
    from engine.core.config import PromptConfig
    from engine.stages.detect import build as build_detect
    from engine.stages.prompt import FusionPrompt

    torch.set_num_threads(1)
    cfg = RunConfig(
        runtime=RuntimeConfig(out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), models="tiny",
                              device="cpu"),
        experts=ExpertsConfig(expert_cache="off", max_tags=5),
        boxes=FusionConfig(open_min_score=0.0, closed_min_score=0.0, max_boxes=4),
    )
    tag, detect, prompt = build_tag(cfg), build_detect(cfg), FusionPrompt(PromptConfig())
    views = {v.name: 1 for stage in (tag, detect) for v in stage.views()}
    batch = [sample("a", 60, 90, seed=5, **views), sample("b", 80, 40, seed=6, **views)]
    for stage in (tag, detect, prompt):
        stage.setup()
        stage.process(batch)
    for s in batch:
        assert s.alive and s.tags and 0 < len(s.boxes) <= 4
        tags = {t.name for t in s.tags}
        assert all(b.label in tags for b in s.boxes if b.source == "owlv2")
        section = s.prompt.split("[Detection Box]:")[1].split("[OCR]:")[0]
        lines = [line for line in section.strip().splitlines() if line]
        assert lines == [f"{b.label}: [{', '.join(f'{v:.2f}' for v in b.xyxy)}]" for b in s.boxes]
    assert {b.source for s in batch for b in s.boxes} & {"owlv2", "fused"}  # the tag-driven detector contributed


def test_stages_opening_a_new_cache_at_once_do_not_lock_each_other_out(tmp_path):
    """The tag and detect stages set up in parallel threads and both open the same new file
    (before the fix, about 1 in 100 such openings failed at once with "database is locked")."""
    import threading

    from engine.io.expert_cache import ExpertCache

    errors, rounds = [], 200
    start = threading.Barrier(2)

    def open_caches():
        for attempt in range(rounds):
            start.wait()
            try:
                cache = ExpertCache(tmp_path / f"{attempt}.sqlite")
                cache.put_many({threading.current_thread().name: {"tags": []}}, "e")
                cache.close()
            except Exception as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)

    threads = [threading.Thread(target=open_caches, name=f"stage{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    last = ExpertCache(tmp_path / f"{rounds - 1}.sqlite")
    assert set(last.get_many(["stage0", "stage1"], "e")) == {"stage0", "stage1"}


def test_a_nan_or_zero_embedding_fails_its_sample_alone():
    from engine.stages.embed import EMBED_VIEW, fill_embeddings

    class Broken:
        def embed_images(self, images):
            out = np.zeros((len(images), 4), np.float32)
            out[:, 0] = 1.0
            out[1] = np.nan  # fp16 overflow in the model
            out[2] = 0.0  # an all-zero feature, "normalised"
            return out

    samples = [Sample(key=f"k{i}", source=Source("s", "s.tar", f"k{i}.jpg")) for i in range(3)]
    for s in samples:
        s.views[EMBED_VIEW.name] = np.zeros((8, 8, 3), np.uint8)
    fill_embeddings(Broken(), samples, "embed")
    assert samples[0].alive and samples[0].embedding.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert not samples[1].alive and "not finite" in samples[1].reason
    assert not samples[2].alive and "norm 0" in samples[2].reason
