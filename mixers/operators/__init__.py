"""The token mixers (one operator per file, the reference path first, fast paths beside it) and the
engines they share: ``recurrence`` (diagonal linear recurrences, under the EMA and CEMA) and
``kv_cache`` (fixed-shape key/value caches, under both attentions).

Every module here is imported with the package, so a mixer file dropped into this folder registers
itself (``@register_mixer``) without being named anywhere else.
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
