"""Models in the Hugging Face layout: ``seqmix.save_pretrained``, ``seqmix.from_pretrained``, ``seqmix.push_to_hub``.

A directory (or Hub repository) holds

- ``config.json``: ``{"model_type": "seqmix", "seqmix_version": ..., <the model description>}``, the
  model in seqmix's own terms (registry names and options, ``seqmix.model.description``), and the
  ``task`` it was trained on when known;
- ``model.safetensors``: the weights;
- ``tokenizer.json`` when the model was trained with one, and ``labels.json`` (the class names)
  for a classifier of the user's labels;
- ``README.md``: a model card (architecture, parameter count, streaming state per sequence, and,
  when given, the training data with its hash, the metrics and the command that trained it);
- ``checksums.json``: the sha256 of every other file.

Loading is the same verified path as ``seqmix.load_model``: checksums first (``allow_unverified``
asked for by name), then a description that can name only registered parts, checked against the
safetensors header before anything is allocated. Hub access goes through ``huggingface_hub``
(``snapshot_download``, ``HfApi.upload_folder``); with ``HF_HUB_OFFLINE=1`` only local directories
and the local cache are read.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

from torch.utils._pytree import tree_flatten

from seqmix.errors import SeqmixError, SeqmixWarning, one_line, require_path, require_writable_dir, json_kind
from seqmix.jsontext import parse_json
from seqmix.model.checkpoint import (WEIGHTS, check_savable, check_saved_description, load_verified, require_own_folder,
                                     write_checksums)
from seqmix.model.description import model_description
from seqmix.staging import new_directory, write_shareable
from seqmix.tasks.base import MODEL_FILES

CONFIG_JSON = "config.json"
CARD = "README.md"
MODEL_TYPE = "seqmix"
TRAINING_KEYS = ("task", "evaluation")
"""Keys of config.json beside the model's description: the task it was trained on and how its metrics were computed."""
HUB_FILES = [CONFIG_JSON, WEIGHTS, CARD, "checksums.json"]
"""The files every pretrained directory holds."""
HUB_PATTERNS = [*HUB_FILES, *MODEL_FILES]
"""The only files fetched from the Hub: those above, and the tokenizer and labels when there are any."""


def _version() -> str:
    import seqmix

    return seqmix.__version__


def _evaluated_on(evaluation: Mapping | None) -> str:
    """What the card's metrics were computed on, from a checked ``evaluation``; empty when unknown."""
    if evaluation is None:
        return ""
    batches, size = evaluation["batches"], evaluation["batch_size"]
    autocast = ", under bfloat16 autocast" if evaluation["bf16"] else ""
    return f" (validation: {batches} batch{'es' if batches != 1 else ''} of {size} sequence{'s' if size != 1 else ''}{autocast})"


def _card(model, training: Mapping | None, files: Mapping[str, bytes], evaluation: Mapping | None = None) -> str:
    """The model card: what the model is, and what trained it when ``training`` says so."""
    from seqmix.model.summary import describe_model

    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    state = sum(t[0].numel() for t in tree_flatten(model.init_state(1))[0]) if model.causal else 0
    training = dict(training or {})
    metrics = training.get("metrics")
    lines = [
        "---",
        "library_name: seqmix",
        "tags: [seqmix, sequence-mixer]",
        "---",
        "",
        f"# {training.get('name', 'seqmix model')}",
        "",
        f"A seqmix {'causal' if model.causal else 'bidirectional'} sequence model: {len(model.blocks)} layers, "
        f"d_model={model.d_model}, vocabulary {model.vocab_size}.",
        "",
        f"- parameters: {parameters:,}",
        f"- streaming state per sequence: {state:,} numbers ({state * 4 / 1024:,.1f} KiB in float32)"
        if model.causal else "- streaming state: none (bidirectional)",
        "- tokenizer: `tokenizer.json` (in this directory)" if "tokenizer.json" in files
        else "- tokenizer: bytes (token ids are the UTF-8 bytes of the text)",
        f"- training data: {training.get('data', 'not recorded')}",
        f"- training data sha256: {training.get('data_sha256', 'not recorded')}",
        f"- metrics: {json.dumps(metrics) + _evaluated_on(evaluation) if metrics else 'not recorded'}",
        f"- trained with: `{training['command']}`" if training.get("command") else "- trained with: not recorded",
        "",
        "## Architecture",
        "",
        "```",
        describe_model(model),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "import seqmix",
        "model = seqmix.from_pretrained(\"<this directory or repo id>\")",
        "```",
        "",
        "`config.json` describes the model by seqmix's registry names; loading builds nothing else.",
        "",
    ]
    return "\n".join(lines)


def check_pretrained_target(field: str, directory: str | os.PathLike) -> None:
    """Raise unless ``save_pretrained`` could write ``directory`` (named ``field``): writable, and absent,
    empty or an earlier pretrained directory, which it replaces: only the files it writes, its
    config.json of model_type seqmix (a folder with any config.json was deleted whole, a Hugging Face
    model's weights and a user's notes in it)."""
    require_writable_dir(field, directory, replaces_verified=True)
    path = Path(os.path.abspath(directory))
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise SeqmixError(f"{field}: {path} is not a directory")
    require_own_folder(field, path, HUB_PATTERNS)
    if (path / CONFIG_JSON).is_file():
        try:
            model_type = parse_json((path / CONFIG_JSON).read_bytes()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if model_type != MODEL_TYPE:
            raise SeqmixError(f"{field}: {path / CONFIG_JSON} is not a seqmix model's (model_type={model_type!r}); "
                              "refusing to replace the folder: choose a new or empty one")


def save_pretrained(model, directory: str | os.PathLike, training: Mapping | None = None, task: Mapping | None = None,
                    files: Mapping[str, bytes] | None = None, evaluation: Mapping | None = None) -> Path:
    """Write ``model`` to ``directory`` in the Hugging Face layout, whole or not at all.

    Args:
        model: built by ``seqmix.instantiate_model`` (it carries its description).
        directory: created, or replaced if it is an earlier pretrained directory (only the files this
            writes, its config.json a seqmix model's); any other non-empty directory is refused.
        training: optional card facts: ``name``, ``data``, ``data_sha256``, ``metrics`` (a mapping),
            ``command``.
        task: optional task description (``{task: <name>, ...}``) stored in config.json as ``task``, so
            ``seqmix export`` can build the example inputs of an exported graph from the directory.
        files: the task's ``model_files()`` (``tokenizer.json``, ``labels.json``), written beside the weights.
        evaluation: optional ``{batches, batch_size, bf16}``, how the card's metrics were computed on
            ``task``, stored in config.json as ``evaluation`` so that ``seqmix evaluate`` reproduces them.
    """
    from safetensors.torch import save_model as save_weights

    # The run records' own readers: what evaluate and export read back is checked the same way before anything is written.
    from seqmix.training.records import read_evaluation, read_task

    if evaluation is not None:
        evaluation = read_evaluation(evaluation, "save_pretrained")
    files = dict(files or {})
    unknown = sorted(set(files) - set(MODEL_FILES))
    if unknown or not all(isinstance(content, bytes) for content in files.values()):
        raise SeqmixError(f"save_pretrained: files={sorted(files)} is not valid; expected bytes under the names {list(MODEL_FILES)}")

    description = check_savable(model, "save_pretrained")
    training = _training_facts(training)
    if task is not None:
        # Checked as the readers of config.json check it: a task that export or evaluate would refuse
        # (an unknown name, an option it lacks, NaN, a tensor) is refused before anything is written.
        task = read_task(task, "save_pretrained: task")
    check_pretrained_target("save_pretrained: directory", directory)
    directory = Path(os.path.abspath(directory))
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = new_directory(directory.parent, f".{directory.name}.partial-")
    try:
        config = {"model_type": MODEL_TYPE, "seqmix_version": _version(), **model_description(description)}
        if task is not None:
            config["task"] = task
        if evaluation is not None:
            config["evaluation"] = evaluation
        (staging / CONFIG_JSON).write_text(json.dumps(config, indent=2))
        write_shareable(staging / WEIGHTS, lambda path: save_weights(model, str(path)))
        check_saved_description(description, staging / WEIGHTS, "save_pretrained")
        for name, content in files.items():
            (staging / name).write_bytes(content)
        (staging / CARD).write_text(_card(model, training, files, evaluation))
        write_checksums(staging)
        if directory.exists():
            # Move the old directory aside before the new one takes its name, so a kill never leaves neither.
            previous = new_directory(directory.parent, f".{directory.name}.replaced-")
            os.rename(directory, previous / directory.name)
            os.rename(staging, directory)
            shutil.rmtree(previous)
        else:
            os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


TRAINING_FACTS = ("name", "data", "data_sha256", "metrics", "command")
"""What ``save_pretrained``'s ``training`` may tell the model card."""


def _training_facts(training) -> dict:
    """``training`` (None or a mapping of ``TRAINING_FACTS``) checked: text, and a mapping of metric names to numbers."""
    if training is None:
        return {}
    if not isinstance(training, Mapping) or not set(training) <= set(TRAINING_FACTS):
        raise SeqmixError(f"save_pretrained: training={training!r} is not valid; expected a mapping of some of {list(TRAINING_FACTS)}")
    for key, value in training.items():
        if key == "metrics":
            plain = isinstance(value, Mapping) and all(
                isinstance(name, str) and not isinstance(number, bool) and isinstance(number, (int, float))
                for name, number in value.items())
            if not plain:
                raise SeqmixError(f"save_pretrained: training metrics={value!r} is not valid; expected a mapping of names "
                                  "to numbers")
        elif not isinstance(value, str):
            raise SeqmixError(f"save_pretrained: training {key}={value!r} is not valid; expected text")
    return dict(training)


def read_config_json(path: Path) -> dict:
    """The canonical description in a pretrained ``config.json``; another model type or a bad description is refused."""
    try:
        config = parse_json(path.read_text())
    except (OSError, ValueError) as error:
        raise SeqmixError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise SeqmixError(f"{path} holds {json_kind(config)}, not an object; a pretrained config.json is "
                          f"{{\"model_type\": \"{MODEL_TYPE}\", ...}}")
    if config.get("model_type") != MODEL_TYPE:
        raise SeqmixError(f"{path}: model_type={config.get('model_type')!r}; seqmix loads only model_type={MODEL_TYPE!r}")
    _warn_if_newer(path, config.get("seqmix_version"))
    description = {key: value for key, value in config.items() if key not in ("model_type", "seqmix_version", *TRAINING_KEYS)}
    try:
        return model_description(description)
    except SeqmixError as error:
        raise SeqmixError(f"{path}: {error}") from None


def _warn_if_newer(path: Path, saved) -> None:
    """Warn when ``path`` was written by a newer seqmix than this one: a part or option it added would
    be refused as unknown, and the warning says why. A missing or unreadable version says nothing."""
    from packaging.version import InvalidVersion, Version

    try:
        newer = isinstance(saved, str) and Version(saved) > Version(_version())
    except (InvalidVersion, ValueError):  # ValueError: a number of over 4,300 digits
        return
    if newer:
        warnings.warn(f"seqmix: {path} was written by seqmix {saved}, newer than this seqmix {_version()}; a part or option "
                      "added since would be refused as unknown: upgrade seqmix if loading fails", SeqmixWarning, stacklevel=2)


def pretrained_training(directory: str | os.PathLike) -> dict:
    """What a pretrained directory's config.json records of its training (``TRAINING_KEYS``, those it has), unchecked."""
    path = Path(directory) / CONFIG_JSON
    try:
        config = parse_json(path.read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise SeqmixError(f"{path} is not a readable pretrained config")
    return {key: config[key] for key in TRAINING_KEYS if key in config}


def resolve_pretrained(name: str | os.PathLike, revision: str | None = None) -> Path:
    """A local pretrained directory, or the local snapshot of Hub repository ``name`` (downloaded unless offline)."""
    require_path("from_pretrained: name", name)
    if revision is not None and not isinstance(revision, str):
        raise SeqmixError(f"from_pretrained: revision={revision!r} is not valid; expected a branch, tag or commit of the "
                          "Hub repository (a str), or None")
    path = Path(name)
    if path.is_dir():
        if revision is not None:
            raise SeqmixError(f"from_pretrained: revision={revision!r} names a version of a Hub repository, and {path} is a "
                              "local directory, which has one version; leave revision out")
        return path
    if path.exists():
        raise SeqmixError(f"{path} is a file; from_pretrained takes a directory or a Hub repository id")
    text = os.fspath(name)
    if text.startswith(("/", "./", "../", "~", ".\\")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        # No Hub repository id looks so: a mistyped local path was told as a failed download.
        raise SeqmixError(f"from_pretrained: {text!r} does not exist (a local directory was given, and no Hub repository "
                          "id has that form)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:
        raise SeqmixError(f"{name!r} is not a local directory, and reading the Hub needs huggingface_hub: "
                          "pip install 'seqmix[hub]'") from None

    try:
        return Path(snapshot_download(str(name), revision=revision, allow_patterns=HUB_PATTERNS))
    except HFValidationError:
        raise SeqmixError(f"{name!r} is neither a directory nor a valid Hub repository id") from None
    except Exception as error:  # noqa: BLE001  (network, offline mode, missing repo: one named error)
        raise SeqmixError(f"could not fetch {name!r} from the Hugging Face Hub ({one_line(error)}); nor is it a local "
                          "directory here") from None


def from_pretrained(name: str | os.PathLike, device: str = "cpu", allow_unverified: bool = False, revision: str | None = None):
    """The model saved by ``save_pretrained`` in a directory or Hub repository ``name``, through the verified load."""
    return load_verified(resolve_pretrained(name, revision), CONFIG_JSON, read_config_json, device, allow_unverified,
                         "from_pretrained", "save_pretrained")


def push_to_hub(model, repo_id: str, training: Mapping | None = None, private: bool = False, token: str | None = None,
                commit_message: str = "Upload seqmix model", task: Mapping | None = None,
                files: Mapping[str, bytes] | None = None) -> str:
    """Save ``model`` in the pretrained layout and upload it to Hub repository ``repo_id`` (created if needed).

    Returns the URL of the commit. The repository id is checked before anything is saved, and what
    the Hub refuses (no network, no token or rights, a name taken) is one SeqmixError naming it.
    """
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        raise SeqmixError("push_to_hub needs huggingface_hub: pip install 'seqmix[hub]'") from None

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SeqmixError(f"push_to_hub: repo_id={repo_id!r} is not a valid Hub repository id; expected 'name' or "
                          "'owner/name' of letters, digits, '-', '_' and '.'") from None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as scratch:
        folder = save_pretrained(model, Path(scratch) / "model", training, task, files)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
        except Exception as error:  # noqa: BLE001  (network, token, rights: one named error, as from_pretrained)
            raise SeqmixError(f"could not push to {repo_id!r} on the Hugging Face Hub ({one_line(error)})") from None
    return str(getattr(commit, "commit_url", commit))
