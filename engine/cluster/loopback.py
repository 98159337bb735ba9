"""A two-node Ray cluster on one machine, for the fault tests and ``python -m bench ray``.

Each node gets its own loopback address (127.0.0.2, 127.0.0.3: Ray rewrites 127.0.0.1 to the
host's main address), its own ports and temp dir, and one fake GPU slot (``--num-gpus=1``,
which exercises GPU placement without a GPU). Every process it starts is found by its node's
temp dir (and their children) and stopped by PID: ``ray stop`` would kill every Ray process on
the machine, other users' included."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# one auth setting everywhere; a frozen or killed node is noticed in ~2 s, not ~65 s
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
       "RAY_health_check_failure_threshold": "3", "RAY_USAGE_STATS_ENABLED": "0"}
NODE_IPS = ("127.0.0.2", "127.0.0.3")


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LoopbackCluster:
    def __init__(self, root: Path, project_root: Path, cpus_per_node: int = 2):
        """``root``: a short path (Ray's socket paths under it have a length limit)."""
        self.root, self.project_root, self.cpus = root, project_root, cpus_per_node
        self.env = {**os.environ, **ENV, "PYTHONPATH": str(project_root)}
        self.address = ""

    def node_dir(self, node: int) -> Path:
        return self.root / f"n{node}"

    def start(self) -> LoopbackCluster:
        ray = str(Path(sys.executable).parent / "ray")
        head_ip = NODE_IPS[0]
        port = free_port(head_ip)
        self.address = f"{head_ip}:{port}"
        for node, ip in enumerate(NODE_IPS):
            where = ["--head", f"--port={port}", f"--dashboard-port={free_port(ip)}",
                     "--include-dashboard=false"] if node == 0 \
                else [f"--address={self.address}"]
            ports = [f"--{name}={free_port(ip)}" for name in (
                "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
            subprocess.run([ray, "start", *where, f"--node-ip-address={ip}", f"--temp-dir={self.node_dir(node)}",
                            "--num-gpus=1", f"--num-cpus={self.cpus}", "--disable-usage-stats", *ports],
                           env=self.env, check=True, capture_output=True, timeout=180)
        return self

    def node_pids(self, node: int) -> list[int]:
        """Every process of one node: those naming its temp dir, and their descendants."""
        marker = str(self.node_dir(node)).encode()
        parents = {pid: ppid for pid, ppid in _processes()}
        pids = set()
        for pid in parents:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    if marker in handle.read() and pid != os.getpid():
                        pids.add(pid)
            except OSError:
                continue
        grown = True
        while grown:
            children = {pid for pid, ppid in parents.items() if ppid in pids} - pids
            grown = bool(children)
            pids |= children
        return sorted(pids)

    def kill_node(self, node: int, sig: int = signal.SIGKILL) -> list[int]:
        pids = self.node_pids(node)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def stop(self) -> None:
        for node in (1, 0):
            self.kill_node(node, signal.SIGCONT)  # a frozen process cannot handle anything else
            self.kill_node(node)
        deadline = time.monotonic() + 10
        while (self.node_pids(0) or self.node_pids(1)) and time.monotonic() < deadline:
            time.sleep(0.1)


def _processes():
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    yield int(entry), int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
