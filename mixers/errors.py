"""The project's own error type: every user-facing mistake raises it with the bad value named."""
from __future__ import annotations

import argparse
import os
import signal
import stat
import tempfile
from pathlib import Path

from seqmix.jsontext import parse_json


class SeqmixError(ValueError):
    """A configuration, input or state that seqmix cannot accept.

    Subclasses ``ValueError`` so callers that already catch bad values keep working.
    """


class SeqmixWarning(UserWarning):
    """Something seqmix did on the user's behalf that they should know of (a file left out, a plugin
    skipped); the ``seqmix`` command prints it as one line."""


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on a signal, SIGTERM (a scheduler preempting the job, ``kill``) or SIGINT
    (Ctrl-C), after the step it was in, with a checkpoint of that step: ``train.resume=true``
    continues from it. A KeyboardInterrupt, so that code which stops on Ctrl-C stops on it too."""

    def __init__(self, signal_name: str, step: int, max_steps: int, checkpoint: Path | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_status = 128 + signal.Signals[signal_name].value  # what a shell reports for a process the signal ended
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "the checkpoint written by process 0"
        super().__init__(f"stopped by {signal_name} after step {step:,} of {max_steps:,}, with {where}; "
                         "continue with train.resume=true")


def one_line(error: BaseException) -> str:
    """``error`` as "Type: message" on one line, for quoting a library's error inside a SeqmixError:
    YAML's, the Hub's and others run over several lines, and seqmix tells an error in one."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def kind_of(value) -> str:
    """What ``value`` is, for a message: "None", "an int", "a str", "a Tensor" (the type's name with its article)."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


JSON_KINDS = {dict: "a JSON object", list: "a JSON array", str: "a JSON string", bool: "JSON true or false", int: "a JSON number",
              float: "a JSON number", type(None): "JSON null"}


def json_kind(value) -> str:
    """What a value parsed from JSON is, in JSON's words: "a JSON array", "JSON null", ..."""
    return JSON_KINDS.get(type(value), kind_of(value))


def first_few(items, count: int = 3) -> str:
    """The first ``count`` of ``items`` (already strings) joined by commas, and how many more there are."""
    items = list(items)
    return ", ".join(items[:count]) + (f" and {len(items) - count} more" if len(items) > count else "")


def not_a_file(path: str | os.PathLike) -> str:
    """What is at ``path`` instead of a regular file, for an error message: "does not exist", "is a
    directory", "is a FIFO", "is a broken symbolic link", ... A FIFO or a device would block a read
    or never end it, so a reader checks ``os.path.isfile`` first and names what it found with this."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if stat.S_ISREG(mode):
        return "is a regular file"
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return "is " + next((kind for test, kind in kinds if test(mode)), "something else") + ", not a regular file"


def choice_error(field: str, value, allowed) -> SeqmixError:
    """An error for ``field=value`` when only ``allowed`` values are accepted."""
    return SeqmixError(f"{field}={value!r} is not valid; expected one of {sorted(map(str, allowed))}")


def is_choice(value, allowed) -> bool:
    """Whether ``value`` is one of ``allowed``, for any value: ``in`` on a dict or a set raises
    TypeError for an unhashable value, such as a list given where a name was expected."""
    try:
        hash(value)
    except TypeError:
        return False
    return value in allowed


def require_choice(field: str, value, allowed) -> None:
    """Raise ``choice_error`` unless ``value`` is one of ``allowed``, whatever ``value`` is."""
    if not is_choice(value, allowed):
        raise choice_error(field, value, allowed)


def require_module(field: str, value) -> None:
    """Raise unless ``value`` is a torch module (a model from ``seqmix.instantiate_model``, say), before
    a caller reads its attributes or writes anything for it."""
    from torch import nn

    if not isinstance(value, nn.Module):
        raise SeqmixError(f"{field} must be a torch.nn.Module (e.g. from seqmix.instantiate_model), got {kind_of(value)}")


INT_LIMIT = 2**63 - 1
"""The largest integer a size, count or seed may be: torch's sizes and generators hold 64-bit signed
integers, and a larger one was an OverflowError or a TypeError from deep inside torch."""


def require_int(owner: str, field: str, value, minimum: int = 1, meaning: str = "") -> None:
    """Raise unless ``value`` is an integer >= ``minimum`` and at most INT_LIMIT (bools are not integers here)."""
    detail = f" ({meaning})" if meaning else ""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SeqmixError(f"{owner}: {field}={value!r} is not valid; expected an integer >= {minimum}{detail}")
    if value > INT_LIMIT:
        raise SeqmixError(f"{owner}: {field}={value!r} is not valid; expected an integer >= {minimum} and at most "
                          f"2**63 - 1{detail}")


SEED_LIMIT = 2**32 - 1
"""The largest seed: torch's CPU generator keeps the low 32 bits of a seed, so 2**32 gave what 0 gives."""


def require_seed(owner: str, field: str, value) -> None:
    """Raise unless ``value`` is an integer from 0 to SEED_LIMIT, the seeds torch's generators tell apart."""
    require_int(owner, field, value, 0)
    if value > SEED_LIMIT:
        raise SeqmixError(f"{owner}: {field}={value!r} is not valid; expected an integer from 0 to 2**32 - 1 (torch's "
                          "generators keep 32 bits of a seed: a larger one would repeat a smaller one)")


def require_available_device(field: str, name):
    """``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``) as a ``torch.device`` this
    machine has; otherwise a SeqmixError naming ``field``, before anything is read onto it (a loader
    asked for a missing GPU failed as if its file were unreadable)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise SeqmixError(f"{field}={name!r} is not a device torch knows; expected e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SeqmixError(f"{field}={name!r} but no CUDA device is available on this machine; use 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SeqmixError(f"{field}={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if device.type not in ("cpu", "cuda", "meta") and not (hasattr(backend, "is_available") and backend.is_available()):
        raise SeqmixError(f"{field}={name!r} but this machine has no {device.type} device; use 'cpu'")
    return device


def require_bool(owner: str, field: str, value) -> None:
    """Raise unless ``value`` is True or False itself: "false", 0 or None would silently mean the opposite."""
    if not isinstance(value, bool):
        raise SeqmixError(f"{owner}: {field}={value!r} is not valid; expected True or False")


def require_path(field: str, path) -> None:
    """Raise unless ``path`` is a str or PathLike that is not blank: Path("") is the current folder,
    which an empty value would read or write unasked."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise SeqmixError(f"{field}={path!r} is not valid; expected a non-empty path")
    # A path the system cannot even look up (a name over its length limit, a NUL byte) was an OSError
    # or ValueError from the first check a reader made of it.
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        pass
    except (OSError, ValueError) as error:
        shown = os.fspath(path)
        shown = shown if len(shown) <= 80 else shown[:80] + "..."
        raise SeqmixError(f"{field}={shown!r} is not valid: {getattr(error, 'strerror', None) or error}") from None


def _nearest_existing(path: Path) -> Path:
    """``path``, or the nearest of its folders that exists; a dangling symbolic link counts as existing
    (no folder can be made in its place)."""
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def require_folder_path(field: str, path: str | os.PathLike) -> None:
    """Raise unless ``path`` is a folder, or could be made one: no file stands at it or above it."""
    existing = _nearest_existing(Path(path))
    if not existing.is_dir():
        what = "a symbolic link to nothing" if existing.is_symlink() else "a file, not a folder"
        raise SeqmixError(f"{field}={os.fspath(path)!r} is not valid: {str(existing)!r} is {what}")


CHECKSUMS = "checksums.json"
"""The record of a verified directory (a checkpoint, a saved or pretrained model): the sha256 of every
file in it (``seqmix.model.checkpoint`` writes and checks it). Any other file added there makes the
directory fail verification, so no output of seqmix may land inside one."""


RUN_OWN_FILES = ("run.json", "metrics.jsonl", ".lock", "tokenizer.json", "labels.json")
"""The files ``seqmix train`` keeps in a run directory (one holding run.json) beside its checkpoints:
no file output may replace one (gather's csv=<run>/run.json overwrite=true destroyed the run record)."""


def _run_file_problem(target: Path) -> str | None:
    """Why a file output at ``target`` would replace a run's own file, or None."""
    folder = target.absolute().parent
    if (folder / RUN_OWN_FILES[0]).is_file() and target.name in RUN_OWN_FILES:
        return f"it is the run's own {target.name} in {str(folder)!r}"
    if folder.name == "checkpoints" and (folder.parent / RUN_OWN_FILES[0]).is_file():
        return f"it lies in the checkpoints folder of the run in {str(folder.parent)!r}"
    return None


def require_writable_dir(field: str, path, replaces_verified: bool = False) -> None:
    """Raise unless ``path`` is a directory seqmix can write into, or one it can create.

    Checked before any work starts, so that a run of minutes or hours does not end in a traceback
    at its first write: no file may stand at ``path`` or above it, and the nearest folder of it
    that exists must take a new entry (tried with an empty folder, removed at once). Nor may
    ``path`` lie inside a verified directory (one holding CHECKSUMS), or be one, unless
    ``replaces_verified``: the caller rewrites that directory's files and their record (save_model,
    save_pretrained).
    """
    problem = _output_problem(path, is_file=False, replaces_verified=replaces_verified)
    if problem:
        raise SeqmixError(f"{field}={problem}")


def require_writable_file(field: str, path) -> None:
    """Raise unless a file can be written at ``path``: not a directory, its folder writable or creatable."""
    problem = _output_problem(path, is_file=True)
    if problem:
        raise SeqmixError(f"{field}={problem}")


def writable_dir_argument(path: str) -> Path:
    """An argparse ``type`` for an output directory, refused up front as ``require_writable_dir`` refuses it."""
    problem = _output_problem(path, is_file=False)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return Path(path)


def writable_file_argument(path: str) -> Path:
    """An argparse ``type`` for an output file, refused up front as ``require_writable_file`` refuses it."""
    problem = _output_problem(path, is_file=True)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return Path(path)


def _output_problem(path, is_file: bool, replaces_verified: bool = False) -> str | None:
    """Why nothing can be written at ``path`` ("'<path>' is not valid: ..."), or None."""
    if not isinstance(path, (str, os.PathLike)):
        return f"{path!r} is not valid: expected a path (a str or os.PathLike)"
    text = os.fspath(path)
    if not text.strip():
        # Path("") is the current folder: an empty value would write there unasked.
        return f"{text!r} is not valid: expected a non-empty path"
    if "\0" in text:
        return f"{text!r} is not valid: it holds a NUL character"
    target = Path(text)
    if is_file and text.endswith(("/", os.sep)):
        # Path() drops the slash: out=tokenizers/new/ wrote a file named "new".
        return f"{text!r} is not valid: it ends with '/', so it names a folder; give the file's own name"
    try:
        if is_file and target.is_dir():
            return f"{text!r} is not valid: it is a directory; expected a file path"
        # A file output replaces a regular file at most: writing over a FIFO, a device or a socket
        # (overwrite=true turned /dev/full into a file) or through a symbolic link is refused.
        if target.is_symlink() and target.exists() and (is_file or replaces_verified):
            # A saved model's folder too: its files went through the link before the loaders, which
            # take only real directories, refused it. A run directory may be a link (to a larger disk).
            return f"{text!r} is not valid: it is a symbolic link; name the {'file' if is_file else 'folder'} itself"
        if is_file and target.exists() and not target.is_file():
            return f"{text!r} is not valid: it {not_a_file(target)}"
        if is_file and (problem := _run_file_problem(target)):
            return f"{text!r} is not valid: {problem}; write it elsewhere"
        existing = _nearest_existing(target.parent if is_file else target)
        if existing.is_symlink() and not existing.exists():
            return f"{text!r} is not valid: {str(existing)!r} is a symbolic link to nothing"
        if not existing.is_dir():
            return f"{text!r} is not valid: {str(existing)!r} is a file, not a folder"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{text!r} is not valid: {str(existing)!r} is not writable"
        # Permission bits pass every path for root, and say nothing of a read-only or virtual file
        # system (/proc, /sys): only making an entry there shows that one can be made. The empty
        # folder goes at once.
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".seqmix-write-check-", dir=existing))
        except OSError as error:
            return f"{text!r} is not valid: {str(existing)!r} is not writable ({error.strerror or error})"
        longest = os.pathconf(existing, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    except OSError as error:
        return f"{text!r} is not valid: {error.strerror or error}"
    too_long = next((part for part in target.parts if len(os.fsencode(part)) > longest), None)
    if too_long is not None:
        return f"{text!r} is not valid: the name {too_long[:40]!r}... is longer than {longest} bytes"
    verified = _verified_directory_around(target if is_file or not replaces_verified else target.parent, is_file)
    if verified is not None:
        return (f"{text!r} is not valid: it lies in {str(verified)!r}, a verified directory (its {CHECKSUMS} lists every "
                "file in it), which would fail verification with anything added; write it outside that directory")
    return None


def _verified_directory_around(target: Path, is_file: bool) -> Path | None:
    """The nearest of ``target`` (a directory output; a file output's folder) or its folders that
    holds seqmix's CHECKSUMS record, or None. A file of that name in another format (a project's
    own checksums.json) marks nothing."""
    folder = target.absolute().parent if is_file else target.absolute()
    for candidate in (folder, *folder.parents):
        record = candidate / CHECKSUMS
        try:
            if not record.is_file() or record.stat().st_size > 64 * 2**20:
                continue
            content = parse_json(record.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and content.get("algorithm") == "sha256" and isinstance(content.get("files"), dict):
            return candidate
    return None
