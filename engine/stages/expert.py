"""An expert in one class: the stage and its declarations together (what a plugin subclasses).

    class Aesthetics(Expert):
        name = "aesthetics"                        # the stage, its config section, its --experts name
        options = AestheticsOptions                # a frozen dataclass of option(...) fields: flags, YAML, --help
        produces = (Evidence("aesthetics", pa.string(), prompt=PromptSection("Aesthetics", lines)),)
        replicate = True                           # one replica per replica device
        cache = True                               # behind the expert cache, keyed on options with affects=
        def memory(cfg): ...                       # each replica's Need for `plan` and the node's budget
        def __init__(self, options, runtime): ...  # resolve models here (checked before any work);
                                                   # then setup / process / teardown like any Stage

``spec()`` turns the class into the ``StageSpec`` the pipeline reads (engine/core/registry.py);
installed under the entry-point group ``densefusion.experts`` (or ``registry.register``-ed), it
runs when ``--experts`` names it. Nothing under engine/ or models/ changes for it.
"""

from __future__ import annotations

from typing import ClassVar

from engine.core.config import RunConfig, RuntimeConfig
from engine.core.placement import Need
from engine.core.registry import Evidence, StageSpec
from engine.core.stage import Stage
from engine.stages.expert_cache import cached


class Expert(Stage):
    name: ClassVar[str]
    options: ClassVar[type | None] = None
    produces: ClassVar[tuple[Evidence, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()  # evidence an earlier stage must write
    uses: ClassVar[tuple[str, ...]] = ()  # evidence read when an earlier stage wrote it
    replicate: ClassVar[bool] = True
    cache: ClassVar[bool] = True

    def __init__(self, options, runtime: RuntimeConfig):
        """``options``: its section (None without ``options``); ``runtime``: the run's (``device`` is
        this replica's; ``models``, ``cache_dir`` for ``resolve_model``)."""
        self.options, self.runtime, self.device = options, runtime, runtime.device

    @classmethod
    def build(cls, cfg: RunConfig) -> Stage:
        stage = cls(cfg.section(cls.name) if cls.options else None, cfg.runtime)
        for kind in cls.produces if cls.cache else ():
            stage = cached(stage, cfg, kind.name)
        return stage

    @classmethod
    def memory(cls, cfg: RunConfig) -> tuple[Need, ...]:
        """Each replica's memory on a GPU (``plan``); none by default."""
        return ()

    @classmethod
    def spec(cls) -> StageSpec:
        return StageSpec(cls.name, cls.build, reads=cls.reads, uses=cls.uses,
                         writes=tuple(kind.name for kind in cls.produces),
                         options=(cls.name, cls.options) if cls.options else None, replicate=cls.replicate,
                         memory=cls.memory, plugin=True, evidence=cls.produces)
