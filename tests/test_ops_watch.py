"""The run's watch (engine/ops/watch.py): the stall alarm names the stage and replica holding
the oldest item, JSON events for a stall and a retired replica, bounded reject reasons."""

import json
import threading

from test_runtime import Recorder, samples

from engine.core.record import Sample, Source
from engine.core.runtime import Pipeline
from engine.ops import events
from engine.ops.watch import RunWatch, reason_label


class Held(Recorder):
    """Holds every batch in process() until released."""

    def __init__(self, release: threading.Event, fail: bool = False):
        super().__init__("held", batch_size=2)
        self.release, self.fail = release, fail

    def process(self, batch):
        if self.fail:
            raise ValueError("this replica is broken")
        self.release.wait(60)
        return super().process(batch)


class WatchedWriter:
    """A sink as the driver wraps it: every sample also reaches the watch."""

    def __init__(self):
        self.written = self.rejected = 0
        self.watch: RunWatch | None = None

    def write(self, sample):
        self.written += sample.alive
        self.rejected += not sample.alive
        self.watch.sample_written(sample)

    def commit(self, end):
        pass


def run_watched(stages, items, stall_seconds, during=lambda watch: None):
    pipeline, writer = Pipeline(stages, 2), WatchedWriter()
    writer.watch = watch = RunWatch("run", pipeline, writer, shards_total=1, shards_before=0,
                                    expected_samples=[None], stall_seconds=stall_seconds)
    with watch:
        runner = threading.Thread(target=pipeline.run, args=(iter(items), writer))
        runner.start()
        during(watch)
        runner.join(60)
    return watch


def logged(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_stall_names_the_replica_holding_the_oldest_batch_and_ends_when_samples_move(tmp_path):
    release = threading.Event()
    events.configure("json", str(tmp_path / "events.jsonl"))
    seen = {}

    def during(watch):
        for _ in range(200):
            if watch.stall is not None:
                break
            release.wait(0.05)
        seen["stall"] = watch.stall
        seen["since"] = watch.seconds_since_last_sample
        release.set()

    try:
        run_watched([Recorder("first"), [Held(release), Held(release)]], list(samples("s", 4)), 0.3, during)
    finally:
        events.configure("text", "")
    assert seen["stall"] is not None and seen["stall"].stage == "held"
    assert seen["stall"].replica in ("0:cpu", "1:cpu") and seen["since"] >= 0.3
    kinds = [(e["event"], e.get("stage")) for e in logged(tmp_path / "events.jsonl")]
    assert kinds == [("stalled", "held"), ("stall_ended", "held")]


def test_a_retired_replica_is_one_json_event(tmp_path):
    release = threading.Event()
    release.set()
    events.configure("json", str(tmp_path / "events.jsonl"))
    try:
        watch = run_watched([[Held(release, fail=True), Held(release)]], list(samples("s", 20)), 0)
    finally:
        events.configure("text", "")
    retired = [e for e in logged(tmp_path / "events.jsonl") if e["event"] == "replica_retired"]
    assert [(e["stage"], e["replica"], e["device"]) for e in retired] == [("held", 0, "cpu")]
    assert "this replica is broken" in retired[0]["reason"] and retired[0]["run_id"] == events.RUN_ID
    assert watch.rejected == {("held", "batch failed"): 6}  # three batches of two, before it was retired
    assert watch.stall is None


def test_reject_reasons_are_short_phrases_or_the_status():
    def rejected(kind, reason):
        sample = Sample(key="k", source=Source("s", "s", "m"))
        getattr(sample, kind)("stage", reason)
        return reason_label(sample)

    assert rejected("fail", "batch failed: ValueError: bad 3") == "batch failed"
    assert rejected("filter", "repeated_ngrams") == "repeated_ngrams"
    assert rejected("fail", "member 'x.jpg' has 123 bytes") == "error"
    assert rejected("filter", "300x200 < 448") == "filtered"
