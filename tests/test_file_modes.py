"""What seqmix writes for others to read takes the modes the umask gives (0644 files and 0755 folders
under umask 022), never the private 0600 / 0700 of tempfile's names or of safetensors' writer."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch

import seqmix
from seqmix.staging import new_directory, new_file, write_shareable
from seqmix.tasks import build_task
from seqmix.tasks.byte_lm import ByteLM
from seqmix.training.checkpoints import save_checkpoint

from conftest import tiny_preset, write_text_corpus


@pytest.fixture
def umask():
    """Sets the process's umask for one test (``umask(0o022)``) and restores the old one after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _private(root: Path) -> list[str]:
    """Entries under ``root`` (pytest's own private folder left out) that others cannot read, with their modes."""
    return [f"{entry} {_mode(entry):o}" for entry in root.rglob("*") if not entry.is_symlink() and _mode(entry) & 0o044 != 0o044]


def test_saved_models_pretrained_folders_and_training_checkpoints_are_readable_by_others(tmp_path, umask):
    model = tiny_preset("mega")
    seqmix.save_model(model, tmp_path / "model")
    for _ in range(2):  # the second replaces the first folder
        seqmix.save_pretrained(model, tmp_path / "pretrained")
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, model.vocab_size, (1, 8))).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "run", 1, model, optimizer, keep=2)
    assert (tmp_path / "run" / "checkpoints" / "step-00000001" / "optimizer.safetensors").is_file()
    assert _private(tmp_path) == []
    assert _mode(tmp_path / "pretrained") == 0o755 and _mode(tmp_path / "model" / "model.safetensors") == 0o644


def test_task_caches_are_readable_by_others(tmp_path, umask):
    ByteLM(seq_len=32, cache_dir=tmp_path / "bytes", max_bytes=4096)
    build_task("text", path=write_text_corpus(tmp_path / "corpus"), cache_dir=str(tmp_path / "tokens"), seq_len=16)
    assert len(list((tmp_path / "bytes").iterdir())) == 2 and any((tmp_path / "tokens").iterdir())
    assert _private(tmp_path) == []


def _private_writer(path: Path) -> None:
    """Writes ``path`` as safetensors does: a private temporary file renamed onto it."""
    handle, temporary = tempfile.mkstemp(dir=path.parent)
    os.write(handle, b"weights")
    os.close(handle)
    os.replace(temporary, path)


def test_write_shareable_leaves_the_mode_open_gives_whatever_the_writer_gives(tmp_path, umask):
    write_shareable(tmp_path / "shared", _private_writer)
    assert (tmp_path / "shared").read_bytes() == b"weights" and _mode(tmp_path / "shared") == 0o644
    # An existing file keeps its own mode, as open() leaves it.
    (tmp_path / "kept").write_bytes(b"")
    os.chmod(tmp_path / "kept", 0o640)
    write_shareable(tmp_path / "kept", _private_writer)
    assert _mode(tmp_path / "kept") == 0o640
    # A private umask is followed too: the mode is the umask's, not always public.
    umask(0o077)
    write_shareable(tmp_path / "private", _private_writer)
    assert _mode(tmp_path / "private") == 0o600


def test_new_names_are_fresh_and_take_the_umask(tmp_path, umask):
    folders = {new_directory(tmp_path, ".out.partial-") for _ in range(20)}
    files = {new_file(tmp_path, ".weights.", ".tmp") for _ in range(20)}
    assert len(folders) == 20 and len(files) == 20
    assert all(folder.is_dir() and folder.name.startswith(".out.partial-") and _mode(folder) == 0o755 for folder in folders)
    assert all(file.is_file() and file.name.endswith(".tmp") and _mode(file) == 0o644 for file in files)
    umask(0o027)
    assert _mode(new_directory(tmp_path, "x")) == 0o750 and _mode(new_file(tmp_path, "y")) == 0o640
