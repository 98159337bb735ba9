import threading
import time

import pytest

from engine.core.record import Sample, ShardEnd, Source
from engine.core.runtime import Pipeline, StageFailed
from engine.core.stage import Resources, Stage


def samples(shard: str, n: int, dead: set[int] = frozenset()):
    for i in range(n):
        sample = Sample(key=f"{shard}-{i}", source=Source(shard, shard, str(i)))
        if i in dead:
            sample.fail("read", "broken")
        yield sample
    yield ShardEnd(shard, shard, n)


class Recorder(Stage):
    def __init__(self, name="rec", batch_size=4, fail_keys=(), delay=0.0):
        self.name, self.batch_size, self.fail_keys, self.delay = name, batch_size, set(fail_keys), delay
        self.batches: list[list[str]] = []
        self.setup_thread = None

    def resources(self):
        return Resources(batch_size=self.batch_size)

    def setup(self):
        self.setup_thread = threading.current_thread().name

    def process(self, batch):
        time.sleep(self.delay)
        self.batches.append([s.key for s in batch])
        for sample in batch:
            if sample.key in self.fail_keys:
                sample.fail(self.name, "bad")
            sample.scores[self.name] = 1.0
        return batch


class ListWriter:
    def __init__(self):
        self.events = []

    def write(self, sample):
        self.events.append(("sample", sample.key, sample.status))

    def commit(self, end):
        self.events.append(("commit", end.shard))


def run(stages, items, depth=2):
    writer = ListWriter()
    rejects, interrupted = Pipeline(stages, depth).run(iter(items), writer)
    return writer.events, rejects


def test_every_sample_reaches_the_writer_before_its_shard_commits():
    first, second = Recorder("a", 3, fail_keys={"s1-2"}), Recorder("b", 5)
    items = list(samples("s1", 7, dead={4})) + list(samples("s2", 4))
    events, rejects = run([first, second], items)
    commits = [i for i, e in enumerate(events) if e[0] == "commit"]
    assert [events[i][1] for i in commits] == ["s1", "s2"]
    s1_keys = {e[1] for e in events[: commits[0]] if e[0] == "sample"}
    assert s1_keys == {f"s1-{i}" for i in range(7)}
    assert {e[1] for e in events[commits[0]:] if e[0] == "sample"} == {f"s2-{i}" for i in range(4)}
    assert rejects == {"read": 1, "a": 1}
    # dead samples never reach process(); batches never exceed the batch size and never span a shard end
    assert all(len(b) <= 3 for b in first.batches) and "s1-4" not in sum(first.batches, [])
    assert "s1-2" not in sum(second.batches, [])
    assert all(len({k.split("-")[0] for k in b}) == 1 for b in second.batches)
    assert first.setup_thread == "stage-a" and second.setup_thread == "stage-b"


def test_a_batch_that_raises_fails_its_samples_only():
    class FlakyOnce(Recorder):
        def process(self, batch):
            if not self.batches:
                self.batches.append([])
                raise RuntimeError("CUDA hiccup")
            return super().process(batch)

    events, rejects = run([FlakyOnce("f", 2)], list(samples("s", 6)))
    statuses = [e[2] for e in events if e[0] == "sample"]
    assert statuses.count("error") == 2 and statuses.count("ok") == 4
    assert rejects == {"f": 2}


def test_a_stage_that_always_raises_stops_the_run():
    class Broken(Recorder):
        def process(self, batch):
            raise ValueError("bug")

    with pytest.raises(StageFailed, match="bug"):
        run([Broken("x", 1)], list(samples("s", 10)))


def test_setup_failure_raises_before_any_input_is_read():
    class NoModel(Recorder):
        def setup(self):
            raise FileNotFoundError("model missing")

    pulled = []

    def source():
        for item in samples("s", 3):
            pulled.append(item)
            yield item

    with pytest.raises(FileNotFoundError):
        Pipeline([Recorder("ok"), NoModel("nm")], 2).run(source(), ListWriter())
    assert pulled == []


def test_bounded_queues_hold_back_a_fast_source():
    produced = []

    def source():
        for item in samples("s", 2000):
            produced.append(item)
            yield item

    slow = Recorder("slow", batch_size=8, delay=0.02)
    pipeline = Pipeline([slow], queue_depth=2)
    writer = ListWriter()
    thread = threading.Thread(target=pipeline.run, args=(source(), writer))
    thread.start()
    time.sleep(0.5)
    in_flight = len(produced) - len(writer.events)
    pipeline.stop()
    thread.join()
    # two queues of depth 2 with 64-item chunks, one pending batch, one chunk in the feeder's hand
    assert in_flight <= 5 * 64 + 8
    assert len(produced) < 2000


def test_stop_ends_without_committing_the_open_shard():
    pipeline = Pipeline([Recorder("r", 4, delay=0.01)], 2)

    def source():
        yield from samples("done", 4)
        for item in samples("open", 500):
            if isinstance(item, Sample) and item.key == "open-100":
                pipeline.stop()
            yield item

    writer = ListWriter()
    _, interrupted = pipeline.run(source(), writer)
    assert interrupted
    # "done" was read whole before the stop: committed if it got through the stages in time, else
    # dropped whole (redone on resume); the open shard never is
    commits = [e[1] for e in writer.events if e[0] == "commit"]
    assert commits in ([], ["done"])
    if commits:
        assert [e[1] for e in writer.events[:writer.events.index(("commit", "done"))]] == \
            [f"done-{i}" for i in range(4)]


class Concurrent(Recorder):
    """workers=2; the first two batches meet at a barrier, so they must be in process() together."""

    def __init__(self, name, batch_size, delay=0.0):
        super().__init__(name, batch_size, delay=delay)
        self.meet = threading.Barrier(2, timeout=10)
        self.lock = threading.Lock()
        self.inside = self.most_inside = 0
        self.torn_down_with_batches_inside = None

    def resources(self):
        return Resources(batch_size=self.batch_size, workers=2)

    def process(self, batch):
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            first_two = len(self.batches) < 2
            self.batches.append([s.key for s in batch])
        if first_two:
            self.meet.wait()  # BrokenBarrierError (a failed batch) unless two batches overlap
        time.sleep(self.delay)
        with self.lock:
            self.inside -= 1
        return batch

    def teardown(self):
        self.torn_down_with_batches_inside = self.inside


def test_workers_overlap_batches_and_markers_wait_for_them():
    stage = Concurrent("c", 3, delay=0.01)
    items = list(samples("s1", 10, dead={5})) + list(samples("s2", 7))
    events, rejects = run([stage, Recorder("after", 4)], items)
    assert rejects == {"read": 1}  # no batch failed: the first two met inside process()
    assert stage.most_inside == 2 and stage.torn_down_with_batches_inside == 0
    commits = [i for i, e in enumerate(events) if e[0] == "commit"]
    assert [events[i][1] for i in commits] == ["s1", "s2"]
    assert {e[1] for e in events[: commits[0]] if e[0] == "sample"} == {f"s1-{i}" for i in range(10)}
    assert {e[1] for e in events[commits[0]:] if e[0] == "sample"} == {f"s2-{i}" for i in range(7)}
    assert all(len({k.split("-")[0] for k in b}) == 1 for b in stage.batches)  # never across a shard end


def test_a_stage_failing_on_its_workers_stops_the_run_and_tears_down_after_them():
    class Broken(Concurrent):
        def process(self, batch):
            with self.lock:
                self.inside += 1
            time.sleep(0.05)
            with self.lock:
                self.inside -= 1
            raise ValueError("bug in a worker")

    stage = Broken("x", 1)
    with pytest.raises(StageFailed, match="bug in a worker"):
        run([stage], list(samples("s", 40)))
    assert stage.torn_down_with_batches_inside == 0


# --- the byte budget: image bytes between the source and the writer ---------------------


class Replica(Recorder):
    def resources(self):
        return Resources(batch_size=self.batch_size, workers=2)


class BytesWriter:
    """Records each sample as the writer gets it, and the bytes it has taken off the pipeline."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes, self.written_bytes, self.events = sizes, 0, []

    def write(self, sample):
        self.events.append((sample.key, sample.status, sample.stage, sample.reason, len(sample.image_bytes)))
        self.written_bytes += self.sizes[sample.key]

    def commit(self, end):
        self.events.append(("commit", end.shard))


def budgeted_run(stages, shards: dict[str, list[int]], budget: int, fail_keys=()):
    """Samples of the given image sizes through ``stages`` under ``budget``; returns the writer
    and the bytes in flight (read from the source, not yet written) each time the source was asked
    for more: every sample before that one had been admitted."""
    # a sample failed by the reader carries no bytes (it is rejected before the budget sees it)
    sizes = {key: 0 if key in fail_keys else n
             for shard, ns in shards.items() for i, n in enumerate(ns) for key in [f"{shard}-{i}"]}
    writer, in_flight, read = BytesWriter(sizes), [], [0]

    def source():
        for shard, ns in shards.items():
            for i, n in enumerate(ns):
                in_flight.append(read[0] - writer.written_bytes)
                sample = Sample(key=f"{shard}-{i}", source=Source(shard, shard, str(i)), image_bytes=b"\xff" * n)
                if sample.key in fail_keys:
                    sample.fail("read", "broken")
                read[0] += sizes[sample.key]
                yield sample
            yield ShardEnd(shard, shard, len(ns))

    pipeline = Pipeline(stages, queue_depth=2, max_bytes_in_flight=budget)
    thread = threading.Thread(target=pipeline.run, args=(source(), writer), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the pipeline stopped moving under the byte budget"
    return writer, in_flight, pipeline


def test_image_bytes_in_flight_stay_within_the_budget_across_replicas_workers_and_shard_ends():
    shards = {f"s{j}": [10 + (7 * i + j) % 90 for i in range(30)] for j in range(3)}
    # a batch far larger than what the budget admits: a stage flushes when its input runs dry
    replicas = [Replica("a", batch_size=16, delay=0.002), Replica("a", batch_size=16, delay=0.002)]
    writer, in_flight, pipeline = budgeted_run([replicas, Recorder("b", 5)], shards, budget=300,
                                               fail_keys={"s1-3"})
    assert max(in_flight) <= 300 and pipeline.budget.peak <= 300
    assert max(in_flight) > 200  # the source did run ahead up to the budget
    assert pipeline.budget.held == 0
    assert [e[1] for e in writer.events if e[0] == "commit"] == ["s0", "s1", "s2"]
    assert {e[0] for e in writer.events if e[0] != "commit"} == set(writer.sizes)


def test_a_sample_larger_than_the_budget_runs_alone_and_nothing_deadlocks():
    shards = {"s": [500, 10, 20, 500, 500, 10], "t": [1000, 5]}
    writer, in_flight, pipeline = budgeted_run([Recorder("a", batch_size=4), Replica("b", batch_size=8)],
                                               shards, budget=100)
    sizes = [n for ns in shards.values() for n in ns]
    for before, admitted in zip(sizes, in_flight[1:]):
        if before > 100:  # when the large one was admitted, nothing else was in flight
            assert admitted == before
    assert pipeline.budget.peak == 1000
    assert [e[1] for e in writer.events if e[0] == "commit"] == ["s", "t"]
    assert len([e for e in writer.events if e[0] != "commit"]) == 8


def test_a_rejected_sample_drops_its_image_bytes_and_keeps_its_key_and_reason():
    shards = {"s": [50] * 6}
    writer, _, _ = budgeted_run([Recorder("a", batch_size=2, fail_keys={"s-2"})], shards, budget=10_000,
                                fail_keys={"s-4"})
    by_key = {e[0]: e[1:] for e in writer.events if e[0] != "commit"}
    assert by_key["s-2"] == ("error", "a", "bad", 0)
    assert by_key["s-4"] == ("error", "read", "broken", 0)
    assert by_key["s-0"] == ("ok", "", "", 50)
