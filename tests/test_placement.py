"""Replicas of a stage on several devices (CPU "devices" standing in for GPUs): every replica
gets work, outputs equal a one-replica run, shard order and exactly-once hold, and a replica
that raises fails only its own batches."""

import threading
import time
from collections import Counter

import pytest

from engine.core.record import Sample, ShardEnd, Source
from engine.core.runtime import Pipeline, StageFailed
from engine.core.stage import Resources, Stage


def shards(*sizes: int):
    for s, n in enumerate(sizes):
        shard = f"s{s}"
        for i in range(n):
            yield Sample(key=f"{shard}-{i}", source=Source(shard, shard, str(i)))
        yield ShardEnd(shard, shard, n)


class Scorer(Stage):
    """A model-backed stage on one device: a deterministic score per key, slow enough that
    replicas overlap."""

    name = "score"

    def __init__(self, device: str, delay: float = 0.01, broken: bool = False):
        self.device, self.delay, self.broken = device, delay, broken
        self.seen: list[str] = []
        self.lock = threading.Lock()
        self.loaded = False

    def resources(self):
        return Resources(batch_size=3, device=self.device)

    def setup(self):
        self.loaded = True

    def process(self, batch):
        time.sleep(self.delay)
        if self.broken:
            raise RuntimeError(f"CUDA error on {self.device}")
        with self.lock:
            self.seen += [s.key for s in batch]
        for sample in batch:
            sample.scores["v"] = float(sum(map(ord, sample.key)))
        return batch


class Writer:
    def __init__(self):
        self.events = []

    def write(self, sample):
        self.events.append(("sample", sample.key, sample.status, dict(sample.scores), repr(sample.tags),
                            repr(sample.boxes), repr(sample.ocr), sample.prompt))

    def commit(self, end):
        self.events.append(("commit", end.shard))


def run(stages, items):
    writer = Writer()
    pipeline = Pipeline(stages, queue_depth=2)
    pipeline.run(iter(items), writer)
    return writer.events, pipeline


def check_shards_in_order_exactly_once(events, expected: list[tuple[str, set[str]]]):
    """``expected``: each shard's name and keys, in input order."""
    commits = [i for i, e in enumerate(events) if e[0] == "commit"]
    assert [events[i][1] for i in commits] == [name for name, _ in expected]
    written = [e[1] for e in events if e[0] == "sample"]
    assert sorted(written) == sorted(k for _, keys in expected for k in keys)  # exactly once
    start = 0
    for end, (_, keys) in zip(commits, expected):  # every sample before its shard's marker
        assert {e[1] for e in events[start:end] if e[0] == "sample"} == keys
        start = end


def numbered(*sizes: int) -> list[tuple[str, set[str]]]:
    return [(f"s{s}", {f"s{s}-{i}" for i in range(n)}) for s, n in enumerate(sizes)]


def test_replicas_share_the_work_and_match_one_replica():
    sizes = (20, 7, 13)
    replicas = [Scorer(f"cpu:{d}") for d in range(3)]
    events, pipeline = run([replicas], list(shards(*sizes)))
    check_shards_in_order_exactly_once(events, numbered(*sizes))
    assert all(r.loaded and r.seen for r in replicas)  # every replica loaded and got work
    assert sorted(k for r in replicas for k in r.seen) == sorted(e[1] for e in events if e[0] == "sample")
    per_replica = pipeline.metrics[0].extra["replica_items"]
    assert per_replica == {f"{i}:cpu:{i}": len(r.seen) for i, r in enumerate(replicas)}

    alone, _ = run([Scorer("cpu:0")], list(shards(*sizes)))
    outputs = {e[1]: (e[2], e[3]) for e in events if e[0] == "sample"}
    assert outputs == {e[1]: (e[2], e[3]) for e in alone if e[0] == "sample"}


def test_a_raising_replica_fails_only_its_batches_and_is_retired(capsys):
    sizes = (30, 12)
    replicas = [Scorer("cpu:0"), Scorer("cpu:1", broken=True), Scorer("cpu:2")]
    events, pipeline = run([replicas], list(shards(*sizes)))
    check_shards_in_order_exactly_once(events, numbered(*sizes))
    failed = {e[1] for e in events if e[0] == "sample" and e[2] == "error"}
    ok = {e[1] for e in events if e[0] == "sample" and e[2] == "ok"}
    # the broken replica took 3 batches (of at most 3) before it was retired; nothing else failed
    assert pipeline.metrics[0].failed_batches == 3 and 0 < len(failed) <= 9
    assert ok == {k for r in replicas for k in r.seen} and not ok & failed
    assert pipeline.metrics[0].extra["retired_replicas"] == [1]
    assert "failed 3 batches in a row on replica 1 (cpu:1)" in capsys.readouterr().err


def test_the_stage_fails_when_every_replica_is_broken():
    replicas = [Scorer(f"cpu:{d}", broken=True) for d in range(2)]
    with pytest.raises(StageFailed, match="CUDA error"):
        run([replicas], list(shards(40)))


def test_replicas_load_at_once_and_a_failed_load_stops_before_any_work():
    loading, most, lock = [0], [0], threading.Lock()

    class SlowLoad(Scorer):
        def setup(self):
            with lock:
                loading[0] += 1
                most[0] = max(most[0], loading[0])
            time.sleep(0.3)
            with lock:
                loading[0] -= 1
            super().setup()

    replicas = [SlowLoad(f"cpu:{d}") for d in range(4)]
    run([replicas], list(shards(3)))
    assert most[0] >= 2 and all(r.loaded for r in replicas)  # the first loads alone, the others at once

    class NoModel(Scorer):
        def setup(self):
            raise FileNotFoundError("no weights for cpu:1")

    pulled = Counter()

    def source():
        for item in shards(5):
            pulled["items"] += 1
            yield item

    torn = []

    class Tracked(Scorer):
        def teardown(self):
            torn.append(self.device)

    with pytest.raises(FileNotFoundError, match="no weights"):
        Pipeline([[Tracked("cpu:0"), NoModel("cpu:1")]], 2).run(source(), Writer())
    assert pulled["items"] == 0 and torn == ["cpu:0"]  # what loaded is freed again


def test_real_expert_stages_built_per_device_give_what_one_replica_gives(tmp_path):
    """The pipeline's factories build one replica of each expert per device (two CPU "devices"
    here), and the run's outputs equal a one-device run's."""
    from engine.core import config
    from engine.core.driver import shard_source
    from engine.core.pipeline import build_stages, resolved
    from engine.io.demo_data import demo_members, write_demo_shards

    paths = write_demo_shards(tmp_path / "in", n_shards=2)

    def outputs(devices: tuple[str, ...]):
        cfg = resolved(config.build(
            input={"shards": tuple(map(str, paths))}, experts={"tag_batch": 2, "detect_batch": 2, "expert_cache": "off"},
            runtime={"out": str(tmp_path / f"out{len(devices)}"), "models": "tiny", "progress": False,
                     "device": "cpu", "stages": ("decode", "tag", "detect", "ocr", "prompt"), "replica_devices": devices}))
        stages = build_stages(cfg)
        writer = Writer()
        pipeline = Pipeline(stages, queue_depth=2)
        pipeline.run(shard_source(paths, cfg, set()), writer)
        return stages, pipeline, writer.events

    stages, pipeline, events = outputs(("cpu", "cpu"))
    replicated = {s[0].name: s for s in stages if isinstance(s, list)}
    assert set(replicated) == {"tag", "detect", "ocr"} and all(len(r) == 2 for r in replicated.values())
    for m in pipeline.metrics:
        if m.name in replicated:
            assert list(m.extra["replica_items"]) == ["0:cpu", "1:cpu"]
    check_shards_in_order_exactly_once(events, [(f"demo-{i:05d}", {m.key for m in demo_members(i)}) for i in range(2)])
    ok = [e for e in events if e[0] == "sample" and e[2] == "ok"]
    texts = {m.key for i in range(2) for m in demo_members(i) if m.meta["kind"] in ("poster", "slide")}
    assert len(ok) == 12 and all("OcrLine" in e[6] for e in ok if e[1] in texts)  # 6 good a shard; text read
    _, _, alone = outputs(("cpu",))
    assert {e[1]: e[2:] for e in events if e[0] == "sample"} == {e[1]: e[2:] for e in alone if e[0] == "sample"}


def test_transfers_stay_plain_copies_on_the_cpu():
    import numpy as np
    import torch

    from models.preprocess import to_device, to_tensor

    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    image.flags.writeable = False  # decoded views may be read-only
    tensor = to_tensor(image, "cpu")
    assert tensor.shape == (1, 3, 2, 3) and torch.equal(tensor[0].permute(1, 2, 0), torch.from_numpy(image.copy()))
    assert to_device(tensor, "cpu", torch.float32).dtype == torch.float32


@pytest.mark.gpu
def test_host_to_gpu_copies_are_pinned_and_ordered_on_the_replica_stream():
    import numpy as np
    import torch

    from engine.core.runtime import _device_stream
    from models.preprocess import to_tensor

    images = [np.random.default_rng(i).integers(0, 256, (480, 640, 3), dtype=np.uint8) for i in range(4)]
    with _device_stream("cuda:0"):
        assert torch.cuda.current_stream() != torch.cuda.default_stream()
        moved = [to_tensor(image, "cuda:0").float().sum().item() for image in images]
    assert moved == [float(image.sum(dtype=np.int64)) for image in images]
