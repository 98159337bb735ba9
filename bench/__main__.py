"""``python -m bench NAME ...`` runs ``bench/NAME.py``'s ``main(argv)``."""

import ast
import importlib
import pkgutil
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).parent


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if not m.name.startswith("_"))


def summary(name: str) -> str:
    """A bench's first docstring paragraph (what it measures, against what), read without
    importing it: some import torch, and the list should print at once."""
    doc = ast.get_docstring(ast.parse((HERE / f"{name}.py").read_text(encoding="utf-8"))) or ""
    return " ".join(doc.split("\n\n")[0].split())


def usage(names: list[str]) -> str:
    width = max(map(len, names))
    lines = ["usage: python -m bench NAME [options]   (python -m bench NAME --help: what NAME prints, its options)",
             "", "Profiling benchmarks: what each measures, and against what:"]
    indent = " " * (width + 4)
    lines += [textwrap.fill(summary(name), 100, initial_indent=f"  {name:<{width}}  ", subsequent_indent=indent)
              for name in names]
    return "\n".join(lines)


def main() -> int:
    names = available()
    if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help"):
        print(usage(names))
        return 0
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        said = f"unknown bench {sys.argv[1]!r}\n" if len(sys.argv) >= 2 else ""
        print(said + usage(names), file=sys.stderr)
        return 2
    return importlib.import_module(f"bench.{sys.argv[1]}").main(sys.argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main())
