#!/usr/bin/env python
"""densefusion on one node: web image shards in, hyper-detailed image–caption dataset out.

    python densefusion_local.py demo --out runs/demo
    python densefusion_local.py run --shards '/data/laion/{00000..00099}.tar' --out /data/df
    python densefusion_local.py meta --shards ... --out /data/meta --api-base URL --api-model gpt-4o
    python densefusion_local.py plan --gpus 8 --gpu-memory-gb 40 [model flags]
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core import config as config_module
from engine.core.console import format_summary
from models.errors import ConfigError

if TYPE_CHECKING:
    from engine.core.driver import Executor
    from engine.core.figures import RunSummary

EPILOG = """\
stages (pass 2, in order; --stages picks a subset, the probe always runs):
  {stages}

A rerun with the same --out skips finished shards and redoes the rest; Ctrl-C or SIGTERM
stops within seconds (exit 130; the shard in flight is redone by the rerun), a second one at
once. Misconfiguration exits with code 2 before any work starts.
"""
CURATE_EPILOG = """\
A rerun with the same --out resumes; Ctrl-C or SIGTERM stops within seconds (exit 130), a
second one at once. Misconfiguration exits with code 2 before any work starts.
"""
MORE_OPTIONS = "\n"  # the short help's last line follows it (--help-all drops that line)


def _stage_list() -> str:
    from engine.core.registry import stage_specs

    specs = stage_specs().values()
    plugins = [spec.name for spec in specs if spec.plugin]
    return ", ".join(spec.name for spec in specs if not spec.plugin) \
        + (f"\noptional experts (--experts NAME; in engine/experts/ or installed): {', '.join(plugins)}"
           if plugins else "")


class StrictParser(argparse.ArgumentParser):
    """No abbreviated flags (``--model`` is not ``--models``), and an unknown flag is reported
    by the sub-command that got it: its usage, and the closest flags it knows.

    argparse hands a sub-command's unknown arguments up to the top-level parser, whose error
    shows the top-level usage and suggests nothing; here each parser (sub-commands are built
    from the same class) refuses its own.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestions(extras)}")
        return namespace, extras

    def _suggestions(self, extras: list[str]) -> str:
        known = [flag for action in self._actions for flag in action.option_strings]
        elsewhere = config_module.option_commands()
        hints = []
        for arg in extras:
            flag = arg.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6) if flag.startswith("--") else []
            if flag in elsewhere:
                hints.append(f"{flag} does not apply to {self.prog.split()[-1]} (only to {', '.join(elsewhere[flag])})")
            elif close:
                hints.append(f"{flag}: did you mean {' or '.join(close)}?")
        return "".join(f"\n  {hint}" for hint in hints)


class HelpAll(argparse.Action):
    """``--help-all``: the help with every option of the command, not only the basic ones."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show every option of this command, grouped, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        for action in parser._actions:
            if hasattr(action, "full_help"):
                action.help = action.full_help
        parser.epilog = parser.epilog.split(MORE_OPTIONS)[0]
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(
        prog="densefusion_local.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("run", "caption the images of --shards into --out (pass 2; with --curate, pass 1 first)"),
        ("curate", "pass 1 only: embed --shards, cluster, de-duplicate and select into --out/curate"),
        ("demo", "run the whole pipeline on built-in sample shards with tiny random-weight "
                 "models (writes noise captions; no weights or data needed)"),
        ("plan", "placement and memory budget per GPU for the model flags given, on --gpus GPUs of "
                 "--gpu-memory-gb each, without a GPU or weights (exit 2 when it does not fit)"),
        ("meta", "meta dataset: caption a seeded random share of --shards (--subset-share, default 0.1; with "
                 "--curate, of pass 1's selection) with the GPT-4V template through --api-base/--api-model, "
                 "then export OUT/sft/ as LLaVA fine-tuning data for the caption engine"),
    ):
        # the full usage lists every option (over a hundred lines): an error would scroll away
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  usage="%(prog)s [--config YAML] [OPTIONS]  (--help: the main options, "
                                        "--help-all: every one)",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--help-all", action=HelpAll)
        sub.add_argument("--config", metavar="YAML", help="YAML file with config sections; flags override it")
        if name == "plan":
            sub.add_argument("--gpus", type=int, default=8, metavar="N", help="GPUs per node (default: 8)")
            sub.add_argument("--gpu-memory-gb", type=float, default=80.0, metavar="GIB",
                             help="memory per GPU in GiB (default: 80)")
        config_module.add_arguments(sub, command=name)
        hidden = sum(hasattr(action, "full_help") for action in sub._actions)
        sub.epilog = (EPILOG.format(stages=_stage_list()) if name != "curate" else CURATE_EPILOG) \
            + MORE_OPTIONS + f" {hidden} more options of {name}: --help-all lists every one.\n"
    for name, (module, help_text) in OUTPUT_TOOLS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sub)
    return parser


# Commands that read an output folder (train and evaluate: a meta output; status: one being written too);
# each module has add_arguments() and command().
OUTPUT_TOOLS = {
    "stats": ("engine.output.stats", ("the paper's Table 1, length histograms, coverage and categories "
                               "of an output folder (writes OUT/stats.json)")),
    "export": ("engine.output.export", ("export an output folder, images included: llava (LLaVA pre-training "
                                        "JSON), jsonl, or sft (a meta output as the caption engine's fine-tuning "
                                        "data)")),
    "report": ("engine.output.report", "write a static HTML report of an output folder (OUT/report.html)"),
    "status": ("engine.ops.status", "progress of an output folder being written or finished: shards done, failed "
                                    "and in flight, images, rate and time left, the last errors (--json)"),
    "train": ("engine.train.command", "fine-tune the caption engine (LLaVA-NeXT) on a `meta` output: "
                                      "GPT-4V captions as targets, only caption tokens carry loss"),
    "evaluate": ("engine.train.evaluate", "caption a trained engine's held-out meta samples with it and with "
                                          "its base model; compare both with GPT-4V's captions"),
}


def command_run(args: argparse.Namespace) -> int:
    return caption_pass(config_module.build(args, args.config))


def caption_pass(cfg: config_module.RunConfig) -> int:
    """Pass 2 over --shards, or with --curate over pass 1's selection (pass 1 first, skipped
    once done); in process or on Ray (--ray). The exit code: see :func:`exit_code`."""
    return on_ray(cfg, lambda: _caption_pass(cfg)) if cfg.cluster.ray else _caption_pass(cfg)


def _caption_pass(cfg: config_module.RunConfig) -> int:
    from engine.core import pipeline
    from engine.core.driver import input_shards

    reader = input_shards
    if cfg.curate.curate:
        from engine.curate.pass2_source import selected_shard_items

        check_both_passes(cfg)
        code = _curate_pass(cfg)
        if code:
            return code
        reader = selected_shard_items
    executor = executor_for(cfg)
    summary = pipeline.run(cfg, executor, reader=reader)
    print_summary(summary, executor)
    return exit_code(summary)


def executor_for(cfg: config_module.RunConfig) -> Executor:
    """A pass's executor (engine/core/driver.py): in this process, or the worker actors of the
    Ray cluster of --ray (connected by :func:`on_ray`)."""
    if cfg.cluster.ray:
        from engine.cluster.executor import RayExecutor

        return RayExecutor()
    from engine.core.driver import InProcess

    return InProcess()


def print_summary(summary: RunSummary, executor: Executor) -> None:
    print(format_summary(summary))
    described = executor.describe()  # on Ray: actors, nodes, retries, failed shards
    if described:
        print(described)


def exit_code(summary: RunSummary) -> int:
    """0: every shard committed; 130: interrupted (Ctrl-C, SIGTERM); 1: a shard failed on Ray."""
    return 130 if summary.interrupted else 1 if summary.shards_left else 0


def check_both_passes(cfg: config_module.RunConfig) -> None:
    """Pass 2's stages are built after pass 1 has run: their checks (models resolved) run before
    it too, with pass 1's, so a missing model fails the run before any work, with every problem."""
    from engine.core import driver, pipeline
    from engine.curate.pass1 import curate_stages
    from engine.io.readers import expand_shards
    from models.errors import Problems

    expand_shards(cfg.input.shards)  # the inputs' problems first, before any (tiny) model is built
    problems = Problems()
    with problems.check():
        curate_stages(driver.resolved(cfg))
    with problems.check():
        pipeline.build_stages(pipeline.resolved(cfg))
    problems.raise_found()


def command_plan(args: argparse.Namespace) -> int:
    from engine.core.pipeline import selected_stage_names
    from engine.core.placement import GIB, format_plan, make_plan

    # the plan writes nothing: --out is only checked when given
    cfg = config_module.build(args, args.config, runtime={"out": getattr(args, "runtime.out", None) or "."})
    plan = make_plan(cfg, selected_stage_names(cfg), args.gpus, int(args.gpu_memory_gb * GIB))
    print(format_plan(plan))
    return 0 if plan.fits else 2


def command_curate(args: argparse.Namespace) -> int:
    cfg = config_module.build(args, args.config)
    config_module.check_folder_output(cfg.runtime.out, config_module.CURATION_NEEDS_A_FOLDER)
    return on_ray(cfg, lambda: _curate_pass(cfg)) if cfg.cluster.ray else _curate_pass(cfg)


def _curate_pass(cfg: config_module.RunConfig) -> int:
    """Pass 1 with its summary and report printed (no report when a shard is left: interrupted,
    or failed on Ray); its exit code. On Ray the step after the k-means fit runs as Ray tasks."""
    from engine.curate.pass1 import format_report, run_curate

    select_rows = None
    if cfg.cluster.ray:
        from engine.cluster.curate_partitioned import select_on_ray

        select_rows = select_on_ray
    executor = executor_for(cfg)
    summary, report = run_curate(cfg, executor, select_rows)
    print_summary(summary, executor)
    if report is None:
        return exit_code(summary)
    print(format_report(report, Path(cfg.runtime.out)))
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from engine.core import pipeline
    from engine.io.demo_data import write_demo_shards

    out = getattr(args, "runtime.out", None) or "runs/demo"
    config_module.check_folder_output(out, "demo writes its sample shards (OUT/input)")
    config_module.check_output_folder(Path(out))  # before the sample shards are written into it
    shards = write_demo_shards(Path(out) / "input")
    cfg = config_module.build(args, args.config, **demo_overrides(out, shards))
    print(f"demo: {len(shards)} built-in shards in {out}/input, tiny random-weight models "
          f"(captions are noise; see README for real checkpoints)")
    summary = pipeline.run(cfg)
    print(format_summary(summary))
    if summary.interrupted:
        return 130
    print(demo_next_steps(out))
    return 0


def demo_next_steps(out: str) -> str:
    """Where the demo leads: the commands that read its output (the demo's noise captions are
    all flagged by quality control, so its export has to include them)."""
    prog, quoted = "python densefusion_local.py", shlex.quote(out)
    steps = [(f"{prog} report {quoted}", "one HTML page: figures, samples with boxes, rejects"),
             (f"{prog} stats {quoted}", "the paper's Table 1"),
             (f"{prog} export llava {quoted} --to {shlex.quote(str(Path(out) / 'export'))} --include-flagged",
              "LLaVA JSON + images (noise captions, all flagged)")]
    width = max(len(command) for command, _ in steps)
    return "\n".join(["next, look at what the demo wrote:"]
                     + [f"  {command:<{width}}  # {what}" for command, what in steps])


def demo_overrides(out: str, shards: list[Path]) -> dict:
    return {"input": {"shards": tuple(map(str, shards))},
            "runtime": {"out": out, "models": "tiny"}}


def meta_config(args: argparse.Namespace) -> config_module.RunConfig:
    """The run's config with meta mode's settings; the paper's 10% share unless one was given."""
    from engine.output.meta import META_SHARE, meta_overrides

    cfg = config_module.build(args, args.config, **meta_overrides())
    if "subset.subset_share" not in vars(args) and cfg.subset.subset_share == 1.0:
        cfg = config_module.build(args, args.config, **meta_overrides(), subset={"subset_share": META_SHARE})
    return cfg


def command_meta(args: argparse.Namespace) -> int:
    from engine.output.export import export, left_out_note, nothing_exported

    cfg = meta_config(args)
    config_module.check_folder_output(cfg.runtime.out, "meta exports its fine-tuning data (OUT/sft)")
    out = Path(cfg.runtime.out)
    code = caption_pass(cfg)  # with --curate: the share is drawn from pass 1's selection, as in the paper
    if code == 130:
        return code
    result = export("sft", out, out / "sft")
    if not result.records:
        print(f"meta: {nothing_exported(result, out)}")
        return code
    print(f"meta: {result.records} GPT-4V captions exported as caption-engine fine-tuning data to {result.path}"
          f"{left_out_note(result)}")
    return code


def on_ray(cfg: config_module.RunConfig, passes: Callable[[], int]) -> int:
    """``passes`` with the Ray cluster of --ray connected; Ctrl-C stops the actors (exit 130)."""
    from engine.cluster.executor import connect, disconnect

    connect(cfg.cluster)
    try:
        return passes()
    except KeyboardInterrupt:  # the actors are stopped; every shard committed so far is recorded
        print(f"\ninterrupted: rerun with --out {Path(cfg.runtime.out)} to finish the remaining shards")
        return 130
    finally:
        disconnect()


COMMANDS = {"run": command_run, "curate": command_curate, "demo": command_demo, "meta": command_meta,
            "plan": command_plan}


def main(argv: list[str] | None = None) -> int:
    # The run's own bar shows progress; the libraries' model-loading bars would interleave with it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        args = build_parser().parse_args(argv)  # an argument's type may refuse it (ConfigError)
        if args.command in OUTPUT_TOOLS:
            return importlib.import_module(OUTPUT_TOOLS[args.command][0]).command(args)
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
