"""The ``seqmix`` command: one entry point, Hydra overrides everywhere, short errors, nothing written before validation."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import subprocess
import sys

import pytest

from seqmix.cli import COMMANDS, main
from seqmix.errors import SeqmixError
from seqmix.configs import CONF_DIR, config_groups

from conftest import SEQMIX

TINY_TRAIN = [
    "model=mega", "model.d_model=16", "model.depth=1", "task=mqar", "task.vocab_size=64", "task.seq_len=64",
    "task.num_pairs=4", "train.batch_size=2", "train.max_steps=2", "train.warmup_steps=1", "train.eval_every=2",
    "train.eval_batches=1", "train.checkpoint_every=2", "train.log_every=1", "train.progress=false", "train.device=cpu",
]


def run(capsys, *arguments: str) -> tuple[int, str, str]:
    status = main(list(arguments))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_the_overview_lists_every_command(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for name, command in COMMANDS.items():
        assert f"  {name}" in out and command.summary in out
    assert {"train", "evaluate", "generate", "export", "describe", "search", "bench", "gather", "tour"} <= set(COMMANDS)


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_seqmix_torch_and_python(flag, capsys):
    import platform

    import torch

    import seqmix

    status, out, _ = run(capsys, flag)
    assert status == 0
    assert out.strip() == f"seqmix {seqmix.__version__} (torch {torch.__version__}, Python {platform.python_version()})"
    # The version the package installs as is the one it reports.
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == seqmix.__version__
    # Anything after it was ignored without a word.
    status, out, err = run(capsys, flag, "extra")
    assert status == 2 and out == "" and f"{flag} takes no arguments, got ['extra']" in err


def test_no_command_prints_the_overview_and_fails(capsys):
    status, out, _ = run(capsys)
    assert status == 2 and "commands:" in out


def test_an_unknown_command_lists_the_commands(capsys):
    status, _, err = run(capsys, "trian")
    assert status == 2 and "unknown command 'trian'" in err and "'train'" in err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_lists_its_options_and_groups(name, capsys):
    status, out, _ = run(capsys, name, "--help")
    assert status == 0 and out.startswith(f"usage: seqmix {name}")
    command = COMMANDS[name]
    if command.options:
        first_key = next(line.split(":")[0] for line in (CONF_DIR / command.options).read_text().splitlines()
                         if line and not line.startswith(("#", " ", "defaults")))
        assert f"  {first_key}:" in out
    for group in command.groups:
        assert f"  {group}: {', '.join(config_groups()[group])}" in out


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["generate", "checkpoint=x", "temprature=0"], ["unknown key 'temprature'", "temperature"]),
        (["evaluate", "checkpoint=x", "batch=3"], ["unknown key 'batch'", "batch_size"]),
        (["export", "checkpoint=x", "fromat=onnx"], ["unknown key 'fromat'", "format"]),
        (["gather", "rot=runs"], ["unknown key 'rot'", "root"]),
        (["tour", "widht=8"], ["unknown key 'widht'", "width"]),
        (["bench", "bench=lowering", "bench.lowering.run=[x]"], ["unknown key 'bench.lowering.run'", "runs"]),
        (["bench", "bench=operators", "bench.mixer=[ema]"], ["unknown key 'bench.mixer'", "mixers"]),
        (["describe", "model.d_modle=8"], ["unknown key 'model.d_modle'", "d_model"]),
        (["train", "trian.max_steps=8"], ["unknown key 'trian'", "train"]),
        (["train", "+colour=red"], ["unknown key 'colour'", "model"]),
        (["evaluate", "+colour=red", "checkpoint=x"], ["unknown key 'colour'", "checkpoint"]),
        (["bench", "bench.lenghts=[64]"], ["unknown key 'bench.lenghts'", "lengths"]),
        (["search", "search=tiny", "search.n_trails=3"], ["unknown key 'search.n_trails'", "n_trials"]),
        (["describe", "model=llama"], ["model='llama' is not a preset", "megalodon"]),
        (["evaluate"], ["checkpoint is required", "seqmix evaluate checkpoint=<value>"]),
        (["generate", "checkpoint=x", "tokens=many"], ["tokens", "many"]),
        (["train", "train.max_steps"], ["cannot read the override 'train.max_steps'"]),
        (["search"], ["give one search=<name>", "tiny"]),
        (["tour", "--verbose"], ["unknown flag '--verbose'"]),
        (["describe", "-m", "model=mega,tcnca"], ["-m/--multirun sweeps only apply to ['train', 'search']"]),
        (["train", "-m", "model=mega,llama"], ["model='llama' is not a preset", "megalodon"]),
        # Hydra's own settings outside a sweep: Hydra would ignore them without a word.
        (["train", "hydra.run.dir=/tmp/elsewhere"], ["'hydra.run.dir=/tmp/elsewhere'", "only to sweeps (-m)", "train.out_dir"]),
        (["train", "hydra/launcher=local"], ["'hydra/launcher=local'", "only to sweeps (-m)"]),
        (["describe", "+hydra.job.chdir=true"], ["'+hydra.job.chdir=true'", "seqmix describe does not sweep"]),
        (["describe", "--cfg", "all"], ["--cfg all", "--cfg job"]),
    ],
)
def test_a_mistake_gets_one_short_message_naming_it(arguments, expected, capsys):
    status, out, err = run(capsys, *arguments)
    assert status == 2, out
    assert err.startswith(f"seqmix {arguments[0]}: error: ") and len(err.splitlines()) <= 2, err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize("flag", [["--cfg"], ["--cfg", "job"]], ids=["--cfg", "--cfg job"])
def test_cfg_prints_the_composed_config_and_runs_nothing(flag, capsys):
    status, out, _ = run(capsys, "describe", *flag, "model=tcnca", "model.depth=3")
    assert status == 0 and "depth: 3" in out and "model:" in out


def test_nothing_is_written_before_the_input_is_validated(tmp_path, capsys):
    out_dir = tmp_path / "run"
    status, _, err = run(capsys, "train", *TINY_TRAIN, "train.max_steps=0", f"train.out_dir={out_dir}")
    assert status == 2 and "max_steps=0" in err
    status, _, err = run(capsys, "train", *TINY_TRAIN, "model.mixers.mega.chunk_size=-1", f"train.out_dir={out_dir}")
    assert status == 2
    assert not out_dir.exists()


TORCHRUN_LEFTOVERS = {
    "not a number": ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not valid"),
    "zero": ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not valid"),
    "no rendezvous": ({"WORLD_SIZE": "2", "RANK": "0"},
                      "WORLD_SIZE=2 asks for a process group, but LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set"),
    "rank past the world": ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
                            "RANK='2' is not valid; torchrun sets it to an integer >= 0 below WORLD_SIZE=2"),
    "local rank not a number": ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
                                "LOCAL_RANK='x' is not valid"),
}


@pytest.mark.parametrize("case", TORCHRUN_LEFTOVERS, ids=str)
def test_torchrun_variables_left_in_the_environment_are_refused_by_name_before_any_work(case, tmp_path, monkeypatch, capsys):
    """WORLD_SIZE and its companions set by something other than torchrun (a job script, a shell)."""
    variables, named = TORCHRUN_LEFTOVERS[case]
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    out_dir = tmp_path / "run"
    status, _, err = run(capsys, "train", *TINY_TRAIN, f"train.out_dir={out_dir}")
    assert status == 2 and named in err and err.count("\n") == 1, err
    assert not out_dir.exists()


def test_output_path_checks_name_what_is_wrong(tmp_path):
    from seqmix.errors import require_writable_dir, require_writable_file

    (tmp_path / "a_file").write_text("")
    refused = [
        (require_writable_dir, str(tmp_path / "a_file"), "is a file, not a folder"),
        (require_writable_dir, str(tmp_path / "a_file" / "deeper" / "still"), "is a file, not a folder"),
        (require_writable_file, str(tmp_path), "it is a directory; expected a file path"),
        (require_writable_dir, str(tmp_path / "a\0b"), "NUL character"),
        (require_writable_dir, "", "expected a non-empty path"),
        (require_writable_file, " ", "expected a non-empty path"),
        # The file system says so itself (ENAMETOOLONG) or the name exceeds its PC_NAME_MAX.
        (require_writable_dir, str(tmp_path / ("n" * 300) / "run"), "(File name too long|is longer than)"),
        # Not a path at all: os.fspath's TypeError before (save_model(model, None), say).
        (require_writable_dir, None, r"expected a path \(a str or os.PathLike\)"),
        (require_writable_file, 3, r"expected a path \(a str or os.PathLike\)"),
        (require_writable_dir, ["runs"], r"expected a path \(a str or os.PathLike\)"),
    ]
    for check, path, expected in refused:
        with pytest.raises(SeqmixError, match=f"^out={re.escape(repr(path))} is not valid: .*{expected}"):
            check("out", path)
    require_writable_dir("out", tmp_path / "new" / "run")
    require_writable_file("out", tmp_path / "new" / "tokenizer.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_no_output_lands_inside_a_verified_directory_and_exports_go_beside_one(finished_run, tmp_path, capsys):
    """A file added to a checkpoint or saved model makes it fail verification: every output check
    refuses such a path, save_model may replace the directory itself, and a file that is merely
    named checksums.json (another format) marks nothing."""
    import shutil

    from seqmix.cli import _default_export_dir
    from seqmix.errors import require_writable_dir, require_writable_file
    from seqmix.training.checkpoints import latest_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    checkpoint = latest_checkpoint(run_dir)
    for check, path in ((require_writable_dir, checkpoint), (require_writable_dir, checkpoint / "export" / "onnx"),
                        (require_writable_file, checkpoint / "table.csv")):
        with pytest.raises(SeqmixError, match=f"lies in {re.escape(repr(str(checkpoint)))}, a verified directory"):
            check("out", path)
    require_writable_dir("save_model: directory", checkpoint, replaces_verified=True)
    with pytest.raises(SeqmixError, match="a verified directory"):
        require_writable_dir("save_model: directory", checkpoint / "inner", replaces_verified=True)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "checksums.json").write_text('{"md5": "0123"}')
    require_writable_file("out", tmp_path / "project" / "table.csv")
    # End to end: a run into a checkpoint is refused before anything is written there.
    status, _, err = run(capsys, "train", *TINY_TRAIN, f"train.out_dir={checkpoint / 'run'}")
    assert status == 2 and "a verified directory" in err and not (checkpoint / "run").exists()
    # Without out=, an export of a run goes into it, of a checkpoint or a pretrained directory beside it.
    assert _default_export_dir(str(run_dir), "onnx") == str(run_dir / "export" / "onnx")
    assert _default_export_dir(str(checkpoint), "onnx") == str(run_dir / "export" / checkpoint.name / "onnx")
    pretrained = tmp_path / "hf"
    shutil.copytree(checkpoint, pretrained)
    assert _default_export_dir(str(pretrained), "executorch") == str(tmp_path / "hf-export" / "executorch")


BLOCKED = "'{blocked}' is a file, not a folder"
EMPTY = "'' is not valid"


@pytest.mark.parametrize("arguments, field, problem", [
    (["train", "train.out_dir={blocked}/run"], "train.out_dir", BLOCKED),
    (["train", "train.save_pretrained={blocked}"], "train.save_pretrained", BLOCKED),
    (["search", "search=tiny", "search.out_dir={blocked}/search"], "search.out_dir", BLOCKED),
    (["bench", "bench=smoke", "bench.out_dir={blocked}"], "bench.out_dir", BLOCKED),
    (["export", "checkpoint=x", "format=onnx", "out={blocked}/onnx"], "out", BLOCKED),
    (["tokenizer", "path=x", "out={blocked}/tokenizer.json"], "out", BLOCKED),
    (["gather", "root={root}", "csv={blocked}/runs.csv"], "csv", BLOCKED),
    (["search", "search=tiny", "search.out_dir={root}/search", "search.storage=sqlite:///{blocked}/study.db"],
     "search.storage file", BLOCKED),
    # Path("") is ".": an empty out_dir once ran a whole search and wrote its files where it was started.
    (["train", "train.out_dir="], "train.out_dir", EMPTY),
    (["search", "search=tiny", "search.out_dir="], "search.out_dir", EMPTY),
    (["bench", "bench=smoke", "bench.out_dir="], "bench.out_dir", EMPTY),
    (["export", "checkpoint=x", "format=onnx", "out="], "out", EMPTY),
    (["tokenizer", "path=x", "out="], "out", EMPTY),
    (["gather", "root=.", "csv="], "csv", EMPTY),
    (["export", "checkpoint=", "format=onnx"], "checkpoint", EMPTY),
    (["evaluate", "checkpoint="], "checkpoint", EMPTY),
    (["generate", "checkpoint="], "checkpoint", EMPTY),
    (["tokenizer", "path=", "out=tokenizer.json"], "tokenizer: path", EMPTY),
])
def test_a_path_blocked_by_a_file_or_left_empty_is_refused_before_any_work(arguments, field, problem, tmp_path, monkeypatch,
                                                                           capsys):
    """Exit status 2, one line naming the option, nothing on stdout, nothing written, even in the
    folder the command runs in."""
    monkeypatch.chdir(tmp_path)
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    status, out, err = run(capsys, *[a.format(blocked=blocked, root=tmp_path) for a in arguments])
    assert status == 2 and out == "", out
    assert err.startswith(f"seqmix {arguments[0]}: error: {field}=") and problem.format(blocked=blocked) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder no one can add to")
def test_output_paths_on_a_file_system_that_takes_no_new_entries_are_refused_up_front(tmp_path, capsys):
    # /proc passes the permission check (always for root), yet nothing can be made in it: the
    # check must try, or a benchmark runs to its end and dies at its first write.
    from seqmix.errors import require_writable_dir, require_writable_file

    for check, path in ((require_writable_dir, "/proc/seqmix-run"), (require_writable_file, "/proc/seqmix-run/out.onnx")):
        with pytest.raises(SeqmixError, match=r"^out='/proc/seqmix-run.*' is not valid: '/proc' is not writable \("):
            check("out", path)
    status, out, err = run(capsys, "bench", "bench=roofline", "bench.out_dir=/proc/seqmix-bench", "bench.lengths=[64]")
    assert status == 2 and err.startswith("seqmix bench: error: bench.out_dir='/proc/seqmix-bench' is not valid"), err
    assert "ema/chunked" not in out + err  # refused before the first cell ran


def test_an_os_error_during_a_command_ends_it_with_one_line_naming_the_file(monkeypatch, capsys):
    # Outputs are checked up front; a disk that fills up during the run is still the machine's
    # fault, not a bug: one line with the file and the reason, exit status 1, no traceback.
    from seqmix import cli

    def full_disk(options, choices):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/runs/m/checkpoint.pt")

    monkeypatch.setitem(cli.COMMANDS, "describe", dataclasses.replace(cli.COMMANDS["describe"], run=full_disk))
    status, out, err = run(capsys, "describe")
    assert status == 1 and out == ""
    assert err == f"seqmix describe: error: {os.strerror(errno.ENOSPC)}: '/data/runs/m/checkpoint.pt'\n", err


def test_train_prints_the_plan_then_announces_a_resume_and_counts_its_own_steps(tmp_path, capsys):
    out_dir = tmp_path / "run"
    status, out, err = run(capsys, "train", *TINY_TRAIN, f"train.out_dir={out_dir}")
    assert status == 0, err
    plan = out.split("\n\n")[0]
    assert "mega: 1 layers, d_model=16" in plan and "mqar" in plan and str(out_dir) in plan and "torch thread" in plan
    # Recomputation changes how training runs, not the model: a run resumes with it switched on.
    status, out, err = run(capsys, "train", *TINY_TRAIN, "train.max_steps=3", "train.resume=true", "model.recompute=block",
                           f"train.out_dir={out_dir}")
    assert status == 0, err
    assert "(resuming)" in out and "resume: continuing from" in out and "at step 2 of 3" in out
    assert "3, 1 of them in this run after resuming at step 2" in out and "for 1 steps" in out
    export_dir = tmp_path / "export"
    status, _, err = run(capsys, "export", f"checkpoint={out_dir}", "format=executorch", "quantize=fp16", f"out={export_dir}")
    assert status == 2 and "quantize='fp16' is not valid for format=executorch" in err
    assert not export_dir.exists()
    status, out, err = run(capsys, "evaluate", f"checkpoint={out_dir}", "batches=1", "batch_size=2")
    assert status == 0, err
    assert json.loads(out)["task"] == "mqar"


def test_python_dash_m_seqmix_is_the_same_command():
    done = subprocess.run([*SEQMIX, "describe", "model=transformer", "model.depth=1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 layers" in done.stdout and "softmax_attention" in done.stdout
    bad = subprocess.run([*SEQMIX, "describe", "model.depth=zero"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_sweep_runs_one_job_per_combination(tmp_path):
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [*SEQMIX, "train", "-m", *TINY_TRAIN, "model=mega,tcnca", "train.max_steps=1", f"train.out_dir={sweep}"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = sorted(json.loads(path.read_text())["preset"]["model"] for path in sweep.glob("*/run.json"))
    assert records == ["mega", "tcnca"]
    # The same sweep again: refused before Hydra writes anything (its multirun.yaml was rewritten, and each
    # job's .hydra/ written into the run it was then refused for); nothing of the sweep is touched.
    runs = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in sweep.rglob("*") if path.is_file()}
    assert not list(sweep.glob("*/.hydra"))
    again = subprocess.run(
        [*SEQMIX, "train", "-m", *TINY_TRAIN, "model=mega,tcnca", "train.max_steps=1", f"train.out_dir={sweep}"],
        capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 2 and "already holds a sweep (its multirun.yaml)" in again.stderr, again.stderr[-2000:]
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in sweep.rglob("*") if path.is_file()} == runs
    # A job that fails is told and the sweep goes on (the first refusal ended it), then exits 2 naming it.
    other = tmp_path / "other"
    mixed = subprocess.run([*SEQMIX, "train", "-m", *TINY_TRAIN, "model=mega", "train.max_steps=0,1", f"train.out_dir={other}"],
                           capture_output=True, text=True, timeout=300)
    told = [line for line in mixed.stderr.splitlines() if line.startswith("seqmix train: error:")]
    assert mixed.returncode == 2 and "max_steps=0" in told[0] and len(told) == 2, mixed.stderr[-2000:]
    assert told[1] == f"seqmix train: error: 1 job of the sweep failed: #0 in {other / '0'}"
    assert (other / "1" / "run.json").is_file()


def test_running_out_of_memory_ends_a_command_with_one_line_and_describe_never_allocates(finished_run):
    """Under a 3 GiB address-space limit: an evaluation batch that cannot fit fails with one line naming its
    size (not torch's traceback), and describing a model of 60 trillion parameters allocates nothing."""
    # A batch that half of this machine's memory would hold (the tasks refuse one it cannot hold at
    # all, before allocating), far beyond the limit: seq_len=64, 24 bytes per token at least.
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    batch_size = memory // (2 * 64 * 24)
    assert batch_size * 64 * 24 > 3 << 30, "a machine of less than 6 GiB cannot show this"
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "from seqmix.cli import main\n"
        f"print(main(['evaluate', 'checkpoint=' + sys.argv[1], 'batch_size={batch_size}', 'batches=1']))\n"
        "print(main(['describe', 'model=gpt2', 'model.d_model=1000000']))\n"
    )
    probe = subprocess.run([sys.executable, "-c", script, str(finished_run)], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    statuses = [line for line in probe.stdout.splitlines() if line in ("0", "1", "2")]
    assert statuses == ["1", "0"], probe.stdout[-2000:]
    assert "total parameters: 60,001,347,000,000 (218.3 TiB in float32)" in probe.stdout
    errors = [line for line in probe.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and re.fullmatch(r"seqmix evaluate: error: out of memory: an allocation of [\d,.]+ GiB failed; "
                                             r"lower what scales memory .*", errors[0]), probe.stderr[-2000:]


def test_a_terminal_that_cannot_encode_a_character_gets_an_escape_not_a_traceback(tmp_path):
    """describe prints '·', an error quotes an accented path: on an ASCII stdout and stderr both come out escaped."""
    ascii_env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    described = subprocess.run([*SEQMIX, "describe", "model=mega"], capture_output=True, text=True, env=ascii_env)
    assert described.returncode == 0 and "\\xb7" in described.stdout, described.stderr[-2000:]
    refused = subprocess.run([*SEQMIX, "evaluate", f"checkpoint='{tmp_path / 'nowhere-ü'}'"], capture_output=True,
                             text=True, env=ascii_env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "nowhere-\\xfc does not exist" in refused.stderr


def test_an_unquoted_value_hydra_cannot_read_is_refused_with_how_to_quote_it(tmp_path, capsys):
    status, _, err = run(capsys, "evaluate", f"checkpoint={tmp_path / 'run dir ü'}")
    assert status == 2 and f"cannot read the override 'checkpoint={tmp_path / 'run dir ü'}'" in err and "as key='value'" in err
    status, _, err = run(capsys, "evaluate", f"checkpoint='{tmp_path / 'run dir ü'}'")
    assert status == 2 and "run dir ü does not exist" in err


@pytest.mark.parametrize("command", ["export", "evaluate", "generate"])
def test_a_checkpoint_that_is_a_file_is_named_as_such_before_any_output_is_planned(command, tmp_path, capsys):
    """export once planned its default output inside the path first and blamed ``out`` for a file."""
    record = tmp_path / "run.json"
    record.write_text("{}")
    status, _, err = run(capsys, command, f"checkpoint={record}")
    assert status == 2 and f"{record} is not a directory: expected a run directory" in err and "out=" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_evaluate_says_when_the_runs_recorded_data_is_gone(tmp_path, capsys):
    """A text run reads its validation split from the corpus it was trained on; moved away, the
    refusal says the path is the run's record, not an option of evaluate."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(12):
        (corpus / f"{index}.txt").write_text(" ".join(["alpha", "beta", "gamma", "delta"][(index + j) % 4] for j in range(300)))
    status, _, err = run(capsys, "train", "model=transformer", "model.d_model=16", "model.depth=1", "task=text",
                         f"task.path={corpus}", "task.seq_len=16", "task.valid_fraction=0.5", f"task.cache_dir={tmp_path / 'cache'}",
                         "train.batch_size=2", "train.max_steps=1", "train.eval_batches=1", "train.progress=false",
                         "train.device=cpu", f"train.out_dir={tmp_path / 'run'}")
    assert status == 0, err
    corpus.rename(tmp_path / "moved")
    status, _, err = run(capsys, "evaluate", f"checkpoint={tmp_path / 'run'}", "batches=1")
    assert status == 2 and "the task its run record names cannot be rebuilt here" in err
    assert f"task.path='{corpus}' does not exist" in err


def test_a_key_under_a_map_that_starts_empty_is_refused_saying_to_add_it_with_plus(capsys):
    status, _, err = run(capsys, "bench", "bench.mixer_options.ema.order=4")
    assert status == 2 and "bench.mixer_options starts empty: add a key to it with +bench.mixer_options.ema=<value>" in err


@pytest.mark.parametrize("arguments", [["evaluate", "checkpoint=/nonexistent", "bf16=2"], ["generate", "checkpoint=/nonexistent", "raw=1"],
                                       ["export", "checkpoint=/nonexistent", "allow_unverified=0"],
                                       ["tokenizer", "path=/nonexistent", "out=/nonexistent.json", "overwrite=2"]],
                         ids=lambda arguments: arguments[-1])
def test_every_commands_flags_take_true_or_false_alone(arguments, capsys):
    """OmegaConf made any integer a bool: evaluate bf16=2 ran under autocast, tokenizer overwrite=2 replaced a file."""
    assert main(arguments) == 2
    name, value = arguments[-1].split("=")
    assert f"{arguments[0]}: {name}={value} is not valid; expected true or false" in capsys.readouterr().err


def test_gather_replaces_a_csv_only_when_asked_and_refuses_an_empty_root(tmp_path, capsys):
    """csv= wrote over any file (a run's own run.json), and root= searched the current folder."""
    table = tmp_path / "table.csv"
    table.write_text("an earlier table")
    assert main(["gather", f"root={tmp_path}", f"csv={table}"]) == 2
    assert "already exists; choose another path, or pass overwrite=true" in capsys.readouterr().err
    assert table.read_text() == "an earlier table"
    assert main(["gather", f"root={tmp_path}", f"csv={table}", "overwrite=true"]) == 0
    assert table.read_text() != "an earlier table"
    assert main(["gather", "root="]) == 2 and "root='' is not a directory" in capsys.readouterr().err


def test_gather_makes_the_folder_of_its_csv(tmp_path, capsys):
    """csv=<a folder that does not exist yet>/t.csv passed the check, then failed with No such file or directory."""
    assert main(["gather", f"root={tmp_path}", f"csv={tmp_path / 'new' / 'deeper' / 't.csv'}"]) == 0
    assert (tmp_path / "new" / "deeper" / "t.csv").is_file()


@pytest.mark.parametrize("override", ["+hydra.callbacks.x._target_=builtins.open", "+hydra.callbacks.x.file=/tmp/x",
                                      "hydra.launcher._target_=os.system", "+hydra.job_logging.root.level=DEBUG",
                                      "hydra/launcher=evil", "hydra/sweeper=basic"])
def test_a_sweep_refuses_hydra_settings_that_name_code_to_call(override, tmp_path, capsys):
    """-m +hydra.callbacks.x._target_=builtins.open +hydra.callbacks.x.file=<path> created that file:
    Hydra calls what its callbacks name."""
    assert main(["train", "-m", override, f"train.out_dir={tmp_path / 'sweep'}"]) == 2
    assert f"{override!r}: a sweep" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_with_cfg_is_refused_in_one_line(capsys):
    assert main(["train", "-m", "--cfg", "job", "model=gpt2"]) == 2
    assert "--cfg prints the config of one run; leave out -m" in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """seqmix bench --help | true ended in a BrokenPipeError traceback (and so did the exported runner)."""
    read, write = os.pipe()
    os.close(read)  # every write to the pipe now fails with EPIPE
    try:
        done = subprocess.run([*SEQMIX, "bench", "--help"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def test_config_dir_without_a_directory_says_so(capsys):
    """It said --config-dir=None is not a directory."""
    assert main(["describe", "--config-dir"]) == 2
    assert "--config-dir needs a directory: --config-dir DIR" in capsys.readouterr().err


def test_no_file_output_replaces_a_runs_own_files(tmp_path, capsys):
    """gather csv=<run>/run.json overwrite=true destroyed the run record, and csv=<run>/checkpoints/latest
    its checkpoint pointer; a table beside them is fine."""
    from seqmix.errors import RUN_OWN_FILES, require_writable_file
    from seqmix.tasks.base import MODEL_FILES
    from seqmix.training.checkpoints import RUN
    from seqmix.training.loop import LOCK, METRICS

    assert set(RUN_OWN_FILES) == {RUN, METRICS, LOCK, *MODEL_FILES}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in RUN_OWN_FILES:
        (run / name).write_text("the run's")
    (run / "checkpoints" / "latest").write_text("the run's")
    for target in [*(run / name for name in RUN_OWN_FILES), run / "checkpoints" / "latest", run / "checkpoints" / "table.csv"]:
        with pytest.raises(SeqmixError, match="(is the run's own|lies in the checkpoints folder of the run)"):
            require_writable_file("csv", target)
        assert main(["gather", f"root={tmp_path}", f"csv={target}", "overwrite=true"]) == 2
        assert "write it elsewhere" in capsys.readouterr().err
    assert all((run / name).read_text() == "the run's" for name in RUN_OWN_FILES)
    require_writable_file("csv", run / "table.csv")
    require_writable_file("csv", tmp_path / "run.json")  # not in a run directory


def test_generate_refuses_a_model_of_a_task_whose_tokens_are_not_text(tmp_path, capsys):
    """An MQAR model with a vocabulary of 256 passed the tokenizer's size check and 'continued' the
    prompt with its synthetic tokens read as bytes."""
    from conftest import library_run
    from seqmix.cli import main

    library_run(tmp_path / "run", "model.depth=1", "task.vocab_size=256")
    capsys.readouterr()
    assert main(["generate", f"checkpoint={tmp_path / 'run'}", "tokens=3"]) == 2
    captured = capsys.readouterr()
    assert "trained on task=mqar, whose tokens are not text; generate needs a model trained on text (task=" in captured.err
    assert captured.out == ""
