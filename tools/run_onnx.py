"""Run an exported seqmix model with ONNX Runtime and NumPy only: no seqmix, no torch.

    python tools/run_onnx.py <export dir> generate --prompt "def " [--tokens 200] [--temperature 0.8] [--top-k 40] [--seed 0]
    python tools/run_onnx.py <export dir> classify --ids 11,3,7,15

`generate` streams a byte-level model through step.onnx, one token per call, feeding the state
outputs back as inputs (constant memory); `classify` runs model.onnx on one sequence, padded to the
graph's length unit. Everything about the graphs comes from manifest.json, checked first.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

NUMPY_DTYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


class ExportError(ValueError):
    """The export directory or an input does not fit what the manifest promises."""


class OnnxModel:
    """One exported graph with its manifest entry; inputs are checked against it before running."""

    def __init__(self, directory: Path, entry: dict):
        self.entry = entry
        self.session = ort.InferenceSession(str(directory / entry["file"]), providers=["CPUExecutionProvider"])
        self.inputs = {spec["name"]: spec for spec in entry["inputs"]}

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name, spec in self.inputs.items():
            if name not in feed:
                raise ExportError(f"input {name!r} is missing; the graph takes {list(self.inputs)}")
            value = feed[name]
            expected = NUMPY_DTYPES.get(spec["dtype"])
            if expected is not None and value.dtype != expected:
                raise ExportError(f"input {name!r} has dtype {value.dtype}, expected {np.dtype(expected)} ({spec['dtype']})")
            if len(value.shape) != len(spec["shape"]):
                raise ExportError(f"input {name!r} has shape {value.shape}, expected rank {len(spec['shape'])} {spec['shape']}")
            for axis, (got, want) in enumerate(zip(value.shape, spec["shape"])):
                if isinstance(want, int) and got != want:
                    raise ExportError(f"input {name!r} has shape {value.shape}; axis {axis} must be {want} (manifest {spec['shape']})")
        return self.session.run(None, feed)


def load(directory: Path) -> dict:
    """Read and check manifest.json."""
    path = directory / "manifest.json"
    if not path.is_file():
        raise ExportError(f"{path} does not exist; export the model with tools/export.py first")
    manifest = json.loads(path.read_text())
    for key in ("format", "vocab_size", "parallel"):
        if key not in manifest:
            raise ExportError(f"{path} has no {key!r}; re-export the model")
    if manifest["format"] != "onnx":
        raise ExportError(f"{path} describes a {manifest['format']!r} export; this runner takes ONNX")
    return manifest


def initial_state(manifest: dict) -> list[np.ndarray]:
    """The step graph's state before any token, as the manifest describes it (0, or −1 for empty cache slots)."""
    return [np.full(s["shape"], s["fill"], dtype=np.dtype(s["dtype"])) for s in manifest["step"]["state"]]


def sample(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """One token id from a (V,) logits vector."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.astype(np.float64) / temperature
    if top_k:
        cutoff = np.sort(logits)[-top_k]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def generate(directory: Path, manifest: dict, prompt: str, tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
    """Stream ``tokens`` bytes after ``prompt`` through the step graph."""
    if "step" not in manifest:
        raise ExportError("this export has no step graph (a bidirectional model or a classifier); use classify")
    step = OnnxModel(directory, manifest["step"])
    state = initial_state(manifest)
    names = [s["name"] for s in manifest["step"]["state"]]
    rng = np.random.default_rng(seed)
    out = bytearray()
    logits = None
    for token in list(prompt.encode()) + [None] * tokens:
        if token is None:
            token = sample(logits, temperature, top_k, rng)
            out.append(token)
        outputs = step.run({"tokens": np.array([[token]], dtype=np.int64), **dict(zip(names, state))})
        logits, state = outputs[0][0, -1], outputs[1:]
    return out.decode("utf-8", errors="replace")


def classify(directory: Path, manifest: dict, ids: list[int]) -> np.ndarray:
    """Class probabilities for one sequence of token ids."""
    parallel = OnnxModel(directory, manifest["parallel"])
    unit = manifest["parallel"]["length_unit"]
    length = -(-len(ids) // unit) * unit
    tokens = np.zeros((1, length), dtype=np.int64)
    tokens[0, : len(ids)] = ids
    mask = np.arange(length)[None, :] >= len(ids)
    logits = parallel.run({"tokens": tokens, "padding_mask": mask})[0][0]
    if logits.ndim != 1:
        raise ExportError("this export predicts tokens, not classes; use generate")
    probs = np.exp(logits - logits.max())
    return probs / probs.sum()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    sub = parser.add_subparsers(dest="mode", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--prompt", default="def ")
    gen.add_argument("--tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=40)
    gen.add_argument("--seed", type=int, default=0)
    cls = sub.add_parser("classify")
    cls.add_argument("--ids", required=True, help="comma-separated token ids")
    args = parser.parse_args(argv)
    try:
        manifest = load(args.directory)
        if args.mode == "generate":
            print(args.prompt + generate(args.directory, manifest, args.prompt, args.tokens, args.temperature, args.top_k or None, args.seed))
        else:
            probs = classify(args.directory, manifest, [int(i) for i in args.ids.split(",")])
            print(json.dumps({"class": int(probs.argmax()), "probabilities": [round(float(p), 4) for p in probs]}))
    except ExportError as error:
        print(f"run_onnx: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
