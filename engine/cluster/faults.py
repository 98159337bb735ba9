"""Test-only fault injection for Ray workers, switched on by one environment variable.

    DENSEFUSION_FAULTS="kill:shard-01:1,freeze:shard-02:1,kill:shard-03"

Each entry is ``ACTION:SHARD[:ATTEMPT]`` (no attempt: every attempt of that shard):

    kill    the worker sends itself SIGKILL half-way through the shard's samples
    freeze  the worker sends itself SIGSTOP just before committing the shard (SIGCONT resumes it)
    stall   the worker waits STALL_S seconds just before committing the shard (a slow shard)

The fault tests (tests/test_cluster.py) use it to kill or freeze a worker at a known point of
a known shard. Only engine/cluster/worker.py reads it; the driver hands it to its actors.
Unset, as everywhere outside tests, it does nothing.
"""

from __future__ import annotations

import os

ENV = "DENSEFUSION_FAULTS"
ACTIONS = ("kill", "freeze", "stall")
STALL_S = 4.0


def parse(spec: str) -> list[tuple[str, str, int | None]]:
    faults = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        action, _, rest = entry.partition(":")
        shard, _, attempt = rest.partition(":")
        if action not in ACTIONS or not shard:
            raise ValueError(f"{ENV}: {entry!r} is not ACTION:SHARD[:ATTEMPT] with ACTION one of {ACTIONS}")
        faults.append((action, shard, int(attempt) if attempt else None))
    return faults


def faults_for(shard: str, attempt: int, spec: str | None = None) -> set[str]:
    """The actions to inject into this attempt of this shard."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    return {action for action, name, on in parse(spec) if name == shard and on in (None, attempt)}
