"""Export of seqmix models to ONNX / ONNX Runtime, TensorRT and ExecuTorch.

Wraps the library; the library (``seqmix`` outside ``seqmix.compile`` and ``seqmix.export``) never imports this package.
"""
