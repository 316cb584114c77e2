"""manifest.json: what an export directory holds, checked before anything runs it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mixers import SeqmixError

MANIFEST = "manifest.json"
REQUIRED = {"format", "vocab_size", "impls"}


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
    return path


def read_manifest(out_dir: str | Path) -> dict:
    """Load and validate ``manifest.json``: required keys, and every file it names exists."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise SeqmixError(f"{path} does not exist; export the model first with tools/export.py")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SeqmixError(f"{path} is not valid JSON ({error}); re-export the model") from None
    if not isinstance(manifest, dict) or not REQUIRED <= set(manifest):
        raise SeqmixError(f"{path} lacks the keys {sorted(REQUIRED - set(manifest or {}))}; re-export the model")
    for section in ("parallel", "step"):
        entry = manifest.get(section)
        if entry is not None and not (Path(out_dir) / entry["file"]).is_file():
            raise SeqmixError(f"{path} names {entry['file']} for the {section} graph, but that file is missing")
    return manifest
