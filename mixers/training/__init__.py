"""Training on a task: the loop (``loop``), checkpoint files (``checkpoints``), experiments built
from configs (``experiment``), what a run prints (``reporting``) and tables of finished runs (``runs``)."""
