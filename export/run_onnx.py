"""Run an exported seqmix model with ONNX Runtime and NumPy only: no seqmix, no torch.

    python run_onnx.py <export dir> generate --prompt "def " [--tokens 200] [--temperature 0.8] [--top-k 40] [--seed 0] [--raw]
    python run_onnx.py <export dir> classify --ids 11,3,7,15

`generate` streams a language model through step.onnx, the decoder graph: the prompt in one call,
then one token per call, feeding the state outputs back as inputs (constant memory); `classify` runs model.onnx on one sequence, padded to the
graph's length unit, and names the class from labels.json when the export carries one. Text is
encoded and decoded as the model was trained: with the export's tokenizer.json when it has one
(this needs ``pip install tokenizers``), else as UTF-8 bytes. Everything about the graphs comes from manifest.json, checked first; every
graph is verified against the sha256 and size the manifest records for it, and symlinks are
refused, before ONNX Runtime opens it. A bad directory, file or argument ends the run with one
line, ``run_onnx: error: ...``, and exit status 2.

An export can come from someone else, and the text its model and tokenizer produce can hold
control characters that a terminal acts on (escape sequences, a carriage return, bidirectional
overrides). The generated text and the error line show them escaped (``\\x1b``); ``--raw`` writes
the text exactly as decoded.

``seqmix export`` copies this file into every ONNX export directory, so the directory runs on any
machine with ``pip install onnxruntime numpy``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np

NUMPY_DTYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(bool)": np.bool_, "tensor(float16)": np.float16}
STATE_DTYPES = ("bool", "float16", "float32", "float64", "int32", "int64")
MAX_STATE_NUMBERS = 1 << 31
"""The most numbers one state tensor may hold per sequence: far above any real state, and a limit
before NumPy tries to allocate what a hostile manifest asks for."""
FILE_NAME = "the name of a file in the export directory (no directories, '..', drive or absolute paths)"
# Characters that make a name a path on some system where an export may be run (Windows included).
PATH_CHARACTERS = ("/", "\\", ":", "\0")
SHA256_HEX = frozenset("0123456789abcdef")
COMPANIONS = {"tokenizer.json": "tokenizer", "labels.json": "labels"}
"""Files an export may carry beside its graphs, and the manifest key that names each."""
CHUNK = 1 << 20
# C0 controls and DEL, C1 controls, the bidirectional embeddings, overrides and isolates, and lone
# surrogates: the characters escape_controls shows escaped (as seqmix.terminal does; this script
# runs without seqmix).
CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


class ExportError(ValueError):
    """The export directory or an input does not fit what the manifest promises."""


class OnnxModel:
    """One exported graph with its manifest entry; inputs are checked against it before running.

    Args:
        directory: the export directory.
        entry: the graph's manifest entry, from ``load``, which checked it and verified its file.
        vocab_size: V; token ids outside [0, V) are refused before ONNX Runtime sees them.
    """

    def __init__(self, directory: Path, entry: dict, vocab_size: int | None = None):
        self.entry = entry
        self.vocab_size = vocab_size
        # Imported here, so seqmix.export.manifest can reuse this file's checks without ONNX Runtime installed.
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(directory / entry["file"]), providers=["CPUExecutionProvider"])
        self.inputs = {spec["name"]: spec for spec in entry["inputs"]}
        self._check_graph(entry["file"])

    def _check_graph(self, file: str) -> None:
        """Raise unless the graph takes the inputs the manifest lists, of those ranks and fixed sizes,
        and a language model's logits have the manifest's vocabulary: a manifest that did not match
        its graph was ONNX Runtime's error at the first call, or NumPy's."""
        actual = {spec.name: spec.shape for spec in self.session.get_inputs()}
        if set(actual) != set(self.inputs):
            raise ExportError(f"{file} takes the inputs {sorted(actual)}, but the manifest lists {sorted(self.inputs)}; "
                              "re-export the model")
        for name, spec in self.inputs.items():
            shape = actual[name]
            if len(shape) != len(spec["shape"]) or any(_is_int(got) and _is_int(want) and got != want
                                                       for got, want in zip(shape, spec["shape"])):
                raise ExportError(f"{file}: input {name!r} has shape {shape} in the graph, {spec['shape']} in the manifest; "
                                  "re-export the model")
        logits = self.session.get_outputs()[0].shape
        if self.vocab_size is not None and len(logits) == 3 and _is_int(logits[-1]) and logits[-1] != self.vocab_size:
            raise ExportError(f"{file} predicts {logits[-1]} tokens, but the manifest's vocab_size is {self.vocab_size}; "
                              "re-export the model")

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        unknown = sorted(set(feed) - set(self.inputs))
        if unknown:
            raise ExportError(f"input {unknown[0]!r} is not an input of this graph; it takes {list(self.inputs)}")
        dims: dict[str, tuple[str, int]] = {}
        for name, spec in self.inputs.items():
            if name not in feed:
                raise ExportError(f"input {name!r} is missing; the graph takes {list(self.inputs)}")
            value = feed[name]
            if not isinstance(value, np.ndarray):
                raise ExportError(f"input {name!r} is {_kind(value)}; expected a NumPy array of shape {spec['shape']}")
            expected = NUMPY_DTYPES[spec["dtype"]]
            if value.dtype != expected:
                raise ExportError(f"input {name!r} has dtype {value.dtype}, expected {np.dtype(expected)} ({spec['dtype']})")
            if len(value.shape) != len(spec["shape"]):
                raise ExportError(f"input {name!r} has shape {value.shape}, expected rank {len(spec['shape'])} {spec['shape']}")
            for axis, (got, want) in enumerate(zip(value.shape, spec["shape"])):
                if isinstance(want, int) and got != want:
                    raise ExportError(f"input {name!r} has shape {value.shape}; axis {axis} must be {want} (manifest {spec['shape']})")
                if isinstance(want, str):
                    # A named dynamic dim (batch, tokens) must have one size across all inputs.
                    seen_name, seen_size = dims.setdefault(want, (name, got))
                    if got != seen_size:
                        raise ExportError(f"input {name!r} has {want}={got} on axis {axis} but input {seen_name!r} has "
                                          f"{want}={seen_size}; every input must agree")
        for name in TOKEN_INPUTS:
            tokens = feed.get(name)
            if self.vocab_size is not None and tokens is not None and tokens.size:
                low, high = int(tokens.min()), int(tokens.max())
                if low < 0 or high >= self.vocab_size:
                    raise ExportError(f"input {name!r} holds ids from {low} to {high}; they must lie in [0, vocab_size={self.vocab_size})")
        return self.session.run(None, feed)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load(directory: Path) -> dict:
    """Read manifest.json, check everything this runner relies on, and verify the graphs' files,
    before any session opens.

    The promises are those export/manifest.py's ``read_manifest`` checks, restated here because
    this runner must work where neither seqmix nor torch is installed. Every graph the manifest
    names (parallel and step) must be a bare file name listed in ``files``, a regular file in
    ``directory`` (not a symlink) of the recorded size and sha256.
    """
    path = directory / "manifest.json"
    manifest = load_json(path)
    if not isinstance(manifest, dict):
        raise ExportError(f"{path} holds {'null' if manifest is None else type(manifest).__name__} JSON, not a manifest "
                          "(an object); re-export the model")
    for key in ("format", "vocab_size", "parallel", "files"):
        if key not in manifest:
            raise ExportError(f"{path} has no {key!r}; re-export the model")
    if manifest["format"] != "onnx":
        raise ExportError(f"{path} describes a {manifest['format']!r} export; this runner takes ONNX")

    def bad(field: str, value, expected: str) -> NoReturn:
        raise ExportError(f"{path}: {field}={value!r} is not valid; expected {expected}. Re-export the model")

    if not _is_int(manifest["vocab_size"]) or manifest["vocab_size"] < 2:
        bad("vocab_size", manifest["vocab_size"], "an integer >= 2")
    _check_graph(manifest["parallel"], "parallel", bad)
    unit = manifest["parallel"].get("length_unit")
    if not _is_int(unit) or unit < 1:
        bad("parallel.length_unit", unit, "an integer >= 1")
    if "step" in manifest:
        _check_graph(manifest["step"], "step", bad)
        _check_state(manifest["step"], bad)
    files = check_files(manifest["files"], bad)
    for section in ("parallel", "step"):
        if section in manifest:
            verify_file(directory, manifest[section]["file"], files, f"{section}.file")
    for name, key in COMPANIONS.items():
        if key in manifest:
            if manifest[key] != name:
                bad(key, manifest[key], repr(name))
            verify_file(directory, name, files, key)
    return manifest


class TextCodec:
    """Text to token ids and back, as the model was trained: the export's tokenizer.json, or UTF-8 bytes."""

    def __init__(self, directory: Path, manifest: dict):
        self.tokenizer = None
        if "tokenizer" in manifest:
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise ExportError("this export carries a tokenizer.json; reading it needs: pip install tokenizers") from None
            self.tokenizer = Tokenizer.from_file(str(directory / manifest["tokenizer"]))
            # As seqmix encoded the training text: special tokens in a prompt are text, and the prompt is
            # encoded whole and unpadded whatever the file sets (seqmix.tokenization.apply_encoding_settings).
            self.tokenizer.encode_special_tokens = True
            self.tokenizer.no_truncation()
            self.tokenizer.no_padding()

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            # surrogateescape gives back the bytes of a command-line argument that was not valid UTF-8.
            return list(text.encode("utf-8", "surrogateescape"))
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load_json(path: Path):
    """The parsed contents of a manifest file that is a regular file, not a symlink."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ExportError(f"{path} does not exist; export the model with seqmix export first") from None
    except OSError as error:
        raise ExportError(f"{path} cannot be read: {error.strerror}") from None
    if stat.S_ISLNK(mode):
        raise ExportError(f"{path} is a symbolic link; an export's manifest must be a regular file in its directory")
    if not stat.S_ISREG(mode):
        raise ExportError(f"{path} is not a regular file; re-export the model")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ExportError(f"{path} is not valid JSON ({error}); re-export the model") from None
    except OSError as error:
        raise ExportError(f"{path} cannot be read: {error.strerror}") from None


def _kind(value) -> str:
    """What ``value`` is, for a message: "None", "an int", "a list" (seqmix.errors.kind_of, which this runner cannot import)."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def is_file_name(name) -> bool:
    """True for a bare file name that stays inside the directory it is joined to, on any system."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in PATH_CHARACTERS)


def check_files(files, bad) -> dict:
    """``files``: a mapping of bare file names to {"sha256": 64 lowercase hex digits, "bytes": size}."""
    if not isinstance(files, dict):
        bad("files", files, "a mapping of file names to {sha256, bytes}")
    for name, record in files.items():
        if not is_file_name(name):
            bad("files", name, FILE_NAME)
        digest = record.get("sha256") if isinstance(record, dict) else None
        size = record.get("bytes") if isinstance(record, dict) else None
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= SHA256_HEX and _is_int(size) and size >= 0):
            bad(f"files[{name!r}]", record, "{sha256: 64 lowercase hex digits, bytes: a size >= 0}")
    return files


def file_record(path: Path) -> dict:
    """{"sha256": hex digest, "bytes": size} of one file, read without following a symlink."""
    digest, size = hashlib.sha256(), 0
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)), "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def verify_file(directory: Path, name: str, files: dict, what: str) -> Path:
    """Check that ``name`` is a regular file of ``directory`` (not a symlink) with the size and
    sha256 that the manifest's ``files`` records for it; return its path. Raises ExportError naming
    the file: missing, a symlink or not a regular file, not listed, another size or another sha256.
    """
    path = directory / name
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise ExportError(f"the manifest names {name} for {what}, but {path} is missing") from None
    except OSError as error:
        raise ExportError(f"{path} ({what}) cannot be read: {error.strerror}") from None
    if stat.S_ISLNK(mode):
        raise ExportError(f"{path} ({what}) is a symbolic link; an export's files must be regular files in its directory")
    if not stat.S_ISREG(mode):
        raise ExportError(f"{path} ({what}) is not a regular file")
    if name not in files:
        raise ExportError(f"{path} ({what}) is not among the files the manifest verifies; re-export the model")
    try:
        found = file_record(path)
    except OSError as error:
        raise ExportError(f"{path} ({what}) cannot be read: {error.strerror}") from None
    expected = files[name]
    if found["bytes"] != expected["bytes"]:
        raise ExportError(f"{path} ({what}) is {found['bytes']} bytes but the manifest records {expected['bytes']}: "
                          "it was truncated or replaced; re-export the model")
    if found["sha256"] != expected["sha256"]:
        raise ExportError(f"{path} ({what}) does not match the sha256 the manifest records: it was modified; re-export the model")
    return path


def _check_graph(entry, section: str, bad) -> None:
    """A graph entry: a bare file name (verified by ``load``) and inputs of known dtypes with list shapes."""
    if not isinstance(entry, dict):
        bad(section, entry, "a mapping with file and inputs")
    # A bare file name: the manifest must not point the runtime at files outside the directory.
    if not is_file_name(entry.get("file")):
        bad(f"{section}.file", entry.get("file"), FILE_NAME)
    inputs = entry.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        bad(f"{section}.inputs", inputs, "a non-empty list of {name, shape, dtype}")
    for index, spec in enumerate(inputs):
        where = f"{section}.inputs[{index}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            bad(where, spec, "a mapping with a string name, a shape and a dtype")
        if not isinstance(spec.get("dtype"), str) or spec["dtype"] not in NUMPY_DTYPES:
            bad(f"{where}.dtype", spec.get("dtype"), f"one of {list(NUMPY_DTYPES)}")
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all((_is_int(d) and d >= 0) or isinstance(d, str) for d in shape):
            bad(f"{where}.shape", shape, "a list of sizes (integers >= 0, or names of dynamic dims)")


TOKEN_INPUTS = ("input_ids", "tokens")
"""The token input of a step graph: ``input_ids`` (the ONNX decoder graph), ``tokens`` (ExecuTorch)."""


def is_state_shape(shape) -> bool:
    """A state shape: sizes >= 0, the first of which may be the dynamic batch, ``"batch"``."""
    return (isinstance(shape, list) and bool(shape) and (shape[0] == "batch" or (_is_int(shape[0]) and shape[0] >= 0))
            and all(_is_int(d) and d >= 0 for d in shape[1:]))


def stream_limit(step: dict) -> int | None:
    """The most tokens one stream through the step graph takes (its ``dynamic_dims.tokens``, ``"1..N"``); None when unreadable."""
    dims = step.get("dynamic_dims")
    text = dims.get("tokens") if isinstance(dims, dict) else None
    low, _, high = text.partition("..") if isinstance(text, str) else ("", "", "")
    return int(high) if low == "1" and high.isdigit() and high.isascii() and int(high) >= 1 else None


def parallel_limit(parallel: dict) -> int | None:
    """The longest sequence the parallel graph takes (its ``dynamic_dims.length``, ``"multiple of U, up to N"``); None when unreadable."""
    dims = parallel.get("dynamic_dims")
    text = dims.get("length") if isinstance(dims, dict) else None
    found = re.fullmatch(r"multiple of \d+, up to (\d+)", text) if isinstance(text, str) and text.isascii() else None
    return int(found.group(1)) if found else None


def token_input(step: dict) -> str:
    """The name of the step graph's token input."""
    return next(spec["name"] for spec in step["inputs"] if spec["name"] in TOKEN_INPUTS)


def _check_state(step: dict, bad) -> None:
    """Every step input but the tokens is a state entry with that input's shape, a known dtype and a numeric fill."""
    state = step.get("state")
    if not isinstance(state, list):
        bad("step.state", state, "a list of {name, shape, dtype, fill}")
    inputs = {spec["name"]: spec for spec in step["inputs"]}
    tokens = [name for name in inputs if name in TOKEN_INPUTS]
    names = []
    for index, entry in enumerate(state):
        where = f"step.state[{index}]"
        if not isinstance(entry, dict):
            bad(where, entry, "a mapping with name, shape, dtype and fill")
        name, shape, dtype, fill = (entry.get(key) for key in ("name", "shape", "dtype", "fill"))
        if not isinstance(name, str) or name not in inputs or name in TOKEN_INPUTS or name in names:
            bad(f"{where}.name", name, f"a distinct state input of the step graph, one of {sorted(set(inputs) - set(tokens))}")
        names.append(name)
        graph_shape = inputs[name]["shape"]
        if (not is_state_shape(shape) or len(shape) != len(graph_shape)
                or any(_is_int(g) and g != d for g, d in zip(graph_shape, shape))):
            bad(f"{where}.shape", shape, f"the shape of the step graph's input {name!r}, {graph_shape} (first dim 'batch' or a size)")
        if dtype not in STATE_DTYPES:
            bad(f"{where}.dtype", dtype, f"one of {list(STATE_DTYPES)}")
        if not isinstance(fill, (int, float)) or isinstance(fill, bool) or not math.isfinite(fill):
            bad(f"{where}.fill", fill, "a finite number (the value every element starts at)")
        if not dtype.startswith(("float", "bfloat")) and fill != int(fill):
            # np.full truncated 0.5 to 0 for an integer state, without a word.
            bad(f"{where}.fill", fill, f"an integer for dtype {dtype}")
        numbers = math.prod(d for d in shape if _is_int(d))
        if numbers > MAX_STATE_NUMBERS:
            bad(f"{where}.shape", shape, f"at most {MAX_STATE_NUMBERS:,} numbers per sequence (it holds {numbers:,})")
    missing = sorted(set(inputs) - set(tokens) - set(names))
    if len(tokens) != 1 or missing:
        bad("step.inputs", sorted(inputs), f"one token input ({' or '.join(TOKEN_INPUTS)}) and the state entries {names}")


def initial_state(manifest: dict, batch: int = 1) -> list[np.ndarray]:
    """The step graph's state for ``batch`` sequences before any token, as the manifest describes it
    (0, or −1 for empty cache slots)."""
    return [np.full([batch if d == "batch" else d for d in s["shape"]], s["fill"], dtype=np.dtype(s["dtype"]))
            for s in manifest["step"]["state"]]


SEED_LIMIT = 2**32 - 1
"""The largest seed, as for ``seqmix generate``, whose torch generators keep 32 bits of one."""


def sample(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """One token id from a (V,) logits vector."""
    if temperature == 0:
        return int(logits.argmax())
    # Shifted so that the largest is 0 before the division: a temperature so small that a logit
    # over it overflows (1e-320) gave inf - inf = NaN probabilities; this way the others go to
    # -inf and the sample is the argmax, the limit it tends to.
    with np.errstate(over="ignore"):  # the others going to -inf is the point: see above
        logits = (logits.astype(np.float64) - logits.max()) / temperature
    # A top_k at or above the vocabulary keeps every token: the default 40 suits a vocabulary of 14 too.
    if top_k and top_k < len(logits):
        cutoff = np.sort(logits)[-top_k]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits)
    probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def generate_ids(directory: Path, manifest: dict, prompt: str, tokens: int, temperature: float, top_k: int | None,
                 seed: int) -> list[int]:
    """The ``tokens`` ids sampled after ``prompt`` (encoded as the model was trained) through the step graph.

    Every option is checked before a session opens: a generation needs a prompt of at least one
    token (the first sampled token is drawn from the logits after the prompt's last one).
    """
    if "step" not in manifest:
        raise ExportError("this export has no step graph (a bidirectional model or a classifier); use classify")
    prompt_ids = TextCodec(directory, manifest).encode(prompt)
    if not prompt_ids:
        raise ExportError(f"--prompt={prompt!r} is not valid; generation needs at least one prompt token")
    if max(prompt_ids) >= manifest["vocab_size"]:
        raise ExportError(f"--prompt={prompt!r} holds token {max(prompt_ids)}; "
                          f"this model's tokens lie in [0, vocab_size={manifest['vocab_size']})")
    if tokens < 1:
        raise ExportError(f"--tokens={tokens} is not valid; expected a count >= 1 of tokens to generate")
    if not temperature >= 0 or not math.isfinite(temperature):
        raise ExportError(f"--temperature={temperature} is not valid; expected a finite number >= 0 (0 decodes greedily)")
    if top_k is not None and top_k < 1:
        raise ExportError(f"--top-k={top_k} is not valid; expected a count >= 1 (at or above vocab_size={manifest['vocab_size']}: "
                          "every token), or 0 for no cut-off")
    if not 0 <= seed <= SEED_LIMIT:
        raise ExportError(f"--seed={seed} is not valid; expected an integer from 0 to 2**32 - 1, as seqmix generate takes")
    limit = stream_limit(manifest["step"])
    if limit is None:
        raise ExportError(f"the manifest's step.dynamic_dims={manifest['step'].get('dynamic_dims')!r} is not valid; expected "
                          "{'tokens': '1..N'} with N >= 1, the tokens one stream takes. Re-export the model")
    # The prompt and every sampled token but the last go through the graph, whose stream takes `limit` tokens.
    if len(prompt_ids) + tokens - 1 > limit:
        raise ExportError(f"--tokens={tokens} is not valid with a prompt of {len(prompt_ids)} tokens: one stream of this "
                          f"model takes {limit} tokens; " + (f"ask for at most {limit - len(prompt_ids) + 1}"
                                                              if len(prompt_ids) <= limit else "shorten the prompt"))
    step = OnnxModel(directory, manifest["step"], manifest["vocab_size"])
    names = [s["name"] for s in manifest["step"]["state"]]
    ids = token_input(manifest["step"])
    # The whole prompt in one call (prefill), then one token per call, the state fed back each time.
    outputs = step.run({ids: np.array([prompt_ids], dtype=np.int64), **dict(zip(names, initial_state(manifest)))})
    logits, state = outputs[0][0, -1], outputs[1:]
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for index in range(tokens):
        out.append(sample(logits, temperature, top_k, rng))
        if index + 1 < tokens:
            outputs = step.run({ids: np.array([[out[-1]]], dtype=np.int64), **dict(zip(names, state))})
            logits, state = outputs[0][0, -1], outputs[1:]
    return out


def generate(directory: Path, manifest: dict, prompt: str, tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
    """The text of ``generate_ids``' tokens."""
    ids = generate_ids(directory, manifest, prompt, tokens, temperature, top_k, seed)
    return TextCodec(directory, manifest).decode(ids)


def classify(directory: Path, manifest: dict, ids: list[int]) -> np.ndarray:
    """Class probabilities for one sequence of token ids, each in [0, vocab_size), checked before a session opens."""
    if not ids:
        raise ExportError("--ids is empty; expected at least one token id")
    if min(ids) < 0 or max(ids) >= manifest["vocab_size"]:
        raise ExportError(f"--ids holds ids from {min(ids)} to {max(ids)}; "
                          f"they must lie in [0, vocab_size={manifest['vocab_size']})")
    parallel = OnnxModel(directory, manifest["parallel"], manifest["vocab_size"])
    unit = manifest["parallel"]["length_unit"]
    length = -(-len(ids) // unit) * unit
    limit = parallel_limit(manifest["parallel"])
    if limit is not None and length > limit:
        # ONNX Runtime's Gather error otherwise, or a length beyond what the export was verified at.
        raise ExportError(f"--ids holds {len(ids)} tokens; this export takes at most {limit} in one sequence")
    tokens = np.zeros((1, length), dtype=np.int64)
    tokens[0, : len(ids)] = ids
    mask = np.arange(length)[None, :] >= len(ids)
    logits = parallel.run({"tokens": tokens, "padding_mask": mask})[0][0]
    if logits.ndim != 1:
        raise ExportError("this export predicts tokens, not classes; use generate")
    probs = np.exp(logits - logits.max())
    return probs / probs.sum()


class _Parser(argparse.ArgumentParser):
    """argparse whose errors raise ExportError, so that a bad argument ends the run with one line."""

    def error(self, message: str) -> NoReturn:
        raise ExportError(f"{message} (see --help)")


def escape_controls(text: str, keep: str = "") -> str:
    """``text`` with every control character but those in ``keep`` written as its Python escape (``\\x1b``)."""
    return CONTROLS.sub(lambda match: match.group() if match.group() in keep else repr(match.group())[1:-1], text)


def _graph_errors() -> tuple[type[BaseException], ...]:
    """The errors of opening or running a graph that does not fit its manifest: ONNX Runtime's own
    (which derive from Exception alone) and NumPy's for a size it cannot allocate or index."""
    errors: tuple[type[BaseException], ...] = (RuntimeError, ValueError, MemoryError, OverflowError, IndexError)
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError:
        return errors
    names = ("Fail", "InvalidArgument", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "NoModel", "RuntimeException",
             "NotImplemented", "ModelLoaded", "EngineError", "EPFail")
    return errors + tuple(getattr(state, name) for name in names if hasattr(state, name))


def main(argv: list[str]) -> int:
    """Run the command line; 0 on success, 2 with one ``run_onnx: error: ...`` line on stderr otherwise."""
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="the export directory: manifest.json, the graphs, this file")
    sub = parser.add_subparsers(dest="mode", required=True)
    gen = sub.add_parser("generate", help="stream text from a language model through step.onnx",
                         description="Stream text from a language model through step.onnx: the prompt in one call, "
                                     "then one token per call.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--prompt", default="def ", help="the text to continue, encoded as the model was trained")
    gen.add_argument("--tokens", type=int, default=200, help="tokens to sample after the prompt")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    gen.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0 for all")
    gen.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    gen.add_argument("--raw", action="store_true", help="write the text exactly as decoded, control characters included")
    cls = sub.add_parser("classify", help="class probabilities of one sequence through model.onnx",
                         description="Class probabilities of one sequence of token ids through model.onnx, as JSON.")
    cls.add_argument("--ids", required=True, help="comma-separated token ids, e.g. 11,3,7")
    try:
        args = parser.parse_args(argv)
        manifest = load(args.directory)
        if args.mode == "generate":
            # A prompt's bytes that are not UTF-8 (surrogates from the command line) are shown as U+FFFD.
            shown_prompt = args.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            text = shown_prompt + generate(args.directory, manifest, args.prompt, args.tokens, args.temperature, args.top_k or None, args.seed)
            print(text if args.raw else escape_controls(text, keep="\n\t"))
        else:
            try:
                ids = [int(i) for i in args.ids.split(",")]
            except ValueError:
                raise ExportError(f"--ids={args.ids!r} is not valid; expected comma-separated integers, e.g. 11,3,7") from None
            probs = classify(args.directory, manifest, ids)
            result = {"class": int(probs.argmax()), "probabilities": [round(float(p), 4) for p in probs]}
            if "labels" in manifest:
                labels = load_json(args.directory / manifest["labels"])
                result["label"] = labels[result["class"]] if isinstance(labels, list) and result["class"] < len(labels) else None
            print(json.dumps(result))
    except ExportError as error:
        shown = escape_controls(str(error), keep="\n")
        print(f"run_onnx: error: {shown}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001  (narrowed at once to the errors of running a graph)
        if not isinstance(error, _graph_errors()):
            raise
        # ONNX Runtime's and NumPy's own errors, where a graph does not fit its manifest (a damaged or
        # swapped graph, sizes the graph refuses): one line naming the export, as for the checks above.
        reason = " ".join(str(error).split())[:500]
        print(f"run_onnx: error: the export in {escape_controls(str(args.directory))} does not run as its manifest "
              f"describes ({type(error).__name__}: {escape_controls(reason)}); export it again", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:
        # The reader of stdout went away (run_onnx.py ... | head): its choice, so stop quietly with
        # the status a shell gives a process SIGPIPE ended (141, as `yes | head`), not a failure's;
        # stdout goes to /dev/null so that Python's flush at exit does not raise it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + 13)
