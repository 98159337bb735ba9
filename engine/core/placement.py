"""Placement: which device runs which stage replica, and what each GPU's memory must hold.

One process per node. Every stage that declares ``replicate`` (engine/core/registry.py: the
model-backed experts) runs one replica per GPU (``--replica-devices`` picks a subset, or CPU
"devices" for tests); the runtime feeds the replicas batches as they free up. The stage that
declares ``rest`` (the caption engine) takes what they leave of each GPU: its own processes
(SGLang's data-parallel workers), or a runtime replica. A stage that declares memory but does not
replicate (decode) stays on the run's device (GPU 0): one decoder fills every replica's queue.
This module reads the stages' declarations only; each stage module says what its models need.

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

from engine.core.config import RunConfig
from engine.core.registry import StageSpec, stage_specs
from models.errors import ConfigError

GIB = 1024**3
CUDA_CONTEXT = int(0.5 * GIB)  # per process per GPU (ours, and SGLang's worker): CUDA/cuBLAS state
SGLANG_RUNTIME = 2 * GIB  # SGLang outside its static pool: prefill activations, CUDA graphs (estimate)
MARGIN_SHARE, MARGIN_MIN = 0.10, 1 * GIB  # allocator fragmentation and estimate error
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
    """The engine that takes the rest of each GPU (the caption engine), per GPU: weights, and the
    KV cache one request needs (estimates). ``own_processes``: it runs in processes of its own (one
    more CUDA context per GPU, a runtime outside its pool) and sizes its pool by a share of the GPU."""

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
    own_processes: bool = False

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


def replicated(stages: list[StageSpec]) -> list[StageSpec]:
    """The stages with a memory need on every GPU: one replica each."""
    return [spec for spec in stages if spec.memory and spec.replicate is True]


def make_plan(cfg: RunConfig, stages: list[str], gpus: int, gpu_bytes: int, *, node: bool = False) -> Plan:
    """One replica of each replicated stage of ``stages`` and of the one that takes the rest (the
    caption engine) on each of ``gpus`` GPUs of ``gpu_bytes``; the other stages' needs on GPU 0.
    ``node``: for this node's GPUs (the rest-taker settles its choices, like a backend, for them)."""
    if gpus < 1 or gpu_bytes <= 0:
        raise ConfigError("plan: --gpus must be >= 1 and --gpu-memory-gb > 0")
    specs = stage_specs()
    chosen = [specs[name] for name in stages]
    everywhere = replicated(chosen)
    needs = [need for spec in everywhere for need in spec.memory(cfg)]
    first = [need for spec in chosen if spec.memory and spec not in everywhere for need in spec.memory(cfg)]
    caption = next((spec.rest(cfg, node) for spec in chosen if spec.rest), None)
    sglang = caption is not None and caption.own_processes
    budgets, problems = [], {}
    for gpu in range(gpus):
        experts = tuple(needs + (first if gpu == 0 else []))
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
    return Plan(gpus, gpu_bytes, tuple(spec.name for spec in everywhere), tuple(budgets), caption,
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
            how = "" if caption.own_processes else "--caption-backend sglang "
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

    if not cfg.runtime.device.startswith("cuda") or not torch.cuda.is_available():
        return None
    devices = [d for d in replica_devices(cfg) if d.startswith("cuda")] or [cfg.runtime.device]
    gpu_bytes = min(torch.cuda.get_device_properties(d).total_memory for d in devices)
    return make_plan(cfg, list(stages), len(devices), gpu_bytes, node=True)


def check_fits(plan: Plan | None) -> None:
    if plan is not None and not plan.fits:
        raise ConfigError("the models do not fit this node's GPUs: " + "; ".join(plan.problems)
                          + " (see `densefusion_local.py plan`: fewer or smaller experts, smaller batches)")


def rest_fraction(cfg: RunConfig, stages: tuple[str, ...]) -> float:
    """The share of each GPU the experts leave the engine that takes the rest, on the tightest GPU
    (:func:`make_plan`); SGLang's old fixed share without a GPU."""
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


def vit_activations(batch: int, tokens: int, hidden: int, heads: int = 0, span: int = 0) -> int:
    """Estimate, float16: one transformer layer's live tensors at inference (q, k, v, output, a
    4x MLP, the residual: ~12 x hidden per token), plus its attention scores (heads x tokens x
    span) where attention is not a fused kernel (SDPA keeps no score matrix)."""
    return batch * 2 * (12 * tokens * hidden + heads * tokens * span)


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


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

