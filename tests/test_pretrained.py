"""The Hugging Face layout: save_pretrained -> from_pretrained gives the same model, and loading one stays safe.

Everything runs offline (HF_HUB_OFFLINE=1); the Hub upload is checked against a stand-in for HfApi.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqmix
from seqmix import SeqmixError, from_pretrained
from conftest import composed_config
from seqmix.model.checkpoint import write_checksums
from seqmix.model.pretrained import CARD, CONFIG_JSON, HUB_FILES

from conftest import examples

PRESETS = ["megalodon", "mega_encoder", "gpt2"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _model(preset: str):
    torch.manual_seed(0)
    return seqmix.instantiate_model(composed_config([f"model={preset}", "model.d_model=16", "model.depth=1"]).model).eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_save_pretrained_then_from_pretrained_gives_identical_logits(preset, tmp_path):
    model = _model(preset)
    training = {"name": "probe", "data": "mqar", "data_sha256": "ab" * 32, "metrics": {"accuracy": 0.75}, "command": "seqmix train task=mqar"}
    directory = seqmix.save_pretrained(model, tmp_path / "pretrained", training)
    assert sorted(p.name for p in directory.iterdir()) == sorted(HUB_FILES)
    config = json.loads((directory / CONFIG_JSON).read_text())
    assert config["model_type"] == "seqmix" and config["seqmix_version"] == seqmix.__version__
    assert "_target_" not in json.dumps(config)
    card = (directory / CARD).read_text()
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert f"parameters: {parameters:,}" in card and "ab" * 32 in card and "seqmix train task=mqar" in card
    loaded = from_pretrained(directory).eval()
    tokens = torch.randint(0, model.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_an_empty_or_unwritable_directory_is_refused_by_every_save_and_load(tmp_path, monkeypatch):
    # Path("") is the current folder: an empty value must not write the model there, or load one from there.
    monkeypatch.chdir(tmp_path)
    model = _model("gpt2")
    calls = {
        "save_model: directory=''": lambda: seqmix.save_model(model, ""),
        "save_pretrained: directory=''": lambda: seqmix.save_pretrained(model, ""),
        "load_model: directory=''": lambda: seqmix.load_model(""),
        "from_pretrained: name=''": lambda: seqmix.from_pretrained(""),
    }
    for named, call in calls.items():
        with pytest.raises(SeqmixError, match=f"^{re.escape(named)} is not valid.*expected a non-empty path"):
            call()
    (tmp_path / "a_file").write_text("")
    for save in (seqmix.save_model, seqmix.save_pretrained):
        with pytest.raises(SeqmixError, match="directory=.*a_file/m.* is not valid: .*is a file, not a folder"):
            save(model, tmp_path / "a_file" / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_save_pretrained_replaces_only_a_pretrained_directory(tmp_path):
    model = _model("megalodon")
    first = seqmix.save_pretrained(model, tmp_path / "m")
    (first / "stale.txt").write_text("from an earlier save")
    seqmix.save_pretrained(model, first)
    assert not (first / "stale.txt").exists() and from_pretrained(first) is not None
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(SeqmixError, match="holds files but no config.json"):
        seqmix.save_pretrained(model, other)
    assert sorted(p.name for p in other.iterdir()) == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "a staging directory was left behind"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return seqmix.save_pretrained(_model("megalodon"), tmp_path_factory.mktemp("pretrained") / "model")


HOSTILE = [
    ("a target", lambda c: c["ffn"].update({"_target_": "os.system", "command": "touch pwned"}), "not a part seqmix builds"),
    ("another model type", lambda c: c.update({"model_type": "llama"}), "model_type='llama'"),
    ("a huge depth", lambda c: c.update({"depth": 10**7}), "does not belong to these weights"),
    ("a huge width", lambda c: c.update({"d_model": 10**6}), "does not belong to these weights"),
    ("an unknown mixer", lambda c: c["mixers"]["megalodon"].update({"mixer": "evil"}), "is not valid"),
    ("a string for a bool", lambda c: c.update({"tie_embeddings": "false"}), "expected bool"),
]


@pytest.mark.parametrize("what, edit, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_config_json_is_refused_even_with_rewritten_checksums(what, edit, message, saved, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(saved, directory)
    config = json.loads((directory / CONFIG_JSON).read_text())
    edit(config)
    (directory / CONFIG_JSON).write_text(json.dumps(config))
    with pytest.raises(SeqmixError, match="config.json does not match its sha256"):
        from_pretrained(directory)
    write_checksums(directory)
    with pytest.raises(SeqmixError, match=message):
        from_pretrained(directory)
    assert not (Path.cwd() / "pwned").exists()


@given(removed=st.sets(st.sampled_from(HUB_FILES), min_size=1))
@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_pretrained_directory_missing_files_is_refused_unless_unverified_is_asked(removed, saved, tmp_path):
    directory = tmp_path / f"model-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(saved, directory)
    for name in removed:
        (directory / name).unlink()
    with pytest.raises(SeqmixError):
        from_pretrained(directory)
    if "checksums.json" in removed and removed <= {"checksums.json", CARD}:
        assert from_pretrained(directory, allow_unverified=True).vocab_size == 256


def test_a_symlink_in_a_pretrained_directory_is_refused(saved, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(saved, directory)
    outside = tmp_path / "weights.safetensors"
    shutil.move(directory / "model.safetensors", outside)
    (directory / "model.safetensors").symlink_to(outside)
    with pytest.raises(SeqmixError, match="symbolic link"):
        from_pretrained(directory)


def test_an_unknown_repository_offline_is_a_named_error():
    with pytest.raises(SeqmixError, match="could not fetch 'nobody/no-such-seqmix-model' from the Hugging Face Hub") as refused:
        from_pretrained("nobody/no-such-seqmix-model")
    assert "\n" not in str(refused.value)  # the Hub's several lines, told in one
    with pytest.raises(SeqmixError, match="neither a directory nor a valid Hub repository id"):
        from_pretrained("not a/valid//id")


def test_push_to_hub_uploads_the_pretrained_layout(monkeypatch, tmp_path):
    """Through a stand-in for HfApi: the uploaded folder is exactly what from_pretrained reads back."""
    import huggingface_hub

    calls, uploaded = [], tmp_path / "uploaded"

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id))
            shutil.copytree(folder_path, uploaded)
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = _model("megalodon")
    url = seqmix.push_to_hub(model, "someone/tiny-megalodon", private=True, token="t")
    assert url.endswith("/commit/0")
    assert calls == [("init", "t"), ("create_repo", "someone/tiny-megalodon", True, True), ("upload_folder", "someone/tiny-megalodon")]
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(uploaded).eval()(tokens), model(tokens), rtol=0, atol=0)


def test_push_to_hub_names_a_bad_repository_id_before_saving_and_a_refused_upload(monkeypatch):
    import huggingface_hub

    class OfflineApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            raise ConnectionError("Name or service not known\nretry later")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    monkeypatch.setattr(seqmix.model.pretrained, "save_pretrained", lambda *a, **k: pytest.fail("saved before the id was checked"))
    model = _model("megalodon")
    for bad in ("bad repo id!", "a//b", 123):
        with pytest.raises(SeqmixError, match=rf"push_to_hub: repo_id={bad!r} is not a valid Hub repository id"):
            seqmix.push_to_hub(model, bad)
    monkeypatch.undo()
    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    # The Hub's error (here: no network), told in one line, as from_pretrained tells it.
    with pytest.raises(SeqmixError, match=r"could not push to 'someone/tiny' on the Hugging Face Hub \(ConnectionError: "
                       r"Name or service not known retry later\)"):
        seqmix.push_to_hub(model, "someone/tiny")


def test_train_saves_pretrained_and_evaluate_and_export_read_it(tmp_path, capsys):
    """seqmix train train.save_pretrained=<dir>; then evaluate and export take that directory like a run."""
    from seqmix.cli import main
    from seqmix.export.manifest import read_manifest
    from seqmix.training.checkpoints import load_run

    run, pretrained = tmp_path / "run", tmp_path / "pretrained"
    assert main([
        "train", "model=transformer", "model.d_model=16", "model.depth=1", "task=mqar", "task.vocab_size=64",
        "task.seq_len=64", "task.num_pairs=4", "train.batch_size=2", "train.max_steps=2", "train.eval_batches=1",
        "train.progress=false", "train.device=cpu", f"train.out_dir={run}", f"train.save_pretrained={pretrained}",
    ]) == 0
    card = (pretrained / CARD).read_text()
    assert "seqmix train" in card and "train.save_pretrained=" in card and '"task": "mqar"' in card
    assert re.search(r"- metrics: \{.*\} \(validation: 1 batch of 2 sequences\)", card), card
    from_run, _ = load_run(run)
    shared = from_pretrained(pretrained).eval()
    tokens = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(shared(tokens), from_run.eval()(tokens), rtol=0, atol=0)
    # Without options evaluate scores the directory as the run scored itself: the card's final metrics.
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["split"] == "valid"
    capsys.readouterr()
    assert main(["evaluate", f"checkpoint={pretrained}"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores == {"task": "mqar", "batches": 1, "batch_size": 2, "bf16": False, "loss": final["loss"], "accuracy": final["accuracy"]}
    assert json.loads((pretrained / CONFIG_JSON).read_text())["evaluation"] == {"batches": 1, "batch_size": 2, "bf16": False}
    assert main(["export", f"checkpoint={pretrained}", f"out={tmp_path / 'export'}", "length=64"]) == 0
    assert read_manifest(tmp_path / "export")["vocab_size"] == 64
