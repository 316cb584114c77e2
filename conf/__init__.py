"""seqmix's Hydra configs, installed as the package ``seqmix.conf`` so an installed wheel finds them.

Nothing to import here: ``seqmix.configs`` locates this directory with ``importlib.resources``.
"""
