"""ONNX → TensorRT engine (a serialized plan) with a batch optimisation profile.

Needs a GPU and the `tensorrt` extra; neither exists on CI machines, so this path is
exercised only on a GPU node (the ONNX it consumes is tested everywhere).
"""

from __future__ import annotations

from pathlib import Path

from models.errors import ConfigError


def build_engine(onnx_path: Path, plan_path: Path, *, fp16: bool, min_batch: int, opt_batch: int,
                 max_batch: int, workspace_gib: float = 8.0) -> Path:
    try:
        import tensorrt as trt
    except ImportError:
        raise ConfigError("building a TensorRT engine needs the tensorrt extra on a GPU node: "
                          "pip install -e '.[tensorrt]'") from None
    if not onnx_path.exists():
        raise ConfigError(f"{onnx_path} does not exist: export it first with `python -m models.export onnx`")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)[1:]
        profile.set_shape(tensor.name, [min_batch, *shape], [opt_batch, *shape], [max_batch, *shape])
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(plan))
    return plan_path
