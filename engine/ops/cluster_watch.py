"""A pass on Ray seen from its driver, for the metrics endpoint: every shard an actor commits
arrives at the driver with its marker (samples, written, rejected by stage, the actor's node),
so the driver's endpoint counts them by node while the run goes on. Per-stage figures (busy
time, queues) stay on the actors until the run ends (``metrics.json``'s ``cluster`` entry)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from engine.ops import events


class ClusterWatch:
    def __init__(self, pass_name: str, *, shards_total: int, shards_before: int):
        self.pass_name, self.shards_total, self.shards_before = pass_name, shards_total, shards_before
        self.started = time.monotonic()
        self.running = True
        self.shards: Counter[str] = Counter()  # node → shards committed
        self.written: Counter[str] = Counter()  # node → samples written
        self.rejected: Counter[tuple[str, str]] = Counter()  # (node, stage) → samples rejected
        self.lock = threading.Lock()  # the lease loop adds while a scrape reads

    def committed(self, shard: str, marker: dict[str, Any]) -> None:
        node = marker.get("node") or "?"
        with self.lock:
            self.shards[node] += 1
            self.written[node] += marker.get("written", 0)
            for stage, n in (marker.get("rejected_by_stage") or {}).items():
                self.rejected[(node, stage)] += n
        events.emit("shard_committed", pass_name=self.pass_name, shard=shard, shard_node=node,
                    samples=marker.get("samples"), written=marker.get("written"), rejected=marker.get("rejected"),
                    attempt=marker.get("attempt"))

    def snapshot(self) -> tuple[Counter, Counter, Counter]:
        with self.lock:
            return Counter(self.shards), Counter(self.written), Counter(self.rejected)

    @property
    def eta_s(self) -> float | None:
        done = sum(self.shards.values())
        if not self.running:
            return 0.0
        if not done:
            return None
        return (self.shards_total - self.shards_before - done) * (time.monotonic() - self.started) / done
