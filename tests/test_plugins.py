"""An expert from outside engine/ and models/, through the seams alone (engine/core/registry.py):
a GPU-style expert with text evidence, options of its own, a replica per device and a memory
estimate, defined here and once more as a tiny installed package found through the entry-point
group ``densefusion.experts``. It runs end to end through ``densefusion_local.main``: its evidence
in the prompt, a parquet column, the expert cache (hits on a rerun), ``plan``'s table, a replica
per device, ``--help``."""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg, sample_members, write_tar

import densefusion_local
from engine.core import registry
from engine.core.config import option
from engine.core.placement import Need
from engine.core.registry import Evidence, PromptSection
from engine.core.stage import ImageView, Resources
from engine.stages.expert import Expert
from models.errors import ConfigError

# --- the expert: everything a plugin module holds ------------------------------------------------


@dataclass(frozen=True)
class BrightnessOptions:
    TITLE: ClassVar[str] = "brightness expert (plugin)"
    COMMANDS: ClassVar[tuple[str, ...]] = ("run", "demo", "meta", "plan")

    brightness_levels: int = option(4, "brightness levels the expert tells apart", affects=("brightness",), basic=True)
    brightness_batch: int = option(8, "images per brightness batch", affects=())

    def validate(self) -> None:
        if self.brightness_levels < 2:
            raise ConfigError("--brightness-levels must be >= 2")


def brightness_lines(value: str) -> list[str]:
    return [value]


class Brightness(Expert):
    """Mean luma of a small view, computed with torch on the replica's device, as text evidence."""

    name = "brightness"
    options = BrightnessOptions
    produces = (Evidence("brightness", pa.string(), prompt=PromptSection("Brightness", brightness_lines)),)
    replicate = True
    built: ClassVar[list[str]] = []  # the device of every replica built (a test's record)

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        Brightness.built.append(self.device)

    @classmethod
    def memory(cls, cfg):
        return (Need("brightness", "luma net (plugin)", 1_000_000, 2_000_000, 64 << 20, "declared by the plugin",
                     "--experts without brightness"),)

    def views(self):
        return (ImageView("brightness", 64),)

    def resources(self):
        return Resources(batch_size=self.options.brightness_batch, device=self.device)

    def process(self, batch):
        import torch

        levels = self.options.brightness_levels
        for sample in batch:
            luma = torch.tensor(sample.views.pop("brightness"), device=self.device).float().mean().item()
            sample.put("brightness", f"level {min(levels - 1, int(luma / 256 * levels)) + 1} of {levels}")
        return batch


# --- the run ---------------------------------------------------------------------------------------

COLORS = {"dark": (20, 20, 30), "mid": (120, 120, 120), "bright": (250, 250, 240)}


@pytest.fixture
def shard(tmp_path):
    members = [m for key, color in COLORS.items() for m in sample_members(key, jpeg(480, 480, color))]
    return write_tar(tmp_path / "s.tar", members)


@pytest.fixture
def in_this_process():
    Brightness.built.clear()
    registry.register(Brightness)
    yield
    registry.unregister("brightness")


INSTALLED_HEADER = """\
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa

from engine.core.config import option
from engine.core.placement import Need
from engine.core.registry import Evidence, PromptSection
from engine.core.stage import ImageView, Resources
from engine.stages.expert import Expert
from models.errors import ConfigError


"""


def expert_source() -> str:
    """This module's expert as the text of a module of its own."""
    return INSTALLED_HEADER + "\n\n".join(inspect.getsource(part) for part in (BrightnessOptions, brightness_lines, Brightness))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The same expert as a package with a dist-info: what ``pip install`` leaves on sys.path."""
    site = tmp_path / "site"
    package = site / "densefusion_brightness"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(expert_source())
    info = site / "densefusion_brightness-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: densefusion-brightness\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[densefusion.experts]\nbrightness = densefusion_brightness:Brightness\n")
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    yield
    sys.modules.pop("densefusion_brightness", None)
    monkeypatch.undo()
    registry.refresh()


def run(tmp_path, shard, tiny_cache, out: str, *extra: str) -> int:
    return densefusion_local.main([
        "run", "--shards", str(shard), "--out", str(tmp_path / out), "--models", "tiny", "--cache-dir", str(tiny_cache),
        "--stages", "decode", "prompt", "--replica-devices", "cpu", "cpu", "--no-progress",
        "--expert-cache", str(tmp_path / "experts.sqlite"), *extra])


def rows(tmp_path, out: str) -> dict[str, dict]:
    table = pq.read_table(tmp_path / out / "shards" / "s.parquet")
    return {row["key"]: row for row in table.to_pylist()} | {"_schema": table.schema}


def cache_figures(tmp_path, out: str) -> dict[str, tuple[int, int]]:
    stages = json.loads((tmp_path / out / "metrics.json").read_text())["stages"]
    return {s["stage"]: (s["cache_hits"], s["cache_misses"]) for s in stages if "cache_hits" in s}


def check_end_to_end(tmp_path, shard, tiny_cache, capsys, built: list[str]) -> None:
    assert run(tmp_path, shard, tiny_cache, "paper") == 0  # the plugin installed but not asked for: the paper's run
    assert run(tmp_path, shard, tiny_cache, "with", "--experts", "brightness", "--brightness-levels", "3") == 0
    assert "brightness x2 (cpu cpu)" in capsys.readouterr().err  # a replica per device
    assert built == ["cpu", "cpu"]
    paper, plugin = rows(tmp_path, "paper"), rows(tmp_path, "with")
    assert "brightness" not in paper["_schema"].names
    assert plugin["_schema"].field("brightness").type == pa.string()
    assert {key: plugin[key]["brightness"] for key in COLORS} == {"dark": "level 1 of 3", "mid": "level 2 of 3",
                                                                  "bright": "level 3 of 3"}
    for key in COLORS:  # the paper's prompt, word for word, with the plugin's section before [IMAGE]:
        head, _, image = paper[key]["prompt"].rpartition("\n\n")
        assert plugin[key]["prompt"] == f"{head}\n\n[Brightness]:\n{plugin[key]['brightness']}\n\n{image}"
    assert cache_figures(tmp_path, "with")["brightness"] == (0, 3)
    assert run(tmp_path, shard, tiny_cache, "again", "--experts", "brightness", "--brightness-levels", "3") == 0
    assert cache_figures(tmp_path, "again")["brightness"] == (3, 0)  # the expert cache, keyed on its options
    assert rows(tmp_path, "again")["mid"]["brightness"] == "level 2 of 3"
    assert run(tmp_path, shard, tiny_cache, "other", "--experts", "brightness", "--brightness-levels", "2") == 0
    assert cache_figures(tmp_path, "other")["brightness"] == (0, 3)  # an option declared to affect it: a new key
    capsys.readouterr()

    assert densefusion_local.main(["plan", "--gpus", "2", "--gpu-memory-gb", "24", "--stages", "decode",
                                   "--experts", "brightness", "--out", str(tmp_path / "plan")]) == 0
    plan = capsys.readouterr().out
    assert "one replica of each of brightness per GPU" in plan
    assert plan.count("luma net (plugin)") == 2 and plan.count("nvJPEG / DALI") == 1  # on each GPU; decode on GPU 0
    with pytest.raises(SystemExit):
        densefusion_local.main(["run", "--help"])
    helped = capsys.readouterr().out
    assert "brightness expert (plugin):" in helped and "--brightness-levels N" in helped
    assert "optional experts (--experts NAME; in engine/experts/ or installed): brightness" in helped
    assert densefusion_local.main(["run", "--shards", str(shard), "--out", str(tmp_path / "bad"),
                                   "--experts", "brightness", "--brightness-levels", "1"]) == 2
    assert "--brightness-levels must be >= 2" in capsys.readouterr().err


def test_an_expert_defined_here_runs_end_to_end(tmp_path, shard, tiny_cache, capsys, in_this_process):
    check_end_to_end(tmp_path, shard, tiny_cache, capsys, Brightness.built)


def test_an_installed_expert_is_found_through_the_entry_point(tmp_path, shard, tiny_cache, capsys, installed):
    assert [spec.name for spec in registry.plugin_specs()] == ["brightness"]
    module = sys.modules.get("densefusion_brightness")
    assert module is not None and registry.plugin_specs()[0].build.__self__ is module.Brightness
    check_end_to_end(tmp_path, shard, tiny_cache, capsys, module.Brightness.built)


def test_an_in_tree_expert_is_found_in_engine_experts(tmp_path, monkeypatch, capsys):
    """A module in engine/experts/ (here one more folder of that package: nothing is written into the
    source tree) is found without a table to edit."""
    import engine.experts

    (tmp_path / "brightness_in_tree.py").write_text(expert_source())
    monkeypatch.setattr(engine.experts, "__path__", [*engine.experts.__path__, str(tmp_path)])
    registry.refresh()
    try:
        assert [(spec.name, spec.build.__self__.__module__) for spec in registry.plugin_specs()] == \
            [("brightness", "engine.experts.brightness_in_tree")]
        with pytest.raises(SystemExit):
            densefusion_local.main(["plan", "--help"])
        assert "--brightness-levels N" in capsys.readouterr().out
    finally:
        monkeypatch.undo()
        sys.modules.pop("engine.experts.brightness_in_tree", None)
        registry.refresh()


def test_without_plugins_no_plugin_option_or_section_exists(capsys):
    assert registry.plugin_specs() == ()
    with pytest.raises(SystemExit):
        densefusion_local.main(["run", "--help-all"])
    out = capsys.readouterr().out
    assert "--brightness-levels" not in out and "optional experts (--experts NAME" not in out


def test_a_stage_whose_input_no_stage_writes_is_refused_before_any_work(tmp_path, shard, capsys):
    code = densefusion_local.main(["run", "--shards", str(shard), "--out", str(tmp_path / "out"), "--models", "tiny",
                                   "--stages", "decode", "caption", "--no-progress"])
    assert code == 2
    assert "stage caption reads prompt, which no stage before it writes: add prompt to --stages" in capsys.readouterr().err
    assert not (tmp_path / "out" / "shards").exists()


def test_an_unknown_plugin_is_named_with_those_installed(tmp_path, shard, capsys, in_this_process):
    assert densefusion_local.main(["run", "--shards", str(shard), "--out", str(tmp_path / "out"),
                                   "--experts", "depth", "--no-progress"]) == 2
    assert "unknown stage(s) ['depth']" in (err := capsys.readouterr().err) and "optional experts (--experts): brightness" in err


def test_a_plugin_may_not_take_a_built_in_stage_name():
    class Detect(Brightness):
        name = "detect"

    with pytest.raises(ConfigError, match="a built-in stage has that name"):
        registry.register(Detect)
        registry.stage_specs()
    registry.unregister("detect")


def test_a_plugins_evidence_may_not_overwrite_what_every_sample_carries():
    class Overwriting(Brightness):
        name = "overwriting"
        produces = (Evidence("caption", pa.string()),)

    with pytest.raises(ConfigError, match=r"evidence \['caption'\] would overwrite"):
        registry.register(Overwriting)
        registry.stage_specs()
    registry.unregister("overwriting")
    assert "overwriting" not in registry.stage_specs()


def test_the_plugins_cache_key_follows_its_options_and_models_tiny(tmp_path, in_this_process):
    from engine.core import config
    from engine.io.expert_cache import output_fingerprint

    def key(**sections) -> str:
        return output_fingerprint(config.build(runtime={"out": str(tmp_path), **sections.pop("runtime", {})},
                                               **sections), "brightness")

    base = key()
    assert key(brightness={"brightness_batch": 2}) == base  # declared affects=()
    assert key(brightness={"brightness_levels": 3}) != base
    assert key(runtime={"models": "tiny"}) != base  # --models tiny changes every expert's output
    assert key(experts={"max_tags": 3}) == base  # another expert's option
