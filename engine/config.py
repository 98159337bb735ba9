"""Configuration: frozen dataclasses, built once from CLI flags and an optional YAML file.

Every section is a frozen dataclass whose fields carry their own help text; the CLI flags
(``--min-short-edge``) and the YAML keys (``filter: {min_short_edge: 448}``) are derived
from the fields, so an option is declared in exactly one place. ``validate()`` on each
section raises :class:`ConfigError` before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError


def option(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None):
    """A config field with the help text and choices the CLI shows."""
    meta = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults: sections are frozen")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class InputConfig:
    shards: tuple[str, ...] = option(
        (), "input shards: tar/parquet files or image folders; braces {000..009} and globs expand"
    )
    image_column: str = option("", "parquet: column with image bytes (default: auto-detect)")
    text_column: str = option("", "parquet: column with the alt text (default: auto-detect)")
    key_column: str = option("", "parquet: column with the sample key (default: key, else row id)")
    max_alt_text_chars: int = option(2000, "alt text longer than this is cut (web alt text can be huge)")

    def validate(self) -> None:
        if self.max_alt_text_chars < 0:
            raise ConfigError("--max-alt-text-chars must be >= 0")


@dataclass(frozen=True)
class FilterConfig:
    min_short_edge: int = option(448, "drop images whose shorter side is below this (pixels)")
    max_pixels: int = option(
        89_478_485, "reject images with more pixels than this (decompression-bomb guard)"
    )

    def validate(self) -> None:
        if self.min_short_edge < 0 or self.max_pixels <= 0:
            raise ConfigError("--min-short-edge must be >= 0 and --max-pixels > 0")


@dataclass(frozen=True)
class DecodeConfig:
    decoder: str = option(
        "auto",
        "image decoder: auto (torchvision nvJPEG on a GPU, else pil), pil, torchvision",
        choices=("auto", "pil", "torchvision"),
    )
    decode_threads: int = option(max(1, min(8, os.cpu_count() or 1)), "CPU decode threads")
    decode_batch: int = option(32, "images per decode batch")

    def validate(self) -> None:
        if self.decode_threads < 1 or self.decode_batch < 1:
            raise ConfigError("--decode-threads and --decode-batch must be >= 1")


@dataclass(frozen=True)
class RuntimeConfig:
    out: str = option("", "output folder (created; a rerun with the same folder resumes)")
    stages: tuple[str, ...] = option(
        (), "run only these stages, in pipeline order (default: all); see `stages` in --help"
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    models: str = option(
        "", "'tiny': random-weight tiny models for every model-backed stage (noise, for tests/demo)"
    )
    cache_dir: str = option(
        str(Path.home() / ".cache" / "densefusion"), "where tiny models and caches are kept"
    )
    queue_depth: int = option(4, "batches buffered between two stages (back-pressure)")
    progress: bool = option(True, "show a live progress bar")

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("--out is required: the folder to write the dataset to")
        if self.queue_depth < 1:
            raise ConfigError("--queue-depth must be >= 1")
        if self.models not in ("", "tiny"):
            raise ConfigError("--models takes 'tiny' (or nothing, for the per-stage model flags)")
        _check_writable(Path(self.out))


def _check_writable(out: Path) -> None:
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir() or not os.access(probe_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {out} is not writable (checked {probe_dir})")


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of one run; sections are passed down, never re-spread."""

    input: InputConfig = InputConfig()
    filter: FilterConfig = FilterConfig()
    decode: DecodeConfig = DecodeConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def validate(self) -> RunConfig:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- deriving the CLI and YAML from the dataclasses -------------------------------------


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _sections(cls=RunConfig):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f.name, hints[f.name]


def add_arguments(parser: argparse.ArgumentParser, cls=RunConfig) -> None:
    """Add one flag per config field, grouped by section; defaults stay in the dataclass."""
    seen: set[str] = set()
    for section_name, section_cls in _sections(cls):
        group = parser.add_argument_group(section_name)
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            flag = _flag(f)
            if flag in seen:
                raise TypeError(f"duplicate config flag {flag}")
            seen.add(flag)
            kind = hints[f.name]
            kwargs: dict[str, Any] = {
                "dest": f"{section_name}.{f.name}",
                "default": argparse.SUPPRESS,
                "help": f"{f.metadata.get('help', '')} (default: {_show(f.default)})",
            }
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif _is_tuple(kind):
                kwargs["nargs"] = "+"
                kwargs["type"] = typing.get_args(kind)[0]
            else:
                kwargs["type"] = kind
                if f.metadata.get("choices"):
                    kwargs["choices"] = f.metadata["choices"]
            group.add_argument(flag, **kwargs)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return repr(value) if isinstance(value, str) else str(value)


def _is_tuple(kind) -> bool:
    return typing.get_origin(kind) is tuple


def build(args: argparse.Namespace | None = None, yaml_path: str | None = None, cls=RunConfig,
          **overrides: dict[str, Any]):
    """YAML file, then CLI flags, then ``overrides`` (``section={field: value}``), validated."""
    values: dict[str, dict[str, Any]] = {name: {} for name, _ in _sections(cls)}
    if yaml_path:
        for name, section in _load_yaml(yaml_path).items():
            if name not in values:
                raise ConfigError(f"{yaml_path}: unknown section {name!r} (known: {sorted(values)})")
            values[name].update(section or {})
    for dest, value in vars(args or argparse.Namespace()).items():
        if "." in dest:
            name, key = dest.split(".", 1)
            values[name][key] = value
    for name, section in overrides.items():
        values[name].update(section)
    sections = {}
    for name, section_cls in _sections(cls):
        sections[name] = _make(section_cls, values[name], name)
    return cls(**sections).validate()


def _make(section_cls, values: dict[str, Any], name: str):
    hints = typing.get_type_hints(section_cls)
    known = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown option(s) in section {name!r}: {sorted(unknown)}")
    coerced = {}
    for key, value in values.items():
        kind = hints[key]
        try:
            coerced[key] = _coerce(value, kind)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}.{key}: {value!r} is not a valid {kind}: {exc}") from None
    return section_cls(**coerced)


def _coerce(value: Any, kind):
    if _is_tuple(kind):
        item = typing.get_args(kind)[0]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        return tuple(_coerce(v, item) for v in value)
    if kind is bool and isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(kind, types.UnionType):
        return value
    return kind(value)


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return data
