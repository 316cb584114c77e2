"""The model: one sequence model composed from injected parts, its checkpoints (build, save,
load), its description, generation through ``step``, and weights converted from reference code."""
