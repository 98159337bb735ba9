"""Runs on a loopback two-node Ray cluster with fake GPU slots, under injected faults: every
input key ends exactly once in shards/ ∪ rejects/, and the first commit of a shard stands.

Faults are injected with the test-only switch of engine/cluster/faults.py (DENSEFUSION_FAULTS),
by SIGKILL of the driver, and by SIGKILL of a node's processes. One cluster serves the module;
the node-loss test runs last (it leaves one node)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from prometheus_server import free_port, prometheus_scraping
from prometheus_server import wait_for as wait_until
from test_object_storage import s3_server, serving
from test_resume import ROOT, command, contents, make_shards

from engine.cluster.loopback import ENV, LoopbackCluster
from engine.io.commit import listed
from engine.io.object_output import ObjectPath, OutPath, staging_folder

pytestmark = pytest.mark.slow  # starts a two-node Ray cluster on loopback: left out by the quick test command (README)

pytest.importorskip("ray")

N_SHARDS = 5


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="dfray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    started = LoopbackCluster(root, ROOT)
    try:
        yield started.start()
    finally:
        started.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return make_shards(tmp_path_factory.mktemp("in") / "shards", n_shards=N_SHARDS, per_shard=16)


@pytest.fixture(scope="module")
def single_node(shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "out"
    subprocess.run(command(shards, out), cwd=ROOT, check=True, capture_output=True)
    return contents(out, shards)


def on_ray(cmd: list[str], cluster: LoopbackCluster, *extra: str) -> list[str]:
    return [*cmd, "--ray", cluster.address, *extra]


def ray_env(faults: str = "") -> dict[str, str]:
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    if faults:
        env["DENSEFUSION_FAULTS"] = faults
    return env


def run(cmd: list[str], faults: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ray_env(faults), capture_output=True, text=True, timeout=400)


def cluster_figures(root: Path) -> dict:
    """The cluster figures of the last invocation in a pass's metrics.json."""
    return json.loads((root / "metrics.json").read_text())["invocations"][-1]["cluster"]


def markers(out: OutPath) -> dict[str, dict]:
    folder = out / "markers"
    return {name[:-5]: json.loads((folder / name).read_text()) for name in sorted(listed(folder))
            if name.endswith(".json")}


def published(out: OutPath, shard: str) -> dict[str, bytes]:
    labels = [f"shards/{shard}.tar", f"shards/{shard}.parquet", f"rejects/{shard}.parquet", f"markers/{shard}.json"]
    return {label: (out / label).read_bytes() for label in labels}


def wait_for(condition, timeout: float = 240.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_clean_run_equals_a_single_node_run_captions_included(cluster, tmp_path, tiny_cache):
    shards = make_shards(tmp_path / "in", n_shards=3, per_shard=5)
    captions = ["--stages", "decode", "prompt", "caption", "--models", "tiny", "--cache-dir", str(tiny_cache),
                "--max-new-tokens", "6", "--caption-batch", "4", "--caption-sort-window", "1"]
    single = run([*command(shards, tmp_path / "single"), *captions])
    assert single.returncode == 0, single.stderr
    clustered = run(on_ray([*command(shards, tmp_path / "ray"), *captions], cluster))
    assert clustered.returncode == 0, clustered.stderr + clustered.stdout

    assert contents(tmp_path / "ray", shards) == contents(tmp_path / "single", shards)
    for shard in shards:
        import pyarrow.parquet as pq

        ray_rows = pq.read_table(tmp_path / "ray" / "shards" / f"{shard.stem}.parquet").to_pylist()
        single_rows = pq.read_table(tmp_path / "single" / "shards" / f"{shard.stem}.parquet").to_pylist()
        assert [(r["key"], r["caption"]) for r in ray_rows] == [(r["key"], r["caption"]) for r in single_rows]
        assert all(r["caption"] for r in ray_rows)
    figures = cluster_figures(tmp_path / "ray")
    assert figures["retries"] == 0 and figures["failed_shards"] == {}
    assert sum(a["samples"] for a in figures["actors"]) == 15
    assert "ray: " in clustered.stdout and "images/s busy" in clustered.stdout


def test_shards_at_urls_are_read_by_the_actors_in_place(cluster, shards, single_node, tmp_path):
    with serving(shards[0].parent) as (handler, base):
        result = run(on_ray(command([f"{base}/{s.name}" for s in shards], tmp_path / "ray"), cluster))
    assert result.returncode == 0, result.stderr + result.stdout
    assert contents(tmp_path / "ray", shards) == single_node
    assert {file for file, _, _ in handler.log} == {s.name for s in shards}  # ranged reads of every shard


def test_killed_worker_is_redone_elsewhere_and_a_shard_that_always_kills_fails_alone(cluster, shards, single_node,
                                                                                      tmp_path):
    out = tmp_path / "out"
    # one shard per actor at a time: every death is charged to the one shard it held
    result = run(on_ray(command(shards, out), cluster, "--ray-max-attempts", "2", "--ray-shards-in-flight", "1"),
                 faults="kill:shard-01:1,kill:shard-03")
    assert result.returncode == 1, result.stderr + result.stdout
    assert "FAILED shard-03" in result.stdout and "attempt 2 of 2" in result.stdout
    done = markers(out)
    assert set(done) == {p.stem for p in shards} - {"shard-03"}
    assert done["shard-01"]["attempt"] == 2
    assert all(m["attempt"] == 1 for name, m in done.items() if name != "shard-01")
    assert not (out / "shards" / "shard-03.tar").exists()
    kept = [p for p in shards if p.stem != "shard-03"]
    assert contents(out, kept) == {p.stem: single_node[p.stem] for p in kept}  # every key exactly once
    figures = cluster_figures(out)
    assert figures["retries"] == 3 and list(figures["failed_shards"]) == ["shard-03"]
    assert not list(out.rglob("*.tmp"))


def test_a_shard_that_kills_its_actor_costs_the_shards_beside_it_no_attempt(cluster, shards, single_node, tmp_path):
    out = tmp_path / "out"
    # One actor holding two shards: shard-02 stalls in its commit while shard-03's samples are
    # read, so shard-03 kills the actor with shard-02 still in flight beside it.
    result = run(on_ray(command(shards, out), cluster, "--ray-actors", "1", "--ray-shards-in-flight", "2",
                        "--ray-max-attempts", "1"), faults="stall:shard-02:1,kill:shard-03")
    assert result.returncode == 1, result.stderr + result.stdout
    figures = cluster_figures(out)
    # the shared death charged neither; each was retried alone, where shard-03 died again and
    # used its one attempt, and shard-02 committed
    assert list(figures["failed_shards"]) == ["shard-03"] and "attempt 1 of 1" in figures["failed_shards"]["shard-03"]
    assert figures["retries"] == 3
    done = markers(out)
    assert set(done) == {p.stem for p in shards} - {"shard-03"}
    assert done["shard-02"]["attempt"] == 2 and done["shard-04"]["attempt"] == 1
    kept = [p for p in shards if p.stem != "shard-03"]
    assert contents(out, kept) == {p.stem: single_node[p.stem] for p in kept}  # every key exactly once
    assert [a["state"] for a in figures["actors"]] == ["dead", "dead", "ready"]


def test_driver_killed_then_rerun_redoes_only_unfinished_shards(cluster, shards, single_node, tmp_path):
    out = tmp_path / "out"
    cmd = on_ray(command(shards, out), cluster)
    # every shard after the first two stalls before its commit, so the kill lands with shards left
    # however fast the machine is (the rerun has no faults)
    stalls = ",".join(f"stall:{p.stem}:1" for p in shards[2:])
    driver = subprocess.Popen(cmd, cwd=ROOT, env=ray_env(stalls), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(markers(out)) >= 2 or driver.poll() is not None, what="two committed shards")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = markers(out)
    assert 2 <= len(before) < N_SHARDS
    finished = {name: published(out, name) for name in before}
    # and one finished shard as if the kill came between publishing its files and its marker
    unmarked = sorted(before)[0]
    (out / "markers" / f"{unmarked}.json").unlink()
    inodes = {p: p.stat().st_ino for p in (out / "shards").glob(f"{unmarked}.*")}

    rerun = run(cmd)
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout
    assert f"{N_SHARDS - len(before)} committed this run, {len(before)} already done" in rerun.stdout
    for name, files in finished.items():
        if name != unmarked:
            assert published(out, name) == files  # byte for byte: not redone
    completed = markers(out)[unmarked]
    assert completed["completed_from_files"] and completed["files"] == before[unmarked]["files"]
    assert {p: p.stat().st_ino for p in (out / "shards").glob(f"{unmarked}.*")} == inodes
    assert contents(out, shards) == single_node


# No straggler copy in the frozen-worker tests: under load one can commit shard-00 before the lease
# times out, and the run then ends without waiting for the frozen attempt, which these tests wake.
FROZEN_SHARD_00 = ("--ray-lease-timeout", "6", "--no-ray-copy-stragglers")


def wake_the_frozen_worker(cluster, out, staging: Path, driver: subprocess.Popen) -> dict[str, bytes]:
    """Once shard-00 was redone while its first worker is frozen, wake that worker and see its
    commit lose: the first commit's files stay, and the driver reports the late attempt."""
    wait_for(lambda: "shard-00" in markers(out), what="shard-00 redone while its first worker is frozen")
    first = published(out, "shard-00")
    assert json.loads(first["markers/shard-00.json"])["attempt"] == 2
    frozen = [pid for node in (0, 1) for pid in cluster.node_pids(node) if _state(pid) == "T"]
    assert len(frozen) == 1
    temporaries = list(staging.glob(f"shard-00.tar.*-{frozen[0]}-*.tmp"))
    assert temporaries, "the frozen worker holds its unpublished shard"
    os.kill(frozen[0], signal.SIGCONT)
    wait_for(lambda: not temporaries[0].exists(), what="the woken worker's commit")  # it tried, and lost
    assert published(out, "shard-00") == first
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr + stdout
    assert "shard-00 attempt 1" in stdout and "the marker of attempt 2 stands" in stdout
    return first


def test_frozen_worker_cannot_replace_the_commit_made_while_it_was_frozen(cluster, shards, single_node, tmp_path):
    out = tmp_path / "out"
    cmd = on_ray(command(shards, out), cluster, *FROZEN_SHARD_00)
    driver = subprocess.Popen(cmd, cwd=ROOT, env=ray_env("freeze:shard-00:1"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        first = wake_the_frozen_worker(cluster, out, out / "shards", driver)
    finally:
        driver.kill()
    assert published(out, "shard-00") == first
    assert contents(out, shards) == single_node


def test_killed_and_frozen_workers_on_an_s3_output_keep_exactly_once(cluster, shards, single_node, tmp_path):
    """The two worker faults above with the output on S3 (moto's server, started here): the
    killed worker's shard is redone; the frozen worker wakes after its shard was redone and its
    conditional creates change nothing."""
    with s3_server() as fs:
        fs.mkdir("ray-out")
        out = ObjectPath("s3://ray-out/out")
        cmd = on_ray(command(shards, out.url), cluster, *FROZEN_SHARD_00, "--ray-shards-in-flight", "1")
        driver = subprocess.Popen(cmd, cwd=ROOT, env=ray_env("freeze:shard-00:1,kill:shard-02:1"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:  # the frozen worker's temporaries are local files, staged before their upload
            first = wake_the_frozen_worker(cluster, out, staging_folder(out / "shards"), driver)
        finally:
            driver.kill()
        done = markers(out)
        assert done["shard-02"]["attempt"] == 2 and done["shard-01"]["attempt"] == 1
        assert published(out, "shard-00") == first
        assert contents(out, shards) == single_node
    for folder in ("shards", "rejects", "markers"):  # this run's local staging folders (on this machine)
        shutil.rmtree(staging_folder(out / folder, make=False), ignore_errors=True)


def test_curation_embeds_on_the_actors_selects_once_and_captions_the_selection(cluster, tmp_path, tiny_cache):
    shards = make_shards(tmp_path / "in", n_shards=3, per_shard=8)
    # one cluster: the selection does not depend on the order in which shards reached the store
    curated = ["--curate", "--models", "tiny", "--cache-dir", str(tiny_cache), "--device", "cpu", "--embed-batch", "1",
               "--curate-clusters", "1", "--curate-top-n", "6", "--curate-eps", "0.02"]
    single = run([*command(shards, tmp_path / "single"), *curated])
    assert single.returncode == 0, single.stderr
    clustered = run(on_ray([*command(shards, tmp_path / "ray"), *curated], cluster))
    assert clustered.returncode == 0, clustered.stderr + clustered.stdout

    import pyarrow.parquet as pq

    def kept(out: Path) -> set[str]:
        return {r["key"] for r in pq.read_table(out / "curate" / "selection.parquet").to_pylist() if r["kept"]}

    assert kept(tmp_path / "ray") and kept(tmp_path / "ray") == kept(tmp_path / "single")
    assert contents(tmp_path / "ray", shards) == contents(tmp_path / "single", shards)
    embedded = cluster_figures(tmp_path / "ray" / "curate")
    assert sum(a["shards"] for a in embedded["actors"]) == len(shards)  # pass 1 ran on the actors
    assert len(markers(tmp_path / "ray" / "curate")) == len(shards)


def test_curation_partitioned_by_cluster_equals_the_single_node_selection_key_for_key(cluster, tmp_path, tiny_cache):
    import pyarrow.parquet as pq

    shards = make_shards(tmp_path / "in", n_shards=3, per_shard=10)
    curate = [sys.executable, str(ROOT / "densefusion_local.py"), "curate", "--shards", *map(str, shards),
              "--no-progress", "--models", "tiny", "--cache-dir", str(tiny_cache), "--device", "cpu", "--embed-batch",
              "4", "--curate-clusters", "4", "--curate-top-n", "2", "--curate-eps", "0.001"]
    clustered = run(on_ray([*curate, "--out", str(tmp_path / "ray")], cluster))
    assert clustered.returncode == 0, clustered.stderr + clustered.stdout
    assert "partitioned by cluster: 1 ranges assigned" in clustered.stdout
    # One node's global step on the same store: a Ray run's store holds shards in commit order,
    # which decides the fit's seeded sample and the row order ties follow.
    shutil.copytree(tmp_path / "ray", tmp_path / "single")
    for name in ("selection.parquet", "report.json"):
        (tmp_path / "single" / "curate" / name).unlink()
    single = run([*curate, "--out", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr + single.stdout

    selections = [pq.read_table(out / "curate" / "selection.parquet") for out in (tmp_path / "ray", tmp_path / "single")]
    assert selections[0].equals(selections[1])  # keys, clusters, distances, ranks, verdicts and reasons, row for row
    reports = [json.loads((out / "curate" / "report.json").read_text()) for out in (tmp_path / "ray", tmp_path / "single")]
    partitioned = reports[0].pop("partitioned")
    assert partitioned["partitions"] == 4 and "partitioned" not in reports[1]
    assert sum(partitioned["tasks_by_node"].values()) == partitioned["ranges"] + partitioned["partitions"]
    for report in reports:
        del report["embed_s"], report["select_s"]
    assert reports[0] == reports[1]
    assert reports[1]["n_embedded"] > reports[1]["n_after_dedup"] > reports[1]["n_selected"]  # both steps decide


def test_meta_with_curate_on_ray_captions_the_selection_of_a_single_node_run(cluster, tmp_path, tiny_cache):
    import pyarrow.parquet as pq

    from bench._chat_server import ChatServer
    from engine.io.demo_data import write_demo_shards

    shards = write_demo_shards(tmp_path / "in", n_shards=2)
    flags = ["--no-progress", "--device", "cpu", "--caption-max-side", "256", "--api-model", "fake-4v",
             "--stages", "decode", "prompt", "caption", "--subset-share", "1", "--curate", "--embed-model", "tiny",
             "--cache-dir", str(tiny_cache), "--embed-batch", "2", "--curate-clusters", "1", "--curate-top-n", "3"]

    def meta(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return run([sys.executable, str(ROOT / "densefusion_local.py"), "meta", "--shards", *map(str, shards),
                    "--out", str(out), "--api-base", server.url, *flags, *extra])

    with ChatServer(output_words=20) as server:  # the GPT-4V stand-in, reached from every actor
        single = meta(tmp_path / "single")
        assert single.returncode == 0, single.stderr + single.stdout
        clustered = meta(tmp_path / "ray", "--ray", cluster.address)
        assert clustered.returncode == 0, clustered.stderr + clustered.stdout

    def selected(out: Path) -> set[str]:
        return {r["key"] for r in pq.read_table(out / "curate" / "selection.parquet").to_pylist() if r["kept"]}

    def captioned(out: Path) -> set[str]:
        return {r["key"] for shard in shards for r in pq.read_table(out / "shards" / f"{shard.stem}.parquet").to_pylist()}

    assert selected(tmp_path / "ray") and selected(tmp_path / "ray") == selected(tmp_path / "single")
    assert captioned(tmp_path / "ray") == captioned(tmp_path / "single") == selected(tmp_path / "single")
    sft = [{r["id"].partition("/")[2] for r in json.loads((out / "sft" / "densefusion_sft.json").read_text())}
           for out in (tmp_path / "ray", tmp_path / "single")]
    assert sft[0] == sft[1] == selected(tmp_path / "single")
    for root in (tmp_path / "ray" / "curate", tmp_path / "ray"):  # both passes ran on the actors
        assert sum(a["shards"] for a in cluster_figures(root)["actors"]) == len(shards)


def test_the_drivers_metrics_endpoint_counts_each_nodes_commits_while_the_run_goes_on(cluster, tmp_path):
    shards = make_shards(tmp_path / "in", n_shards=5, per_shard=4)
    held = shards[-1]  # a named pipe nobody writes: the run holds with four shards committed
    held.unlink()
    os.mkfifo(held)
    out, port = tmp_path / "out", free_port()
    cmd = on_ray(command(shards, out), cluster, "--metrics-port", str(port), "--metrics-final-scrape-s", "60")
    with prometheus_scraping(f"127.0.0.1:{port}", tmp_path / "prometheus") as prom:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            alive = lambda: driver.poll() is None  # noqa: E731
            wait_until(lambda: prom.value("densefusion_run_shards_done") == 4, 300, "four shards committed", alive)
            during = markers(out)
            by_node: dict[str, int] = {}
            for marker in during.values():
                by_node[marker["node"]] = by_node.get(marker["node"], 0) + marker["written"]
            assert prom.by("node", "densefusion_images_written_total") == by_node
            assert all("/127.0.0." in node for node in by_node)  # host/address of the actor's node
            with open(held, "wb"):  # let the reader through: an empty shard, committed with its error
                pass
            output, _ = driver.communicate(timeout=300)
        finally:
            driver.kill()
        assert driver.returncode == 0, output
        figures = cluster_figures(out)
        final = prom.by("node", "sum by (node) (last_over_time(densefusion_shards_committed_total[10m]))")
        assert final == {node: counts["shards"] for node, counts in figures["nodes"].items() if counts["shards"]}
        assert sum(final.values()) == N_SHARDS


def test_lost_node_run_finishes_on_the_remaining_node(cluster, shards, single_node, tmp_path):
    out = tmp_path / "out"
    slow = ",".join(f"stall:{p.stem}:1" for p in shards)  # first tries are slow: both nodes get work
    driver = subprocess.Popen(on_ray(command(shards, out), cluster), cwd=ROOT, env=ray_env(slow),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    in_flight: list[str] = []

    def second_node_mid_shard() -> bool:
        """A worker on the second node has a shard open (its unpublished tar names its pid)."""
        pids = cluster.node_pids(1)
        open_shards = [p.name.split(".tar.")[0] for p in (out / "shards").glob("*.tar.*.tmp")
                       if int(p.name.rsplit("-", 2)[1]) in pids]
        if open_shards:
            for pid in pids:  # at once: the shard must still be open when its node goes
                os.kill(pid, signal.SIGKILL)
            in_flight.extend(open_shards)
        return bool(open_shards) or driver.poll() is not None

    try:
        wait_for(second_node_mid_shard, what="a shard open on the second node")
        assert in_flight, "the run ended before the second node had a shard open"
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, stderr + stdout
    done = markers(out)
    assert set(done) == {p.stem for p in shards}
    for shard in in_flight:  # redone on the node that is left
        assert done[shard]["attempt"] == 2 and done[shard]["node"].endswith("127.0.0.2"), done[shard]
    assert contents(out, shards) == single_node


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""
