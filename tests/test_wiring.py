"""How the pieces are wired: import direction, stage factories, the one tiny-vs-real decision,
expert-cache keys derived from the options, and the CLI's handling of unknown flags.

The source checks read the files with ``ast`` (nothing is imported), so they are fast and see
lazy imports inside functions too.
"""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
from conftest import jpeg, sample_members, write_tar

import densefusion_local
from engine.core import config
from engine.core.config import ExpertsConfig, FusionConfig, RunConfig, RuntimeConfig, options_affecting
from engine.core.models import resolve_model
from engine.io.expert_cache import fingerprint, output_fingerprint
from models.errors import ConfigError

FIELDS = ("tags", "boxes")  # the cached evidence kinds (the tag and detect stages' outputs)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "models", "kernels")


def module_files(*folders: str) -> dict[str, Path]:
    files = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    return files


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``path`` imports, at the top or inside a function."""
    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(without_type_checking(ast.parse(path.read_text(encoding="utf-8")))):
        if isinstance(node, ast.Import):
            found.update(owner(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.update(owner(f"{node.module}.{alias.name}") for alias in node.names)
    return found - {None}


def without_type_checking(tree: ast.Module) -> ast.Module:
    """``tree`` without its ``if TYPE_CHECKING:`` blocks: annotations only, nothing runs them."""
    tree.body = [node for node in tree.body if not (isinstance(node, ast.If) and
                                                    getattr(node.test, "id", "") == "TYPE_CHECKING")]
    return tree


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_engine_models_kernels():
    known = module_files(*PACKAGES)
    graph = {name: imported_modules(path, known) - {name} for name, path in known.items()}
    assert len(graph) > 50  # the walk saw the packages
    assert "engine.core.config" in graph["engine.stages.caption"]
    assert cycles(graph) == []


def test_config_imports_from_models_only_the_shared_errors_and_the_registries_of_its_choices():
    known = module_files(*PACKAGES)
    imports = imported_modules(known["engine.core.config"], known)
    assert {m for m in imports if m.startswith("models")} <= {"models.errors", "models.caption.registry", "models.ocr"}


def engine_imports_from(package: str) -> dict[str, set[str]]:
    """module of ``package`` -> the engine modules it imports (at the top or inside a function)."""
    known = module_files(*PACKAGES)
    return {name: found for name, path in known.items() if name.startswith(f"{package}.") or name == package
            if (found := {m for m in imported_modules(path, known) if m.split(".")[0] == "engine"})}


def test_dependencies_point_one_way_models_never_import_the_engine():
    assert engine_imports_from("models") == {}
    assert engine_imports_from("kernels") == {}
    assert engine_imports_from("engine")  # the walk sees engine's own imports: it would see models' too


def test_the_one_way_check_sees_a_planted_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from engine.core.record import Sample\n")
    assert imported_modules(planted, module_files(*PACKAGES)) == {"engine.core.record"}


def test_the_core_knows_no_cluster():
    """One driver, two executors: engine/core/driver.py runs a pass in process or on whatever
    executor the CLI hands it; the Ray one (engine/cluster/) depends on the core, never back."""
    known = module_files(*PACKAGES)
    users = {name for name, path in known.items() if name.startswith("engine.core")
             and any(m.startswith("engine.cluster") for m in imported_modules(path, known))}
    assert users == set()
    assert "engine.core.driver" in imported_modules(known["engine.cluster.worker"], known)  # the walk sees them


def test_models_take_no_engine_config():
    known = module_files(*PACKAGES)
    users = {name for name, path in known.items() if name.startswith("models")
             and "engine.core.config" in imported_modules(path, known)}
    assert users == set()


# --- engine/core names no stage and no model ----------------------------------------------------

# What engine/core may take from models/: the shared types and the model reference (models/base.py).
CORE_MAY_IMPORT = {"models.errors", "models.records", "models.base"}
# config.py declares the built-in experts' options (their sections, by name); record.py is the
# output's contract (the Sample's fields are the <key>.json's keys).
CORE_NAMING_ALLOWED = {"engine.core.config", "engine.core.record"}


def names_in_core(path: Path, names: set[str]) -> set[str]:
    """The string constants of ``path`` that are one of ``names``, and the modules it imports from
    engine.stages or from models/ beyond ``CORE_MAY_IMPORT``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.add(node.value)
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found.update(m for m in modules if m.startswith("engine.stages") or
                     (m.split(".")[0] == "models" and m not in CORE_MAY_IMPORT))
    return found


def stage_and_model_names() -> set[str]:
    from engine.stages import STAGES

    return {spec.name for spec in STAGES} | set(config.model_options())


def test_engine_core_names_no_stage_and_no_model():
    names = stage_and_model_names()
    assert {"caption", "detect", "ocr", "owlv2", "ram_plus"} <= names
    core = {name: path for name, path in module_files("engine/core").items() if name not in CORE_NAMING_ALLOWED}
    assert len(core) > 10
    assert {name: found for name, path in core.items() if (found := names_in_core(path, names))} == {}


def test_the_core_check_sees_a_planted_name_and_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('from models.ocr import OcrModel\nfrom models.errors import ConfigError\n'
                       'def f(stage):\n    from engine.stages import tag\n    return stage == "detect"\n')
    assert names_in_core(planted, stage_and_model_names()) == {"models.ocr", "engine.stages", "detect"}


# --- one decision: tiny or real ------------------------------------------------------------

# what decides "tiny": building a model reference, building a tiny model, comparing with TINY
TINY_REGISTRY = {"models.base.ModelRef", "models.tiny.ensure", "models.base.TINY"}


def tiny_registry_users(path: Path) -> set[str]:
    """The functions (or "<module>") of ``path`` that call ``ModelRef(...)`` or the tiny
    registry's ``ensure``, or read ``TINY``: the places that decide tiny vs real."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {}  # local name -> what it is
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names})

    def full_name(node) -> str:
        if isinstance(node, ast.Name):
            return aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            return f"{full_name(node.value)}.{node.attr}"
        return ""

    users = set()

    def visit(node, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        used = full_name(node.func) if isinstance(node, ast.Call) else \
            full_name(node) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) else ""
        if used in TINY_REGISTRY and (used != "models.base.ModelRef" or isinstance(node, ast.Call)):
            users.add(function)
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return users


def test_resolve_model_is_the_only_user_of_the_tiny_registry_outside_models():
    files = {**module_files("engine", "bench", "kernels"), "densefusion_local": ROOT / "densefusion_local.py"}
    users = {(name, fn) for name, path in files.items() for fn in tiny_registry_users(path)}
    # resolve_model decides; ran_tiny_models reads that decision back from a run's recorded config
    assert users == {("engine.core.models", "resolve_model"), ("engine.core.models", "ran_tiny_models")}


def test_tiny_registry_users_sees_a_planted_caller(tmp_path):
    planted = tmp_path / "x.py"
    planted.write_text("from models.base import TINY, ModelRef\n\n"
                       "def pick():\n    from models import tiny\n    return tiny.ensure('caption', '.')\n\n"
                       "def name(models: str) -> ModelRef:\n    return ModelRef('x', 'caption')\n\n"
                       "def same(models: str) -> bool:\n    return models == TINY\n")
    assert tiny_registry_users(planted) == {"pick", "name", "same"}


def runtime(models=""):
    return RuntimeConfig(out="unused", models=models, cache_dir="unused")


def test_a_default_model_follows_models_tiny():
    roles = config.model_options()  # an optional expert's model option (model=ROLE) adds its role
    assert set(roles) >= {"caption", "embed", "ram_plus", "owlv2", "detector"}
    for role, (_, option) in roles.items():
        ref = resolve_model(role, option.default, runtime("tiny"))
        assert ref is not None and ref.is_tiny and ref.role == role


def test_an_explicit_model_with_models_tiny_is_an_error():
    with pytest.raises(ConfigError, match="--caption-model /ckpt/llava contradicts --models tiny"):
        resolve_model("caption", "/ckpt/llava", runtime("tiny"))
    with pytest.raises(ConfigError, match="--closed-detector det.onnx contradicts --models tiny"):
        resolve_model("detector", "det.onnx", runtime("tiny"))


def test_the_contradiction_is_refused_when_the_config_is_built(tmp_path):
    """Up front, not when pass 2's stages are built (with --curate that is after pass 1)."""
    with pytest.raises(ConfigError, match="--owlv2-model /ckpt/owl contradicts --models tiny"):
        config.build(None, None, runtime={"out": str(tmp_path), "models": "tiny"},
                     experts={"owlv2_model": "/ckpt/owl"})
    assert config.build(None, None, runtime={"out": str(tmp_path), "models": "tiny"},
                        experts={"owlv2_model": ""}).experts.owlv2_model == ""


def test_off_stays_off_and_tiny_can_be_asked_per_model():
    assert resolve_model("owlv2", "", runtime("tiny")) is None  # the user turned OWLv2 off
    assert resolve_model("detector", "", runtime()) is None  # off by default without --models tiny
    assert resolve_model("detector", "tiny", runtime()).is_tiny
    assert resolve_model("caption", "tiny", runtime()).is_tiny


def test_the_cli_refuses_an_explicit_model_with_models_tiny(tmp_path, capsys):
    shard = write_tar(tmp_path / "s.tar", sample_members("a", jpeg(500, 500)))
    code = densefusion_local.main(["run", "--shards", str(shard), "--out", str(tmp_path / "out"), "--models", "tiny",
                                   "--caption-model", str(tmp_path), "--stages", "caption", "--no-progress"])
    assert code == 2 and "contradicts --models tiny" in capsys.readouterr().err
    assert not (tmp_path / "out" / "shards").exists()


# --- stages built by their modules -----------------------------------------------------------

def test_every_stage_module_builds_its_stage_and_the_table_lists_them():
    from engine.stages import STAGES

    stage_modules = {name for name in module_files("engine/stages") if not name.endswith("__init__")
                     and name.count(".") == 2} - {"engine.stages"}
    without = {name for name in stage_modules
               if "build" not in {n.name for n in ast.parse(module_files("engine/stages")[name].read_text()).body
                                  if isinstance(n, ast.FunctionDef)}}
    # a wrapper the tag and detect factories apply; the plugins' base class (its build is a classmethod)
    assert without == {"engine.stages.expert_cache", "engine.stages.expert"}
    assert {f"{spec.build.__module__}" for spec in STAGES} <= stage_modules
    assert all(spec.build.__name__ == "build" for spec in STAGES)


# --- expert-cache keys from the options --------------------------------------------------------

def test_every_experts_and_fusion_option_declares_what_it_affects():
    for section in (ExpertsConfig, FusionConfig):
        undeclared = [f.name for f in dataclasses.fields(section) if f.metadata.get("affects") is None]
        assert undeclared == [], f"{section.__name__} options without affects=: {undeclared}"
    cfg = RunConfig()
    declared = {a for _, section in cfg.sections() for f in dataclasses.fields(section)
                for a in f.metadata.get("affects") or ()}
    assert declared == {*FIELDS, config.EVERY_OUTPUT}  # only outputs the cache stores (--models: all of them)


@pytest.mark.parametrize("section, change, changes", [
    ("experts", {"max_tags": 3}, {"tags", "boxes"}),  # boxes are detected with the tags as queries
    ("experts", {"owlv2_nms_iou": 0.3}, {"boxes"}),
    ("boxes", {"max_boxes": 2}, {"boxes"}),
    ("experts", {"tag_batch": 2, "detect_batch": 2}, set()),
    ("runtime", {"models": "tiny"}, {"tags", "boxes"}),
    ("caption", {"max_new_tokens": 8}, set()),
])
def test_a_fingerprint_changes_with_the_options_declared_to_affect_it(section, change, changes):
    base = RunConfig()
    other = dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **change)})
    changed = {out for out in FIELDS if output_fingerprint(base, out) != output_fingerprint(other, out)}
    assert changed == changes


def test_a_fingerprint_changes_when_files_at_the_same_path_change(tmp_path):
    checkpoint = tmp_path / "ram" / "ram_plus_swin_large_14m.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    (checkpoint.parent / "ram_tag_list.txt").write_text("cat\ndog\n")
    owlv2 = tmp_path / "owlv2"
    (owlv2 / "sub").mkdir(parents=True)
    (owlv2 / "sub" / "model.safetensors").write_bytes(b"w")
    base = RunConfig()
    cfg = dataclasses.replace(base, experts=dataclasses.replace(
        base.experts, ram_plus_model=str(checkpoint), owlv2_model=str(owlv2)))

    def keys():
        return {out: output_fingerprint(cfg, out) for out in FIELDS}

    first = keys()
    assert keys() == first  # stable while nothing changes
    changes = [
        (lambda: checkpoint.write_bytes(b"new weights"), {"tags", "boxes"}),  # boxes are queried with the tags
        (lambda: (checkpoint.parent / "ram_tag_list.txt").write_text("cat\ndog\nbird\n"), {"tags", "boxes"}),
        (lambda: (owlv2 / "sub" / "model.safetensors").write_bytes(b"other"), {"boxes"}),
        (lambda: (checkpoint.parent / "notes.md").write_text("unrelated"), set()),
    ]
    for change, expected in changes:
        before = keys()
        change()
        after = keys()
        assert {out for out in FIELDS if after[out] != before[out]} == expected
    # a hub id or 'tiny' names nothing on disk: its key is the one it always had
    assert output_fingerprint(base, "boxes") == fingerprint(
        "boxes", options_affecting(base, "boxes"), [output_fingerprint(base, "tags")])


def test_a_second_run_over_the_same_images_reports_cache_hits_in_metrics(tmp_path, tiny_cache):
    colors = [(200, 50, 50), (40, 160, 90), (30, 60, 220)]
    members = [m for i, c in enumerate(colors) for m in sample_members(f"k{i}", jpeg(480, 480, c))]
    shard = write_tar(tmp_path / "s.tar", members)
    common = ["--shards", str(shard), "--models", "tiny", "--cache-dir", str(tiny_cache), "--stages", "decode", "tag",
              "detect", "--expert-cache", str(tmp_path / "experts.sqlite"), "--no-progress"]
    figures = []
    for out in ("first", "second"):
        assert densefusion_local.main(["run", "--out", str(tmp_path / out), *common]) == 0
        stages = json.loads((tmp_path / out / "metrics.json").read_text())["stages"]
        figures.append({s["stage"]: (s["cache_hits"], s["cache_misses"]) for s in stages if "cache_hits" in s})
    assert figures == [{"tag": (0, 3), "detect": (0, 3)}, {"tag": (3, 0), "detect": (3, 0)}]


# --- lists kept equal across the engine/models boundary ---------------------------------------

def test_config_choices_match_what_the_models_offer():
    """The caption and OCR backends are the registries' own; the decode modes live in the transformers
    backend, which imports torch, so the config keeps their names and this test keeps them equal."""
    from models.caption.transformers_backend import DECODE_MODES

    assert config.CAPTION_DECODE_MODES == DECODE_MODES


# --- the CLI: unknown and abbreviated flags -----------------------------------------------------

def test_a_misspelled_flag_shows_the_subcommands_usage_and_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        densefusion_local.main(["run", "--out", "x", "--modles", "tiny"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: densefusion_local.py run ")
    assert "unrecognized arguments: --modles tiny" in err and "--modles: did you mean --models" in err


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        densefusion_local.main(["run", "--out", "x", "--model", "tiny"])
    assert "--model: did you mean --models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        densefusion_local.main(["stats", "x", "--js"])  # an output tool's flag (--json) too
    assert "usage: densefusion_local.py stats" in capsys.readouterr().err


def test_every_other_parser_refuses_abbreviations():
    """The benchmarks', the exporter's and the output tools' own parsers (densefusion_local's are
    StrictParser, whose behaviour the tests above check)."""
    parsers = []
    for path in module_files("engine", "models", "bench").values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "ArgumentParser", "add_parser"):
                keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                parsers.append((path.name, keywords.get("allow_abbrev")))
    assert len(parsers) > 10
    assert [p for p in parsers if p[1] is not False] == []
