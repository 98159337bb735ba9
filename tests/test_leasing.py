"""Which actor the Ray driver gives the next shard to (engine/cluster/driver.py: pick_actor), and
the summary it prints, on actor records alone: no cluster needed. tests/test_cluster.py runs the
same driver on a real one."""

from collections import Counter
from pathlib import Path

from engine.cluster.driver import ActorRecord, ClusterResult, Lease, pick_actor, pick_stragglers
from engine.cluster.executor import format_cluster


def actor(index: int, state: str = "ready", leases: int = 0, alone: bool = False, given_at: float = 0.0) -> ActorRecord:
    record = ActorRecord(index, handle=None, state=state)
    record.leases = [Lease(object(), Path(f"shard-{index}-{i}"), 1, alone, given_at=given_at + i) for i in range(leases)]
    return record


def pick(actors: list[ActorRecord], **kwargs) -> ActorRecord | None:
    """pick_actor over every actor, live ones counted (the driver passes only those with room)."""
    live = sum(actor.state in ("ready", "starting") for actor in actors)
    return pick_actor(actors, live=live, **kwargs)


def running(actors: list[ActorRecord]) -> Counter:
    return Counter(lease.path for a in actors for lease in a.leases)


def test_the_next_shard_goes_to_the_ready_actor_holding_the_fewest():
    actors = [actor(0, leases=1), actor(1), actor(2, leases=1)]
    assert pick(actors, alone=False, depth=2, waiting=10) is actors[1]
    assert pick([actor(0, leases=1), actor(1, leases=2)], alone=False, depth=2, waiting=10).index == 0
    assert pick([actor(0, leases=2)], alone=False, depth=2, waiting=10) is None  # full
    assert pick([actor(0, leases=1)], alone=False, depth=1, waiting=10) is None  # one at a time


def test_a_busy_actor_takes_a_second_shard_only_while_more_wait_than_there_are_live_actors():
    actors = [actor(0, leases=1), actor(1, leases=1), actor(2, state="starting")]
    assert pick(actors, alone=False, depth=2, waiting=4) is actors[0]
    # the run's last 3 shards for 3 live actors: each waits for an actor to empty (or to start)
    assert pick(actors, alone=False, depth=2, waiting=3) is None
    actors[2].state = "dead"  # a dead actor does not count: 3 shards for 2 live actors
    assert pick(actors, alone=False, depth=2, waiting=3) is actors[0]


def test_a_shard_to_run_alone_needs_an_empty_actor_and_an_actor_running_one_takes_nothing_beside_it():
    actors = [actor(0, leases=1), actor(1, leases=1, alone=True)]
    assert pick(actors, alone=True, depth=2, waiting=10) is None
    assert pick(actors, alone=False, depth=2, waiting=10) is actors[0]
    actors.append(actor(2))
    assert pick(actors, alone=True, depth=2, waiting=10) is actors[2]


def test_starting_lost_and_dead_actors_take_nothing():
    actors = [actor(0, state="starting"), actor(1, state="lost"), actor(2, state="dead")]
    assert pick(actors, alone=False, depth=2, waiting=10) is None


def test_an_idle_actor_copies_the_lease_likely_to_finish_last():
    actors = [actor(0, leases=1, given_at=10.0), actor(1, leases=1, given_at=5.0), actor(2)]
    assert pick_stragglers(actors, running(actors), 1, set()) == [actors[1].leases[0]]  # running longest
    # a lease queued behind another has not started: it ends last whenever it was given
    actors.append(actor(3, leases=2, given_at=20.0))
    assert pick_stragglers(actors, running(actors), 1, set()) == [actors[3].leases[1]]


def test_idle_actors_spread_over_the_stragglers_before_a_shard_gets_a_second_copy():
    actors = [actor(0, leases=1, given_at=1.0), actor(1, leases=1, given_at=2.0)]
    first, second = actors[0].leases[0], actors[1].leases[0]
    assert pick_stragglers(actors, running(actors), 4, set()) == [first, second, first, second]
    copies = running(actors)
    copies[first.path] += 1  # its copy already runs on a third actor
    assert pick_stragglers(actors, copies, 2, set()) == [second, first]


def test_no_copy_of_a_shard_that_was_on_an_actor_when_it_died_nor_from_an_actor_not_ready():
    actors = [actor(0, leases=1), actor(1, state="lost", leases=1), actor(2, leases=1)]
    suspects = {actors[0].leases[0].path}
    assert pick_stragglers(actors, running(actors), 3, suspects) == [actors[2].leases[0]] * 3


def test_the_summary_counts_one_of_a_thing_in_the_singular():
    one = actor(0)
    one.node, one.shards, one.samples, one.busy_s = "host/127.0.0.2", 1, 10, 2.0
    two = actor(1)
    two.node, two.shards, two.samples, two.busy_s = "host/127.0.0.2", 3, 30, 3.0
    result = ClusterResult(retries=1, actors=[one, two], wall_s=5.0)
    lines = format_cluster(result).splitlines()
    assert lines[0] == "ray: 2 worker actors started on 1 node, 1 retry, 0 failed shards"
    assert lines[1] == "  node host/127.0.0.2: 2 actors, 4 shards, 40 images, 8.0 images/s"
    assert lines[2].endswith(": 1 shard, 10 images, 5.0 images/s busy, ready")
    result.copies, result.copies_first = 3, 1
    assert format_cluster(result).splitlines()[0].endswith(
        "0 failed shards, 3 straggler copies at the tail (1 committed first)")
