"""Lowering of seqmix models through torch.compile and torch-tensorrt.

Wraps the library; ``mixers`` never imports this package.
"""
