"""Export of seqmix models to ONNX / ONNX Runtime, TensorRT and ExecuTorch.

Wraps the library; ``mixers`` never imports this package.
"""
