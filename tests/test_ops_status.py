"""`status OUT` on an output being written (a shard held back as a named pipe keeps the run
mid-way), after the writer is killed, and once a rerun finished it: the counts agree with the
output's own files; --json is checked against its schema."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
from test_resume import command, finished, held_back, make_shards

from engine.io.commit import node_name, temp_path
from engine.ops.status import STATUS_SCHEMA, status

ROOT = Path(__file__).resolve().parent.parent


def status_json(out: Path) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "densefusion_local.py"), "status", str(out), "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    jsonschema.validate(report, STATUS_SCHEMA)
    [run] = report["passes"]
    return run


def output_counts(out: Path) -> dict:
    """What the committed files hold, counted from the parquet files themselves."""
    def rows(folder: str) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in (out / folder).glob("*.parquet"))

    return {"written": rows("shards"), "rejected": rows("rejects")}


def test_status_while_running_after_a_kill_and_after_the_resume(tmp_path):
    shards = make_shards(tmp_path / "in", n_shards=3, per_shard=10)
    out = tmp_path / "out"
    with held_back(shards[-1]):
        writer = subprocess.Popen(command(shards, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while finished(out) < 2 and time.monotonic() < deadline:
                assert writer.poll() is None
                time.sleep(0.05)
            running = status_json(out)
            assert running["state"] == "running"
            assert running["writer"] == {**running["writer"], "pid": writer.pid, "alive": True}
            assert running["shards"] == {"total": 3, "done": 2, "failed": 0, "in_flight": 0, "left": 1}
            assert {k: running["images"][k] for k in ("written", "rejected")} == output_counts(out)
            assert running["rate"]["images"] == 20 and running["rate"]["images_per_s"] > 0
            assert running["eta_s"] is not None and running["eta_s"] > 0
            assert running["invocations"] == {"count": 1, "killed": 0, "interrupted": 0}
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()

    killed = status_json(out)
    assert killed["state"] == "stopped" and killed["writer"]["alive"] is False
    assert killed["shards"] == {"total": 3, "done": 2, "failed": 0, "in_flight": 0, "left": 1}
    assert killed["invocations"] == {"count": 1, "killed": 1, "interrupted": 0}
    assert killed["eta_s"] is None

    subprocess.run(command(shards, out), cwd=ROOT, check=True, capture_output=True)
    done = status_json(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert done["state"] == "finished"
    assert done["shards"] == {"total": 3, "done": 3, "failed": 0, "in_flight": 0, "left": 0}
    assert done["images"] == {"samples": metrics["samples"], "written": metrics["written"],
                              "rejected": metrics["rejected"]}
    assert {k: done["images"][k] for k in ("written", "rejected")} == output_counts(out)
    assert done["invocations"] == {"count": 2, "killed": 1, "interrupted": 0}
    text = subprocess.run([sys.executable, str(ROOT / "densefusion_local.py"), "status", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "finished" in text and "3 done of 3" in text and f"{metrics['written']} written" in text


def test_a_shard_in_flight_is_a_live_writers_temporary_and_a_dead_ones_is_not(tmp_path):
    shards = make_shards(tmp_path / "in", n_shards=2, per_shard=3)
    out = tmp_path / "out"
    subprocess.run(command(shards[:1], out), cwd=ROOT, check=True, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["invocations"][-1].update(status="running", pid=os.getpid())  # as if this process were writing
    metrics["invocations"][-1]["config"]["input"]["shards"] = list(map(str, shards))
    (out / "metrics.json").write_text(json.dumps(metrics))
    live = temp_path(out / "shards" / "shard-01.tar")  # this process's name: a live writer
    live.write_bytes(b"")
    dead = out / "shards" / f"shard-01.parquet.{node_name()}-999999999-0123abcd.tmp"  # no such process
    dead.write_bytes(b"")
    [run] = status(out)["passes"]
    assert run["state"] == "running"
    assert run["in_flight"] == [{"shard": "shard-01", "attempts": 1, "writers": [f"{node_name()}-{os.getpid()}"]}]
    assert run["shards"] == {"total": 2, "done": 1, "failed": 0, "in_flight": 1, "left": 1}


def test_ctrl_c_is_an_interrupted_event_and_status_says_stopped(tmp_path):
    shards = make_shards(tmp_path / "in", n_shards=3, per_shard=10)
    out, log, stderr = tmp_path / "out", tmp_path / "events.jsonl", tmp_path / "stderr.txt"
    with held_back(shards[-1]), open(stderr, "w") as errors:
        writer = subprocess.Popen([*command(shards, out), "--log-format", "json", "--log-file", str(log)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=errors, text=True)
        try:
            deadline = time.monotonic() + 120
            while finished(out) < 2:
                assert writer.poll() is None and time.monotonic() < deadline, stderr.read_text()
                time.sleep(0.05)
            writer.send_signal(signal.SIGINT)
            while "stopping:" not in writer.stdout.readline():  # the run has taken the Ctrl-C
                assert writer.poll() is None, stderr.read_text()
            with open(shards[-1], "wb"):  # the reader waits on the pipe: let it through to see the stop
                pass
            writer.wait(timeout=300)
        finally:
            writer.kill()
            writer.wait()
    assert writer.returncode == 130, stderr.read_text()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["shard"] for e in events if e["event"] == "shard_committed"] == ["shard-00", "shard-01"], events
    [interrupted] = [e for e in events if e["event"] == "interrupted"]
    assert (interrupted["shards_committed"], interrupted["shards_left"]) == (2, 1)
    stopped = status_json(out)
    assert stopped["state"] == "stopped" and stopped["invocations"] == {"count": 1, "killed": 0, "interrupted": 1}
