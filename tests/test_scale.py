"""The real Ray driver (engine/cluster/driver.py) on the simulated cluster of
engine/cluster/simulator.py, at a small size: what ``python -m bench scale`` runs at 50,000
shards. Every shard is committed exactly once whatever dies or is copied, a shard that kills
every actor it runs on fails after its attempts, a rerun leases only the unmarked shards, and
copying stragglers leaves no actor idle at the tail."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from engine.cluster.driver import lease_shards
from engine.cluster.simulator import SimulatedCluster, WorkTimes
from engine.core.config import ClusterConfig, RunConfig
from engine.core.pipeline import PASS2
from engine.io.manifest import read_manifest
from engine.io.readers import shard_name

PATHS = [Path(f"/shared/in/{i:03d}.tar") for i in range(60)]


def config(copy_stragglers: bool = True) -> RunConfig:
    return replace(RunConfig(), cluster=ClusterConfig(ray="simulated", ray_max_attempts=3,
                                                      ray_copy_stragglers=copy_stragglers))


def run(out: Path, paths: list[Path], cluster: SimulatedCluster, cfg: RunConfig, stop_after: int = 0):
    """What the Ray executor (engine/cluster/executor.py) does around the leasing: settle the sink, skip what is
    done, record each commit. ``stop_after``: the driver is stopped after that many commits."""
    sink = PASS2.open_sink(cfg, out)
    sink.settle([shard_name(p) for p in paths])
    todo = [p for p in paths if shard_name(p) not in sink.finished]
    commits = []

    def on_commit(shard: str, marker: dict) -> None:
        sink.adopt({shard: marker})
        commits.append(shard)
        if len(commits) == stop_after:
            raise KeyboardInterrupt

    return todo, commits, lease_shards(cfg, todo, on_commit, cluster)


def cluster(out: Path, **kwargs) -> SimulatedCluster:
    return SimulatedCluster(8, out, times=WorkTimes(60.0, straggler_share=0.1), startup_s=5.0, **kwargs)


def manifest_lines(out: Path) -> list[str]:
    return [line for line in (out / "manifest.jsonl").read_text().splitlines() if '"shard"' in line]


def test_every_shard_is_committed_once_and_a_poison_shard_fails_after_its_attempts(tmp_path):
    sim = cluster(tmp_path, death_rate=0.05, poison=frozenset({"007"}), seed=1)
    _, commits, result = run(tmp_path, PATHS, sim, config())
    assert sorted(commits) == sorted(shard_name(p) for p in PATHS if p.stem != "007")
    assert len(manifest_lines(tmp_path)) == len(commits)  # one line each, copies and retries included
    assert set(read_manifest(tmp_path)) == set(commits)
    assert set(result.failed) == {"007"} and "attempt 3 of 3" in result.failed["007"]
    assert not (tmp_path / "markers" / "007.json").exists()
    deaths = sum(1 for a in sim.started if a.dies_at < float("inf"))
    assert deaths >= 3 and result.retries >= deaths  # each death sent its shards back
    # a death is replaced while shards wait; one at the very end, with nothing left to lease, is not
    # (the simulated clock follows the driver's own CPU time, so where deaths land varies run to run)
    assert 8 < len(result.actors) <= 8 + sum(1 for a in result.actors if a.state == "dead")
    manifest = read_manifest(tmp_path)
    for shard in commits:  # what the driver recorded is the marker that stands
        assert manifest[shard] == json.loads((tmp_path / "markers" / f"{shard}.json").read_text())
    assert result.counts["written"] == sum(entry["written"] for entry in manifest.values())


def test_a_rerun_after_the_driver_stopped_leases_only_unmarked_shards(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, PATHS, cluster(tmp_path, seed=2), config(), stop_after=20)
    marked = {p.stem for p in (tmp_path / "markers").glob("*.json")}
    assert len(read_manifest(tmp_path)) == 20 and len(marked) >= 20
    again = cluster(tmp_path, seed=3)
    todo, commits, result = run(tmp_path, PATHS, again, config())
    assert len(read_manifest(tmp_path)) == len(PATHS) and not result.failed
    # markers the stopped driver never recorded were recorded by the rerun's settle, not redone
    assert {shard_name(p) for p in todo} == {shard_name(p) for p in PATHS} - marked
    assert {ref.shard for ref in again.calls if ref.shard} == {shard_name(p) for p in todo}
    assert sorted(commits) == sorted(shard_name(p) for p in todo)
    assert len(manifest_lines(tmp_path)) == len(PATHS)


def test_copying_stragglers_leaves_no_actor_idle_at_the_tail_and_the_losers_change_nothing(tmp_path):
    usage, usages_sim = {}, {}
    for copy in (False, True):
        out = tmp_path / str(copy)
        sim = cluster(out, seed=7)
        _, commits, result = run(out, PATHS, sim, config(copy))
        assert sorted(commits) == sorted(shard_name(p) for p in PATHS)
        assert len(manifest_lines(out)) == len(PATHS)
        usage[copy] = (sim.usage(result.wall_s), result)
        usages_sim[copy] = sim
    before, after = usage[False][0], usage[True][0]
    assert before.idle_tail > 0.2  # today's leasing: actors idle while the last shards finish
    assert after.idle_tail < 0.01 and usage[True][1].copies > 0
    assert usage[True][1].wall_s < usage[False][1].wall_s
    # a copy that finished second published too: a no-op (the first marker stands) that the driver ignored
    sim = usages_sim[True]
    answered: dict[str, list] = {}
    for ref in sim.calls:
        if ref.shard and ref.answered and not ref.error:
            answered.setdefault(ref.shard, []).append(ref)
    both = {shard: refs for shard, refs in answered.items() if len(refs) > 1}
    assert both
    for shard, refs in both.items():
        assert sum(ref.stood for ref in refs) == 1
        stands = json.loads((tmp_path / "True" / "markers" / f"{shard}.json").read_text())
        assert [ref.attempt for ref in refs if ref.stood] == [stands["attempt"]]
        assert read_manifest(tmp_path / "True")[shard] == stands
