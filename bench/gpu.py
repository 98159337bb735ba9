"""The GPU paths at real size with random weights in one command (images/s per GPU, memory,
utilisation), the caption rows against the roofline and the experts against the caption engine.

Runs on a bare GPU machine from the source tree (``PYTHONPATH=. python -m bench gpu``) with
nothing but torch with CUDA, Triton, torchvision and transformers (possibly older; no
open_clip, timm, SGLang, TensorRT, DALI, faiss or onnxruntime-gpu, no pip, no network). Every
model is built with random weights (they cost what real ones cost) from torch/transformers or
this repository's own code; where the production model needs a missing library, a stand-in of
the same size is measured and the table says so:

- embed: EVA02-L-14's image tower needs open_clip/timm; CLIP ViT-L/14 (transformers: same
  width, depth, patch and input size, 304M parameters) stands in, JPEG decode (nvJPEG) included;
- tag: RAM++ Swin-L 384 (models/ram_plus.py, our own torch code); detect: OWLv2 base at 960 px
  (transformers) and, for the closed-set detector (the paper's EVA02-L detector is not
  buildable here), DETR-ResNet-50 (transformers);
- OCR: the batched PP-OCR backend on ONNX Runtime's CUDA provider when onnxruntime-gpu and the
  rapidocr models are there; on the CPU provider otherwise (labelled); skipped without them;
- curate: pass 1's k-means (torch fp16: no faiss there) and SemDeDup (the Triton kernel) over
  1M synthetic 768-d embeddings into 1,000 clusters, held in host memory (per embedding, so
  outside the experts' share of the caption engine's time);
- caption: LLaVA-1.6-7B on the transformers backend: the batch in arrival order, sorted
  windows with dynamic, static and compiled decoding, and a naive ``generate`` loop (batch 4,
  beam search 3, as ShareGPT4V's captioner ran), every request ``--tokens`` long;
- caption families (models/caption/families.py): Qwen2.5-VL-7B, Qwen3-VL-8B and InternVL3-8B at
  their checkpoints' dimensions on the transformers backend (sorted window, dynamic decoding), each
  at its image budget (Qwen: 1,280 tokens at most; InternVL: 12 tiles and a thumbnail); their
  tokenizer is the tiny BPE with the real vocabulary size (a stand-in: prompts are a little shorter).

Printed and written to ``--json``: images/s per GPU, ms per image, peak GPU memory and mean
NVML utilisation per row (pynvml may be absent: then "n/a"), the best caption row against the
roofline (~4.5 images/s per H100), and the experts' time per image as a share of the caption
engine's. ``--tiny`` runs the same code with tiny models on the CPU: a quick check of the command
without a GPU (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench._common import cuda_sync

ROOFLINE_H100 = 4.5  # LLaVA-1.6-7B images/s per H100 (DESIGN.md reference figures)


class Utilisation:
    """Mean NVML GPU utilisation while a block runs; None without pynvml or a GPU."""

    def __init__(self, device: str):
        self.handle, self.samples, self.mean = None, [], None
        if device.startswith("cuda"):
            try:
                import pynvml

                pynvml.nvmlInit()
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(device.partition(":")[2] or 0))
                self.pynvml = pynvml
            except Exception:  # noqa: BLE001 - not installed, or no NVML: the figure is "n/a"
                self.handle = None

    def __enter__(self):
        self.stop = threading.Event()
        if self.handle is not None:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.05):
            self.samples.append(self.pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __exit__(self, *exc):
        self.stop.set()
        if self.handle is not None:
            self.thread.join()
            self.mean = float(np.mean(self.samples)) if self.samples else None
        return False


def measured(label: str, fn, images: int, device: str, repeat: int = 1) -> dict:
    """``fn()`` once untimed (kernels, allocator, compiling), then ``repeat`` times timed."""
    import torch

    fn()
    cuda_sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with Utilisation(device) as util:
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        cuda_sync()
        seconds = (time.perf_counter() - start) / repeat
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"row": label, "images": images, "images_per_s": images / seconds, "ms_per_image": 1000 * seconds / images,
            "peak_gpu_gib": peak, "gpu_utilisation": util.mean}


# --- vision experts -------------------------------------------------------------------------------


def embed_row(jpegs: list[bytes], tiny: bool, device: str) -> dict:
    """CLIP ViT-L/14 (transformers) standing in for EVA02-L-14's image tower, decode included."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from engine.core.stage import ImageView
    from engine.image.decode_gpu import decode_jpegs_on_gpu
    from models.preprocess import normalise, to_tensor

    size = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": 224, "patch_size": 14, "projection_dim": 32} if tiny else {
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 224, "patch_size": 14, "projection_dim": 768}
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        net = CLIPVisionModelWithProjection(CLIPVisionConfig(**size)).to(dtype).eval()
    view = ImageView("embed", 224)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def run():
        views = decode_jpegs_on_gpu(jpegs, (view,), device)  # the decode stage's path (nvJPEG on a GPU)
        pixels = torch.cat([_square(to_tensor(v["embed"], device), 224) for v in views])
        with torch.inference_mode():
            return net(pixel_values=normalise(pixels, mean, std, dtype)).image_embeds

    params = sum(p.numel() for p in net.parameters())
    label = (f"embed: CLIP ViT-L/14 {params / 1e6:.0f}M, stand-in for EVA02-L-14 (no open_clip), incl. decode"
             if not tiny else "embed: tiny CLIP ViT, incl. decode")
    return measured(label, run, len(jpegs), device)


def _square(image, side: int):
    """(1, 3, H, W) uint8 → (1, 3, side, side) float, 0-255 (the embedder's square input)."""
    import torch.nn.functional as F

    return F.interpolate(image.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def expert_rows(images: list[np.ndarray], tiny: bool, device: str, tmp: Path) -> list[dict]:
    """RAM++, OWLv2, the closed-set detector as ``bench experts`` builds them (real sizes or tiny)."""
    from bench.experts import build_experts

    experts = build_experts(tmp, real=not tiny, device=device)
    rows = []
    for name, fn in experts.items():
        if "closed-set" in name and not tiny:
            name += " (DETR-R50 stand-in for the EVA02-L detector)"
        rows.append(measured(name, lambda fn=fn: fn(images), len(images), device))
    return rows


def ocr_row(n: int, device: str) -> dict:
    """The batched PP-OCR backend on text images, on the best provider this machine has."""
    try:
        import onnxruntime as ort

        from bench.experts import text_images
        from engine.core.config import OcrConfig
        from engine.stages.ocr import ocr_settings
        from models.ocr import OcrModel

        on = device if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        model = OcrModel(ocr_settings(OcrConfig(ocr_backend="batched", ocr_threads=0)), on)
        model.load()
    except Exception as exc:  # noqa: BLE001 - onnxruntime or the rapidocr models missing: say so
        return {"row": f"ocr: skipped ({type(exc).__name__}: {exc})", "images": 0}
    images, _ = text_images(n)
    label = f"ocr: PP-OCR batched, onnxruntime {model.backend.provider.removesuffix('ExecutionProvider')}"
    if on == "cpu" and device != "cpu":
        label += " (no onnxruntime-gpu here: CPU provider, all cores)"
    return measured(label, lambda: model.read(images), n, on)


# --- caption engine -------------------------------------------------------------------------------


def curate_row(tiny: bool, device: str, tmp: Path) -> dict:
    """Pass 1 after the embedder: k-means, SemDeDup and the top-N selection, as the engine runs
    them (engine/curate), over synthetic unit embeddings in float16 host memory."""
    from bench.curate import fill_embeddings
    from engine.curate.kmeans import cluster
    from engine.curate.selection import select

    n, k = (20_000, 20) if tiny else (1_000_000, 1_000)
    embeddings = np.empty((n, 768), np.float16)
    fill_embeddings(embeddings, k)
    on_gpu = device.startswith("cuda")

    def run():
        clustering = cluster(embeddings, k, backend="torch")
        return select(embeddings, clustering, scratch=tmp / "curate.scratch",
                      backend=("triton", device) if on_gpu else None)

    label = f"curate: k-means {k:,} + SemDeDup + top 20 on {n:,} x 768 ({'torch fp16, Triton' if on_gpu else 'CPU'})"
    return measured(label, run, n, device)


def caption_rows(tiny: bool, images: int, tokens: int, batch: int, window: int, tmp: Path) -> list[dict]:
    from bench.caption import caption_stage, make_samples, measure, real_size_engine, tiny_engine, variant

    engine = tiny_engine(tmp, 1, batch) if tiny else real_size_engine(batch)
    samples = make_samples(images)
    modes = ("dynamic", "static") if tiny else ("dynamic", "static", "compiled")  # compiling is for GPUs
    plans = [(f"caption: {batch} per call, arrival order, dynamic", 1, "dynamic")]
    plans += [(f"caption: {batch} per call, window of {window} sorted, {mode}", window, mode) for mode in modes]
    rows = []
    for label, win, mode in plans:
        rows.append(_caption_row(label, lambda win=win, mode=mode: measure(
            caption_stage(variant(engine, batch, mode), batch, tokens), samples, batch * win), engine.device))
    rows.append(naive_generate_row(engine, samples, tokens))
    engine.close()
    return rows


def _caption_row(label: str, run, device: str) -> dict:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with Utilisation(device) as util:
        result = run()  # measure() warms up, then times one pass
    return {"row": label, "images": result["images"], "images_per_s": result["images_per_s"],
            "ms_per_image": 1000 / result["images_per_s"], "tokens_per_s": result["tokens_per_s"],
            "warmup_s": result["warmup_s"],
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
            "gpu_utilisation": util.mean}


def naive_generate_row(engine, samples, tokens: int, batch: int = 4, beams: int = 3) -> dict:
    """``generate`` on batches of 4 in arrival order with beam search 3 (ShareGPT4V's captioner)."""
    import torch

    from models.caption.chat import chat_text

    todo = samples[: max(batch, len(samples) // 2)]

    def run():
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            inputs = engine.processor(text=[chat_text(engine.processor, s.prompt) for s in chunk],
                                      images=[s.views["caption"] for s in chunk], return_tensors="pt",
                                      padding=True).to(engine.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(engine.dtype)
            with torch.inference_mode():
                engine.net.generate(**inputs, num_beams=beams, do_sample=False, max_new_tokens=tokens,
                                    min_new_tokens=tokens, pad_token_id=engine.pad_id)

    row = measured(f"caption: naive generate, batch {batch}, beam {beams}", run, len(todo), engine.device)
    row["tokens_per_s"] = row["images_per_s"] * tokens
    return row


# --- caption engine families ------------------------------------------------------------------------


def family_builds() -> dict:
    """family -> (its real checkpoint's name, parts builder, real-size dimensions, tiny dimensions)."""
    from models import tiny
    from models.caption.families import INTERNVL, QWEN2_5_VL, QWEN3_VL

    return {QWEN2_5_VL: ("Qwen2.5-VL-7B", tiny.qwen2_5_vl_parts, tiny.QWEN2_5_VL_7B, tiny.TINY_QWEN2_5_VL),
            QWEN3_VL: ("Qwen3-VL-8B", tiny.qwen3_vl_parts, tiny.QWEN3_VL_8B, tiny.TINY_QWEN3_VL),
            INTERNVL: ("InternVL3-8B", tiny.internvl_parts, tiny.INTERNVL3_8B, tiny.TINY_INTERNVL)}


def family_engine(name: str, parts, size, batch: int, device: str, tmp: Path):
    """``(engine, its processor's folder)`` on transformers: random weights at ``size``, built on
    ``device`` (bf16 on a GPU); the processor is saved, as a checkpoint's, for the image budget."""
    import torch
    from transformers import AutoModelForImageTextToText

    from models.caption.transformers_backend import TransformersCaptionEngine

    config, processor = parts(size)
    folder = tmp / name
    processor.save_pretrained(folder)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        net = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    text = config.get_text_config()
    net.generation_config.pad_token_id, net.generation_config.eos_token_id = text.pad_token_id, text.eos_token_id
    return TransformersCaptionEngine(name, processor, net.eval(), device, batch_size=batch, decode="dynamic"), folder


def family_rows(tiny: bool, images: int, tokens: int, batch: int, window: int, tmp: Path) -> list[dict]:
    """A caption row per engine family besides LLaVA-1.6, each with its most image tokens per image."""
    from bench.caption import caption_stage, make_samples, measure

    samples = make_samples(images)
    rows = []
    for family, (name, parts, real_size, tiny_size) in family_builds().items():
        engine, folder = family_engine(name, parts, tiny_size if tiny else real_size, batch,
                                       "cpu" if tiny else "cuda", tmp)
        image_tokens = family.max_image_tokens(engine.net.config, folder)
        label = f"caption family {family.name}, {'tiny' if tiny else name + ' random'}: <={image_tokens:,} image tokens"
        row = _caption_row(label, lambda engine=engine: measure(caption_stage(engine, batch, tokens), samples,
                                                                batch * window), engine.device)
        rows.append({**row, "family": family.name, "max_image_tokens": image_tokens})
        engine.close()
    return rows


# --- the command ----------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models on the CPU: the same code, checked without a GPU (figures mean nothing)")
    parser.add_argument("--images", type=int, default=None, help="images per expert row (default 64; tiny 4)")
    parser.add_argument("--caption-images", type=int, default=None, help="images per caption row (16; tiny 4)")
    parser.add_argument("--tokens", type=int, default=None, help="output tokens per caption (250; tiny 4)")
    parser.add_argument("--batch", type=int, default=8, help="caption images per generation call")
    parser.add_argument("--window", type=int, default=4, help="caption batches sorted together")
    parser.add_argument("--json", default="bench-gpu.json", help="where the figures go")
    args = parser.parse_args(argv)
    import torch
    import transformers

    tiny = args.tiny
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("python -m bench gpu needs a CUDA GPU; --tiny runs the same code on the CPU")
    device = "cpu" if tiny else "cuda"
    n = args.images or (4 if tiny else 64)
    gpu = "cpu" if tiny else torch.cuda.get_device_name()
    print(f"bench gpu: {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{'tiny models' if tiny else 'real sizes, random weights'}")
    from bench.experts import photos
    from bench.io import photo_jpegs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(embed_row(photo_jpegs(n), tiny, device))
        rows += expert_rows(photos(n), tiny, device, Path(tmp))
        rows.append(ocr_row(n if not tiny else 2, device))
        rows.append(curate_row(tiny, device, Path(tmp)))
        caption = caption_rows(tiny, args.caption_images or (4 if tiny else 16), args.tokens or (4 if tiny else 250),
                               args.batch if not tiny else 2, args.window, Path(tmp))
        caption += family_rows(tiny, args.caption_images or (4 if tiny else 16), args.tokens or (4 if tiny else 250),
                               args.batch if not tiny else 2, args.window, Path(tmp))
    figures = summarise(rows, caption, gpu, tiny, args.tokens or (4 if tiny else 250))
    print_table(figures)
    Path(args.json).write_text(json.dumps(figures, indent=1))
    print(f"figures: {args.json}")
    return 0


def summarise(experts: list[dict], caption: list[dict], gpu: str, tiny: bool, tokens: int) -> dict:
    import torch
    import transformers

    llava = [r for r in caption if r["row"].startswith("caption:")]  # the paper's engine, then its naive loop
    best, naive = max(llava[:-1], key=lambda r: r["images_per_s"]), llava[-1]
    expert_ms = sum(r["ms_per_image"] for r in experts if r.get("images")
                    and not r["row"].startswith(("tag: CLIP", "box fusion", "curate")))
    return {
        "gpu": gpu, "tiny": tiny, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "caption_tokens": tokens, "rows": experts + caption,
        "caption_best": best["row"], "caption_best_images_per_s": best["images_per_s"],
        "caption_vs_naive": best["images_per_s"] / naive["images_per_s"],
        "caption_vs_roofline_h100": None if tiny else best["images_per_s"] / ROOFLINE_H100,
        "experts_ms_per_image": expert_ms,
        "experts_share_of_caption": expert_ms / best["ms_per_image"],
    }


def print_table(figures: dict) -> None:
    def cell(value, fmt):
        return "n/a" if value is None else format(value, fmt)  # a CPU run, or no pynvml

    print(f"  {'row':<78} {'images/s':>9} {'ms/image':>9} {'peak GiB':>9} {'GPU util':>8}")
    for row in figures["rows"]:
        if not row.get("images"):
            print(f"  {row['row']}")
            continue
        print(f"  {row['row'][:78]:<78} {row['images_per_s']:>9.2f} {row['ms_per_image']:>9.1f} "
              f"{cell(row['peak_gpu_gib'], '.1f'):>9} {cell(row['gpu_utilisation'], '.0f%'):>8}")
    roofline = figures["caption_vs_roofline_h100"]
    print(f"caption: best {figures['caption_best_images_per_s']:.2f} images/s per GPU ({figures['caption_best']}); "
          f"{figures['caption_vs_naive']:.1f}x the naive generate loop"
          + (f"; {roofline:.0%} of the H100 roofline ({ROOFLINE_H100} images/s)" if roofline is not None else ""))
    print(f"experts (embed, tag, detect, ocr): {figures['experts_ms_per_image']:.1f} ms per image = "
          f"{figures['experts_share_of_caption']:.1%} of the caption engine's time per image")
