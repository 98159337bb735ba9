"""Events a machine can read: with ``--log-format json`` one JSON object per line for each
thing an operator is paged or asked about (a shard committed or failed, a replica retired, a
stall, an interruption), to stderr or ``--log-file``; every line carries the time, the run id,
the node and the event's own fields (its shard, stage, reason...).

With the default ``text`` format the console already says these things in words (the progress
bar, the summary, the runtime's warnings); only an event given ``text`` (the stall alarm, which
nothing else reports) prints that line. The log is process-wide: the runtime and the cluster
driver reach it through :func:`emit`, without a handle passed down to every thread.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from typing import Any, TextIO

from engine.io.commit import node_name

RUN_ID = uuid.uuid4().hex[:12]  # one per process: every event and metric of this invocation carries it


class EventLog:
    def __init__(self, log_format: str = "text", path: str = ""):
        self.format, self.path = log_format, path
        self._stream: TextIO = open(path, "a", encoding="utf-8") if path else sys.stderr  # noqa: SIM115 - process-wide
        self._lock = threading.Lock()  # stage threads, the stall watcher and the driver emit at once
        self.node = node_name()

    def emit(self, event: str, text: str = "", **fields: Any) -> None:
        if self.format == "json":
            line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event,
                               "run_id": RUN_ID, "node": self.node, **fields}, ensure_ascii=False, default=str)
        elif text:
            line = text
        else:
            return
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


_log = EventLog()


def configure(log_format: str, path: str) -> None:
    """Called by the driver with the run's ``--log-format`` and ``--log-file``."""
    global _log
    if (log_format, path) != (_log.format, _log.path):
        _log = EventLog(log_format, path)


def emit(event: str, text: str = "", **fields: Any) -> None:
    _log.emit(event, text, **fields)
