"""``python densefusion_local.py evaluate CKPT --meta META_OUT``: is the fine-tuned engine closer to GPT-4V?

The samples ``train`` held out (listed in ``CKPT/densefusion_train.json``) are captioned by the
base model and by the fine-tuned engine, each with the caption-engine prompt and the image
exactly as `run` gives them (transformers backend, greedy; any caption family). Both, and
GPT-4V's own captions, are scored the way the project scores a dataset:

* similarity to GPT-4V's caption: ROUGE-L F1 over words (longest common subsequence; the
  usual caption-overlap score, no model needed);
* quality control: the share of captions `run` would drop (every rule, action ``drop``);
* the paper's Table 1: characters, words, sentences per caption, parts of speech;
* evidence coverage: OCR lines and tokens, box labels and tags named, nouns no expert reported
  (from the experts' outputs in META_OUT's shards; an SFT export alone has none).

Printed side by side and written to CKPT/evaluation.json (``--to`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.config import CaptionConfig, QcConfig
from engine.core.stage import ImageView
from engine.evidence.coverage import COVERAGE_SCORES, Evidence, coverage_scores
from engine.evidence.qc import check_caption, words
from engine.io.manifest import write_json_atomic
from engine.train.data import MetaRecord, caption_image, read_records
from engine.train.loop import RECORD, base_model
from models.errors import ConfigError

EVALUATION = "evaluation.json"
COLUMNS = ("gpt4v", "base", "fine_tuned")


@dataclass(frozen=True)
class Written:
    """One caption to score: its text and why it ended (``stop``, ``length``, ``error``)."""

    text: str
    finish_reason: str


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts over lower-cased words."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def score_captions(captions: list[Written], references: list[str], evidence: list[Evidence | None],
                   tagger) -> dict[str, Any]:
    """Similarity, QC drop rate, Table 1 and mean coverage of one engine's captions."""
    from engine.output.stats import CaptionCounts, table1

    qc = QcConfig(qc_action="drop")
    counts = CaptionCounts()
    coverage: dict[str, list[float]] = {name: [] for name in COVERAGE_SCORES}
    dropped = 0
    for caption, found in zip(captions, evidence, strict=True):
        dropped += any(qc.drops(v.rule) for v in check_caption(caption.text, caption.finish_reason, qc))
        if caption.text.strip():
            counts.add(caption.text, tagger)
            if found is not None:
                for name, value in coverage_scores(caption.text, found, tagger).items():
                    coverage[name].append(value)
    similarity = [rouge_l(c.text, r) for c, r in zip(captions, references, strict=True)]
    return {
        "samples": len(captions),
        "rouge_l_vs_gpt4v": sum(similarity) / len(similarity) if similarity else 0.0,
        "qc_drop_rate": dropped / len(captions) if captions else 0.0,
        "table1": table1(counts, len(captions)),
        "coverage": {name: {"mean": sum(v) / len(v), "samples": len(v)} for name, v in coverage.items() if v},
    }


def held_out_records(record: dict[str, Any], meta: Path, limit: int) -> list[MetaRecord]:
    keys = record["held_out"]
    if not keys:
        raise ConfigError("this engine was trained with no held-out samples (--held-out-share 0): nothing to evaluate")
    by_key = {r.key: r for r in read_records(meta)[0]}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ConfigError(f"{meta} lacks {len(missing)} of the held-out samples (first: {missing[0]}): "
                          f"pass the meta output the engine was trained on")
    return [by_key[k] for k in keys][:limit or None]


def expert_evidence(meta: Path, keys: list[str]) -> dict[str, Evidence]:
    """What the experts reported for each key, from the meta output's shards (none for an export)."""
    from engine.output.dataset_reader import iter_samples
    from engine.output.export import export_id

    if not (meta / "shards").is_dir():
        return {}
    wanted, found = set(keys), {}
    for sample in iter_samples(meta):
        if export_id(sample) in wanted:  # the keys are the sft export's ids
            ann = sample.annotations
            found[export_id(sample)] = Evidence(tags=tuple(t["name"] for t in ann.get("tags") or []),
                                         box_labels=tuple(b["label"] for b in ann.get("boxes") or []),
                                         ocr_lines=tuple(o["text"] for o in ann.get("ocr") or []))
    return found


def caption_with(model: str, path: str, records: list[MetaRecord], images: list, config: CaptionConfig,
                 device: str) -> list[Written]:
    from engine.core.config import ApiConfig, SglangConfig
    from engine.stages.caption import backend_settings
    from models.caption.base import SamplingParams
    from models.caption.registry import load_engine

    settings = backend_settings("transformers", config, ApiConfig(), SglangConfig(), out="")
    engine = load_engine("transformers", model, path, device, settings)
    try:
        params = SamplingParams(max_new_tokens=config.max_new_tokens)
        captions = engine.generate([r.prompt for r in records], images, params=params)
    finally:
        engine.close()
    return [Written(c.text if c.finish_reason != "error" else "", c.finish_reason) for c in captions]


def evaluate(ckpt: Path, meta: Path | None = None, *, base: str = "", device: str = "auto",
             max_new_tokens: int = 400, batch: int = 8, limit: int = 0, cache_dir: str = "") -> dict[str, Any]:
    from engine.evidence.language import pos_tagger
    from models.base import resolve_device

    ckpt = Path(ckpt)
    if not (ckpt / RECORD).is_file():
        raise ConfigError(f"{ckpt} is not a finished `train` output (no {RECORD}): train first, or wait "
                          f"for the run to finish")
    record = json.loads((ckpt / RECORD).read_text())
    meta = Path(meta or record["data"])
    train_cfg = record["config"]["train"]
    records = held_out_records(record, meta, limit)
    device = resolve_device(device)
    cache_dir = cache_dir or train_cfg["cache_dir"]
    base_ref = base_model(base or record["base"], cache_dir)
    base_path = base_ref.resolve(Path(cache_dir))
    view = ImageView("caption", train_cfg["caption_max_side"])
    images = [caption_image(r, view) for r in records]
    config = CaptionConfig(caption_backend="transformers", caption_batch=batch, max_new_tokens=max_new_tokens,
                           caption_max_side=train_cfg["caption_max_side"])
    written = {
        "gpt4v": [Written(r.caption, "stop") for r in records],
        "base": caption_with(base_ref.name, base_path, records, images, config, device),
        "fine_tuned": caption_with(str(ckpt), str(ckpt), records, images, config, device),
    }
    found = expert_evidence(meta, [r.key for r in records])
    evidence = [found.get(r.key) for r in records]
    references = [r.caption for r in records]
    tagger = pos_tagger("pattern")
    result = {
        "engine": str(ckpt), "base": base_ref.name, "meta": str(meta), "device": device,
        "max_new_tokens": max_new_tokens, "keys": [r.key for r in records],
        "scores": {name: score_captions(written[name], references, evidence, tagger) for name in COLUMNS},
        "captions": [{"key": r.key, **{name: written[name][i].text for name in COLUMNS}}
                     for i, r in enumerate(records)],
    }
    return result


def format_side_by_side(result: dict[str, Any]) -> str:
    from engine.evidence.language import POS_CLASSES
    from engine.output.stats import POS_COLUMNS

    scores = result["scores"]
    rows: list[tuple[str, ...]] = [("", "GPT-4V", "base", "fine-tuned")]

    def row(label: str, pick, fmt: str) -> None:
        values = [pick(scores[name]) for name in COLUMNS]
        rows.append((label, *("-" if v is None else format(v, fmt) for v in values)))

    row("samples", lambda s: s["samples"], "d")
    row("ROUGE-L vs GPT-4V", lambda s: s["rouge_l_vs_gpt4v"], ".3f")
    row("QC drop rate", lambda s: s["qc_drop_rate"], ".1%")
    for column in ("chars", "words", "sentences"):
        row(f"mean {column}", lambda s, c=column: s["table1"][c], ".1f")
    for cls in POS_CLASSES:
        row(f"{POS_COLUMNS[cls]} share", lambda s, c=POS_COLUMNS[cls]: s["table1"][c], ".1%")
    for name in COVERAGE_SCORES:
        if any(name in scores[c]["coverage"] for c in COLUMNS):
            row(name, lambda s, n=name: s["coverage"].get(n, {}).get("mean"), ".3f")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    if not any(scores[c]["coverage"] for c in COLUMNS):
        lines.append("(no evidence coverage: the meta folder has no experts' outputs for these samples)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", type=Path, metavar="CKPT", help="folder written by `train`")
    parser.add_argument("--meta", type=Path, metavar="META_OUT",
                        help="the meta output it was trained on (default: the one its training record names)")
    parser.add_argument("--base", default="", help="model to compare with (default: the base it was trained from)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-new-tokens", type=int, default=400, help="token limit per caption (as in `run`)")
    parser.add_argument("--batch", type=int, default=8, help="images per generation batch")
    parser.add_argument("--limit", type=int, default=0, help="caption at most N held-out samples (0: all)")
    parser.add_argument("--cache-dir", default="", help="where the tiny model is (default: as in training)")
    parser.add_argument("--to", type=Path, help=f"JSON file to write (default: CKPT/{EVALUATION})")


def command(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1 or args.batch < 1 or args.limit < 0:
        raise ConfigError("--max-new-tokens and --batch must be >= 1, --limit >= 0")
    result = evaluate(args.ckpt, args.meta, base=args.base, device=args.device, max_new_tokens=args.max_new_tokens,
                      batch=args.batch, limit=args.limit, cache_dir=args.cache_dir)
    target = args.to or args.ckpt / EVALUATION
    write_json_atomic(target, result)
    print(f"evaluate: {len(result['keys'])} held-out samples of {result['meta']}; base {result['base']}")
    print(format_side_by_side(result))
    print(f"captions and figures: {target}")
    return 0
