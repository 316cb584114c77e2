"""The token mixers (one operator per file, the reference path first, fast paths beside it) and the
engines they share: ``recurrence`` (diagonal linear recurrences, under the EMA and CEMA) and
``kv_cache`` (fixed-shape key/value caches, under both attentions)."""
