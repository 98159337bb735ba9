"""Export the vision experts to ONNX (checked against torch with ONNX Runtime) and TensorRT.

    python -m models.export onnx --target embed --model EVA02-L-14 --weights ckpt.bin --out exports/eva
    python -m models.export tensorrt --onnx exports/eva/visual.onnx --fp16 --max-batch 256
"""
