"""The one driver of both passes: sinks, reruns, metrics.json across invocations, shard problems."""

import json
import subprocess

from conftest import jpeg, sample_members, write_tar
from test_resume import ROOT, command, held_back, make_shards, run_and_kill

import densefusion_local
from engine.core.console import BAR_FORMAT, ProgressBar
from engine.core.figures import OutputTotals
from engine.core.record import ShardEnd
from engine.core.sink import Sink
from engine.curate.store import EmbeddingStore
from engine.io.manifest import Manifest
from engine.io.writers import DatasetWriter


def cli(*argv) -> int:
    return densefusion_local.main(list(argv))


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_both_passes_sinks_implement_the_one_interface(tmp_path):
    assert isinstance(DatasetWriter(tmp_path / "out", Manifest(tmp_path / "out")), Sink)
    assert isinstance(EmbeddingStore(tmp_path / "curate"), Sink)


def test_pass1_reaches_the_driver_without_pass2s_module():
    code = ("import sys, engine.curate.pass1; "
            "sys.exit('engine.core.pipeline' in sys.modules or 'engine.io.writers' in sys.modules)")
    assert subprocess.run(["python", "-c", code], cwd=ROOT).returncode == 0


class WorkerExecutor:
    """An executor of the test's own, outside engine/core: one worker built as a Ray actor builds
    it (engine/cluster/worker.py), fed here shard by shard; the driver's sink records its markers,
    as the Ray executor's does."""

    def __init__(self):
        self.handed = None

    def device(self, cfg):
        return "worker"

    def figures(self):
        return {"worker": {"shards": len(self.handed.todo)}}

    def describe(self):
        return ""

    def run(self, work):
        from dataclasses import replace

        from engine.cluster.worker import build_worker

        self.handed = work
        worker = build_worker(work.given, work.spec, work.reader)
        worker.ready()
        markers = [worker.process(str(path), 1)["marker"] for path in work.todo]
        for path, marker in zip(work.todo, markers):
            work.sink.adopt({path.stem: marker})
        return replace(work.summary, shards_done=[p.stem for p in work.todo], written=sum(m["written"] for m in markers),
                       rejected=sum(m["rejected"] for m in markers), wall_s=1.0)


def test_another_executor_gets_the_shards_left_and_its_workers_write_what_a_local_run_writes(tmp_path):
    from test_resume import contents

    from engine.core import config, pipeline
    from engine.io.manifest import read_manifest

    shards = make_shards(tmp_path / "in", n_shards=3, per_shard=6)
    local, other = tmp_path / "local", tmp_path / "other"
    subprocess.run(command(shards, local), cwd=ROOT, check=True, capture_output=True)
    subprocess.run(command(shards[:1], other), cwd=ROOT, check=True, capture_output=True)  # one done already

    cfg = config.build(input={"shards": tuple(map(str, shards))}, runtime={"out": str(other), "progress": False,
                                                                          "stages": ("decode",)})
    executor = WorkerExecutor()
    summary = pipeline.run(cfg, executor)
    assert [p.stem for p in executor.handed.todo] == [p.stem for p in shards[1:]]  # only the shards left
    assert executor.handed.given.runtime.device == "auto" != executor.handed.cfg.runtime.device  # settled where it runs
    assert summary.shards_skipped == [shards[0].stem] and summary.shards_left == 0
    assert contents(other, shards) == contents(local, shards)
    assert set(read_manifest(other)) == {p.stem for p in shards}
    entry = metrics(other)["invocations"][-1]
    assert entry["device"] == "worker" and entry["worker"] == {"shards": 2} and entry["status"] == "finished"


def test_rerun_of_a_finished_output_loads_no_model_and_keeps_its_totals(tmp_path, monkeypatch, capsys):
    shards = [write_tar(tmp_path / f"in{i}.tar", sample_members(f"k{i}", jpeg(500, 500))
                        + sample_members(f"small{i}", jpeg(100, 100))) for i in range(2)]
    args = ["run", "--shards", *map(str, shards), "--out", str(tmp_path / "out"), "--no-progress",
            "--stages", "decode"]
    assert cli(*args) == 0
    first = metrics(tmp_path / "out")

    class NoPipeline:  # stages' setup() (model loading) runs only inside Pipeline.run
        def __init__(self, *a, **k):
            raise AssertionError("a rerun with nothing to do built a pipeline")

    monkeypatch.setattr("engine.core.driver.Pipeline", NoPipeline)
    capsys.readouterr()
    assert cli(*args) == 0
    out = capsys.readouterr().out
    assert "nothing left to do" in out and "0 committed this run, 2 already done" in out
    assert "2 shards, 2 written, 2 rejected" in out  # the output's totals, not this invocation's zeros
    again = metrics(tmp_path / "out")
    totals = ("written", "rejected", "samples", "shards", "rejects_by_stage")
    assert {k: again[k] for k in totals} == {k: first[k] for k in totals} == {
        "written": 2, "rejected": 2, "samples": 4, "shards": 2, "rejects_by_stage": {"probe": 2}}
    assert [i["status"] for i in again["invocations"]] == ["finished", "nothing to do"]
    assert again["invocations"][1]["written"] == 0 and again["stages"] == first["stages"]


def test_resume_after_a_kill_keeps_every_invocation_and_the_totals_of_a_clean_run(tmp_path):
    from engine.output.report import run_figures

    shards = make_shards(tmp_path / "in", n_shards=4, per_shard=30)
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert cli(*command(shards, clean)[2:]) == 0
    with held_back(shards[-1]):
        assert run_and_kill(command(shards, resumed), resumed, after_shards=1) < len(shards)
    for _ in range(2):  # the resume, then a rerun with nothing left to do
        assert cli(*command(shards, resumed)[2:]) == 0
    a, b = metrics(clean), metrics(resumed)
    totals = ("written", "rejected", "samples", "shards", "rejects_by_stage", "shard_problems")
    assert {k: b[k] for k in totals} == {k: a[k] for k in totals}
    assert a["written"] == 4 * 30 - 4 * 5  # every 7th image of a shard is too small
    assert [i["status"] for i in b["invocations"]] == ["killed", "finished", "nothing to do"]
    resumed_run = b["invocations"][1]
    assert 0 < resumed_run["written"] < b["written"] and resumed_run["shards_skipped"] >= 1
    page = run_figures(OutputTotals.of(Manifest(resumed)), b)
    assert f'<td class="l">{b["written"]}</td>' in page and "3 (1 killed)" in page  # the report shows the totals


def test_shard_problems_are_warned_summarised_and_recorded(tmp_path, capsys):
    good = write_tar(tmp_path / "good.tar", sample_members("k", jpeg(500, 500)))
    empty = write_tar(tmp_path / "empty.tar", [])
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    out = tmp_path / "out"
    assert cli("run", "--shards", str(good), str(empty), str(zero), "--out", str(out), "--no-progress",
               "--stages", "decode") == 0
    captured = capsys.readouterr()
    assert "warning: shard empty: no samples in this shard" in captured.err
    assert "warning: shard zero:" in captured.err
    assert "shard problems (2 of 3 committed shards" in captured.out
    problems = metrics(out)["shard_problems"]
    assert set(problems) == {"empty", "zero"} and str(zero) in problems["zero"][0]  # the reader names the file


def test_out_pointing_at_a_file_says_so(tmp_path, capsys):
    shard = write_tar(tmp_path / "in.tar", sample_members("k", jpeg(500, 500)))
    (tmp_path / "taken").write_text("")
    assert cli("run", "--shards", str(shard), "--out", str(tmp_path / "taken"), "--no-progress") == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_progress_shows_shards_rate_and_time_left_always_as_images_per_second(capsys):
    from tqdm import tqdm

    bar = ProgressBar(True, shards_total=4, shards_before=1, expected_samples=[10, 10, 10])
    bar.update(10, 0)
    bar.shard_committed(ShardEnd("a", "a.tar", 10), [])
    bar.update(6, 2)
    assert bar.seconds_left() is not None
    bar.close()
    err = capsys.readouterr().err
    assert "shards 2/4" in err and "ETA" in err and "img/s" in err and "rejected=2" in err
    slow = tqdm.format_meter(1, None, 50.0, unit="img", prefix="images", bar_format=BAR_FORMAT)
    assert "0.02img/s" in slow and "s/img" not in slow  # slow runs never flip to seconds per image


def test_time_left_from_committed_shards_when_counts_are_unknown():
    bar = ProgressBar(True, shards_total=3, expected_samples=[None, None, None])
    bar.update(5, 0)
    assert bar.seconds_left() is None  # a tar's count is known only once it is read
    bar.shard_committed(ShardEnd("a", "a.tar", 5), [])
    assert bar.seconds_left() > 0  # two more shards of about five images each
    bar.close()


def test_expert_cache_hits_reach_metrics_totals_the_summary_and_the_report(tmp_path):
    from engine.core.console import format_summary
    from engine.core.figures import MetricsFile, OutputTotals, RunSummary
    from engine.output.report import run_figures

    def stage(name, **cache):
        return {"stage": name, "description": f"{name} stage", "items": 3, "items_per_busy_s": 9.0,
                "busy_share": 0.1, **cache}

    metrics_file = MetricsFile(tmp_path / "metrics.json")
    for hits in (0, 3):  # a first run fills the cache, a second one over the same images hits it
        stages = [stage("probe"), stage("tag", cache_hits=hits, cache_misses=3 - hits)]
        summary = RunSummary(["s"], [], 3, 0, {}, 1.0, False, stages, root=tmp_path, shards_total=1)
        metrics_file.start("run", {}, OutputTotals())
        metrics_file.finish(summary, "cpu")
    data = metrics(tmp_path)
    assert data["expert_cache"] == {"tag": {"cache_hits": 3, "cache_misses": 3}}  # summed over the runs
    table = format_summary(summary).splitlines()
    header = next(line for line in table if line.strip().startswith("stage"))
    assert "expert cache" in header
    assert "3 hits, 0 misses" in next(line for line in table if "tag stage" in line)
    page = run_figures(OutputTotals(), data)
    assert "expert cache: tag" in page and "3 hits, 3 misses" in page and "3 hits, 0 misses" in page
