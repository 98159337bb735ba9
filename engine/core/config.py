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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from engine.evidence.boxes import LABEL_SYNONYMS
from engine.evidence.qc import QC_RULES, QC_SCAFFOLDING
from engine.io.remote import is_url
from models.caption.registry import backend_names as caption_backend_names
from models.errors import ConfigError
from models.ocr import backend_names as ocr_backend_names


def option(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None,
           affects: tuple[str, ...] | None = None, model: str | None = None,
           commands: tuple[str, ...] | None = None, basic: bool = False, metavar: str | None = None):
    """A config field with the help text and choices the CLI shows.

    ``commands``: the CLI commands the option applies to (default: its section's ``COMMANDS``);
    another command refuses it and its help does not list it. ``basic``: listed by ``--help``
    (the others by ``--help-all``). ``metavar``: its placeholder in the help (``--min-short-edge PX``;
    default: MODEL, N, X or TEXT by kind).

    ``affects``: the expert outputs (``"tags"``, ``"boxes"``) whose values the option changes,
    ``()`` for none (a batch size); the expert cache keys each output on exactly those options
    (``options_affecting``), so an option cannot change tags yet keep serving cached ones.
    ``model``: the option names the model of this role (``--models tiny`` replaces it).
    """
    meta = {"help": help, "choices": choices, "flag": flag, "affects": affects, "model": model,
            "commands": commands, "basic": basic, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults: sections are frozen")
    return field(default=default, metadata=meta)


# The CLI commands whose options come from these sections (densefusion_local.py): each section
# says which of them it applies to (COMMANDS), an option may narrow that (option(commands=)).
RUN, CURATE, DEMO, META, PLAN = "run", "curate", "demo", "meta", "plan"
# option(affects=(EVERY_OUTPUT,)): the option changes every expert output, an optional expert's too
EVERY_OUTPUT = "*"
ALL_COMMANDS = (RUN, CURATE, DEMO, META, PLAN)


@dataclass(frozen=True)
class InputConfig:
    TITLE: ClassVar[str] = "input shards"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, CURATE, META)

    shards: tuple[str, ...] = option(
        (), "input shards: tar/parquet files or image folders; braces {000..009} and globs expand", metavar="PATTERN", basic=True,
    )
    image_column: str = option("", "parquet: column with image bytes (default: auto-detect)", metavar="COLUMN")
    text_column: str = option("", "parquet: column with the alt text (default: auto-detect)", metavar="COLUMN")
    key_column: str = option("", "parquet: column with the sample key (default: key, else row id)", metavar="COLUMN")
    max_alt_text_chars: int = option(2000, "alt text longer than this is cut (web alt text can be huge)")
    max_member_bytes: int = option(
        128 << 20, "images larger than this (bytes) are rejected without being read; bounds memory per sample", metavar="BYTES",
    )
    remote_retries: int = option(
        5, "shards at URLs: after a dropped connection, stall or error, re-open at the byte already read "
        "(a ranged read) up to this many times in a row; then the shard ends with an error", metavar="N",
    )
    remote_timeout: float = option(
        60.0, "shards at URLs: seconds a read may wait for data before it counts as stalled (and is retried)",
        metavar="SECONDS",
    )

    def validate(self) -> None:
        if self.max_alt_text_chars < 0:
            raise ConfigError("--max-alt-text-chars must be >= 0")
        if self.max_member_bytes < 1:
            raise ConfigError("--max-member-bytes must be >= 1")
        if self.remote_retries < 0 or self.remote_timeout <= 0:
            raise ConfigError("--remote-retries must be >= 0 and --remote-timeout > 0 (seconds)")


@dataclass(frozen=True)
class FilterConfig:
    TITLE: ClassVar[str] = "resolution filter"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, CURATE, DEMO, META)

    min_short_edge: int = option(448, "drop images whose shorter side is below this (pixels)", metavar="PX", basic=True)
    max_pixels: int = option(
        89_478_485, "reject images with more pixels than this (decompression-bomb guard)", metavar="PIXELS",
    )

    def validate(self) -> None:
        if self.min_short_edge < 0 or self.max_pixels <= 0:
            raise ConfigError("--min-short-edge must be >= 0 and --max-pixels > 0")


@dataclass(frozen=True)
class DecodeConfig:
    TITLE: ClassVar[str] = "decode"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = ALL_COMMANDS

    decoder: str = option(
        "auto",
        "image decoder: auto (on a GPU: dali if installed, else torchvision's nvJPEG; on a CPU: pil)",
        choices=("auto", "pil", "torchvision", "dali"),
    )
    decode_threads: int = option(max(1, min(8, os.cpu_count() or 1)), "CPU decode threads")
    decode_batch: int = option(32, "images per decode batch")

    def validate(self) -> None:
        if self.decode_threads < 1 or self.decode_batch < 1:
            raise ConfigError("--decode-threads and --decode-batch must be >= 1")


# --- pass 2: OCR expert, fusion prompt, caption engine ---------------------------------

PROMPT_TEMPLATES = ("caption_engine", "gpt4v")  # engine/evidence/prompt.py holds their text
OCR_BACKENDS = ocr_backend_names()


@dataclass(frozen=True)
class PromptConfig:
    TITLE: ClassVar[str] = "fusion prompt"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, DEMO, META)

    prompt_template: str = option(
        "caption_engine",
        "fusion prompt: caption_engine (what the DenseFusion engine was trained on) or gpt4v",
        choices=PROMPT_TEMPLATES, basic=True,
    )
    box_decimals: int = option(2, "decimals of the normalised box coordinates in the prompt")
    prompt_alt_text_chars: int = option(600, "alt text longer than this is cut in the prompt")
    prompt_ocr_chars: int = option(1000, "OCR text in the prompt is cut after this many characters")
    prompt_label_chars: int = option(60, "box labels longer than this are cut in the prompt")

    def validate(self) -> None:
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise ConfigError(f"--prompt-template must be one of {', '.join(PROMPT_TEMPLATES)}")
        if not 0 <= self.box_decimals <= 6:
            raise ConfigError("--box-decimals must be between 0 and 6")
        if min(self.prompt_alt_text_chars, self.prompt_ocr_chars, self.prompt_label_chars) < 1:
            raise ConfigError("--prompt-*-chars limits must be >= 1")


@dataclass(frozen=True)
class OcrConfig:
    TITLE: ClassVar[str] = "OCR expert"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, DEMO, META, PLAN)

    ocr_backend: str = option(
        "batched",
        "OCR backend: batched (PP-OCR's ONNX models on ONNX Runtime, batched across images, on the "
        "run's device), rapidocr (the rapidocr pipeline, one image per call, CPU), paddleocr "
        "(see models/ocr.py)",
        choices=OCR_BACKENDS, basic=True,
    )
    ocr_model_dir: str = option(
        "",
        "batched, rapidocr: folder with *det*.onnx and *rec*.onnx to use instead of the bundled PP-OCR; "
        "paddleocr (required): folder with det/ and rec/ PaddleOCR inference models", metavar="DIR",
    )
    ocr_min_score: float = option(0.5, "drop recognised lines below this confidence")
    ocr_max_lines: int = option(32, "at most this many lines per image, in reading order")
    ocr_max_chars: int = option(1000, "at most this many characters of text per image")
    ocr_max_side: int = option(960, "longer side of the image the OCR reads (pixels)", metavar="PX")
    ocr_det_side: int = option(
        736, "batched: longer side of the image text detection reads (pixels; rapidocr upscales the "
        "shorter side to 736 instead, 2-3x the pixels for the same lines on the OCR tests)", metavar="PX",
    )
    ocr_det_batch: int = option(
        0, "batched: images per text-detection call, padded to one shape; 0 = 8 on a GPU, 1 on the "
        "CPU (where a larger call gains nothing per core)"
    )
    ocr_rec_batch: int = option(32, "batched: text lines per recognition call, from all images of a batch")
    ocr_angle_cls: bool = option(False, "classify and turn upside-down text lines (slower)")
    ocr_threads: int = option(1, "ONNX Runtime threads per OCR session")
    ocr_workers: int = option(
        max(1, min(8, (os.cpu_count() or 2) // 2)),
        "OCR sessions reading batches in parallel (each its own session)",
    )

    def validate(self) -> None:
        if self.ocr_backend not in OCR_BACKENDS:
            raise ConfigError(f"--ocr-backend must be one of {', '.join(OCR_BACKENDS)}")
        if not 0.0 <= self.ocr_min_score <= 1.0:
            raise ConfigError("--ocr-min-score must be between 0 and 1")
        if min(self.ocr_max_lines, self.ocr_max_chars, self.ocr_threads, self.ocr_workers,
               self.ocr_rec_batch) < 1 or self.ocr_det_batch < 0:
            raise ConfigError("--ocr-max-lines, --ocr-max-chars, --ocr-threads, --ocr-workers "
                              "and --ocr-rec-batch must be >= 1, --ocr-det-batch >= 0")
        if min(self.ocr_max_side, self.ocr_det_side) < 32:
            raise ConfigError("--ocr-max-side and --ocr-det-side must be >= 32")


# transformers decoding (models/caption/transformers_backend.py's DECODE_MODES): KV cache grown
# every step, preallocated, or preallocated with a torch.compile'd decoding step
CAPTION_DECODE_MODES = ("dynamic", "static", "compiled")
CAPTION_BACKENDS = tuple(caption_backend_names())


@dataclass(frozen=True)
class CaptionConfig:
    TITLE: ClassVar[str] = "caption engine"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, DEMO, META, PLAN)

    caption_model: str = option(
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        "caption engine: local folder or hub id of a LLaVA-NeXT checkpoint, or 'tiny'. Layouts: "
        "transformers takes llava-hf's (LlavaNextForConditionalGeneration); sglang takes llava-hf's "
        "(converted once into the original LLaVA layout, cached) or the original one "
        "(LlavaLlamaForCausalLM and kin, e.g. liuhaotian/llava-v1.6-*)", model="caption", basic=True,
    )
    caption_backend: str = option(
        "auto",
        "caption backend: auto (sglang on a GPU where installed, else transformers), "
        "transformers, sglang, openai (--api-base, --api-model; key in $OPENAI_API_KEY)",
        choices=CAPTION_BACKENDS, basic=True,
    )
    caption_batch: int = option(8, "images per generation batch")
    caption_sort_window: int = option(
        4,
        "transformers: gather this many batches, sort them by prompt length (text + AnyRes image "
        "tokens) and generate shortest first, so little of a batch is padding; 1 = arrival order",
    )
    caption_decode: str = option(
        "auto",
        "transformers decoding: dynamic (KV cache grown every step), static (preallocated KV "
        "cache), compiled (static + torch.compile'd decoding step, CUDA graphs on a GPU); "
        "auto = compiled on a GPU, dynamic on the CPU",
        choices=("auto", *CAPTION_DECODE_MODES),
    )
    caption_max_side: int = option(1344, "longer side of the image handed to the engine (AnyRes)", metavar="PX")
    max_new_tokens: int = option(400, "token limit of a caption (the paper's average ~190 words)")
    min_new_tokens: int = option(
        0, "generate at least this many tokens (benchmarks set it to --max-new-tokens)"
    )
    temperature: float = option(0.0, "sampling temperature; 0 = greedy")
    top_p: float = option(1.0, "nucleus sampling mass (with temperature > 0)")
    caption_cpu_threads: int = option(
        1, "torch threads for a caption engine on the CPU (stages run side by side: more oversubscribe)"
    )
    caption_dtype: str = option(
        "auto",
        "weights dtype: auto (transformers: bfloat16 on a GPU, float32 on the CPU; sglang: float16, "
        "the only dtype it runs LLaVA in), bfloat16, float16, float32",
        choices=("auto", "bfloat16", "float16", "float32"),
    )

    def validate(self) -> None:
        if self.caption_backend not in CAPTION_BACKENDS:
            raise ConfigError(
                f"--caption-backend {self.caption_backend!r}: known backends are {', '.join(CAPTION_BACKENDS)}"
            )
        if min(self.caption_batch, self.caption_sort_window, self.max_new_tokens, self.caption_cpu_threads) < 1:
            raise ConfigError(
                "--caption-batch, --caption-sort-window, --max-new-tokens and --caption-cpu-threads must be >= 1"
            )
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("--min-new-tokens must be between 0 and --max-new-tokens")
        if self.caption_max_side < 64:
            raise ConfigError("--caption-max-side must be >= 64")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")


@dataclass(frozen=True)
class CurateConfig:
    TITLE: ClassVar[str] = "curation (pass 1) and the embedding model"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, CURATE, META)

    curate: bool = option(False, "run, meta: curate first (pass 1, into OUT/curate) and caption only the selected "
                                 "samples (meta: its share of them)", commands=(RUN, META), basic=True)
    embed_model: str = option(
        "EVA02-L-14", "embedding model: open_clip architecture, folder with open_clip_config.json, "
        "'hf-hub:org/repo', or 'tiny'", affects=("tags",), model="embed", commands=(RUN, CURATE, META, PLAN), basic=True,
    )
    embed_weights: str = option(
        "merged2b_s4b_b131k", "weights for an architecture name: checkpoint file, open_clip "
        "pretrained tag, or 'random' (benchmarks only)", affects=("tags",), commands=(RUN, CURATE, META, PLAN),
        basic=True, metavar="WEIGHTS",
    )
    embed_onnx: str = option(
        "", "run the embedder's image tower from this ONNX file (python -m models.export onnx "
        "--target embed) on ONNX Runtime instead of torch", affects=("tags",),
        commands=(RUN, CURATE, DEMO, META, PLAN), metavar="FILE",
    )
    embed_batch: int = option(64, "images per embedding batch", commands=(RUN, CURATE, DEMO, META, PLAN))
    curate_clusters: int = option(0, "k-means clusters (0: N / 10,000 like the paper, at least 1)")
    curate_eps: float = option(0.4, "SemDeDup epsilon: duplicates have cosine similarity > 1 - eps")
    curate_top_n: int = option(20, "keep this many non-duplicates closest to each centroid")
    curate_keep: str = option(
        "hard", "which member of a duplicate group SemDeDup keeps: hard (farthest from the centroid, "
        "the reference's default) or easy (closest); the order changes the counts too",
        choices=("hard", "easy"),
    )
    kmeans_iterations: int = option(
        20, "k-means iterations at most, coarse and refining together; the coarse ones stop early once "
        "no assignment changes"
    )
    kmeans_refine_iterations: int = option(
        1, "the last k-means iterations, on the whole fit sample; the others run on a quarter of it "
        "(coarse to fine, seeded by AFK-MC2; 0: all on the whole sample)"
    )
    kmeans_points_per_centroid: int = option(
        256, "k-means is fitted on a random sample of this many points per centroid (FAISS's default)"
    )

    def validate(self) -> None:
        if not 0.0 < self.curate_eps < 1.0:
            raise ConfigError("--curate-eps must be in (0, 1): a cosine-distance threshold")
        if self.curate_top_n < 1 or self.embed_batch < 1 or self.kmeans_iterations < 1:
            raise ConfigError("--curate-top-n, --embed-batch and --kmeans-iterations must be >= 1")
        if self.curate_clusters < 0 or self.kmeans_points_per_centroid < 1:
            raise ConfigError("--curate-clusters must be >= 0 and --kmeans-points-per-centroid >= 1")
        if not 0 <= self.kmeans_refine_iterations <= self.kmeans_iterations:
            raise ConfigError("--kmeans-refine-iterations must be between 0 and --kmeans-iterations")
        if self.embed_onnx and not Path(self.embed_onnx).is_file():
            raise ConfigError(f"--embed-onnx {self.embed_onnx} does not exist: export it with "
                              f"`python -m models.export onnx --target embed --model ... --out DIR`")


@dataclass(frozen=True)
class RuntimeConfig:
    TITLE: ClassVar[str] = "run"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = ALL_COMMANDS

    out: str = option("", "output folder (created; a rerun with the same folder resumes)", basic=True, metavar="DIR")
    stages: tuple[str, ...] = option(
        (), "run only these stages, in pipeline order (default: all; --help ends with the list)",
        commands=(RUN, DEMO, META, PLAN), basic=True, metavar="STAGE",
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N", basic=True, metavar="DEVICE")
    replica_devices: tuple[str, ...] = option(
        (), "devices that each run one replica of every model-backed expert (category, tag, detect, ocr) "
        "and of a transformers caption engine (default: every visible GPU with --device cuda, else "
        "--device); e.g. cuda:0 cuda:1, or cpu cpu (tests)", basic=True, metavar="DEVICE",
    )
    models: str = option(
        "", "'tiny': random-weight tiny models for every model-backed stage (noise, for tests/demo)", affects=(EVERY_OUTPUT,),
        basic=True, metavar="tiny",
    )
    cache_dir: str = option(
        str(Path.home() / ".cache" / "densefusion"), "where tiny models and caches are kept", metavar="DIR",
    )
    queue_depth: int = option(4, "batches buffered between two stages (back-pressure)", commands=(RUN, CURATE, DEMO, META))
    max_bytes_in_flight: int = option(
        1 << 30, "image bytes held between reading and writing, all stages together: bounds memory "
        "whatever the member sizes (one image larger than this still runs, alone)", commands=(RUN, CURATE, DEMO, META),
        metavar="BYTES",
    )
    progress: bool = option(True, "show a live progress bar", commands=(RUN, CURATE, DEMO, META))
    experts: tuple[str, ...] = option(
        (), "experts to run besides the paper's stages: in-tree ones (engine/experts/) and installed plugins "
        "(entry-point group densefusion.experts); their options follow, a group each; --help ends with their "
        "names; --stages may name them too",
        commands=(RUN, DEMO, META, PLAN), basic=True, metavar="EXPERT",
    )

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("--out is required: the folder to write the dataset to")
        if self.queue_depth < 1:
            raise ConfigError("--queue-depth must be >= 1")
        if self.max_bytes_in_flight < 1:
            raise ConfigError("--max-bytes-in-flight must be >= 1 (bytes)")
        if self.models not in ("", "tiny"):
            raise ConfigError("--models takes 'tiny' (or nothing, for the per-stage model flags)")
        if is_url(self.out):
            check_output_store(self.out)
            return
        from engine.io.commit import check_links

        reason = check_links(check_output_folder(Path(self.out)))
        if reason:
            raise ConfigError(f"output folder {self.out}: {reason}; use a local or NFS-like filesystem")


def check_output_store(out: str) -> None:
    """The check of an ``--out`` on object storage: a store fsspec can write with a conditional
    create that refuses a second create of a key (engine/io/object_output.py)."""
    from engine.io.object_output import OUTPUT_PROTOCOLS, ObjectPath, check_conditional_create

    protocol = out.split("://", 1)[0].lower()
    if protocol not in OUTPUT_PROTOCOLS:
        raise ConfigError(f"--out {out}: {protocol}:// cannot hold an output (no conditional create); "
                          f"pass a local or shared folder, s3://bucket/prefix or gs://bucket/prefix")
    if not out.split("://", 1)[1].strip("/"):
        raise ConfigError(f"--out {out}: name a bucket (s3://bucket/prefix)")
    reason = check_conditional_create(ObjectPath(out.rstrip("/")))
    if reason:
        raise ConfigError(f"--out {out}: {reason}")


def check_folder_output(out: str, what: str) -> None:
    """Commands whose output needs a folder (curation's zarr store, appended chunk by chunk; meta's
    and demo's files beside the dataset) refuse an ``--out`` on object storage."""
    if is_url(out):
        raise ConfigError(f"--out {out}: {what} in a folder; pass a local or shared folder "
                          f"(run without --curate writes to object storage)")


CURATION_NEEDS_A_FOLDER = "curation (curate, run --curate) keeps its embedding store"


def check_output_folder(out: Path, flag: str = "--out") -> Path:
    """The one check of a folder that a command writes into (every ``--out``, ``export --to``):
    a folder, or creatable as one, and writable. Returns the nearest folder that exists."""
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if probe_dir == out and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file, not a folder: pass a folder (it is created if missing)")
    if not probe_dir.is_dir():
        raise ConfigError(f"{flag} {out} is not writable: {probe_dir} is a file, not a folder")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out} is not writable (checked {probe_dir})")
    return probe_dir


# --- pass 2: vision experts (engine/stages/tag.py, engine/stages/detect.py, engine/evidence/boxes.py) ---

TAGGERS = ("ram_plus", "clip")


@dataclass(frozen=True)
class ExpertsConfig:
    TITLE: ClassVar[str] = "tagging and detection experts"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, DEMO, META, PLAN)

    tagger: str = option("ram_plus", "image tagger: ram_plus, or clip (zero-shot from the pass-1 "
                         "embedding against the same vocabulary)", choices=TAGGERS, affects=("tags",), basic=True)
    ram_plus_model: str = option(
        "", "RAM++ checkpoint (ram_plus_swin_large_14m.pth) or its folder, or its ONNX export "
        "(python -m models.export onnx --target ram_plus), with ram_tag_list.txt "
        "(and ram_tag_list_threshold.txt) beside it; 'tiny'", affects=("tags",), model="ram_plus", basic=True,
    )
    tag_batch: int = option(16, "images per tagging batch", affects=())
    max_tags: int = option(30, "keep at most this many tags per image (they are OWLv2's queries)", affects=("tags",))
    tag_vocab: str = option(
        "", "clip tagger: vocabulary file, one tag a line (default: ram_tag_list.txt beside --ram-plus-model)", affects=("tags",),
        basic=True, metavar="FILE",
    )
    clip_tag_template: str = option("a photo of a {}.", "clip tagger: text prompt per tag", affects=("tags",), metavar="TEMPLATE")
    clip_tag_threshold: float = option(0.2, "clip tagger: minimum cosine similarity of a tag", affects=("tags",))
    clip_tag_top_k: int = option(10, "clip tagger: at most this many tags per image", affects=("tags",))
    owlv2_model: str = option(
        "google/owlv2-base-patch16-ensemble", "open-set detector (transformers OWLv2 folder or hub id; "
        "'tiny'; '' turns it off)", affects=("boxes",), model="owlv2", basic=True,
    )
    owlv2_preprocess: str = option("tensor", "OWLv2 preprocessing: tensor (fast) or stock (the processor)",
                                   choices=("tensor", "stock"), affects=("boxes",))
    owlv2_query_template: str = option("a photo of a {}", "OWLv2 text query per tag", affects=("boxes",), metavar="TEMPLATE")
    owlv2_nms_iou: float = option(0.5, "OWLv2: per-label non-maximum suppression IoU (1 = off)", affects=("boxes",))
    closed_detector: str = option(
        "", "closed-set detector: transformers object-detection checkpoint (folder or hub id) or an "
        ".onnx file with boxes/scores/labels outputs; 'tiny'; '' = off", affects=("boxes",),
        model="detector", basic=True,
    )
    closed_label_map: str = option("", "ONNX detector: labels.json / labels.txt (default: beside the .onnx)", affects=("boxes",),
                                   metavar="FILE")
    closed_input_size: int = option(0, "ONNX detector: input side when the graph's is dynamic", affects=("boxes",), metavar="PX")
    detect_batch: int = option(8, "images per detection batch", affects=())
    expert_cache: str = option(
        "", "expert outputs cache (sqlite) keyed by image hash + expert config: '' = "
        "<cache-dir>/experts.sqlite, 'off' = no cache", affects=(), metavar="PATH",
    )

    def validate(self) -> None:
        if min(self.tag_batch, self.detect_batch) < 1:
            raise ConfigError("--tag-batch and --detect-batch must be >= 1")
        if self.max_tags < 0 or self.clip_tag_top_k < 0 or self.closed_input_size < 0:
            raise ConfigError("--max-tags, --clip-tag-top-k and --closed-input-size must be >= 0")
        if "{}" not in self.clip_tag_template or "{}" not in self.owlv2_query_template:
            raise ConfigError("--clip-tag-template and --owlv2-query-template need a {} for the tag")
        if not 0.0 < self.owlv2_nms_iou <= 1.0:
            raise ConfigError("--owlv2-nms-iou must be in (0, 1]")


@dataclass(frozen=True)
class FusionConfig:
    """Box fusion rules (engine/evidence/boxes.py); every default is listed in the README."""
    TITLE: ClassVar[str] = "box fusion"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, DEMO, META)


    open_min_score: float = option(0.3, "keep open-set (OWLv2) boxes scoring at least this", affects=("boxes",))
    closed_min_score: float = option(0.5, "keep closed-set detector boxes scoring at least this", affects=("boxes",))
    merge_iou: float = option(
        0.5, "an open-set and a closed-set box with the same label and IoU >= this become one", affects=("boxes",),
    )
    min_box_side: float = option(
        4.0, "drop boxes narrower or shorter than this, in pixels of the original image, before the "
        "size quotas (detectors emit boxes of no size that would take the small-object slots)",
        affects=("boxes",), metavar="PX",
    )
    small_area: float = option(
        0.01, "a box covering less than this share of the image is small (0.01 = 10%% x 10%%)", affects=("boxes",),
        metavar="SHARE",
    )
    large_area: float = option(0.1, "a box covering at least this share of the image is large", affects=("boxes",),
                               metavar="SHARE")
    quota_small: int = option(5, "boxes kept from the small bucket before the others", affects=("boxes",))
    quota_medium: int = option(3, "boxes kept from the medium bucket (plus what small left over)", affects=("boxes",))
    quota_large: int = option(2, "boxes kept from the large bucket (plus what medium left over)", affects=("boxes",))
    max_boxes: int = option(10, "at most this many boxes per image", affects=("boxes",))
    label_synonyms: tuple[str, ...] = option(
        LABEL_SYNONYMS, "label groups treated as one when merging: 'canonical=syn1,syn2'", affects=("boxes",),
        metavar="GROUP",
    )

    def validate(self) -> None:
        for name in ("open_min_score", "closed_min_score", "merge_iou"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1]")
        if self.min_box_side < 0:
            raise ConfigError("--min-box-side must be >= 0 (pixels)")
        if not 0.0 < self.small_area <= self.large_area <= 1.0:
            raise ConfigError("need 0 < --small-area <= --large-area <= 1")
        if min(self.quota_small, self.quota_medium, self.quota_large, self.max_boxes) < 0:
            raise ConfigError("box quotas and --max-boxes must be >= 0")
        for group in self.label_synonyms:
            if "=" not in group:
                raise ConfigError(f"--label-synonyms entry {group!r} must read 'canonical=syn1,syn2'")


# --- caption quality control (engine/evidence/qc.py: its rules and patterns) ----------------------


@dataclass(frozen=True)
class QcConfig:
    TITLE: ClassVar[str] = "caption quality control"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, DEMO, META)

    qc_action: str = option(
        "auto",
        "what a failed quality-control rule does: drop the sample (to rejects/) or only flag it; "
        "auto: drop, but flag with --models tiny (whose captions are noise)",
        choices=("auto", "drop", "flag"), basic=True,
    )
    qc_rules: tuple[str, ...] = option(QC_RULES, "quality-control rules to run: " + ", ".join(QC_RULES), metavar="RULE")
    qc_flag_rules: tuple[str, ...] = option(
        (), "rules that only flag, even when --qc-action is drop", metavar="RULE",
    )
    qc_min_words: int = option(20, "rule 'short': captions with fewer words fail")
    qc_ngram: int = option(4, "rule 'repeated_ngrams': n-gram length, in words")
    qc_max_ngram_repeat_share: float = option(
        0.3, "rule 'repeated_ngrams': largest share of n-grams that may repeat an earlier one", metavar="SHARE",
    )
    qc_max_sentence_repeats: int = option(
        2, "rule 'repeated_sentences': most times one sentence may occur"
    )
    qc_scaffolding: tuple[str, ...] = option(
        QC_SCAFFOLDING,
        "rule 'scaffolding': regular expressions (case-insensitive) a caption must not match", metavar="REGEX",
    )

    def validate(self) -> None:
        unknown = sorted(set(self.qc_rules).union(self.qc_flag_rules) - set(QC_RULES))
        if unknown:
            raise ConfigError(f"unknown quality-control rule(s) {unknown}; known: {list(QC_RULES)}")
        if self.qc_min_words < 0 or self.qc_ngram < 1 or self.qc_max_sentence_repeats < 1:
            raise ConfigError("--qc-min-words >= 0, --qc-ngram >= 1, --qc-max-sentence-repeats >= 1")
        if not 0.0 <= self.qc_max_ngram_repeat_share <= 1.0:
            raise ConfigError("--qc-max-ngram-repeat-share must be within [0, 1]")
        for pattern in self.qc_scaffolding:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"--qc-scaffolding pattern {pattern!r}: {exc}") from None

    def for_models(self, models: str) -> QcConfig:
        """``auto`` settled for the run's models."""
        if self.qc_action != "auto":
            return self
        return dataclasses.replace(self, qc_action="flag" if models == "tiny" else "drop")

    def drops(self, rule: str) -> bool:
        return self.qc_action != "flag" and rule not in self.qc_flag_rules


# --- caption backends (models/caption/) -------------------------------------------------


@dataclass(frozen=True)
class ApiConfig:
    TITLE: ClassVar[str] = "OpenAI-compatible endpoint (--caption-backend openai)"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, META)

    api_base: str = option(
        "", "OpenAI-compatible endpoint for --caption-backend openai (e.g. http://host:8000/v1)", basic=True, metavar="URL",
    )
    api_model: str = option("", "model name the endpoint serves (e.g. gpt-4o)", basic=True, metavar="NAME")
    api_concurrency: int = option(16, "requests in flight at once")
    api_max_retries: int = option(6, "retries per request before the sample fails")
    api_timeout: float = option(120.0, "seconds to wait for one response", metavar="SECONDS")
    api_backoff: float = option(1.0, "first retry waits about this long (s), doubling each time", metavar="SECONDS")
    api_max_backoff: float = option(60.0, "longest wait before a retry, Retry-After included (s)", metavar="SECONDS")
    api_image_detail: str = option(
        "high", "image detail level sent with each image", choices=("auto", "low", "high")
    )
    api_jpeg_quality: int = option(90, "JPEG quality of the image sent")
    api_journal: bool = option(
        True, "keep finished captions in OUT/journal/ so a rerun of a killed run does not pay for them again"
    )

    def validate(self) -> None:
        if self.api_base and not self.api_base.startswith(("http://", "https://")):
            raise ConfigError(f"--api-base {self.api_base!r} must start with http:// or https://")
        if self.api_concurrency < 1 or self.api_max_retries < 0:
            raise ConfigError("--api-concurrency must be >= 1 and --api-max-retries >= 0")
        if self.api_timeout <= 0 or self.api_backoff < 0 or self.api_max_backoff < 0:
            raise ConfigError("--api-timeout must be > 0, --api-backoff/--api-max-backoff >= 0")
        if not 1 <= self.api_jpeg_quality <= 100:
            raise ConfigError("--api-jpeg-quality must be within 1..100")


@dataclass(frozen=True)
class SglangConfig:
    TITLE: ClassVar[str] = "SGLang (--caption-backend sglang)"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, META, PLAN)

    sglang_dp_size: int = option(0, "SGLang data-parallel replicas (0: one per visible GPU / tp)", basic=True)
    sglang_tp_size: int = option(1, "SGLang tensor-parallel GPUs per replica", basic=True)
    sglang_dummy_weights: bool = option(
        False, "load random weights of the checkpoint's shape (benchmarks: same cost as real)"
    )
    sglang_radix_cache: bool = option(True, "reuse the shared prompt prefix's KV cache")
    sglang_mem_fraction: float = option(
        0.0, "share of GPU memory for SGLang's weights and KV cache; 0 = what the experts placed on "
        "the same GPU leave, after a margin (see `densefusion_local.py plan`)", metavar="SHARE",
    )
    sglang_window: int = option(256, "caption requests kept in flight in the engine")
    sglang_max_total_tokens: int = option(
        0, "KV-cache pool in tokens (0: SGLang sizes it from --sglang-mem-fraction; 16384 on the CPU)", metavar="TOKENS",
    )

    def validate(self) -> None:
        if self.sglang_dp_size < 0 or self.sglang_tp_size < 1 or self.sglang_window < 1 \
                or self.sglang_max_total_tokens < 0:
            raise ConfigError("--sglang-dp-size >= 0, --sglang-tp-size >= 1, --sglang-window >= 1, "
                              "--sglang-max-total-tokens >= 0")
        if not 0.0 <= self.sglang_mem_fraction < 1.0:
            raise ConfigError("--sglang-mem-fraction must be within [0, 1) (0: from the placement)")


# --- meta-dataset mode (engine/stages/subset.py) ----------------------------------------


@dataclass(frozen=True)
class SubsetConfig:
    TITLE: ClassVar[str] = "seeded subset (meta)"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, META)

    subset_share: float = option(
        1.0, "caption only this seeded random share of the samples (meta dataset: 0.1 of 1M)", basic=True, metavar="SHARE",
    )
    subset_seed: int = option(0, "seed of the --subset-share draw (same seed, same samples)")

    def validate(self) -> None:
        if not 0.0 < self.subset_share <= 1.0:
            raise ConfigError("--subset-share must be within (0, 1]")


@dataclass(frozen=True)
class ScoreConfig:
    TITLE: ClassVar[str] = "coverage scores"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, DEMO, META)

    pos_tagger: str = option(
        "pattern", "part-of-speech tagger for the coverage scores: pattern (built in, offline) or "
        "spacy[:model] (an installed spaCy English pipeline)", metavar="TAGGER",
    )

    def validate(self) -> None:
        from engine.evidence.language import check_pos_tagger

        check_pos_tagger(self.pos_tagger)  # a missing spaCy pipeline fails here, before any work


@dataclass(frozen=True)
class ClusterConfig:
    """Running on a Ray cluster (engine/cluster/): shards leased to one worker actor per GPU."""
    TITLE: ClassVar[str] = "Ray cluster (--ray)"  # its group in --help
    COMMANDS: ClassVar[tuple[str, ...]] = (RUN, CURATE, META)


    ray: str = option(
        "",
        "run on a Ray cluster: its address (host:port or ray://...), or 'auto' ($RAY_ADDRESS, else a local "
        "cluster); --shards and --out must be on storage every node sees at the same path", basic=True, metavar="ADDRESS",
    )
    ray_max_attempts: int = option(
        3, "a shard whose worker died this many times with no other shard beside it is recorded as failed")
    ray_shards_in_flight: int = option(
        2,
        "shards each worker actor holds at once, so its pipeline reads the next while the last one drains "
        "(1: one at a time); a worker that dies holding several charges none of them an attempt and each "
        "is retried alone",
    )
    ray_actors: int = option(0, "worker actors (0: one per GPU of the cluster, by --ray-gpus-per-actor)")
    ray_gpus_per_actor: float = option(1.0, "GPUs each worker actor holds (0: CPU-only workers; then set --ray-actors)")
    ray_cpus_per_actor: float = option(1.0, "CPUs each worker actor reserves in Ray's accounting")
    ray_lease_timeout: float = option(
        0.0,
        "seconds a shard may take on one worker before it is given to another (0: no limit); the slow "
        "worker is no longer used, and whatever it commits later cannot replace the first commit", metavar="SECONDS",
    )
    ray_copy_stragglers: bool = option(
        True,
        "once no shard waits, give an idle worker a copy of the shard likely to finish last; the first commit "
        "stands and the run ends without waiting for the other (duplicated GPU work at the tail, no idle GPUs)",
    )

    def validate(self) -> None:
        if self.ray_max_attempts < 1 or self.ray_shards_in_flight < 1:
            raise ConfigError("--ray-max-attempts and --ray-shards-in-flight must be >= 1")
        if self.ray_actors < 0 or self.ray_gpus_per_actor < 0 or self.ray_cpus_per_actor < 0 or self.ray_lease_timeout < 0:
            raise ConfigError("--ray-actors, --ray-gpus-per-actor, --ray-cpus-per-actor and --ray-lease-timeout must be >= 0")
        if self.ray and self.ray_gpus_per_actor == 0 and self.ray_actors == 0:
            raise ConfigError("--ray-gpus-per-actor 0 (CPU-only workers) needs --ray-actors N")
        if self.ray:
            from importlib.util import find_spec

            if find_spec("ray") is None:
                raise ConfigError("--ray needs Ray: pip install 'densefusion[ray]'")


LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class OpsConfig:
    """Watching a long run: live Prometheus metrics, machine-readable events, the stall alarm
    (engine/ops/)."""

    metrics_port: int = option(
        0, "serve Prometheus metrics on this port of the driver (0: off); see README 'Watching a long run'")
    metrics_final_scrape_s: float = option(
        15.0, "with --metrics-port: after the run, keep serving until one scrape has read the final "
        "figures, at most this many seconds (0: exit at once)")
    log_format: str = option(
        "text", "text, or json: one JSON object per event (shard committed or failed, replica retired, stall, "
        "interrupted) with run id, node and shard", choices=LOG_FORMATS)
    log_file: str = option("", "--log-format json: append the events to this file (empty: stderr)")
    stall_seconds: float = option(
        600.0, "when no sample finishes for this long, log the stage and replica that hold the oldest "
        "item, and show it in the metrics (0: off)")

    def validate(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("--metrics-port must be a TCP port (1-65535), or 0 for no metrics endpoint")
        if self.metrics_final_scrape_s < 0 or self.stall_seconds < 0:
            raise ConfigError("--metrics-final-scrape-s and --stall-seconds must be >= 0")
        if self.log_file and self.log_format != "json":
            raise ConfigError("--log-file takes the JSON events: add --log-format json")
        if self.metrics_port:
            from importlib.util import find_spec

            if find_spec("prometheus_client") is None:
                raise ConfigError("--metrics-port needs prometheus_client: pip install prometheus_client")


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of one run; sections are passed down, never re-spread."""

    input: InputConfig = InputConfig()
    filter: FilterConfig = FilterConfig()
    decode: DecodeConfig = DecodeConfig()
    ocr: OcrConfig = OcrConfig()
    prompt: PromptConfig = PromptConfig()
    caption: CaptionConfig = CaptionConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    curate: CurateConfig = CurateConfig()
    experts: ExpertsConfig = ExpertsConfig()
    boxes: FusionConfig = FusionConfig()
    qc: QcConfig = QcConfig()
    api: ApiConfig = ApiConfig()
    sglang: SglangConfig = SglangConfig()
    subset: SubsetConfig = SubsetConfig()
    score: ScoreConfig = ScoreConfig()
    cluster: ClusterConfig = ClusterConfig()
    ops: OpsConfig = OpsConfig()
    # (name, section) of each expert plugin's own section (engine/core/registry.py), built like the
    # others from flags and YAML; read with ``section(name)``
    plugin_sections: tuple[tuple[str, Any], ...] = ()

    def section(self, name: str) -> Any:
        """A section by name: a plugin's, or a built-in one."""
        return dict(self.plugin_sections)[name] if name in dict(self.plugin_sections) else getattr(self, name)

    def sections(self) -> list[tuple[str, Any]]:
        """(name, section) of every section, the plugins' after the built-in ones."""
        return [(f.name, getattr(self, f.name)) for f in _builtin_fields(RunConfig)] + list(self.plugin_sections)

    def validate(self) -> RunConfig:
        for _, section in self.sections():
            section.validate()
        if self.curate.curate:
            check_folder_output(self.runtime.out, CURATION_NEEDS_A_FOLDER)
        for section, f in model_options().values():  # before any pass starts (pass 2 builds after pass 1)
            check_tiny_swap(f, getattr(self.section(section), f.name), self.runtime.models)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(section) for name, section in self.sections()}


def _builtin_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name != "plugin_sections"]


def plugin_section_classes() -> list[tuple[str, type]]:
    """(name, section class) of the optional experts (in-tree and plugins) that own a config section."""
    from engine.core.registry import plugin_specs

    return [spec.options for spec in plugin_specs() if spec.options is not None]


def model_options() -> dict[str, tuple[str, dataclasses.Field]]:
    """role -> (section, field) of the option that names its model (``option(model=role)``)."""
    return {f.metadata["model"]: (name, f) for name, section_cls in _sections()
            for f in dataclasses.fields(section_cls) if f.metadata.get("model")}


def check_tiny_swap(f: dataclasses.Field, name: str, models: str) -> None:
    """A model option set to another model than its default contradicts ``--models tiny``:
    refused, not silently replaced (engine/core/models.py says why)."""
    if models == "tiny" and name not in (f.default, "tiny", ""):
        raise ConfigError(
            f"{flag_name(f)} {name} contradicts --models tiny (which replaces every model with a "
            f"random-weight tiny one): leave out --models tiny to run {name}, or leave out {flag_name(f)}"
        )


def options_affecting(cfg: RunConfig, output: str) -> dict[str, Any]:
    """The options whose fields declare that they change ``output`` (``option(affects=...)``),
    as ``section.field: value``: what keys the cached ``output`` of an expert."""
    return {
        f"{name}.{f.name}": getattr(section, f.name)
        for name, section in cfg.sections()
        for f in dataclasses.fields(section)
        if {output, EVERY_OUTPUT} & set(f.metadata.get("affects") or ())
    }


# --- deriving the CLI and YAML from the dataclasses -------------------------------------


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _sections(cls=RunConfig):
    """(name, section class) of ``cls``'s sections; a RunConfig's plugin sections last."""
    hints = typing.get_type_hints(cls)
    for f in _builtin_fields(cls):
        yield f.name, hints[f.name]
    if cls is RunConfig:
        yield from plugin_section_classes()


def applies_to(section_cls, f: dataclasses.Field) -> tuple[str, ...] | None:
    """The commands an option applies to (its own ``commands``, else its section's); None: all."""
    return f.metadata.get("commands") or getattr(section_cls, "COMMANDS", None)


def option_commands(cls=RunConfig) -> dict[str, tuple[str, ...]]:
    """flag -> the commands it applies to, for every option of ``cls``."""
    return {flag_name(f): applies_to(section_cls, f) or ALL_COMMANDS
            for _, section_cls in _sections(cls) for f in dataclasses.fields(section_cls)}


def add_arguments(parser: argparse.ArgumentParser, cls=RunConfig, command: str | None = None) -> None:
    """Add one flag per config field, grouped by section; defaults stay in the dataclass.

    With ``command``: only the options that apply to it, and those not ``basic`` with their help
    kept aside as ``action.full_help`` (``--help-all`` shows them)."""
    seen: set[str] = set()
    for section_name, section_cls in _sections(cls):
        group = parser.add_argument_group(getattr(section_cls, "TITLE", section_name))
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            flag = flag_name(f)
            if flag in seen:
                raise TypeError(f"duplicate config flag {flag}")
            seen.add(flag)
            if command and command not in (applies_to(section_cls, f) or (command,)):
                continue
            kind = hints[f.name]
            help_text = f.metadata.get("help", "")
            if "default" not in help_text and f.default not in ("", ()):  # the help says it better, or
                # nothing is the default (an option that is off, or required like --out)
                help_text += f" (default: {_show(f.default)})"
            kwargs: dict[str, Any] = {"dest": f"{section_name}.{f.name}", "default": argparse.SUPPRESS,
                                      "help": help_text}
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                item = typing.get_args(kind)[0] if _is_tuple(kind) else kind
                kwargs["type"] = item
                if _is_tuple(kind):
                    kwargs["nargs"] = "+"
                if f.metadata.get("choices"):
                    kwargs["choices"] = f.metadata["choices"]
                else:
                    kwargs["metavar"] = f.metadata.get("metavar") or _placeholder(f, item)
            action = group.add_argument(flag, **kwargs)
            if command and not f.metadata.get("basic"):
                action.full_help, action.help = action.help, argparse.SUPPRESS


def _placeholder(f: dataclasses.Field, kind) -> str:
    if f.metadata.get("model"):
        return "MODEL"
    return {int: "N", float: "X"}.get(kind, "TEXT")


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
    sections = {name: _make(section_cls, values[name], name) for name, section_cls in _sections(cls)}
    if cls is RunConfig:
        plugins = tuple((name, sections.pop(name)) for name, _ in plugin_section_classes())
        return cls(**sections, plugin_sections=plugins).validate()
    return cls(**sections).validate()


def _make(section_cls, values: dict[str, Any], name: str):
    hints = typing.get_type_hints(section_cls)
    known = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown option(s) in section {name!r}: {sorted(unknown)}")
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(section_cls)}
    coerced = {}
    for key, value in values.items():
        kind = hints[key]
        try:
            coerced[key] = _coerce(value, kind)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}.{key}: {value!r} is not a valid {kind}: {exc}") from None
        # argparse checks choices on the CLI; YAML values and overrides are checked here
        if choices[key] and coerced[key] not in choices[key]:
            raise ConfigError(f"{name}.{key}: {value!r} is not one of {', '.join(map(str, choices[key]))}")
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
