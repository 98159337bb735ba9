"""The Ray actor around a :class:`ShardWorker`: one per GPU, never restarted by Ray.

``max_restarts=0`` and ``max_task_retries=0``: when an actor dies, its call fails and the
driver decides what happens to the shard (another actor, with an attempt count). Ray's own
retries would redo a shard without counting, forever under preemption.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from engine.core.config import ClusterConfig, RunConfig


class EngineActor:
    def __init__(self, cfg: RunConfig, kind: str):
        from engine.cluster.worker import build_worker

        self.worker = build_worker(cfg, kind)
        self.worker.sink.node = self.node = self._node()

    def ready(self) -> dict[str, Any]:
        """Returns once the models are loaded: where this actor runs."""
        self.worker.ready()
        return {"node": self.node, "pid": os.getpid()}

    @staticmethod
    def _node() -> str:
        """The host and the node's address (nodes on one host differ only by it)."""
        import ray

        return f"{socket.gethostname()}/{ray.util.get_node_ip_address()}"

    def process(self, path: str, attempt: int) -> dict[str, Any]:
        return self.worker.process(path, attempt)

    def figures(self) -> list[dict[str, Any]]:
        return self.worker.figures()


def remote_actor(cluster: ClusterConfig, env: dict[str, str]):
    """The actor class with its resources and the environment its process needs."""
    import ray

    return ray.remote(EngineActor).options(
        num_gpus=cluster.ray_gpus_per_actor, num_cpus=cluster.ray_cpus_per_actor,
        max_restarts=0, max_task_retries=0, runtime_env={"env_vars": env},
        # a thread per shard in flight (each waits on its own commit), and one for figures()
        max_concurrency=cluster.ray_shards_in_flight + 1,
    )
