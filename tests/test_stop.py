"""Ctrl-C and SIGTERM through the CLI: a run stops within a batch, says so, exits 130, and a rerun
finishes the output exactly (what a terminal or a scheduler does to a real process group)."""

import json
import os
import signal
import subprocess
import time

import pytest
from contract import check_output_contract
from test_resume import ROOT, command, finished, make_shards

STOP_BOUND_S = 30  # generous: one batch of 8 images is well under a second, even on a loaded CI machine


def interrupted_run(shards, out, signum) -> tuple[subprocess.CompletedProcess, float, int]:
    """A run signalled (its whole process group) after its first commit: (result, seconds from the
    signal to its exit, shards committed when the signal was sent)."""
    process = subprocess.Popen(command(shards, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while finished(out) < 1 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    at_signal = finished(out)
    sent = time.monotonic()
    os.killpg(process.pid, signum)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), \
        time.monotonic() - sent, at_signal


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_within_a_batch_and_a_rerun_finishes_exactly(tmp_path, signum):
    shards = make_shards(tmp_path / "in", n_shards=12, per_shard=60)
    out = tmp_path / "out"
    result, stop_s, at_signal = interrupted_run(shards, out, signum)
    assert 1 <= at_signal < len(shards), result.stderr
    assert result.returncode == 130, result.stderr
    assert stop_s < STOP_BOUND_S, f"took {stop_s:.1f}s to stop"
    # the queues held several shards' samples: they are dropped, not worked through
    assert finished(out) <= at_signal + 2 < len(shards), (at_signal, finished(out))
    assert f"{signal.Signals(signum).name}: stopping" in result.stderr
    assert result.stdout.startswith("interrupted after ") and "rerun with the same --out" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["invocations"][-1]["status"] == "interrupted"
    assert not list((out / "shards").glob("*.tmp"))

    rerun = subprocess.run(command(shards, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.startswith("done in ")
    assert finished(out) == len(shards)
    check_output_contract(out, shards)  # every key exactly once: nothing lost or doubled by the stop


def test_a_second_signal_stops_at_once(tmp_path):
    """The first signal waits for the batches in progress; the second does not (held up here by a
    shard that is a named pipe nobody writes, which no first signal can get past)."""
    shards = make_shards(tmp_path / "in", n_shards=2, per_shard=5)
    stuck = tmp_path / "in" / "stuck.tar"
    os.mkfifo(stuck)
    out = tmp_path / "out"
    process = subprocess.Popen(command([*shards, stuck], out), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while finished(out) < len(shards) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(1.0)
    assert process.poll() is None  # the reader is still blocked on the pipe
    sent = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < STOP_BOUND_S
    assert process.returncode == 130, stderr
    assert "SIGINT again: stopping at once" in stderr
    assert finished(out) == len(shards)
