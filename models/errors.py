"""The one exception type the engine raises on purpose, and how several are reported at once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class ConfigError(Exception):
    """Misconfiguration found before any work starts; the CLI prints it and exits with 2.

    It may carry several problems (``ConfigError(*problems)``): a user fixes them in one go
    instead of meeting one per attempt."""

    def __init__(self, *problems: str):
        self.problems = tuple(dict.fromkeys(problems))  # the same problem met by two stages, once
        super().__init__(self.problems[0] if len(self.problems) == 1 else
                         f"{len(self.problems)} problems, fix them all before rerunning:\n"
                         + "\n".join(f"  - {p}" for p in self.problems))


class Problems:
    """Runs independent checks, each in ``with problems.check():``, and raises what they found
    together (``raise_found``)."""

    def __init__(self):
        self.found: list[str] = []

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as exc:
            self.found += exc.problems

    def raise_found(self) -> None:
        if self.found:
            raise ConfigError(*self.found)
