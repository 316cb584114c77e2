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


def test_a_path_the_system_cannot_look_up_is_refused_by_name(tmp_path):
    """A name over the file system's limit was pathlib's OSError (File name too long), and a NUL byte its ValueError."""
    for path, reason in (("a" * 5000, "File name too long"), (str(tmp_path / ("b" * 300) / "c"), "File name too long"),
                         ("x\0y", "embedded null byte")):
        for load, field in ((seqmix.load_model, "load_model: directory"), (seqmix.from_pretrained, "from_pretrained: name")):
            with pytest.raises(SeqmixError, match=f"^{re.escape(field)}=.* is not valid: {reason}"):
                load(path)


def test_the_loaders_flags_are_checked(tmp_path):
    """allow_unverified='yes' (or 1) was taken as true, and a revision for a local directory went unused."""
    seqmix.save_pretrained(_model("gpt2"), tmp_path / "m")
    for load, name in ((seqmix.load_model, "load_model"), (seqmix.from_pretrained, "from_pretrained")):
        for flag in ("yes", 1, None):
            with pytest.raises(SeqmixError, match=f"{name}: allow_unverified={flag!r} is not valid; expected True or False"):
                load(tmp_path / "m", allow_unverified=flag)
    with pytest.raises(SeqmixError, match="revision=5 is not valid; expected a branch, tag or commit"):
        from_pretrained(tmp_path / "m", revision=5)
    with pytest.raises(SeqmixError, match="revision='main' names a version of a Hub repository, and .* is a local directory"):
        from_pretrained(tmp_path / "m", revision="main")


@pytest.mark.parametrize("arguments, message", [
    ({"task": "abc"}, "save_pretrained: task: task config is a str"),
    ({"task": {"task": "nope"}}, r"save_pretrained: task: task.task='nope' is not valid"),
    ({"task": {"task": "mqar", "x": 1}}, "save_pretrained: task: task 'mqar' has no option 'x'"),
    ({"task": {"task": "mqar", "seq_len": float("nan")}}, "save_pretrained: task: .*seq_len"),
    ({"task": {"task": "mqar", "seq_len": torch.tensor(8)}}, "save_pretrained: task: task.seq_len is a Tensor"),
    ({"training": "abc"}, "save_pretrained: training='abc' is not valid; expected a mapping of some of"),
    ({"training": {"metrics": {"loss": torch.tensor(1.0)}}}, "training metrics=.* is not valid; expected a mapping of names to numbers"),
    ({"training": {"command": 5}}, "training command=5 is not valid; expected text"),
])
def test_save_pretrained_refuses_what_its_readers_would_before_writing(arguments, message, tmp_path):
    """A task export would refuse (an unknown name, NaN) was saved with checksums; a string or a tensor
    among the card's facts was Python's ValueError or json's TypeError."""
    with pytest.raises(SeqmixError, match=message):
        seqmix.save_pretrained(_model("gpt2"), tmp_path / "m", **arguments)
    assert list(tmp_path.iterdir()) == []


def test_saving_a_model_whose_config_was_edited_after_it_was_built_is_refused(tmp_path):
    """Both saves wrote, with checksums, a directory whose config no loader would read with its weights."""
    model = _model("gpt2")
    model.config = {**model.config, "d_model": 2 * model.config["d_model"]}
    for save in (seqmix.save_model, seqmix.save_pretrained):
        with pytest.raises(SeqmixError, match=f"{save.__name__}: the model's d_model is 16, but the model's config builds it with 32"):
            save(model, tmp_path / "m")
        assert list(tmp_path.iterdir()) == []


def test_save_pretrained_replaces_only_a_pretrained_directory_and_save_model_only_its_own(tmp_path):
    """Any folder with a config.json was replaced whole (a Hugging Face model's weights and a user's
    notes deleted), and save_model wrote over and beside anything."""
    model = _model("megalodon")
    first = seqmix.save_pretrained(model, tmp_path / "m")
    seqmix.save_pretrained(model, first)
    assert from_pretrained(first) is not None
    (first / "notes.txt").write_text("mine")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    notes, hf_model, folder_of_files = tmp_path / "notes", tmp_path / "hf", tmp_path / "saved_model_and_more"
    for folder, files in ((notes, {"mine.txt": "keep"}), (hf_model, {"config.json": '{"model_type": "bert"}', "pytorch_model.bin": "w"})):
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    seqmix.save_model(model, folder_of_files)
    (folder_of_files / "sub").mkdir()
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    refusals = [
        (seqmix.save_pretrained, first, r"holds notes.txt, which this save does not write"),
        (seqmix.save_pretrained, other, r"config.json is not a seqmix model's \(model_type='bert'\)"),
        (seqmix.save_pretrained, notes, r"holds mine.txt, which this save does not write"),
        (seqmix.save_pretrained, hf_model, r"holds pytorch_model.bin, which this save does not write"),
        (seqmix.save_model, first, r"holds README.md, config.json, notes.txt, which this save does not write"),
        (seqmix.save_model, notes, r"holds mine.txt"),
        (seqmix.save_model, folder_of_files, r"holds sub, which this save does not write"),
    ]
    for save, folder, message in refusals:
        with pytest.raises(SeqmixError, match=message):
            save(model, folder)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "a staging directory was left behind"


def test_a_symbolic_link_as_a_saved_models_folder_is_refused_before_anything_is_written(tmp_path):
    """The files went through the link before the save failed (the loaders take only real folders),
    and a dangling link was a FileExistsError, for train.out_dir too; a run directory may be a link."""
    from seqmix.errors import require_writable_dir

    model = _model("megalodon")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for save in (seqmix.save_model, seqmix.save_pretrained):
        with pytest.raises(SeqmixError, match="link' is not valid: it is a symbolic link; name the folder itself"):
            save(model, tmp_path / "link")
        for folder in (tmp_path / "dangling", tmp_path / "dangling" / "deeper"):
            with pytest.raises(SeqmixError, match="dangling' is a symbolic link to nothing"):
                save(model, folder)
    assert list((tmp_path / "target").iterdir()) == [] and not (tmp_path / "nowhere").exists()
    with pytest.raises(SeqmixError, match="train.out_dir=.* is a symbolic link to nothing"):
        require_writable_dir("train.out_dir", tmp_path / "dangling")
    require_writable_dir("train.out_dir", tmp_path / "link")


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


def test_a_config_json_that_is_no_object_says_so(saved, tmp_path):
    """A list was reported as model_type='list'."""
    directory = tmp_path / "model"
    shutil.copytree(saved, directory)
    (directory / CONFIG_JSON).write_text("[1, 2]")
    write_checksums(directory)
    with pytest.raises(SeqmixError, match=r"config.json holds a JSON array, not an object"):
        from_pretrained(directory)


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


def test_a_folder_written_by_a_newer_seqmix_is_warned_of_and_an_older_or_unknown_version_is_not(saved, tmp_path):
    """A newer seqmix's folder loaded silently, or failed on an option it added with no word of why."""
    import warnings

    from seqmix.errors import SeqmixWarning

    def with_version(version, **changes) -> Path:
        directory = tmp_path / f"model-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(saved, directory)
        config = {**json.loads((directory / CONFIG_JSON).read_text()), "seqmix_version": version, **changes}
        (directory / CONFIG_JSON).write_text(json.dumps(config))
        write_checksums(directory)
        return directory

    with pytest.warns(SeqmixWarning, match=rf"written by seqmix 99\.0\.0, newer than this seqmix {seqmix.__version__}"):
        assert from_pretrained(with_version("99.0.0")).vocab_size == 256
    with pytest.warns(SeqmixWarning, match="upgrade seqmix if loading fails"), pytest.raises(SeqmixError, match="added_in_99"):
        from_pretrained(with_version("99.0.0", added_in_99=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeqmixWarning)
        for version in (seqmix.__version__, "0.0.1", "not a version", 3, "9" * 5000):
            assert from_pretrained(with_version(version)).vocab_size == 256


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
    assert "nor is it a local directory here" in str(refused.value)
    with pytest.raises(SeqmixError, match="neither a directory nor a valid Hub repository id"):
        from_pretrained("not a/valid id")
    # A mistyped local path was told as a failed download from the Hub.
    for path in ("/no/such/model", "./no-such-model", "runs/no/such"):
        with pytest.raises(SeqmixError, match=f"from_pretrained: '{re.escape(path)}' does not exist"):
            from_pretrained(path)


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


def _hub_cache(saved: Path, cache: Path, repo: str = "me/notes") -> Path:
    """``saved`` laid out as huggingface_hub's cache holds a download: files in blobs/ named by
    their sha256, and the snapshot's entries links to them. Returns the snapshot folder."""
    import hashlib

    repository = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (repository / "blobs").mkdir(parents=True)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)
    snapshot = repository / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in saved.iterdir():
        blob = repository / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


def test_a_model_in_the_hub_cache_loads_through_its_links_and_only_links_into_its_blobs(saved, tmp_path, monkeypatch):
    """snapshot_download gives a folder of links into the cache's blobs/: every Hub download was
    refused as 'a symbolic link', and a git clone of a Hub repository for its .gitattributes."""
    import huggingface_hub.constants

    # The library reads the variable once, at import: an earlier test may have imported it.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = _hub_cache(saved, tmp_path / "cache")
    tokens = torch.randint(0, 256, (1, 9))
    expected = from_pretrained(saved)(tokens)
    torch.testing.assert_close(from_pretrained("me/notes")(tokens), expected, rtol=0, atol=0)
    torch.testing.assert_close(from_pretrained(snapshot)(tokens), expected, rtol=0, atol=0)
    # A link out of the blobs folder is refused as ever, even in a snapshot.
    outside = tmp_path / "elsewhere.md"
    outside.write_text((saved / CARD).read_text())
    (snapshot / CARD).unlink()
    (snapshot / CARD).symlink_to(outside)
    with pytest.raises(SeqmixError, match="README.md is a symbolic link"):
        from_pretrained(snapshot)
    # A clone: git's own entries are not files of the model.
    clone = tmp_path / "clone"
    shutil.copytree(saved, clone)
    (clone / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (clone / ".git").mkdir()
    torch.testing.assert_close(from_pretrained(clone)(tokens), expected, rtol=0, atol=0)
    (clone / "extra.txt").write_text("not listed")
    with pytest.raises(SeqmixError, match="extra.txt is not listed in checksums.json"):
        from_pretrained(clone)


def test_saves_refuse_non_finite_weights_and_a_config_that_is_no_description_before_writing(tmp_path):
    """NaN weights were saved with checksums into folders every loader refused as damaged; a config
    that was no mapping was a ValueError traceback from dict()."""
    for save in (seqmix.save_model, seqmix.save_pretrained):
        model = _model("megalodon")
        with torch.no_grad():
            model.embed.weight[3, 1] = float("nan")
        with pytest.raises(SeqmixError, match=r"tensor 'embed.weight' holds NaN or infinite values; .* not saved"):
            save(model, tmp_path / save.__name__)
        model = _model("megalodon")
        model.config = "x"
        with pytest.raises(SeqmixError, match="the model's config is a str, not the description"):
            save(model, tmp_path / save.__name__)
    assert list(tmp_path.iterdir()) == []


def test_the_loaders_take_cpu_0_and_name_a_checksums_record_that_is_no_file(saved, tmp_path):
    """'cpu:0' was blamed on the file (safetensors: device cpu:0 is invalid); a folder in the record's
    place was 'missing', with advice (allow_unverified) that did not help."""
    tokens = torch.randint(0, 256, (1, 5))
    torch.testing.assert_close(from_pretrained(saved, device="cpu:0")(tokens), from_pretrained(saved)(tokens))
    directory = tmp_path / "model"
    shutil.copytree(saved, directory)
    (directory / "checksums.json").unlink()
    (directory / "checksums.json").mkdir()
    for allow_unverified in (False, True):
        with pytest.raises(SeqmixError, match="checksums.json is a directory, not a regular file; refusing to load"):
            from_pretrained(directory, allow_unverified=allow_unverified)


def test_a_saved_model_naming_a_mixer_that_is_not_installed_says_a_package_may_be_missing(saved, tmp_path):
    """It was only 'is not valid; expected one of [...]': nothing said a plugin's package was missing here."""
    directory = tmp_path / "model"
    shutil.copytree(saved, directory)
    config = json.loads((directory / CONFIG_JSON).read_text())
    config["mixers"]["megalodon"]["mixer"] = "shift_gate"
    (directory / CONFIG_JSON).write_text(json.dumps(config))
    write_checksums(directory)
    with pytest.raises(SeqmixError, match=r"mixer='shift_gate' is not valid; .*known only where that package is installed"):
        from_pretrained(directory)
