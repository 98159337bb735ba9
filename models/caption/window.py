"""One background event loop and one bounded window of requests, shared by every caller.

The SGLang and OpenAI-compatible backends keep requests in flight rather than generating in
lock-step batches. ``generate()`` runs its batch's coroutines on this loop and blocks its
caller until they finish; the window (one semaphore on the loop) admits a request whenever
another completes, whichever batch either belongs to. The caption stage asks the runtime for
two workers, so while one batch's last requests run the next batch's fill the window, and
the engine behind it never drains between batches.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class RequestWindow:
    def __init__(self, size: int, name: str):
        self._loop = asyncio.new_event_loop()
        self._slots = asyncio.Semaphore(size)  # bound to the loop on first use, only ever used there
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (thread-safe; blocks the caller)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def call_soon(self, fn) -> None:
        """Run ``fn()`` on the loop (from any thread, a signal handler included)."""
        self._loop.call_soon_threadsafe(fn)

    def slot(self) -> asyncio.Semaphore:
        """``async with window.slot():`` around a request keeps it inside the window."""
        return self._slots

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
