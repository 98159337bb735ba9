"""The seams: what a stage declares, the kinds of evidence, and where both are found.

A pass-2 stage is a :class:`StageSpec`: its factory, what it reads and writes on the sample, the
config section it owns (a plugin's options), and its resources (replicated per device or not,
its memory per GPU for ``plan``). The pipeline (engine/core/pipeline.py) orders, checks, builds
and places stages from these declarations alone; it names no stage.

An evidence kind (:class:`Evidence`) is declared once: its parquet type, how it travels as JSON
(the output's ``<key>.json``, the expert cache) and, for a plugin's kind, its section of the
fusion prompt. The writer, the expert cache and the prompt read the declarations.

Where they are found, in pipeline order: the paper's stages (``engine.stages.STAGES``) and
evidence (``engine.evidence.kinds.KINDS``); then the optional experts, which run only when
``--experts`` names them (the paper's prompt stays word for word without them): in-tree ones (every
:class:`engine.stages.expert.Expert` subclass of a module in ``engine/experts/``), plugins installed
under the entry-point group ``densefusion.experts`` (each entry an ``Expert`` subclass or a
``StageSpec``), and experts registered in this process (:func:`register`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from engine.core.stage import Stage
from models.errors import ConfigError

# The config and the memory needs are the config module's and the placement's types: named in the
# docs, not imported (the config finds the plugins' sections here).
RunConfig = Need = Any

ENTRY_POINT_GROUP = "densefusion.experts"
BUILTIN_STAGES = "engine.stages"  # its STAGES: the built-in stage specs, in pipeline order
BUILTIN_EVIDENCE = "engine.evidence.kinds"  # its KINDS: the paper's evidence kinds
IN_TREE_EXPERTS = "engine.experts"  # its modules' Expert subclasses: optional experts in this repository


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class PromptSection:
    """A plugin kind's block of the fusion prompt: ``[label]:`` then ``lines(value)``, one a line
    (each sanitised like alt text), after the paper's sections; only present when the kind is."""

    label: str
    lines: Callable[[Any], list[str]]


@dataclass(frozen=True)
class Evidence:
    """One kind of evidence on a sample, declared once.

    ``encode``: the value as JSON (the output's ``<key>.json``, its parquet column, the expert
    cache's payload); ``decode``: back from the cache. A plugin's values are plain JSON values
    (the default codec); the paper's kinds are lists of ``models.records`` dataclasses."""

    name: str
    parquet_type: pa.DataType
    encode: Callable[[Any], Any] = _identity
    decode: Callable[[Any], Any] = _identity
    prompt: PromptSection | None = None


@dataclass(frozen=True)
class StageSpec:
    """A pass-2 stage as the pipeline sees it.

    ``reads``: what an earlier selected stage must write (else a configuration error before any
    work); ``uses``: what it reads when an earlier stage wrote it (and runs without);
    ``writes``: what it leaves on the sample. Names are evidence kinds or other sample products
    (``embedding``, the prompt, the caption). ``options``: the config section the stage owns,
    ``(name, frozen dataclass of option(...) fields)``, for a plugin (the built-in sections are
    ``RunConfig``'s). ``replicate``: one replica per replica device (model-backed);
    ``memory``: each replica's memory needs for ``plan`` and the node's budget.
    ``decoder``: built last, from the views of the stages after it. ``always``: runs whatever
    ``--stages`` says. ``plugin``: optional (in-tree or a plugin); runs only when ``--experts`` or
    ``--stages`` names it. ``resolve``: settles the config before any stage is built (given the selected
    stage names). ``rest``: takes what the replicated experts leave of each GPU: given the config
    and whether the plan is for this node, it returns a :class:`engine.core.placement.CaptionNeed`."""

    name: str
    build: Callable[..., Stage]
    reads: tuple[str, ...] = ()
    uses: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()
    writes: tuple[str, ...] = ()
    options: tuple[str, type] | None = None
    replicate: bool | Callable[[RunConfig], bool] = False
    memory: Callable[[RunConfig], tuple[Need, ...]] | None = None
    decoder: bool = False
    always: bool = False
    plugin: bool = False
    resolve: Callable[[RunConfig, tuple[str, ...]], RunConfig] | None = None
    rest: Callable[[RunConfig, bool], Any] | None = None
    evidence: tuple[Evidence, ...] = field(default=())  # the kinds it declares (those of ``writes`` it owns)

    def inputs(self) -> tuple[str, ...]:
        uses = self.uses() if callable(self.uses) else self.uses
        return (*self.reads, *uses)

    def replicated(self, cfg: RunConfig) -> bool:
        return self.replicate(cfg) if callable(self.replicate) else self.replicate


_REGISTERED: dict[str, StageSpec] = {}


def register(expert: Any) -> StageSpec:
    """Add an expert to this process's stages (an ``Expert`` subclass or a ``StageSpec``), as an
    optional one: it runs when ``--experts`` or ``--stages`` names it. Returns its spec."""
    spec = as_spec(expert)
    _REGISTERED[spec.name] = spec
    refresh()
    return spec


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)
    refresh()


def refresh() -> None:
    """Find the optional experts again (after an install into a running process: tests)."""
    plugin_specs.cache_clear()
    stage_specs.cache_clear()


def as_spec(expert: Any) -> StageSpec:
    spec = expert.spec() if hasattr(expert, "spec") else expert
    if not isinstance(spec, StageSpec):
        raise ConfigError(f"{expert!r} is neither a StageSpec nor an Expert (engine/stages/expert.py)")
    return spec if spec.plugin else _as_plugin(spec)


def _as_plugin(spec: StageSpec) -> StageSpec:
    from dataclasses import replace

    return replace(spec, plugin=True)


def _in_tree() -> list[StageSpec]:
    import inspect
    import pkgutil

    package = importlib.import_module(IN_TREE_EXPERTS)
    found = []
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{IN_TREE_EXPERTS}.{module_info.name}")
        found += [as_spec(cls) for _, cls in inspect.getmembers(module, inspect.isclass)
                  if cls.__module__ == module.__name__ and hasattr(cls, "spec") and getattr(cls, "name", "")]
    return found


def _installed() -> list[StageSpec]:
    from importlib.metadata import entry_points

    found = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found.append(as_spec(entry.load()))
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken plugin is named, not a traceback
            raise ConfigError(f"expert plugin {entry.name} ({entry.value}) does not load: "
                              f"{type(exc).__name__}: {exc}; uninstall it or fix it") from None
    return found


@functools.lru_cache(maxsize=1)
def plugin_specs() -> tuple[StageSpec, ...]:
    """The optional experts: in-tree, installed, registered (the config's sections come from these:
    the paper's stages are not imported to find them)."""
    return tuple({spec.name: spec for spec in [*_in_tree(), *_installed(), *_REGISTERED.values()]}.values())


@functools.lru_cache(maxsize=1)
def stage_specs() -> dict[str, StageSpec]:
    """name -> spec: the built-in stages in pipeline order, then the plugins. A plugin may not
    reuse a built-in stage's name."""
    specs = {spec.name: spec for spec in importlib.import_module(BUILTIN_STAGES).STAGES}
    taken = reserved_names()
    for spec in plugin_specs():
        if spec.name in specs:
            raise ConfigError(f"expert plugin {spec.name!r}: a built-in stage has that name; rename the plugin")
        clash = sorted({kind.name for kind in spec.evidence} & taken)
        if clash:
            raise ConfigError(f"expert plugin {spec.name!r}: evidence {clash} would overwrite what every sample "
                              f"carries (its <key>.json keys); rename the kind")
        specs[spec.name] = spec
    return specs


def reserved_names() -> set[str]:
    """What an optional expert's evidence may not be called: a sample's fields and output keys."""
    from engine.core.record import Sample, Source

    sample = Sample("", Source("", "", ""))
    return set(Sample.__dataclass_fields__) | set(sample.annotations())


def evidence_kinds() -> dict[str, Evidence]:
    """name -> kind: the paper's, then the plugins' (in stage order)."""
    kinds = {kind.name: kind for kind in importlib.import_module(BUILTIN_EVIDENCE).KINDS}
    for spec in stage_specs().values():
        kinds.update((kind.name, kind) for kind in spec.evidence)
    return kinds


def producers(name: str) -> list[StageSpec]:
    return [spec for spec in stage_specs().values() if name in spec.writes]
