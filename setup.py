"""densefusion: perceptual-fusion captioning engine (DenseFusion-1M), one process per GPU node.

Extras (see README "Installing" for which combine):
  cpu       ONNX Runtime + FAISS on the CPU (any machine; CI uses it)
  gpu       ONNX Runtime GPU + FAISS GPU + NVML (replaces `cpu`: same import names)
  sglang    in-process SGLang caption engine (pins torch==2.14.1, transformers==5.19.0)
  tensorrt  torch-tensorrt 2.14 (torch 2.14.x) + ONNX export tools
  dali      NVIDIA DALI decode (CUDA 13 build; no torch pin)
  train     peft + accelerate: fine-tuning the caption engine (`train`, `evaluate`)
  ray       Ray: run, curate and meta on a cluster (--ray); the single-node path never imports it
  cloud     shards and output on object storage (--shards, --out s3://...; http(s):// in) through fsspec; moto's S3 server for the tests
  test      pytest and the dataset loaders the output-compatibility tests use
"""

from setuptools import find_packages, setup

BASE = [
    # torch/torchvision: this pair imports together on CPU-only machines (the CPU wheel of
    # torch 2.13 cannot load the registry's torchvision); sglang 0.5.23 pins torch 2.14.1 too.
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers>=5.19,<6",  # 5.19.0 is what sglang 0.5.23 pins
    "tokenizers>=0.22",
    "numpy>=1.26",
    "Pillow>=10.1",  # ImageFont.load_default(size=...) for the demo's rendered text
    "pyarrow>=15",
    "zarr>=3,<4",
    "pyyaml>=6",
    "tqdm>=4.66",
    "rapidocr>=3.4,<4",  # ships the PP-OCR detection/recognition ONNX models in the wheel
    "open_clip_torch>=3,<4",
    "timm>=1.0",
    "textblob>=0.18",  # offline part-of-speech tagging (pattern lexicon ships in the wheel)
    "matplotlib>=3.8",
    "onnx>=1.16",  # models/export and the ONNX detector backend's tests
    "onnxscript>=0.5",  # torch.onnx's exporter imports it
    "prometheus_client>=0.20",  # --metrics-port (engine/ops/prometheus.py); small, pure Python
]

EXTRAS = {
    "cpu": ["onnxruntime>=1.20", "faiss-cpu>=1.9"],
    "gpu": ["onnxruntime-gpu>=1.20", "faiss-gpu==1.15.1", "nvidia-ml-py>=12"],
    "sglang": ["sglang==0.5.23"],
    "tensorrt": ["torch-tensorrt==2.14.0", "onnx>=1.16"],
    "dali": ["nvidia-dali-cuda130==2.4.0"],
    "train": ["peft>=0.17,<1", "accelerate>=1.10,<2"],
    "ray": ["ray>=2.60,<3"],
    # fsspec's HTTP filesystem needs aiohttp; s3fs brings aiobotocore; moto[server] is the local S3 the tests start
    "cloud": ["fsspec>=2024.12", "aiohttp>=3.9", "s3fs>=2024.12", "moto[server]>=5.1"],  # s3fs 2024.12: mode="create"
    "test": ["pytest>=8", "hypothesis>=6.100", "webdataset>=1.0", "datasets>=3", "aiohttp>=3.9", "playwright>=1.45",
             "jsonschema>=4"],
}

setup(
    name="densefusion",
    version="0.1.0",
    description="Open, fast, resumable perceptual-fusion caption engine (DenseFusion-1M)",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "models*", "kernels*", "bench*"]),
    # not a package (it must import nothing of ours): SGLang's CPU engine puts its folder on PYTHONPATH
    package_data={"models.caption": ["sglang_cpu_site/sitecustomize.py"]},
    py_modules=["densefusion_local"],
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["densefusion=densefusion_local:main"]},
)
