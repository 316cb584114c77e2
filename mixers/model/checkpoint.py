"""Build a model from its description, save it, and load it back without unpickling or calling anything.

A saved model is a directory with ``model.safetensors`` (the weights), ``config.yaml`` (the
model's description: registry names and options, see ``seqmix.model.description``) and
``checksums.json`` (the sha256 of every other file). Loading

1. refuses symlinks and verifies every file against ``checksums.json`` (a directory without it
   loads only when the caller passes ``allow_unverified=True``);
2. reads the description, which can name nothing but registered parts (configs of older seqmix
   versions, which named code paths, go through a frozen translation table);
3. reads only the safetensors *header* and checks the description against it: vocabulary,
   width and layer count first, then every tensor shape of the model built on the meta device
   (no memory), and the model's total size against the weights' size;
4. and only then builds the model and copies the weights in.

So a config asking for a huge model is refused before anything is allocated.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from seqmix.errors import (
    CHECKSUMS,
    SeqmixError,
    first_few,
    kind_of,
    not_a_file,
    one_line,
    require_available_device,
    require_bool,
    require_path,
    require_writable_dir,
)
from seqmix.jsontext import parse_json
from seqmix.model.description import build_described_model, model_description
from seqmix.staging import new_file, write_shareable

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
"""The folder of a training run's checkpoints, each a saved model with the trainer's state beside it."""
LATEST = "latest"
"""The file in CHECKPOINTS naming the newest checkpoint."""

SIZE_SLACK_BYTES = 64 << 20
"""What a model may hold beyond twice its stored weights (buffers the file does not carry)."""


def instantiate_model(config: DictConfig | dict, device=None):
    """Build the model a ``conf/model`` config (a description) describes, remembering its canonical description.

    ``device`` (e.g. ``"meta"``) is where the parameters are made; None keeps torch's default. A
    device this machine lacks is refused by name before anything is built.
    """
    if device is not None:
        device = require_available_device("instantiate_model: device", device)
    description = model_description(config)
    model = build_described_model(description, device)
    model.config = description
    return model


def require_own_folder(field: str, directory: str | os.PathLike, names) -> None:
    """Raise unless ``directory`` is absent, empty, or holds only regular files named in ``names``:
    the files the caller writes there (an earlier save of its own). Anything else in it (a user's
    notes, another library's weights, a folder) would be overwritten, deleted or left beside files
    whose checksums do not cover it, so the folder is refused, naming what is in it."""
    path = Path(directory)
    if not path.is_dir():
        return
    foreign = sorted(entry.name for entry in os.scandir(path) if entry.name not in names or not entry.is_file(follow_symlinks=False))
    if foreign:
        shown = first_few(foreign)
        raise SeqmixError(f"{field}: {path} holds {shown}, which this save does not write (it writes {', '.join(sorted(names))}); "
                          "refusing to write over or beside them: choose a new or empty folder")


def save_model(model, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors``, ``config.yaml`` and ``checksums.json`` into ``directory``, each atomically.

    The model must come from ``instantiate_model`` (or ``load_model``), which records its description.
    """
    from safetensors.torch import save_model as save_weights

    config = check_savable(model, "save_model")
    require_writable_dir("save_model: directory", directory, replaces_verified=True)
    require_own_folder("save_model: directory", directory, (CONFIG, WEIGHTS, CHECKSUMS))
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name and rename, so a crash never leaves a half-written file behind.
    weights_tmp = str(new_file(directory, f".{WEIGHTS}.", ".tmp"))
    try:
        write_shareable(weights_tmp, lambda path: save_weights(model, str(path)))
        check_saved_description(config, Path(weights_tmp), "save_model")
    except BaseException:
        os.unlink(weights_tmp)
        if created:
            directory.rmdir()
        raise
    # The files are about to change, so a checksum record written for the old ones would be stale.
    (directory / CHECKSUMS).unlink(missing_ok=True)
    os.replace(weights_tmp, directory / WEIGHTS)
    config_tmp = directory / (CONFIG + ".tmp")
    OmegaConf.save(OmegaConf.create(dict(config)), config_tmp)
    os.replace(config_tmp, directory / CONFIG)
    write_checksums(directory, [CONFIG, WEIGHTS])
    return directory


def refuse_yaml_aliases(path: Path, text: str) -> None:
    """Raise unless the YAML ``text`` (read from ``path``) is free of anchors and aliases.

    A loader expands every alias into a copy of what its anchor names, so a few hundred bytes of
    anchors that each repeat the one before ("billion laughs") expand without end; seqmix writes
    none, so a file someone else wrote is refused on the first one, from the parser's events,
    which cost no more than the text's length.
    """
    import yaml

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                line = event.start_mark.line + 1
                raise SeqmixError(f"{path} uses a YAML anchor or alias (line {line}), which seqmix does not read: "
                                  "a config it wrote spells every value out")
    except yaml.YAMLError as error:
        raise SeqmixError(f"{path} is not a readable YAML config ({one_line(error)})") from None


def check_savable(model, caller: str):
    """The description of ``model`` (its ``config``), once the model is one a loader will read back:
    built by ``instantiate_model`` with a mapping for config, and every floating tensor finite. NaN
    weights were saved with checksums into a folder every loader then refused as damaged."""
    description = getattr(model, "config", None)
    if description is None:
        raise SeqmixError(f"{caller}: the model has no config; build it with seqmix.instantiate_model(config)")
    if not isinstance(description, Mapping):
        raise SeqmixError(f"{caller}: the model's config is {kind_of(description)}, not the description "
                          "seqmix.instantiate_model(config) records; build the model with it")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SeqmixError(f"{caller}: tensor {name!r} holds NaN or infinite values; the loaders would refuse these "
                              "weights as damaged, so they are not saved")
    check_described_settings(model, description, caller)
    return description


SETTING_TYPES = (int, float, str, bool, type(None))
RESULT_NEUTRAL_SETTINGS = frozenset({"training", "recompute"})
"""Settings a model may change after it is built without changing what it computes: the mode, and
whether a block recomputes its activations in the backward pass. (A compute path, ``impl``, is a
property over a private attribute, so it is not a setting here either.)"""


def _settings(module) -> dict:
    """A module's plain settings: its public attributes holding a number, string, bool or None, or a
    tuple of them (``chunk_size``, ``attention``, ``causal``, ``eps``, ...)."""
    return {key: value for key, value in vars(module).items()
            if not key.startswith("_") and key not in RESULT_NEUTRAL_SETTINGS
            and (isinstance(value, SETTING_TYPES) or (isinstance(value, tuple) and all(isinstance(v, SETTING_TYPES) for v in value)))}


def check_described_settings(model, description: Mapping, caller: str) -> None:
    """Raise unless every module of ``model`` has the type and settings (``_settings``) of the model
    its description builds: a setting changed after the build (``model.blocks[0].mixer.chunk_size =
    8``) was saved beside a config that described the model before it, and the loaders then built a
    model whose outputs differed. The described model is built on the meta device: no memory."""
    try:
        described = dict(build_described_model(model_description(dict(description)), "meta").named_modules())
    except SeqmixError as error:
        raise SeqmixError(f"{caller}: the model's config no longer builds a model ({error}); build the model with "
                          "seqmix.instantiate_model(config) instead of editing model.config") from None
    for name, module in model.named_modules():
        where = name or "the model"
        built = described.get(name)
        if type(built) is not type(module):
            made = "nothing" if built is None else kind_of(built)
            raise SeqmixError(f"{caller}: {where} is {kind_of(module)}, where the model's config builds {made}; "
                              "the loaders would build the config's model, so it is not saved: build the model you "
                              "want with seqmix.instantiate_model(config)")
        ours, theirs = _settings(module), _settings(built)
        for key, value in ours.items():
            if key not in theirs or theirs[key] != value:
                setting = f"{name}.{key}" if name else f"the model's {key}"
                raise SeqmixError(
                    f"{caller}: {setting} is {value!r}, but the model's config builds it with {theirs.get(key)!r}: the "
                    "model or its config was changed after the build, and the loaders would build the config's model, "
                    "whose outputs differ; build the model you want with seqmix.instantiate_model(config)")
    missing = sorted(set(described) - {name for name, _ in model.named_modules()})
    if missing:
        raise SeqmixError(f"{caller}: the model's config builds {missing[0]}, which the model lacks; build the model "
                          "with seqmix.instantiate_model(config)")


def check_saved_description(description: Mapping, weights: Path, caller: str) -> None:
    """Raise unless ``description`` (a model's ``config``) passes the loader's checks against the
    weights just written to ``weights``: a description changed after the model was built (its
    ``config`` edited by hand) was saved, with checksums, as a directory no loader would read."""
    try:
        check_description_fits(model_description(dict(description)), read_header(weights), "the weights")
    except SeqmixError as error:
        raise SeqmixError(f"{caller}: the model's config no longer describes the model itself ({error}); build it "
                          "with seqmix.instantiate_model(config) instead of editing model.config") from None


def read_description(path: Path) -> dict:
    """The canonical model description in a ``config.yaml`` (any version's form); unreadable files,
    and YAML anchors and aliases (``refuse_yaml_aliases``), are refused by name."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise SeqmixError(f"{path} is not a readable YAML config ({one_line(error)})") from None
    refuse_yaml_aliases(path, text)
    try:
        config = OmegaConf.to_container(OmegaConf.load(io.StringIO(text)), resolve=False)
    except Exception as error:
        raise SeqmixError(f"{path} is not a readable YAML config ({one_line(error)})") from None
    try:
        return model_description(config)
    except SeqmixError as error:
        raise SeqmixError(f"{path}: {error}") from None


def checkpoint_name(step: int) -> str:
    """The directory name of a training checkpoint after ``step`` steps: step-NNNNNNNN (at least 8 digits)."""
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint directory's name gives, or None when the name is not ``checkpoint_name``'s
    (at most 19 digits: a step fits an int64, and Python refuses to read an integer of over 4,300)."""
    match = re.fullmatch(r"step-(\d{8,19})", path.name)
    return None if match is None else int(match.group(1))


def is_checkpoint_directory(path: Path) -> bool:
    """A real directory named like a training checkpoint, step-NNNNNNNN (a symlink is never one: it could
    point outside the run)."""
    return checkpoint_step(path) is not None and path.is_dir() and not path.is_symlink()


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` points at in ``out_dir``; without that pointer, the checkpoint
    directory of the highest step; None when there is none.

    A checkpoint is renamed into place whole before ``latest`` names it, so a run killed between
    the two (or a pointer deleted) still has its newest checkpoint: a resume took the missing pointer
    for no checkpoint, trained from step 0 and wrote over the run's checkpoints.
    """
    folder = Path(out_dir) / CHECKPOINTS
    pointer = folder / LATEST
    if not os.path.lexists(pointer):
        found = [entry for entry in folder.iterdir() if is_checkpoint_directory(entry)] if folder.is_dir() else []
        return max(found, key=checkpoint_step) if found else None
    if not pointer.is_file():
        raise SeqmixError(f"{pointer} {not_a_file(pointer)}; it should be the file naming the newest checkpoint in {folder}")
    try:
        name = parse_json(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError):
        raise SeqmixError(f"{pointer} is corrupted; it should name the newest checkpoint in {pointer.parent}") from None
    # A name, not a path: "../../step-00000003" would reach a checkpoint outside the run.
    is_name = isinstance(name, str) and "/" not in name and "\\" not in name and os.sep not in name
    checkpoint = pointer.parent / str(name)
    if not is_name or not is_checkpoint_directory(checkpoint):
        raise SeqmixError(
            f"{pointer} names {name!r}, which is not a checkpoint directory in {pointer.parent} "
            "(checkpoints are real directories named step-NNNNNNNN in that folder; paths and symbolic links are refused)"
        )
    return checkpoint


def load_model(directory: str | os.PathLike, device: str = "cpu", allow_unverified: bool = False):
    """Rebuild a model saved by ``save_model``: checksums, description, header check, then the weights.

    Args:
        directory: written by ``save_model``, a training checkpoint, or a run directory of
            ``seqmix train`` (its latest checkpoint, as the CLI's ``checkpoint=`` takes it).
        device: where the loaded weights go.
        allow_unverified: load a directory that has no ``checksums.json`` (a model saved by hand, or by
            a tool that does not record checksums). Its files are then trusted as they are: a truncated
            or altered file is caught only where it no longer parses or no longer fits the description.
            Symlinks are refused either way, and a present ``checksums.json`` is always verified.
    """
    require_path("load_model: directory", directory)
    directory = Path(directory)
    if not (directory / WEIGHTS).exists():
        directory = latest_checkpoint(directory) or directory
    return load_verified(directory, CONFIG, read_description, device, allow_unverified, "load_model",
                         "save_model, or a run directory of seqmix train or a checkpoint in it")


def load_verified(directory: Path, config_name: str, read_config, device: str, allow_unverified: bool,
                  caller: str, writer: str):
    """The shared load: checksums (or, asked for by name, none), the description ``read_config(path)``
    reads from ``config_name``, the header check, then the weights. ``caller`` and ``writer`` name
    the function that failed and the one that writes such directories, for the error messages."""
    require_bool(caller, "allow_unverified", allow_unverified)
    # A string: safetensors takes no torch.device, nor "cpu:0" (which torch reads as the CPU).
    device = require_available_device(f"{caller}: device", device)
    device = "cpu" if device.type == "cpu" else str(device)
    if device == "meta":
        raise SeqmixError(f"{caller}: device='meta' holds no values, so no weights can be loaded onto it; load onto "
                          "'cpu' or a GPU (seqmix.instantiate_model(config, device='meta') builds a model without memory)")
    for name in (config_name, WEIGHTS):
        if not (directory / name).is_file():
            raise SeqmixError(f"{caller}: {directory / name} {not_a_file(directory / name)}; expected a directory written by {writer}")
    if allow_unverified and not (directory / CHECKSUMS).exists():
        refuse_symlinks(directory)
    else:
        verify_checksums(directory)
    description = read_config(directory / config_name)
    weights = directory / WEIGHTS
    try:
        check_description_fits(description, read_header(weights), str(weights))
        model = build_described_model(description)
    except SeqmixError as error:
        # A description that reads but builds no model (chunk_size: 0, max_len past any size) was
        # told without the file it came from.
        message = str(error)
        raise SeqmixError(message if str(directory) in message else f"{directory / config_name}: {message}") from None
    model.config = description
    load_weights(model, read_tensors(weights, device), str(weights))
    return model.to(device)


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """Name -> (shape, size in bytes) of every tensor in a safetensors file, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = {}
            for name in handle.keys():
                view = handle.get_slice(name)
                shape = tuple(view.get_shape())
                itemsize = torch.empty((), dtype=_DTYPES[view.get_dtype()]).element_size()
                header[name] = (shape, itemsize * int(torch.Size(shape).numel()))
            return header
    except KeyError as error:
        raise SeqmixError(f"{path} holds a tensor of dtype {error}, which seqmix does not store") from None
    except Exception as error:
        raise SeqmixError(f"{path} is not a readable safetensors file ({one_line(error)})") from None


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def check_description_fits(description: Mapping, header: Mapping[str, tuple[tuple[int, ...], int]], source: str) -> None:
    """Raise unless the described model has exactly the tensors of ``header``, before allocating anything.

    The cheap facts come first (vocabulary and width from the embedding, the layer count against
    the number of stored tensors), so even a description asking for millions of layers is refused
    at once; then the model is built on the meta device and every shape compared; finally its
    parameters and buffers may not exceed twice the stored bytes (plus ``SIZE_SLACK_BYTES``).
    """
    embedding = header.get("embed.weight")
    if embedding is None:
        raise SeqmixError(f"{source}: no 'embed.weight' tensor; this is not a seqmix model's weights file")
    wanted = (description["vocab_size"], description["d_model"])
    if tuple(embedding[0]) != wanted:
        raise SeqmixError(
            f"{source}: embed.weight has shape {tuple(embedding[0])}, but the config describes "
            f"vocab_size={wanted[0]}, d_model={wanted[1]}; the config does not belong to these weights"
        )
    layers = description["depth"] or len(description["layers"])
    if not isinstance(layers, int) or layers > len(header):
        raise SeqmixError(
            f"{source}: the config describes {layers} layers, more than the {len(header)} tensors the weights "
            "hold; the config does not belong to these weights"
        )
    skeleton = instantiate_model(description, device="meta")
    check_weights(skeleton, {name: shape for name, (shape, _) in header.items()}, source)
    stored = sum(size for _, size in header.values())
    needed = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*skeleton.parameters(), *skeleton.buffers()]}.values())
    if needed > 2 * stored + SIZE_SLACK_BYTES:
        raise SeqmixError(
            f"{source}: the config describes a model of {needed:,} bytes, but its weights hold only {stored:,}; "
            "refusing to allocate it"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str | os.PathLike, names: list[str] | None = None) -> Path:
    """Record the sha256 of ``names`` (default: every file) in ``directory``'s ``checksums.json``, atomically."""
    directory = Path(directory)
    refuse_symlinks(directory)
    if names is None:
        names = [path.name for path in directory.iterdir() if path.is_file() and path.name != CHECKSUMS]
    files = {name: _sha256(directory / name) for name in sorted(names)}
    tmp = directory / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2))
    os.replace(tmp, directory / CHECKSUMS)
    return directory / CHECKSUMS


def hub_blobs(directory: Path) -> Path | None:
    """The ``blobs`` folder of the Hugging Face cache repository whose snapshot ``directory`` is
    (``<cache>/models--<owner>--<name>/snapshots/<commit>``), or None for any other directory."""
    repository = directory.absolute().parent.parent
    if directory.absolute().parent.name != "snapshots" or not repository.name.startswith("models--"):
        return None
    blobs = repository / "blobs"
    return blobs if blobs.is_dir() and not blobs.is_symlink() else None


def _links_into(path: Path, folder: Path) -> bool:
    """Whether the link ``path`` leads to a regular file directly in ``folder``."""
    target = path.resolve()
    return target.parent == folder.resolve() and target.is_file()


def refuse_symlinks(directory: Path) -> None:
    """Raise if ``directory`` or anything directly in it is a symbolic link (it could point anywhere).

    Except in a snapshot of the Hugging Face cache, where ``snapshot_download`` links every file to
    the repository's ``blobs`` folder: links that lead to a file there, and nowhere else, are taken
    (a model fetched from the Hub was refused whole)."""
    if directory.is_symlink():
        raise SeqmixError(f"{directory} is a symbolic link; seqmix loads only real directories")
    blobs = hub_blobs(directory)
    for path in directory.iterdir():
        if path.is_symlink() and not (blobs is not None and _links_into(path, blobs)):
            raise SeqmixError(f"{path} is a symbolic link; seqmix refuses links inside a saved model or checkpoint")


MAX_SIDE_FILE_BYTES = 64 << 20
"""The largest file besides weights a verified directory may hold (configs, records, a tokenizer, the
checksums themselves): tens of kilobytes in practice, a few megabytes for a large tokenizer."""
SPARSE_CHECK_BYTES = 64 << 20
"""Weights files longer than this are checked for holes (``_size_problem``)."""
SAFETENSORS_MAX_HEADER_BYTES = 100 << 20
"""The largest safetensors header read; the format's own readers refuse larger ones too."""


def _size_problem(path: Path) -> str | None:
    """Why ``path`` is not a size its verified directory may hold, found before hashing a byte of it:
    a weights file must be exactly as long as its header describes, any other file at most
    MAX_SIDE_FILE_BYTES. A hostile directory could otherwise list (with a matching digest) a
    sparse file of terabytes that costs no disk but hours of hashing."""
    size = path.stat().st_size
    if path.suffix != ".safetensors":
        if size > MAX_SIDE_FILE_BYTES:
            return f"holds {size:,} bytes, more than such a file may ({MAX_SIDE_FILE_BYTES:,})"
        return None
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        header_bytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_bytes <= min(SAFETENSORS_MAX_HEADER_BYTES, size - 8):
            return f"holds {size:,} bytes with no safetensors header to describe them"
        try:
            header = parse_json(handle.read(header_bytes))
        except ValueError:
            header = None
    ends = [_tensor_end(entry) for key, entry in header.items() if key != "__metadata__"] if isinstance(header, dict) else [None]
    if None in ends:
        return "has a safetensors header that is not a map of tensors"
    described = 8 + header_bytes + max(ends, default=0)
    if size != described:
        return f"holds {size:,} bytes where its safetensors header describes {described:,}"
    # A header that describes its own length can still describe terabytes: a file with holes
    # (sparse: long, with next to nothing on disk) passed, and took hours to hash. Written weights
    # are never sparse, and even a compressing file system keeps float weights above an eighth.
    stored = getattr(path.stat(), "st_blocks", None)
    if stored is not None and size > SPARSE_CHECK_BYTES and stored * 512 < size // 8:
        return f"holds {size:,} bytes of which only {stored * 512:,} are on disk (a sparse file, which no save writes)"
    return None


def _tensor_end(entry) -> int | None:
    """Where a safetensors header entry's data ends ({"data_offsets": [begin, end], ...}), None for an entry that is no such map."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0
                                                              for o in offsets):
        return offsets[1]
    return None


def _is_version_control(path: Path) -> bool:
    """git's own entries in a clone of a Hub repository (the Hub adds .gitattributes to every one),
    which no loader reads and a checksum record cannot list."""
    return (path.name == ".git" and path.is_dir() and not path.is_symlink()) or (
        path.name == ".gitattributes" and path.is_file() and not path.is_symlink())


def verify_checksums(directory: str | os.PathLike) -> None:
    """Raise unless ``checksums.json`` exists, lists every other file, every file matches it, and nothing is a link.
    Every file's size is checked (``_size_problem``) before any is hashed."""
    directory = Path(directory)
    refuse_symlinks(directory)
    record_path = directory / CHECKSUMS
    if os.path.lexists(record_path) and not record_path.is_file():
        # Not "missing": allow_unverified, which that message suggests, takes only a directory without one.
        raise SeqmixError(f"{directory}: {CHECKSUMS} {not_a_file(record_path)}; refusing to load the directory")
    if not record_path.is_file():
        raise SeqmixError(
            f"{directory}: {CHECKSUMS} is missing, so its files cannot be verified (every directory seqmix saves has "
            "one). If you trust these files, load them with allow_unverified=True (seqmix commands: "
            "allow_unverified=true)"
        )
    problem = _size_problem(record_path)
    if problem:
        raise SeqmixError(f"{directory}: {CHECKSUMS} {problem}; refusing to load it")
    try:
        record = parse_json(record_path.read_text())
        expected = record["files"]
        if record.get("algorithm") != "sha256" or not isinstance(expected, dict):
            raise ValueError("unknown layout")
    except (ValueError, KeyError, TypeError) as error:
        raise SeqmixError(f"{directory}: {CHECKSUMS} is corrupted ({error}); refusing to load it") from None
    present = sorted(path.name for path in directory.iterdir() if path.name != CHECKSUMS and not _is_version_control(path))
    unlisted = [name for name in present if name not in expected]
    if unlisted:
        raise SeqmixError(f"{directory}: {unlisted[0]} is not listed in {CHECKSUMS}; refusing an unverified file")
    for name in expected:
        path = directory / str(name)
        if Path(str(name)).name != name or not path.is_file():
            raise SeqmixError(f"{directory}: {name} is listed in {CHECKSUMS} but missing; the directory is incomplete")
        problem = _size_problem(path)
        if problem:
            raise SeqmixError(f"{directory}: {name} {problem} (truncated, padded or not what seqmix saved); refusing to "
                              "load it. Resume from an earlier checkpoint or retrain")
    for name, digest in expected.items():
        path = directory / str(name)
        if _sha256(path) != digest:
            raise SeqmixError(
                f"{directory}: {name} does not match its sha256 in {CHECKSUMS} (truncated or corrupted); "
                "refusing to load it. Resume from an earlier checkpoint or retrain"
            )


def read_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; an unreadable file is refused by name."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as error:
        raise SeqmixError(f"{path} is not a readable safetensors file ({one_line(error)})") from None


def check_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor | tuple[int, ...]], source: str = WEIGHTS) -> None:
    """Raise unless ``tensors`` (tensors, or their shapes) holds exactly the model's weights with the model's shapes
    (and, for tensors, a dtype copying may take: ``_dtype_fits``).

    A tied weight is stored once under one of its names (safetensors refuses shared tensors), so
    a model name is covered when it, or a name of the same parameter, is in ``tensors``.
    """
    expected = model.state_dict(keep_vars=True)
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise SeqmixError(f"{source}: tensor {unexpected[0]!r} is not a weight of this model; was it saved from another model?")
    for name, value in tensors.items():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
        if shape != tuple(expected[name].shape):
            raise SeqmixError(f"{source}: tensor {name!r} has shape {shape}, the model expects {tuple(expected[name].shape)}")
        if isinstance(value, torch.Tensor) and not _dtype_fits(value.dtype, expected[name].dtype):
            raise SeqmixError(f"{source}: tensor {name!r} holds {str(value.dtype).removeprefix('torch.')} values, the model's "
                              f"{name!r} is {str(expected[name].dtype).removeprefix('torch.')}; was it saved from another model?")
        # Training stops at the first NaN, so no model seqmix saves holds one: such weights loaded
        # without a word and made every output NaN.
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise SeqmixError(f"{source}: tensor {name!r} holds NaN or infinite values; these weights are damaged")
    stored = {id(expected[name]) for name in tensors}
    missing = [name for name, value in expected.items() if name not in tensors and id(value) not in stored]
    if missing:
        raise SeqmixError(f"{source}: the model's weight {missing[0]!r} is not in the file; was it saved from another model?")


def _dtype_fits(stored: torch.dtype, expected: torch.dtype) -> bool:
    """Whether a stored tensor of ``stored`` may be copied into a weight of ``expected``: any floating
    dtype into a floating weight (copying converts it, as from a half-precision save), else the same dtype.
    An integer or boolean tensor in place of a floating weight would be converted without a word."""
    if expected.is_floating_point:
        return stored.is_floating_point
    return stored == expected


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = WEIGHTS) -> None:
    """Copy ``tensors`` into ``model`` after ``check_weights``: a refused load leaves the model untouched.

    Each floating weight takes the stored tensor's dtype (float64, bfloat16, ...): copied into the
    float32 weights the model is built with, a float64 save came back rounded without a word. The
    weight keeps its identity, so tied weights stay tied."""
    check_weights(model, tensors, source)
    weights = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and weights[name].dtype != tensor.dtype:
                weights[name].data = weights[name].data.to(tensor.dtype)
    model.load_state_dict(tensors, strict=False)
