"""``python -m models.export onnx|tensorrt|llava-native ...``: compile the vision experts, or
rewrite a llava-hf LLaVA-NeXT checkpoint into the original LLaVA layout SGLang serves natively.

    python -m models.export onnx --target embed --model EVA02-L-14 --weights eva02_l.bin --out exports/embed
    python -m models.export onnx --target detector --model facebook/detr-resnet-50 --size 800 --out exports/det
    python -m models.export tensorrt --onnx exports/embed/embed.onnx --fp16 --max-batch 256
    python -m models.export llava-native llava-hf/llava-v1.6-vicuna-7b-hf --out llava-v1.6-vicuna-7b-native
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.base import ModelRef
from models.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    from models.export.targets import TARGETS

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m models.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    onnx = commands.add_parser("onnx", allow_abbrev=False,
                               help="export an expert's image network to ONNX and check it against torch")
    onnx.add_argument("--target", required=True, choices=sorted(TARGETS))
    onnx.add_argument("--model", required=True, help="checkpoint folder / file, hub id, or 'tiny'")
    onnx.add_argument("--weights", default="", help="embed: open_clip weights file or tag")
    onnx.add_argument("--size", type=int, default=0, help="detector: input side (default: the model's)")
    onnx.add_argument("--out", required=True, help="folder for <target>.onnx and <target>.export.json")
    onnx.add_argument("--opset", type=int, default=18)
    onnx.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "densefusion"))
    trt = commands.add_parser("tensorrt", allow_abbrev=False,
                              help="build a TensorRT engine from an exported ONNX file (GPU node)")
    trt.add_argument("--onnx", required=True)
    trt.add_argument("--out", default="", help="plan file (default: beside the .onnx, .plan)")
    trt.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True)
    trt.add_argument("--min-batch", type=int, default=1)
    trt.add_argument("--opt-batch", type=int, default=64)
    trt.add_argument("--max-batch", type=int, default=256)
    native = commands.add_parser(
        "llava-native", allow_abbrev=False, help="llava-hf LLaVA-NeXT -> the original LLaVA layout (SGLang serves it with its "
        "radix cache; --caption-backend sglang does this itself, cached)")
    native.add_argument("src", help="llava-hf LLaVA-NeXT checkpoint folder, hub id, or 'tiny'")
    native.add_argument("--out", required=True, help="folder to write (must not exist)")
    native.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "densefusion"))
    args = parser.parse_args(argv)
    commands_run = {"onnx": export_onnx_command, "tensorrt": tensorrt_command, "llava-native": llava_native_command}
    try:
        return commands_run[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def export_onnx_command(args: argparse.Namespace) -> int:
    from models.export.onnx import export_onnx
    from models.export.targets import build_target

    ref = ModelRef(args.model, {"embed": "embed", "ram_plus": "ram_plus", "detector": "detector"}[args.target])
    ref.check()
    model = ref.resolve(Path(args.cache_dir))
    extra = str(args.size) if args.target == "detector" and args.size else args.weights
    target = build_target(args.target, model, extra)
    out = Path(args.out)
    report = export_onnx(target, out, opset=args.opset)
    print(f"{report.onnx_path}: input {report.input_shape} (batch dynamic), outputs {report.outputs}; "
          f"ONNX Runtime vs torch max |diff| {report.max_abs_diff:.2e}; {report.seconds:.1f}s")
    return 0


def llava_native_command(args: argparse.Namespace) -> int:
    from models.caption.llava_native import convert

    ref = ModelRef(args.src, "caption")
    ref.check()
    src = ref.resolve(Path(args.cache_dir))
    if not Path(src).is_dir():  # a hub id: the hub client's local copy
        from huggingface_hub import snapshot_download

        src = snapshot_download(src)
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"--out {out} exists: pass a new folder")
    convert(Path(src), out)
    print(f"{out}: original LLaVA layout of {args.src} (vision tower in {out / 'clip-vision-tower'}); "
          f"serve it with --caption-backend sglang --caption-model {out}")
    return 0


def tensorrt_command(args: argparse.Namespace) -> int:
    from models.export.tensorrt import build_engine

    onnx_path = Path(args.onnx)
    plan = build_engine(onnx_path, Path(args.out) if args.out else onnx_path.with_suffix(".plan"), fp16=args.fp16,
                        min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch)
    print(f"TensorRT engine: {plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
