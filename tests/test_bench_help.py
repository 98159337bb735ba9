"""``python -m bench``'s help: every bench says what it measures and against what, every option
says what it does, and the README lists every bench."""

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import available

ROOT = Path(__file__).resolve().parents[1]


def bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_bench_help_lists_every_bench_with_what_it_measures_against_what():
    shown = bench("--help")
    assert shown.returncode == 0
    listed = {}
    for line in shown.stdout.splitlines():
        match = re.match(r"  (\w+)\s{2,}(\S.*)", line)
        if match:
            listed[match.group(1)] = match.group(2)
        elif listed and line.startswith(" " * 6):
            listed[list(listed)[-1]] += " " + line.strip()
    assert sorted(listed) == available() and "ray" in listed
    assert all(" against " in summary for summary in listed.values()), listed
    unknown = bench("nope")
    assert unknown.returncode == 2 and unknown.stderr.startswith("unknown bench 'nope'")


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


@pytest.mark.parametrize("name", available())
def test_every_bench_option_has_help_and_no_internal_jargon(name, monkeypatch):
    def capture(parser, *_args, **_kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as parsed:
        importlib.import_module(f"bench.{name}").main([])
    parser = parsed.value.parser
    assert parser.prog == f"python -m bench {name}"
    undocumented = [a.option_strings for a in parser._actions if not a.help]
    assert undocumented == []
    assert not re.search(r"\bCI\b", parser.format_help())


def test_gpu_bench_help_speaks_to_a_user():
    shown = bench("gpu", "--help")
    assert shown.returncode == 0 and "--tiny" in shown.stdout
    assert not re.search(r"\bCI\b", shown.stdout)


def test_readme_lists_every_bench():
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("python -m bench "))
    assert sorted(line.split()[3].split("|")) == available()
