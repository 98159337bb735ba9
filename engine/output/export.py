"""Exports of an output folder in the forms people train with.

    python densefusion_local.py export llava OUT --to DIR   # DIR/densefusion_llava.json
    python densefusion_local.py export jsonl OUT --to DIR   # DIR/densefusion.jsonl

Both write the images under DIR/images/<shard>/<key>.<ext> (the original bytes from the tar
shards) and point at them with paths relative to DIR, so DIR can be moved as a whole. A
sample's id is ``<shard>/<key>``: keys are unique only within a shard (two image folders
both hold a ``0001.jpg``), output shard names are unique and hold no ``/``.
``llava`` is LLaVA's pre-training format (one conversation per image: the instruction, then
the caption); ``jsonl`` has the fields of the released DenseFusion-1M files (``image_id``,
``url``, ``image_path``, ``caption``). Samples without a caption are left out of both, and so
are captions that quality control flagged (``flags`` in their annotations: a repeated, cut-off
or scaffolding-leaking caption must not become training data unnoticed) unless
``--include-flagged``; the count left out is reported. When nothing is left to export, no file
is written and the command says why and exits 1. The WebDataset tars and parquet files of OUT
itself load as they are (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.config import check_output_folder
from engine.io.object_output import output_folder
from engine.output.dataset_reader import WrittenSample, check_output, iter_samples
from engine.output.meta import caption_engine_prompt

DEFAULT_INSTRUCTION = "Describe this image in detail."
FILES = {"llava": "densefusion_llava.json", "jsonl": "densefusion.jsonl",
         "sft": "densefusion_sft.json"}


# The tar names every image <key>.jpg (see engine/io/writers.py); exported files get their real extension.
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "MPO": "jpg"}


def export_id(sample: WrittenSample) -> str:
    """The sample's id in every export: unique across the output's shards."""
    return f"{sample.annotations['shard']}/{sample.key}"


def image_path(sample: WrittenSample) -> str:
    """Where the image goes, relative to the export folder, named by its real format. The
    whole key names it (a folder shard's ``a/0001`` and ``b/0001`` are two files; keys are
    never absolute and never hold ``..``)."""
    written_ext = sample.image_name[len(sample.key) + 1:] or "jpg"
    ext = _EXTENSIONS.get(sample.annotations.get("image_format", ""), written_ext)
    return f"images/{export_id(sample)}.{ext}"


def _write_image(to: Path, relative: str, data: bytes) -> None:
    # strings, not Paths: pathlib would intern each sample's names (see dataset_reader.output_files)
    target = os.path.join(to, relative)
    if os.path.exists(target) and os.path.getsize(target) == len(data):
        return  # a rerun of the same export
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, target)


@dataclass
class Exported:
    path: Path  # the export file (not written when ``records`` is 0)
    records: int = 0  # captioned samples written to it
    flagged_left_out: int = 0  # captioned samples quality control flagged, not exported
    uncaptioned: int = 0  # written samples without a caption


# The exit code of an export that found nothing to export (misconfiguration is 2).
NOTHING_EXPORTED = 1


def captioned(out: Path, to: Path, result: Exported, *, include_flagged: bool) -> Iterator[tuple[WrittenSample, str]]:
    """Captioned samples with their image written under ``to``; yields (sample, relative path).
    Counts the flagged ones it leaves out in ``result``."""
    for sample in iter_samples(out, with_images=True):
        if not sample.caption.strip():
            result.uncaptioned += 1
            continue
        if sample.annotations.get("flags") and not include_flagged:
            result.flagged_left_out += 1
            continue
        relative = image_path(sample)
        _write_image(to, relative, sample.image_bytes)
        yield sample, relative


def llava_record(sample: WrittenSample, relative: str, instruction: str) -> dict[str, Any]:
    return {
        "id": export_id(sample),
        "image": relative,
        "conversations": [
            {"from": "human", "value": f"<image>\n{instruction}"},
            {"from": "gpt", "value": sample.caption},
        ],
    }


def sft_instruction(sample: WrittenSample) -> str:
    """sft: the caption-engine prompt with the sample's own evidence (meta-dataset mode)."""
    return caption_engine_prompt(sample.annotations)


def jsonl_record(sample: WrittenSample, relative: str) -> dict[str, Any]:
    return {
        "image_id": export_id(sample),
        "url": (sample.annotations.get("meta") or {}).get("url"),
        "image_path": relative,
        "caption": sample.caption,
    }


def export(kind: str, out: Path, to: Path, *, instruction: str = DEFAULT_INSTRUCTION,
           include_flagged: bool = False) -> Exported:
    """Write the export (flagged captions only with ``include_flagged``). Written under a
    temporary name and renamed, so a stopped export never leaves a half file behind; with no
    record to hold, nothing is published (and a folder made for it is removed again)."""
    out, to = check_output(Path(out)), Path(to)
    made = not to.exists()
    to.mkdir(parents=True, exist_ok=True)
    result = Exported(to / FILES[kind])
    tmp = result.path.with_name(result.path.name + ".tmp")
    samples = captioned(out, to, result, include_flagged=include_flagged)
    with open(tmp, "w", encoding="utf-8") as handle:
        if kind in ("llava", "sft"):
            # One JSON list (what LLaVA's loader json.load()s), streamed record by record.
            handle.write("[")
            for sample, relative in samples:
                handle.write(",\n" if result.records else "\n")
                human = sft_instruction(sample) if kind == "sft" else instruction
                json.dump(llava_record(sample, relative, human), handle, ensure_ascii=False)
                result.records += 1
            handle.write("\n]\n")
        else:
            for sample, relative in samples:
                handle.write(json.dumps(jsonl_record(sample, relative), ensure_ascii=False) + "\n")
                result.records += 1
    if result.records:
        os.replace(tmp, result.path)
    else:
        tmp.unlink()
        if made:
            to.rmdir()  # no image was written either
    return result


def nothing_exported(result: Exported, out: Path) -> str:
    """Why an export wrote nothing, and what to do about it."""
    if result.flagged_left_out:
        why = (f"all {result.flagged_left_out} captions were flagged by quality control "
               f"(--include-flagged exports them)")
    elif result.uncaptioned:
        why = (f"none of its {result.uncaptioned} written samples has a caption "
               f"(was the caption stage left out of --stages?)")
    else:
        why = "it holds no written sample (see its rejects/ and metrics.json)"
    return f"nothing exported from {out}: {why}; {result.path.name} was not written"


def left_out_note(result: Exported) -> str:
    """What the console says about flagged captions left out ("" when none were)."""
    if not result.flagged_left_out:
        return ""
    return (f"; {result.flagged_left_out} captions flagged by quality control left out "
            f"(--include-flagged keeps them)")


def validate_llava(path: Path) -> list[str]:
    """Problems with a LLaVA pre-training JSON (empty when it is valid): the schema above, and
    every image path existing relative to the file's folder."""
    problems = []
    records = json.loads(Path(path).read_text())
    if not isinstance(records, list):
        return [f"{path}: expected a JSON list"]
    for i, rec in enumerate(records):
        where = f"record {i} ({rec.get('id') if isinstance(rec, dict) else '?'})"
        if not isinstance(rec, dict) or set(rec) != {"id", "image", "conversations"}:
            problems.append(f"{where}: keys must be id, image, conversations")
            continue
        if not isinstance(rec["id"], str) or not isinstance(rec["image"], str):
            problems.append(f"{where}: id and image must be strings")
        elif not (Path(path).parent / rec["image"]).is_file():
            problems.append(f"{where}: image {rec['image']} does not exist")
        turns = rec["conversations"]
        if (not isinstance(turns, list) or len(turns) != 2
                or [t.get("from") for t in turns if isinstance(t, dict)] != ["human", "gpt"]
                or not all(isinstance(t.get("value"), str) and t["value"] for t in turns)):
            problems.append(f"{where}: conversations must be one human turn, then one gpt turn")
        elif not turns[0]["value"].startswith("<image>\n"):
            problems.append(f"{where}: the human turn must start with '<image>\\n'")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=tuple(FILES), help="llava: LLaVA pre-training JSON; "
                        "jsonl: image_id, url, image_path, caption per line; "
                        "sft: LLaVA conversations whose human turn is the caption-engine "
                        "prompt with the sample's evidence (meta dataset → engine fine-tuning)")
    parser.add_argument("out", type=output_folder, help="output folder written by the engine")
    parser.add_argument("--to", type=Path, required=True, help="folder to write the export and images to")
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION,
                        help=f"llava: the human turn after <image> (default: {DEFAULT_INSTRUCTION!r})")
    parser.add_argument("--include-flagged", action="store_true",
                        help="also export captions that quality control flagged (left out by default)")
    parser.epilog = (f"exit code {NOTHING_EXPORTED} when nothing is left to export (no caption, or every caption "
                     f"flagged): no file is written and the reason is printed")


def command(args: argparse.Namespace) -> int:
    check_output_folder(args.to, "--to")
    result = export(args.kind, args.out, args.to, instruction=args.instruction, include_flagged=args.include_flagged)
    if not result.records:
        print(nothing_exported(result, args.out), file=sys.stderr)
        return NOTHING_EXPORTED
    print(f"exported {result.records} captioned samples to {result.path} (images under {args.to / 'images'})"
          f"{left_out_note(result)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="densefusion_local.py export", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return command(parser.parse_args(argv))
