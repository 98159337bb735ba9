"""Placement: which device runs which stage replica, and what each GPU's memory must hold.

One process per node. Every model-backed expert stage (``REPLICATED``) runs one replica per
GPU (``--replica-devices`` picks a subset, or CPU "devices" for tests); the runtime feeds the
replicas batches as they free up. The caption engine runs one replica per GPU too: SGLang's
data-parallel workers (their own processes), or, on the transformers backend, a runtime replica.
Decode stays on the run's device (GPU 0): one decoder fills every replica's queue.

The budget per GPU is computed without a GPU and without weights: parameter counts come from
architectures built on PyTorch's ``meta`` device (shapes only, nothing allocated) or from the
ONNX files' sizes; activations and the caption engine's KV cache are *estimates* from the
models' shapes and batch sizes, and are labelled so. SGLang's ``mem_fraction_static`` (weights
+ KV cache, fixed at start) is what the experts on the same GPU leave, after a margin.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

from engine.core.config import RunConfig
from engine.core.errors import ConfigError

REPLICATED = ("category", "tag", "detect", "ocr")  # model-backed experts: one replica per device
GIB = 1024**3
CUDA_CONTEXT = int(0.5 * GIB)  # per process per GPU (ours, and SGLang's worker): CUDA/cuBLAS state
SGLANG_RUNTIME = 2 * GIB  # SGLang outside its static pool: prefill activations, CUDA graphs (estimate)
MARGIN_SHARE, MARGIN_MIN = 0.10, 1 * GIB  # allocator fragmentation and estimate error
TEXT_TOKENS = 400  # fusion prompt text (instruction, alt text, boxes, OCR) in LLaVA tokens (estimate)
FALLBACK_FRACTION = 0.85  # SGLang's fraction when no GPU is visible (CPU engine, tests)


@dataclass(frozen=True)
class Need:
    """One replica's memory on its device."""

    stage: str
    model: str
    params: int
    weight_bytes: int
    activation_bytes: int  # estimate
    source: str  # where the parameter count came from
    leave_out: str = ""  # the flags that run without it (a plan that does not fit suggests them)

    @property
    def total(self) -> int:
        return self.weight_bytes + self.activation_bytes


@dataclass(frozen=True)
class CaptionNeed:
    """The caption engine per GPU: weights, and the KV cache one request needs (estimates)."""

    model: str
    backend: str
    params: int
    weight_bytes: int
    kv_bytes_per_token: int
    tokens_per_request: int
    min_requests: int  # the KV cache must hold at least this many requests at once
    source: str
    tp: int = 1  # GPUs one replica spans (SGLang tensor parallel): weights and KV heads split over them
    kv_heads: int = 1

    @property
    def weight_bytes_per_gpu(self) -> int:
        return math.ceil(self.weight_bytes / self.tp)

    @property
    def kv_bytes_per_token_per_gpu(self) -> int:
        return math.ceil(self.kv_bytes_per_token / min(self.tp, self.kv_heads))  # fewer heads than GPUs: copies

    def bytes_per_gpu(self, requests: int) -> int:
        return self.weight_bytes_per_gpu + self.kv_bytes_per_token_per_gpu * self.tokens_per_request * requests

    @property
    def min_bytes(self) -> int:
        """On each GPU it spans."""
        return self.bytes_per_gpu(self.min_requests)

    def requests_in(self, room: int) -> int:
        """How many requests' KV cache fit in ``room`` bytes per GPU beside the weights."""
        return max(0, room - self.weight_bytes_per_gpu) // (self.kv_bytes_per_token_per_gpu * self.tokens_per_request)


@dataclass(frozen=True)
class GpuBudget:
    device: str
    total: int
    experts: tuple[Need, ...]
    overhead: int  # CUDA contexts (+ SGLang's runtime share outside its pool)
    margin: int
    caption_bytes: int  # what is left for the caption engine's weights + KV cache

    @property
    def experts_bytes(self) -> int:
        return sum(n.total for n in self.experts)


@dataclass(frozen=True)
class Plan:
    gpus: int
    gpu_bytes: int
    replicated: tuple[str, ...]
    budgets: tuple[GpuBudget, ...]
    caption: CaptionNeed | None
    sglang_mem_fraction: float | None
    problems: tuple[str, ...]
    suggestions: tuple[str, ...] = ()  # what would make a plan that does not fit fit

    @property
    def fits(self) -> bool:
        return not self.problems


# --- the plan -----------------------------------------------------------------------------------


def make_plan(cfg: RunConfig, stages: list[str], gpus: int, gpu_bytes: int) -> Plan:
    """One replica of each expert of ``stages`` and of the caption engine on each of ``gpus``
    GPUs of ``gpu_bytes``; decode on GPU 0."""
    if gpus < 1 or gpu_bytes <= 0:
        raise ConfigError("plan: --gpus must be >= 1 and --gpu-memory-gb > 0")
    needs = [need for name in stages if name in REPLICATED for need in stage_needs(cfg, name)]
    decode = decode_need(cfg) if "decode" in stages else None
    caption = caption_need(cfg) if "caption" in stages else None
    sglang = caption is not None and caption.backend == "sglang"
    budgets, problems = [], {}
    for gpu in range(gpus):
        experts = tuple(needs + ([decode] if decode and gpu == 0 else []))
        used = sum(n.total for n in experts)
        overhead = CUDA_CONTEXT * (2 if sglang else 1) + (SGLANG_RUNTIME if sglang else 0)
        margin = max(MARGIN_MIN, int(MARGIN_SHARE * (used + overhead)))
        left = gpu_bytes - used - overhead - margin
        budgets.append(GpuBudget(f"cuda:{gpu}", gpu_bytes, experts, overhead, margin, left))
        if caption is not None and left < caption.min_bytes:
            per_gpu = f" per GPU of its {caption.tp}" if caption.tp > 1 else ""
            problems.setdefault(
                f"the caption engine needs {_gb(caption.min_bytes)}{per_gpu} (weights {_gb(caption.weight_bytes_per_gpu)} "
                f"+ KV cache for {caption.min_requests} requests of ~{caption.tokens_per_request} tokens, estimate) "
                f"but the experts leave {_gb(max(left, 0))}", []).append(f"cuda:{gpu}")
        elif caption is None and left < 0:
            problems.setdefault(f"the experts need {_gb(used + overhead + margin)} of {_gb(gpu_bytes)}",
                                []).append(f"cuda:{gpu}")
    found = [f"{' '.join(devices)}: {message}" for message, devices in problems.items()]
    if caption is not None and caption.tp > 1 and gpus % caption.tp:
        found.append(f"--sglang-tp-size {caption.tp}: a replica spans {caption.tp} GPUs, so the node needs a multiple "
                     f"of {caption.tp} GPUs, not {gpus}")
    fraction = None
    if sglang:
        tightest = min(b.caption_bytes for b in budgets)
        fraction = math.floor(100 * max(tightest, 0) / gpu_bytes) / 100
    return Plan(gpus, gpu_bytes, tuple(n for n in stages if n in REPLICATED), tuple(budgets), caption,
                fraction, tuple(found), tuple(_suggestions(caption, budgets, gpus)) if found else ())


def _suggestions(caption: CaptionNeed | None, budgets: list[GpuBudget], gpus: int) -> list[str]:
    """The levers that make room on the tightest GPU, each with what it gives (and whether that is
    enough on its own): tensor parallel, fewer requests at once, fewer experts per GPU."""
    room = min(b.caption_bytes for b in budgets)  # the tightest GPU's, for the caption engine
    needed = caption.min_bytes if caption is not None else 0
    found = []

    def enough(ok: bool) -> str:
        return " — enough on its own" if ok else ""

    if caption is not None:
        splits = [dataclasses.replace(caption, tp=tp) for tp in (2, 4, 8) if caption.tp < tp <= gpus and gpus % tp == 0]
        split = next((c for c in splits if c.min_bytes <= room), splits[-1] if splits else None)
        if split is not None:
            how = "" if caption.backend == "sglang" else "--caption-backend sglang "
            found.append(f"{how}--sglang-tp-size {split.tp}: each caption replica spans {split.tp} GPUs, weights and KV "
                         f"cache split over them: {_gb(split.min_bytes)} per GPU instead of {_gb(caption.min_bytes)}"
                         + enough(split.min_bytes <= room))
        requests = caption.requests_in(room)
        if 1 <= requests < caption.min_requests:
            found.append(f"--caption-batch {requests}: KV cache for {requests} requests at once instead of "
                         f"{caption.min_requests} (fewer captions per second){enough(True)}")
    freed, left_out = 0, []
    for need in sorted((n for n in budgets[0].experts if n.leave_out), key=lambda n: n.total, reverse=True):
        if room + freed >= needed:
            break
        freed += need.total  # the largest first, until the tightest GPU has room
        left_out.append(need)
    if left_out:
        found.append("fewer experts per GPU: " + "; ".join(f"{n.leave_out} (frees {_gb(n.total)}, {n.model})"
                                                           for n in left_out) + enough(room + freed >= needed))
    return found


@functools.lru_cache(maxsize=4)
def node_plan(cfg: RunConfig, stages: tuple[str, ...]) -> Plan | None:
    """The plan for this node's visible GPUs (the replica devices'), None without a GPU."""
    import torch

    from models.caption.registry import resolve_backend

    if not cfg.runtime.device.startswith("cuda") or not torch.cuda.is_available():
        return None
    captioning = cfg.caption
    backend = resolve_backend(captioning.caption_backend, cfg.runtime.device, captioning.caption_model) \
        if "caption" in stages else "auto"
    cfg = dataclasses.replace(cfg, caption=dataclasses.replace(cfg.caption, caption_backend=backend))
    devices = [d for d in replica_devices(cfg) if d.startswith("cuda")] or [cfg.runtime.device]
    gpu_bytes = min(torch.cuda.get_device_properties(d).total_memory for d in devices)
    return make_plan(cfg, list(stages), len(devices), gpu_bytes)


def check_fits(plan: Plan | None) -> None:
    if plan is not None and not plan.fits:
        raise ConfigError("the models do not fit this node's GPUs: " + "; ".join(plan.problems)
                          + " (see `densefusion_local.py plan`: fewer or smaller experts, smaller batches)")


def sglang_mem_fraction(cfg: RunConfig, stages: tuple[str, ...]) -> float:
    """``--sglang-mem-fraction`` settled: the option when set, else what the experts on the
    tightest GPU leave (:func:`make_plan`); SGLang's old fixed share without a GPU."""
    if cfg.sglang.sglang_mem_fraction:
        return cfg.sglang.sglang_mem_fraction
    plan = node_plan(cfg, stages)
    if plan is None:
        return FALLBACK_FRACTION
    check_fits(plan)
    return plan.sglang_mem_fraction


def replica_devices(cfg: RunConfig) -> list[str]:
    """Where the replicas of a model-backed stage go: ``--replica-devices``, else every visible
    GPU for a run on ``cuda``, else the run's one device."""
    if cfg.runtime.replica_devices:
        devices = list(cfg.runtime.replica_devices)
        gpus = [d for d in devices if d.startswith("cuda")]
        if gpus:
            import torch

            visible = torch.cuda.device_count()
            for device in gpus:
                index = int(device.partition(":")[2] or 0)
                if index >= visible:
                    raise ConfigError(f"--replica-devices {device}: {visible} GPU(s) visible")
        return devices
    if cfg.runtime.device == "cuda":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [cfg.runtime.device]


def on_device(cfg: RunConfig, device: str) -> RunConfig:
    """``cfg`` for one replica: the run's device set to ``device``."""
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, device=device))


# --- what each model needs --------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)  # meta-device builds take seconds (imports); plans for several GPU sizes share them
def stage_needs(cfg: RunConfig, stage: str) -> tuple[Need, ...]:
    experts = cfg.experts
    if stage == "category":
        return (embedder_need(cfg.curate.embed_model, cfg.curate.embed_batch),)
    if stage == "tag":  # the clip tagger loads its own copy of the embedding model (its text tower too)
        return (ram_plus_need(experts.tag_batch),) if experts.tagger == "ram_plus" else \
            (dataclasses.replace(embedder_need(cfg.curate.embed_model, experts.tag_batch), stage="tag", leave_out=""),)
    if stage == "detect":
        found = [owlv2_need(experts.owlv2_model, experts.detect_batch)] if experts.owlv2_model else []
        if experts.closed_detector:
            found.append(closed_detector_need(experts.closed_detector, experts.detect_batch))
        return tuple(found)
    if stage == "ocr":
        return (ocr_need(cfg),)
    return ()


def vit_activations(batch: int, tokens: int, hidden: int, heads: int = 0, span: int = 0) -> int:
    """Estimate, float16: one transformer layer's live tensors at inference (q, k, v, output, a
    4x MLP, the residual: ~12 x hidden per token), plus its attention scores (heads x tokens x
    span) where attention is not a fused kernel (SDPA keeps no score matrix)."""
    return batch * 2 * (12 * tokens * hidden + heads * tokens * span)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def embedder_need(model: str, batch: int) -> Need:
    import torch

    try:
        import open_clip
    except ImportError:
        raise ConfigError("plan: counting the embedder's parameters needs open_clip (pip install open_clip_torch)") from None
    config_file = Path(model) / "open_clip_config.json"
    name = model
    if config_file.is_file():
        open_clip.add_model_config(str(config_file))
        name = config_file.stem
    if open_clip.get_model_config(name) is None:
        raise ConfigError(f"plan: --embed-model {model} is neither an open_clip architecture nor a folder with "
                          f"open_clip_config.json")
    from models.embedder import random_weights_meant

    with torch.device("meta"), random_weights_meant():
        net = open_clip.create_model(name, pretrained=None, device="meta")
    vision = open_clip.get_model_config(name)["vision_cfg"]
    trunk = getattr(net.visual, "trunk", None)
    if trunk is not None:  # timm towers (EVA02)
        tokens, hidden = trunk.patch_embed.num_patches + 1, trunk.embed_dim
    else:
        side, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
        tokens, hidden = (side // patch) ** 2 + 1, vision.get("width", 1024)
    return Need("category", f"{model} (open_clip)", _count(net), 2 * _count(net),
                vit_activations(batch, tokens, hidden), "meta-device architecture",
                "--stages without category")


def ram_plus_need(batch: int) -> Need:
    import torch

    from models.ram_plus import RamPlus, RamPlusConfig

    config = RamPlusConfig()  # the released Swin-L 384 (a checkpoint loads strictly into it)
    with torch.device("meta"):
        net = RamPlus(config, [f"tag {i}" for i in range(config.num_classes)])
    stage1 = (config.image_size // 4) ** 2  # Swin's largest activations: stage 1, windows of 12x12
    return Need("tag", "RAM++ Swin-L 384", _count(net), 2 * _count(net),
                vit_activations(batch, stage1, config.embed_dim, config.num_heads[0], config.window_size**2),
                "meta-device architecture")  # the paper's tagger: the clip tagger loads an embedder instead


def owlv2_need(model: str, batch: int) -> Need:
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    config, source = _hf_config(model, Owlv2Config, KNOWN_OWLV2)
    with torch.device("meta"):
        net = Owlv2ForObjectDetection(config)
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return Need("detect", f"OWLv2 {Path(model).name} ({vision.image_size} px)", _count(net), 2 * _count(net),
                vit_activations(batch, tokens, vision.hidden_size), source, "--owlv2-model ''")


def closed_detector_need(model: str, batch: int) -> Need:
    path = Path(model)
    if model.endswith(".onnx"):
        if path.is_file():
            params = path.stat().st_size // 4  # float32 export
            source = "ONNX file size; float16 on TensorRT"
        else:  # the paper's EVA02-L detector: a ViT-L backbone at 1024 px with a detection head
            params, source = 400_000_000, "assumed: ViT-L detector, 0.4B parameters (file not found here)"
        return Need("detect", f"closed-set {path.name}", params, 2 * params,
                    vit_activations(batch, 64 * 64, 1024, 16, 14 * 14), source, "--closed-detector ''")
    import torch
    from transformers import AutoConfig, AutoModelForObjectDetection

    if not (path / "config.json").is_file():
        raise ConfigError(f"plan: --closed-detector {model}: a local folder with config.json or an .onnx file")
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        net = AutoModelForObjectDetection.from_config(config)
    return Need("detect", f"closed-set {path.name}", _count(net), 2 * _count(net),
                batch * 2 * 1333 * 800 * 256 // 16,  # estimate: stride-4 feature maps, 256 channels
                "config.json", "--closed-detector ''")


def ocr_need(cfg: RunConfig) -> Need:
    from engine.stages.ocr import ocr_settings
    from models.ocr import _model_folder, _one_onnx

    folder = _model_folder(ocr_settings(cfg.ocr))
    size = sum(_one_onnx(folder, task).stat().st_size for task in ("det", "rec"))
    side, batch = cfg.ocr.ocr_det_side, cfg.ocr.ocr_det_batch or 8
    # estimate: DB's largest maps are 64 channels at stride 4... over the padded batch, float32
    activations = batch * 4 * 64 * side * side * 3 // 4 // 16
    return Need("ocr", "PP-OCR det + rec (ONNX Runtime)", size // 4, size, activations, "ONNX file size",
                "--stages without ocr")


def decode_need(cfg: RunConfig) -> Need:
    """GPU JPEG decode (DALI or nvJPEG) on GPU 0: a batch of decoded originals (~4 MP) and its views."""
    batch = cfg.decode.decode_batch
    return Need("decode", "nvJPEG / DALI", 0, 0, batch * 4_000_000 * 3 * 2, "none: no weights")


KNOWN_OWLV2 = {  # hub ids the plan knows without a download: their config.json's sizes
    "google/owlv2-base-patch16-ensemble": {"vision_config": {"image_size": 960}},
    "google/owlv2-base-patch16": {"vision_config": {"image_size": 960}},
    "google/owlv2-large-patch14-ensemble": {
        "projection_dim": 768,
        "vision_config": {"image_size": 1008, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16},
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
    },
}


def _hf_config(model: str, config_class, known: dict):
    """A transformers config: the folder's config.json, else a hub id this module knows."""
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return config_class.from_pretrained(path), "config.json"
    if model in known:
        overrides = known[model]
        base = config_class()
        data = base.to_dict()
        for key, value in overrides.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        return config_class.from_dict(data), f"known config of {model}"
    raise ConfigError(f"plan: {model} is neither a local folder with config.json nor a model the plan knows "
                      f"({', '.join(known)}): pass a local folder")


@functools.lru_cache(maxsize=8)
def caption_need(cfg: RunConfig) -> CaptionNeed:
    """The caption engine's weights, KV cache per token and longest request, for its family
    (models/caption/families.py): image tokens at the checkpoint's own image budget."""
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText

    from models.caption.families import LLAVA_1_6, family_of_folder
    from models.tiny import LLAVA_NEXT_7B, llava_next_parts

    model = cfg.caption.caption_model
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        family = family_of_folder(path, model)
        config, source, folder = getattr(transformers, family.hf_config).from_pretrained(path), "config.json", path
    elif model.startswith("llava-hf/llava-v1.6-") and "7b" in model:
        family, config, source, folder = LLAVA_1_6, llava_next_parts(LLAVA_NEXT_7B)[0], f"known config of {model}", None
    else:
        raise ConfigError(f"plan: --caption-model {model}: pass a local folder with config.json")
    with torch.device("meta"):
        net = AutoModelForImageTextToText.from_config(config)
    text = config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * 2  # K and V, bfloat16
    image_tokens = family.max_image_tokens(config, folder)
    backend = cfg.caption.caption_backend
    if backend == "auto":  # the card's engine on a GPU node, for a family SGLang serves
        backend = "transformers" if family.sglang_refusal else "sglang"
    tp = cfg.sglang.sglang_tp_size if backend == "sglang" else 1  # transformers: one GPU per replica
    return CaptionNeed(f"{model} ({backend})", backend, _count(net), 2 * _count(net), kv_per_token,
                       image_tokens + TEXT_TOKENS + cfg.caption.max_new_tokens, cfg.caption.caption_batch, source,
                       tp, kv_heads)


# --- printing -------------------------------------------------------------------------------------


def _gb(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def format_plan(plan: Plan) -> str:
    caption = plan.caption
    share = f", and a 1/{caption.tp} share of a caption replica (tensor parallel)" if caption and caption.tp > 1 \
        else ", and of the caption engine" if caption else ""
    lines = [f"plan: {plan.gpus} GPU(s) of {_gb(plan.gpu_bytes)}; one replica of each of "
             f"{', '.join(plan.replicated) or 'no expert'} per GPU" + share]
    groups: dict[tuple, list[GpuBudget]] = {}
    for budget in plan.budgets:
        groups.setdefault(tuple(n.stage for n in budget.experts), []).append(budget)
    for members in groups.values():
        budget = members[0]
        names = budget.device if len(members) == 1 else f"{members[0].device}..{members[-1].device} (each)"
        lines.append(f"  {names}:")
        for need in budget.experts:
            lines.append(f"    {need.stage:<9} {need.model:<44} {need.params / 1e6:8.0f}M params  weights "
                         f"{_gb(need.weight_bytes):>9}  activations {_gb(need.activation_bytes):>9} (estimate)  "
                         f"[{need.source}]")
        overhead = "CUDA contexts" + (", SGLang runtime (estimate)" if plan.sglang_mem_fraction is not None else "")
        lines.append(f"    {'':<9} {overhead:<44} {_gb(budget.overhead):>24}")
        lines.append(f"    {'':<9} {'margin (fragmentation, estimate error)':<44} {_gb(budget.margin):>24}")
        lines.append(f"    {'':<9} {'left for the caption engine':<44} {_gb(max(budget.caption_bytes, 0)):>24}")
    if caption is not None:
        room = min(b.caption_bytes for b in plan.budgets)
        kv_tokens = max(0, room - caption.weight_bytes_per_gpu) // caption.kv_bytes_per_token_per_gpu
        split = (f", tensor parallel over {caption.tp} GPUs ({plan.gpus // caption.tp} replica(s)): weights "
                 f"{_gb(caption.weight_bytes_per_gpu)} and KV cache {caption.kv_bytes_per_token_per_gpu / 2**20:.2f} "
                 f"MiB/token per GPU") if caption.tp > 1 else ""
        lines.append(f"  caption  {caption.model}: {caption.params / 1e9:.2f}B params, weights {_gb(caption.weight_bytes)} "
                     f"[{caption.source}]; KV cache {caption.kv_bytes_per_token / 2**20:.2f} MiB/token, "
                     f"~{caption.tokens_per_request} tokens/request (estimate){split}")
        lines.append(f"  KV cache room per {'replica' if caption.tp > 1 else 'GPU'}: {kv_tokens:,} tokens = "
                     f"~{caption.requests_in(room)} requests at once (estimate; at least {caption.min_requests} needed)")
    if plan.sglang_mem_fraction is not None and plan.fits:
        lines.append(f"  --sglang-mem-fraction {plan.sglang_mem_fraction:.2f} (SGLang's weights + KV cache; the rest "
                     f"holds the experts)")
    if plan.fits:
        lines.append("fits.")
    else:
        lines += ["DOES NOT FIT:", *(f"  {p}" for p in plan.problems)]
        if plan.suggestions:
            lines += ["to make room:", *(f"  {s}" for s in plan.suggestions)]
    return "\n".join(lines)

