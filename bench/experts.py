"""Images/s of every vision expert; OWLv2 preprocessing against the stock processor, and the
batched OCR backend against rapidocr's one image per call.

Per expert, on decoded views of photo-sized images (the work of the tag/detect stages
after decode): RAM++ tagging, CLIP zero-shot tagging from a stored embedding over a
4,585-tag vocabulary, OWLv2 queried with tags, the closed-set detector, box fusion.
Default: tiny random-weight models (CPU, machinery only). ``--real``: the real sizes with
random weights (RAM++ Swin-L 384, OWLv2 base 960 px vision tower, a closed-set
DETR-ResNet-50 — random weights cost what real ones cost), meant for a GPU.

OWLv2 preprocessing: the engine's tensor path (resize the longer side, pad) against the
stock processor (``AutoImageProcessor``: pad, Gaussian blur, resize the square), and the
PIL/SciPy processor when SciPy is installed, at 960 px, same images, same run.

OCR: the real PP-OCR models of the rapidocr wheel on text images (posters and slides, 960 px
views), the ``batched`` backend against ``rapidocr`` (the path before it, one image per call),
one session of one thread each: images/s per core and the share of the rendered lines read
exactly, same images, same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import cuda_sync


def photos(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random colour fields of common photo shapes, RGB uint8."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    shapes = [(768, 1024), (1024, 768), (720, 1280), (900, 900)]
    out = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        coarse = torch.from_numpy(rng.random((1, 3, 9, 12), dtype=np.float32))
        img = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
        out.append((img.clamp(0, 1) * 255).to(torch.uint8).numpy())
    return out


def view(image: np.ndarray, side: int) -> np.ndarray:
    """What the decode stage hands a stage: longer side <= side."""
    from PIL import Image

    from engine.image.decode import fit_size

    size = fit_size(image.shape[1], image.shape[0], side)
    if size == (image.shape[1], image.shape[0]):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def timed(fn, repeat: int) -> float:
    fn()  # warm-up (lazy init, allocator, kernels)
    cuda_sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    cuda_sync()
    return (time.perf_counter() - start) / repeat



def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench experts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="images per batch")
    parser.add_argument("--repeat", type=int, default=3, help="timed batches per expert")
    parser.add_argument("--real", action="store_true", help="real model sizes, random weights (for a GPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--ocr-images", type=int, default=16, help="text images of the OCR comparison")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    images = photos(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        experts = build_experts(Path(tmp), real=args.real, device=device)
        print(f"experts: {'real sizes, random weights' if args.real else 'tiny random-weight models'}, "
              f"{device}, batch {args.images}, {args.threads} torch thread(s)")
        total = 0.0
        for name, fn in experts.items():
            seconds = timed(lambda fn=fn: fn(images), args.repeat)
            total += seconds
            _row(name, args.images, seconds)
        _row("all experts together", args.images, total)
        _ram_plus_on_onnxruntime(images, Path(tmp), device, args.threads, args.repeat)
        ocr_rows(args.ocr_images, device)
        _preprocessing(images, Path(tmp), device, args.repeat)
    return 0


def _ram_plus_on_onnxruntime(images: list[np.ndarray], tmp: Path, device: str, threads: int, repeat: int) -> None:
    """The RAM++ built above, exported (``python -m models.export onnx --target ram_plus``) and
    tagging the same views on ONNX Runtime with as many threads, against torch."""
    from models.export.onnx import export_onnx
    from models.export.targets import ram_plus_target
    from models.ram_plus import OnnxRamPlus, load_tagger

    report = export_onnx(ram_plus_target(str(tmp / "ram")), tmp / "ram_onnx")
    views = [view(i, 384) for i in images]
    on_torch = timed(lambda tagger=load_tagger(tmp / "ram", device): tagger.tag(views), repeat)
    onnx = OnnxRamPlus(report.onnx_path, device, threads=threads)
    on_ort = timed(lambda: onnx.tag(views), repeat)
    n = len(images)
    print(f"RAM++ on onnxruntime ({onnx.provider}, export {report.seconds:.0f}s, max |diff| {report.max_abs_diff:.1e}):")
    print(f"  torch {n / on_torch:7.2f} images/s   onnxruntime {n / on_ort:7.2f} images/s   "
          f"(onnxruntime/torch {on_torch / on_ort:4.2f}x)")


def text_images(n: int) -> tuple[list[np.ndarray], list[tuple[str, ...]]]:
    """Posters and slides of three lines each, as the decode stage's 960 px OCR view."""
    from engine.io.demo_data import text_image

    words = ["OPEN", "DAILY", "WEST", "GATE", "FREE", "ENTRY", "NORTH", "PARK", "CITY", "HALL",
             "MAIN", "STREET", "SALE", "TODAY", "MUSEUM", "TICKETS", "2024", "NO. 7"]
    shapes = [(960, 540), (720, 960), (960, 720), (960, 480)]
    colours = [((250, 240, 200), (20, 20, 80)), ((255, 255, 255), (0, 0, 0)), ((30, 30, 60), (240, 240, 240))]
    images, lines = [], []
    for i in range(n):
        text = tuple(f"{words[(3 * i + j) % len(words)]} {words[(5 * i + 2 * j + 1) % len(words)]}" for j in range(3))
        width, height = shapes[i % len(shapes)]
        images.append(np.asarray(text_image(text, width, height, *colours[i % len(colours)])))
        lines.append(text)
    return images, lines


def ocr_rows(n: int, device: str) -> dict[str, dict[str, float]]:
    """``rapidocr`` (one image per call) vs ``batched``, one single-thread session each."""
    from engine.core.config import OcrConfig
    from engine.stages.ocr import ocr_settings
    from models.ocr import OcrModel

    images, truth = text_images(n)
    print(f"OCR (PP-OCR of the rapidocr wheel, {n} text images, 3 lines each, one session, 1 thread):")
    figures = {}
    for backend, on in (("rapidocr", "cpu"), ("batched", "cpu"), *((("batched", device),) if device != "cpu" else ())):
        model = OcrModel(ocr_settings(OcrConfig(ocr_backend=backend, ocr_threads=1)), on)
        model.load()
        model.read(images[:1])  # warm-up
        start = time.perf_counter()
        read = model.read(images)
        seconds = time.perf_counter() - start
        found = sum(len({line.text.upper() for line in lines} & set(want)) for lines, want in zip(read, truth))
        figures[f"{backend} {on}"] = {"images_per_s": n / seconds, "line_recall": found / (3 * n)}
    base = figures["rapidocr cpu"]["images_per_s"]
    for name, row in figures.items():
        print(f"  {name:<16} {row['images_per_s']:7.2f} images/s  line recall {row['line_recall']:.0%}  "
              f"({row['images_per_s'] / base:4.2f}x rapidocr)")
    return figures


def _row(name: str, n: int, seconds: float) -> None:
    print(f"  {name:<32} {n / seconds:10.3g} images/s  ({1000 * seconds / n:9.1f} ms/image)")


def build_experts(tmp: Path, *, real: bool, device: str) -> dict:
    import torch

    from engine.core.config import FusionConfig
    from engine.evidence.boxes import fuse_boxes
    from models import detector, owlv2, ram_plus
    from models.clip_tagger import ClipZeroShotTagger
    from models.records import Box

    if real:
        ram_dir = tmp / "ram"
        ram_dir.mkdir()
        tags = [f"tag {i}" for i in range(4585)]
        (ram_dir / ram_plus.TAG_LIST_NAME).write_text("\n".join(tags))
        torch.save({"model": ram_plus.RamPlus(ram_plus.RamPlusConfig(), tags).state_dict()}, ram_dir / ram_plus.CHECKPOINT_NAME)
        owl_dir = owlv2.build_tiny(tmp / "owlv2", vision={"image_size": 960})  # OWLv2 base (ViT-B/16) at 960 px
        closed_dir = _real_detr(tmp / "detr")
    else:
        ram_dir = ram_plus.build_tiny(tmp / "ram")
        owl_dir = owlv2.build_tiny(tmp / "owlv2")
        closed_dir = detector.build_tiny(tmp / "closed")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    ram = ram_plus.load_ram_plus(ram_dir, device=device, dtype=dtype)
    owl = owlv2.Owlv2Detector(str(owl_dir), device=device)
    closed = detector.load_detector(str(closed_dir), device=device)

    class RandomText:
        name = "random"

        def embed_texts(self, texts):
            return np.random.default_rng(len(texts)).standard_normal((len(texts), 768)).astype(np.float32)

    clip = ClipZeroShotTagger(RandomText(), [f"tag {i}" for i in range(4585)], threshold=0.05, top_k=10)
    embeddings = np.random.default_rng(1).standard_normal((64, 768)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    queries = [list(ram_plus.TINY_TAGS[:8])] * 64
    rng = np.random.default_rng(2)
    raw = [Box("dog", float(s), (x, y, x + 0.1 + s / 4, y + 0.1), "owlv2") for s, x, y in rng.random((40, 3)) * 0.6]
    fusion = FusionConfig()
    closed_side = 1333 if real else 96

    return {
        f"tag: RAM++ ({ram.cfg.image_size} px)": lambda imgs: ram.tag([view(i, 384) for i in imgs]),
        "tag: CLIP zero-shot (4,585)": lambda imgs: clip.tag(embeddings[: len(imgs)]),
        f"detect: OWLv2 ({owl.size} px, 8 tags)": lambda imgs: owl.detect(
            [view(i, owl.size) for i in imgs], queries[: len(imgs)], min_score=0.1),
        "detect: closed-set": lambda imgs: closed.detect([view(i, closed_side) for i in imgs], min_score=0.3),
        "box fusion (40 raw boxes)": lambda imgs: [fuse_boxes(raw, raw[:10], fusion, width=1024, height=768) for _ in imgs],
    }


def _real_detr(folder: Path) -> Path:
    """DETR-ResNet-50 with random weights (transformers' own ResNet, no timm download)."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, num_labels=91)
    DetrForObjectDetection(config).eval().save_pretrained(folder)
    DetrImageProcessor().save_pretrained(folder)
    return folder


def _preprocessing(images: list[np.ndarray], tmp: Path, device: str, repeat: int) -> None:
    """OWLv2 at its real 960 px input: the engine's tensor path vs the stock processors, on
    views already sized by the decode stage (longer side 960: pad + normalise only) and on
    full-size photos (the resize, with the stock path's Gaussian anti-aliasing, included)."""
    from transformers import Owlv2ImageProcessor

    from models.owlv2 import Owlv2Detector

    det = Owlv2Detector(str(tmp / "owlv2"), device=device)
    det.size = 960
    stock = Owlv2ImageProcessor(size={"height": 960, "width": 960})
    try:
        import scipy  # noqa: F401
        from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

        pil = Owlv2ImageProcessorPil(size={"height": 960, "width": 960})
    except ImportError:
        pil = None
    n = len(images)
    print(f"OWLv2 preprocessing to 960 px ({device}, {n} images of 0.8-0.9 MP):")
    for label, batch in (("960 px views", [view(i, 960) for i in images]), ("full-size photos", images)):
        ours = timed(lambda batch=batch: det.preprocess(batch), repeat)
        theirs = timed(lambda batch=batch: stock(images=batch, return_tensors="pt"), repeat)
        line = (f"  {label:<17} tensor {n / ours:7.1f}/s   stock {n / theirs:7.1f}/s "
                f"(tensor/stock {theirs / ours:4.1f}x)")
        if pil is not None:
            slow = timed(lambda batch=batch: pil(images=batch[:2], return_tensors="pt"), 1) / 2 * n
            line += f"   PIL/SciPy {n / slow:6.1f}/s (tensor/PIL {slow / ours:5.1f}x)"
        print(line)
