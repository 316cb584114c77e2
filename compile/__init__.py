"""Lowering of seqmix models through torch.compile and torch-tensorrt.

Wraps the library; the library (``seqmix`` outside ``seqmix.compile`` and ``seqmix.export``) never imports this package.
"""
from .compiler import BACKENDS, CompiledModel, compile_model, explain_model, graph_breaks

__all__ = ["BACKENDS", "CompiledModel", "compile_model", "explain_model", "graph_breaks"]
