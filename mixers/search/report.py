"""What a search writes into ``out_dir``: the leaderboard (CSV and Markdown), the Pareto plot, and the
best architectures as model presets whose header gives the command that trains them.

Every worker writes the report when it ends, and workers may share ``out_dir`` (a shared disk):
each file is written beside its place under a name of this process's own, then moved over it.
"""
from __future__ import annotations

import os
import re
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from seqmix.configs import compose_config
from seqmix.errors import SeqmixError
from seqmix.search.claims import NOT_RUN, RETRY_OF
from seqmix.search.settings import SearchSettings, metric_direction
from seqmix.tables import records_table, write_csv

LEADERBOARD = "leaderboard"
PARETO_PNG = "pareto.png"
PRESETS = "presets"


def _settings_text(params: dict) -> str:
    """The sampled knobs that the architecture summary does not show, e.g. ``chunk_size=16 lr=3.2e-03``."""
    shown = {"pattern_length", "repeats", "d_model"}
    parts = []
    for name, value in sorted(params.items()):
        if name in shown or name.startswith("layer_"):
            continue
        parts.append(f"{name}={value:.2e}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)


def _metric_of(trial: FrozenTrial) -> float | None:
    """The final metric of a finished trial, or the last reported one of a pruned trial."""
    if "metric" in trial.user_attrs:
        return trial.user_attrs["metric"]
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The completed trials no other trial beats on every objective (the best one for a single objective)."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return study.best_trials


def _three_figures(seconds: float) -> float:
    """A trial's wall time to three significant figures: whole seconds read 0 for a sub-second trial."""
    return float(f"{seconds:.3g}")


def leaderboard_rows(study: optuna.Study, metric: str) -> list[dict]:
    """One row per trial run: completed ones best metric first, then pruned, running and failed.

    Queued trials and refused claims (never run, ``claims.NOT_RUN``) have none.

    ``latency_ms`` is the median deployed latency, ``latency_low_ms`` and ``latency_high_ms`` the
    fastest and the slowest timed call; None where latency was not measured.
    """
    front = {t.number for t in pareto_front(study)}
    sign = -1.0 if metric_direction(metric) == "maximize" else 1.0
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.FAIL: 3}
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in order and NOT_RUN not in t.user_attrs]

    def rank(trial: FrozenTrial):
        value = _metric_of(trial)
        return order[trial.state], sign * value if value is not None and trial.state == TrialState.COMPLETE else 0.0, trial.number

    rows = []
    for trial in sorted(trials, key=rank):
        attrs = trial.user_attrs
        note = ""
        if trial.state == TrialState.FAIL:
            # Only seqmix's own failures record an error; the storage fails a trial whose heartbeat stopped.
            note = attrs.get("error", "its worker stopped (no heartbeat)")
        if RETRY_OF in trial.system_attrs:
            note = f"retry of trial {trial.system_attrs[RETRY_OF]}" + (f"; {note}" if note else "")
        rows.append({
            "trial": trial.number,
            "state": trial.state.name.lower(),
            "architecture": attrs.get("architecture", ""),
            "params": attrs.get("parameters"),
            metric: _metric_of(trial),
            "latency_ms": attrs.get("latency_ms"),
            "latency_low_ms": attrs.get("latency", {}).get("low_ms"),
            "latency_high_ms": attrs.get("latency", {}).get("high_ms"),
            "settings": _settings_text(trial.params),
            "pareto": "yes" if trial.number in front else "",
            "seconds": _three_figures(attrs["seconds"]) if "seconds" in attrs else None,
            "note": note,
        })
    return rows


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(staging)`` a file of this process's own beside ``path``, then move it over ``path``."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def plot_pareto(study: optuna.Study, metric: str, runtime: str, path: Path) -> Path:
    """Metric against latency (or parameters when latency was not measured), the front labelled.

    Optuna's ``plot_pareto_front`` draws every completed trial and marks the study's Pareto front
    over its objectives (the best trial for a single objective); the front is also joined in order
    of the x axis and labelled by architecture.
    """
    try:
        import matplotlib
    except ImportError:
        raise SeqmixError("the Pareto plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_pareto_front

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    by_latency = all("latency_ms" in t.user_attrs for t in done)
    x_key, x_label = ("latency_ms", f"latency on {runtime} (ms)") if by_latency else ("parameters", "parameters")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot_pareto_front(study, targets=lambda t: (t.user_attrs[x_key], t.user_attrs["metric"]),
                                 target_names=[x_label, f"validation {metric}"])
    figure = axes.figure
    figure.set_size_inches(8, 5.5)
    front = sorted(pareto_front(study), key=lambda t: t.user_attrs[x_key])
    axes.plot([t.user_attrs[x_key] for t in front], [t.user_attrs["metric"] for t in front], "-", color="tab:red", alpha=0.5)
    for index, trial in enumerate(front):
        # Labels alternate above and below the line, so neighbouring points do not overwrite each other.
        axes.annotate(f"#{trial.number} {trial.user_attrs['architecture']}", (trial.user_attrs[x_key], trial.user_attrs["metric"]),
                      textcoords="offset points", xytext=(6, 6 if index % 2 else -12), fontsize=7)
    axes.set_title(f"study {study.study_name}: {len(done)} completed trials")
    axes.margins(x=0.25, y=0.1)  # room for the labels of the outermost points
    axes.grid(alpha=0.3)
    figure.tight_layout()
    _write_atomic(path, lambda staging: figure.savefig(staging, dpi=120, format="png"))
    plt.close(figure)
    return path


def preset_name(study_name: str, number: int) -> str:
    """The preset name of trial ``number``, e.g. ``mqar_trial7``."""
    return f"{study_name}_trial{number}"


def _override_value(value) -> str:
    """``value`` in Hydra's override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def task_overrides(task_config: dict, name: str) -> list[str]:
    """Command-line overrides that turn ``conf/task/<name>.yaml`` into ``task_config`` (resolved)."""
    defaults = OmegaConf.to_container(compose_config([f"task={name}"]).task)
    changed = [f"task.{key}={_override_value(value)}" for key, value in task_config.items() if defaults.get(key) != value]
    return [f"task={name}", *changed]


def write_presets(study: optuna.Study, settings: SearchSettings, metric: str, task_args: Sequence[str]) -> list[Path]:
    """Save the best architectures as complete model presets in ``<out_dir>/presets/model/``.

    The Pareto front, best metric first, at most ``top_k`` of it; presets of an earlier report
    are replaced. ``seqmix train --config-dir <out_dir>/presets model=<name>`` trains one; each
    file's header gives the whole command, ``task_args`` and the searched learning rate included.
    """
    directory = settings.out_dir / PRESETS / "model"
    directory.mkdir(parents=True, exist_ok=True)
    # This study's presets and no other file: the glob "<study>_trial*.yaml" took a user's
    # "<study>_trial1_tuned.yaml" too, and another study's whose name starts with "<study>_trial".
    earlier = re.compile(rf"{re.escape(settings.study_name)}_trial\d+\.yaml")
    for old in directory.iterdir():
        if earlier.fullmatch(old.name) and old.is_file() and not old.is_symlink():
            old.unlink(missing_ok=True)  # another worker may be writing the same report
    reverse = metric_direction(metric) == "maximize"
    best = sorted(pareto_front(study), key=lambda t: t.user_attrs["metric"], reverse=reverse)[: settings.top_k]
    paths = []
    for trial in best:
        name = preset_name(settings.study_name, trial.number)
        attrs = trial.user_attrs
        latency = f", {attrs['latency_ms']:.3f} ms on {settings.runtime}" if "latency_ms" in attrs else ""
        command = ["seqmix train", f"--config-dir {(settings.out_dir / PRESETS).resolve()}", f"model={name}", *task_args]
        if "lr" in trial.params:
            command.append(f"train.lr={trial.params['lr']:.3e}")
        header = (
            f"# Trial {trial.number} of the architecture search {settings.study_name!r} (seqmix search).\n"
            f"# {attrs['architecture']}: {attrs['parameters']:,} parameters, validation {metric} {attrs['metric']:.4f}{latency}.\n"
            f"# Train it:\n#   {' '.join(command)}\n"
        )
        path = directory / f"{name}.yaml"
        # The sizes first, so the file reads top down like the presets in conf/model.
        config = attrs["model_config"]
        ordered = {key: config[key] for key in ("vocab_size", "d_model", "layers", "depth") if key in config}
        text = header + OmegaConf.to_yaml(OmegaConf.create({**ordered, **config}))
        _write_atomic(path, lambda staging: staging.write_text(text))
        paths.append(path)
    return paths


def write_report(study: optuna.Study, settings: SearchSettings, metric: str, task_args: Sequence[str] = ()) -> tuple[list[Path], list[str]]:
    """Write the leaderboard (CSV and Markdown), the Pareto plot and the best presets into out_dir.

    ``task_args`` are the task overrides the presets' train command repeats (``task_overrides``).

    Returns the files written and notes on what could not be written.
    """
    out_dir = settings.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = leaderboard_rows(study, metric)
    csv_path, markdown_path = out_dir / f"{LEADERBOARD}.csv", out_dir / f"{LEADERBOARD}.md"
    _write_atomic(csv_path, lambda staging: write_csv(rows, staging))
    counts = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    heading = (
        f"# Study {settings.study_name}\n\n"
        f"Objectives: {', '.join(settings.objectives)} (metric: validation {metric}"
        + (f"; latency on {settings.runtime}" if settings.measures_latency else "") + "). "
        f"Trials: {', '.join(f'{n} {s}' for s, n in counts.items()) or 'none yet'}.\n\n"
    )
    _write_atomic(markdown_path, lambda staging: staging.write_text(heading + records_table(rows) + "\n"))
    files, notes = [csv_path, markdown_path], []
    if any(row["state"] == "complete" for row in rows):
        try:
            files.append(plot_pareto(study, metric, settings.runtime, out_dir / PARETO_PNG))
        except SeqmixError as error:
            notes.append(str(error))
    else:
        notes.append("no completed trial yet: no Pareto plot and no presets")
    files += write_presets(study, settings, metric, task_args)
    return files, notes
