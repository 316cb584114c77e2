"""The ``seqmix`` command: every tool behind one entry point and one override syntax, Hydra's.

    seqmix <command> [key=value ...]     e.g. seqmix train model=megalodon train.max_steps=200
    seqmix <command> --help              the command's options, with their defaults, and its config groups
    seqmix <command> --cfg               print the composed config and stop
    seqmix train -m model=mega,tcnca     a Hydra sweep (train only)
    python -m seqmix <command> ...       the same

Overrides are Hydra's: ``key=value`` sets, ``group=option`` picks a preset, ``+key=value`` adds a
key, ``~key`` deletes one. A key the command does not know is refused with the keys it does know.

This module is the application above the library: the commands that lower or export import
``seqmix.compile`` and ``seqmix.export`` when they run; nothing in the library imports this module.
"""
from __future__ import annotations

import json
import itertools
import os
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from seqmix.allocator import keep_freed_memory
from seqmix.configs import CONF_DIR, compose_config, config_groups, preset_picks, store_code_defaults
from seqmix.configs import _composition_problem as composition_problem
from seqmix.errors import (CHECKSUMS, SeqmixError, SeqmixWarning, TrainingStopped, first_few, kind_of, require_bool, require_int, require_seed,
                           require_writable_dir, require_writable_file)
from seqmix.jsontext import strict_json
from seqmix.terminal import escape_controls, mask_url_secrets
from seqmix.threads import apply_thread_policy

PROGRAM = "seqmix"
OVERRIDES = "overrides"
"""The key of a command's choices that holds its command-line overrides (never a config group's name)."""
LAUNCHER_GROUP = "hydra/launcher"
"""The config group that picks where a sweep's jobs run; seqmix's presets (conf/hydra/launcher/) are submitit's."""


@dataclass(frozen=True)
class Command:
    """One subcommand.

    Attributes:
        name: what follows ``seqmix`` on the command line.
        summary: one line for ``seqmix --help``.
        run: (options, preset choices) -> exit status; the options are the composed config, or
            an instance of ``schema`` when the command has one. The choices map each config group to
            its preset, and ``OVERRIDES`` to the command line's overrides.
        config_name: the primary config in ``seqmix.conf`` that the overrides apply to.
        schema: the dataclass the composed config must fit (keys, types, required values).
        groups: the config groups ``--help`` lists.
        options: the config file whose text (comments included) ``--help`` prints as the options.
        examples: command lines ``--help`` shows.
        compose: composes the config from the overrides when the primary config alone cannot
            (search picks a search config; bench composes its own root).
        sweeps: accepts ``-m``/``--multirun`` (a Hydra sweep, one job per combination).
        job_dir: the key a sweep sets to each job's own directory (``train.out_dir``: one run per
            job); None when the jobs share one output (search workers share one study).
        sweep_dir: where a sweep keeps Hydra's and the launcher's files (``hydra.sweep.dir``); None
            keeps the root config's.
    """

    name: str
    summary: str
    run: Callable[[object, dict], int]
    config_name: str = "config"
    schema: type | None = None
    groups: tuple[str, ...] = ()
    options: str | None = None
    examples: tuple[str, ...] = ()
    compose: Callable[[list[str]], tuple[DictConfig, dict]] | None = None
    sweeps: bool = False
    job_dir: str | None = None
    sweep_dir: str | None = None


# --- composing and checking -----------------------------------------------------------------


def compose_command(command: Command, overrides: list[str]) -> tuple[DictConfig, dict]:
    """The command's config with ``overrides`` applied, and the preset chosen in each group.

    A key added with ``+`` at the top level is refused: no command reads keys it does not define.
    """
    if command.compose is not None:
        return command.compose(overrides)
    config = compose_config(overrides, config_name=command.config_name, with_choices=True)
    choices = {**OmegaConf.to_container(config.hydra.runtime.choices), OVERRIDES: list(config.hydra.overrides.task)}
    with_hydra = config
    config = OmegaConf.masked_copy(with_hydra, [key for key in with_hydra if key != "hydra"])
    known = set(compose_config(preset_picks(overrides), config_name=command.config_name))
    added = sorted(set(config) - known)
    if added:
        raise SeqmixError(f"unknown key {added[0]!r}; {command.name} takes the keys {sorted(known)}")
    return config, choices


def options_of(config: DictConfig, schema: type, where: str):
    """``config`` as an instance of the dataclass ``schema``: unknown keys, bad types and missing values refused."""
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    # OmegaConf turns any integer into a bool (bf16=2 was True, overwrite=2 replaced a file): a flag
    # takes true or false alone, as train's do.
    given = OmegaConf.to_container(config, resolve=False) if isinstance(config, DictConfig) else dict(config)
    for field in dataclasses.fields(schema):
        value = given.get(field.name)
        if str(field.type) in ("bool", "bool | None") and value is not None and not isinstance(value, bool):
            raise SeqmixError(f"{where}: {field.name}={value!r} is not valid; expected true or false")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), config))
    except ConfigKeyError as error:
        key = getattr(error, "key", None) or str(error).split("'")[1]
        raise SeqmixError(f"unknown key {key!r}; {where} takes the keys {[f for f in schema.__dataclass_fields__]}") from None
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", None) or str(error)
        raise SeqmixError(f"{key} is required: {PROGRAM} {where} {key}=<value>") from None
    except ValidationError as error:
        key = getattr(error, "full_key", "?")
        detail = str(error).splitlines()[0]
        raise SeqmixError(f"{key}: {detail}") from None


# --- the commands -----------------------------------------------------------------------------


def _warn_if_busy() -> None:
    """Say so when other work competed for the cores while timings were taken."""
    from seqmix.timing import busy_warning

    warning = busy_warning()
    if warning:
        print(warning, file=sys.stderr)


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets besides WORLD_SIZE, which joining its process group reads."""


def _torchrun_world_size() -> int:
    """The process count torchrun set in WORLD_SIZE (1 when unset). A value left in the environment
    by something else (a job script, a shell) is refused naming the variable, rather than failing
    inside torch.distributed: WORLD_SIZE must be an integer >= 1 (blank counts as unset), and above
    1 the variables of TORCHRUN_VARIABLES must be set too, RANK below WORLD_SIZE."""
    text = os.environ.get("WORLD_SIZE", "").strip() or "1"
    world = int(text) if text.isdigit() else 0
    if world < 1:
        raise SeqmixError(f"WORLD_SIZE={text!r} is not valid; torchrun sets it to the number of training processes "
                          "(unset it to train in one process)")
    if world == 1:
        return world
    missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name, "").strip()]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise SeqmixError(f"WORLD_SIZE={world} asks for a process group, but {', '.join(missing)} {verb} not set; launch "
                          "with torchrun, which sets them all, or unset WORLD_SIZE to train in one process")
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ[name]
        if not value.strip().isdigit() or (name == "RANK" and int(value) >= world):
            bound = f" below WORLD_SIZE={world}" if name == "RANK" else ""
            raise SeqmixError(f"{name}={value!r} is not valid; torchrun sets it to an integer >= 0{bound}")
    return world


def _join_torchrun_group() -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPUs)."""
    import torch

    if _torchrun_world_size() > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group(backend)


def run_train(config: DictConfig, choices: dict) -> int:
    """Train, evaluate and checkpoint; print the plan first and a summary and a sample at the end."""
    import torch

    from seqmix.training.experiment import build_experiment
    from seqmix.training.loop import pick_device, process_rank, train
    from seqmix.training.reporting import print_plan, print_summary, sample_text

    _join_torchrun_group()
    # Read while the process group exists: after it is destroyed every process would call itself rank 0.
    rank = process_rank()
    try:
        experiment = build_experiment(config)
        record = {
            "preset": {"model": choices.get("model"), "task": choices.get("task")},
            "model": experiment.model_config,
            "task": experiment.task_config,
        }
        if rank == 0:
            print_plan(experiment, choices)
        compiled = None
        if experiment.train.compile:
            from seqmix.compile import compile_model

            device = pick_device(experiment.train.device)
            compiled = compile_model(experiment.model.to(device), backend=experiment.train.compile)
        result = train(experiment.model, experiment.task, experiment.train, record, forward_module=compiled)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        print_summary(experiment, result)
        if experiment.train.save_pretrained:
            _save_pretrained(experiment, result, choices)
        sample = sample_text(experiment.model, experiment.task)
        if sample is not None:
            text = escape_controls(sample[0] + sample[1], keep="\n\t")
            print(f"\nsample (temperature 0.8, top-k 40) after the prompt {sample[0]!r}:\n{text}")
    return 0


def _save_pretrained(experiment, result, choices: dict) -> None:
    """Write the trained model in the Hugging Face layout, its card naming the data, metrics and command."""
    import hashlib

    from seqmix.model.pretrained import save_pretrained
    from seqmix.training.records import data_sha256, evaluation_record

    task = experiment.task_config
    # A corpus task knows the hash of the text it read; a generated task is pinned by its description.
    content = data_sha256(experiment.task)
    data = (f"{task.get('path')} (the hash is of its documents' text)" if content
            else f"task {json.dumps(task, sort_keys=True)} (the hash is of this description, which generates the data)")
    directory = save_pretrained(
        experiment.model,
        experiment.train.save_pretrained,
        training={
            "name": f"{choices.get('model') or 'seqmix'} on {task['task']}",
            "data": data,
            "data_sha256": content or hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest(),
            "metrics": result.final_eval,
            "command": " ".join([PROGRAM, "train", *choices.get(OVERRIDES, [])]),
        },
        task=task,
        files=experiment.task.model_files(),
        evaluation=evaluation_record(experiment.train.eval_batches, experiment.train.batch_size, experiment.train.bf16),
    )
    print(f"saved the model in the Hugging Face layout to {directory}")


def run_describe(config: DictConfig, choices: dict) -> int:
    from seqmix.model.checkpoint import instantiate_model
    from seqmix.model.summary import describe_model
    from seqmix.tasks import TASKS
    from seqmix.training.experiment import adapt_model_config
    from seqmix.training.records import build_task, task_description

    title, model_config = choices.get("model") or "model", config.model
    # A task given on the command line sets the vocabulary and head, as train does: describe showed
    # the preset's (256 tokens where task=mqar trains 8,192).
    if any(override.split("=", 1)[0].lstrip("+~").split(".", 1)[0] == "task" for override in choices.get(OVERRIDES, [])):
        name = task_description(config.task)["task"]
        if TASKS[name].reads_data:
            print(f"note: task={name} takes its vocabulary and classes from its data, which describe does not read: "
                  "the model is shown with the preset's; seqmix train prints the one it builds", file=sys.stderr)
        else:
            model_config = adapt_model_config(config.model, build_task(config.task))
            title += f" for task={name}"
    # On the meta device: shapes and counts without allocating, so any size is described at once.
    print(describe_model(instantiate_model(model_config, device="meta"), title=title))
    return 0


def _recorded_task(checkpoint: str, record: dict):
    """The task a loaded run's record names, rebuilt (paths of the writer's machine not followed) and
    checked against the model files saved with the model."""
    from seqmix.training.checkpoints import check_task_files
    from seqmix.training.records import build_task

    if "task" not in record:
        raise SeqmixError(f"{checkpoint} names no task (no run.json of {PROGRAM} train, nor a task in its config.json); "
                          "a pretrained directory records one when saved with save_pretrained(..., task={'task': <name>, ...})")
    try:
        task = build_task(record["task"], trust_paths=False)
    except SeqmixError as error:
        # The options named are the run's, not this command's: say where they come from.
        raise SeqmixError(f"{checkpoint}: the task its run record names cannot be rebuilt here, as the run's data is read "
                          f"from where it was trained: {error}") from None
    check_task_files(task, record)
    return task


def _check_same_data(checkpoint: str, record: dict, task) -> None:
    """Refuse to score a run on other data than it trained on: its record keeps the path as typed, read
    again from the current folder, and an edit there went unnoticed too (accuracy on another file, silently)."""
    from seqmix.training.records import data_sha256

    recorded, found = record.get("data_sha256"), data_sha256(task)
    if recorded and found and recorded != found:
        path = record["task"].get("path")
        where = f" (from {os.getcwd()})" if isinstance(path, str) and not os.path.isabs(path) else ""
        raise SeqmixError(f"{checkpoint}: task.path={path!r}{where} holds other data than the run trained on (the sha256 of "
                          f"its text is {found[:12]}..., the run's {recorded[:12]}...); evaluate where the run's data is")


@dataclass
class EvaluateOptions:
    checkpoint: str
    batches: int | None
    batch_size: int | None
    bf16: bool | None
    allow_unverified: bool


EVALUATION_FALLBACK = {"batches": 32, "batch_size": 16, "bf16": False}
"""What ``evaluate`` uses for a run whose record keeps no evaluation (runs of earlier versions)."""


def run_evaluate(options: EvaluateOptions, choices: dict) -> int:
    """Score a run's checkpoint on its task's validation set, by default as the run scored itself
    (its recorded batches, batch size and bf16), so the figures match the ones it reported."""
    from seqmix.training.checkpoints import load_run
    from seqmix.training.loop import evaluate

    given = {"batches": options.batches, "batch_size": options.batch_size, "bf16": options.bf16}
    for name in ("batches", "batch_size"):
        if given[name] is not None:
            require_int("evaluate", name, given[name])
    if given["bf16"] is not None:
        require_bool("evaluate", "bf16", given["bf16"])
    model, record = load_run(options.checkpoint, allow_unverified=options.allow_unverified)
    task = _recorded_task(options.checkpoint, record)
    _check_same_data(options.checkpoint, record, task)
    recorded = record.get("evaluation", EVALUATION_FALLBACK)
    settings = {name: recorded[name] if value is None else value for name, value in given.items()}
    scores = evaluate(model, task, settings["batch_size"], settings["batches"], "cpu", settings["bf16"], progress=True)
    print(strict_json({"task": type(task).name, **settings, **scores}, indent=2))
    return 0


@dataclass
class GenerateOptions:
    checkpoint: str
    prompt: str
    tokens: int
    temperature: float
    top_k: int | None
    seed: int
    raw: bool
    allow_unverified: bool


def run_generate(options: GenerateOptions, choices: dict) -> int:
    import torch

    from seqmix.model.generation import stream_tokens
    from seqmix.tasks import TASKS
    from seqmix.tokenization import TextStream, saved_tokenizer
    from seqmix.training.checkpoints import load_run

    # The same checks as the run_onnx.py an export carries: a count >= 1 of tokens, top_k >= 1 (at or
    # above the vocabulary, every token) or 0 (or null) for no cut-off, a seed torch's generators tell apart.
    require_int("generate", "tokens", options.tokens, 1, meaning="tokens to generate")
    require_seed("generate", "seed", options.seed)
    if options.top_k is not None:
        require_int("generate", "top_k", options.top_k, 0, "0 or null for no cut-off")
    top_k = options.top_k or None
    model, record = load_run(options.checkpoint, allow_unverified=options.allow_unverified)
    recorded = record.get("task")
    task = recorded.get("task") if isinstance(recorded, dict) else None
    if task in TASKS and not TASKS[task].models_text:
        # A vocabulary of 256 (mqar with task.vocab_size=256) passed the tokenizer's check below.
        raise SeqmixError(f"{options.checkpoint}: the model was trained on task={task}, whose tokens are not text; "
                          f"generate needs a model trained on text ({', '.join(f'task={name}' for name, cls in TASKS.items() if cls.models_text)})")
    tokenizer = saved_tokenizer(record["directory"])
    if model.vocab_size != tokenizer.vocab_size:
        raise SeqmixError(f"{options.checkpoint}: the model's vocabulary has {model.vocab_size} tokens but its tokenizer "
                          f"({tokenizer.name}) has {tokenizer.vocab_size}; generate needs a model trained on text")
    if not options.prompt:
        raise SeqmixError("prompt='' is not valid; give at least one character to continue from")
    prompt = tokenizer.encode(options.prompt)
    if not prompt:
        raise SeqmixError(f"prompt={options.prompt!r} encodes to no tokens; give text the tokenizer knows")
    tokens = iter(stream_tokens(
        model,
        torch.tensor([prompt]),
        options.tokens,
        temperature=options.temperature,
        top_k=top_k,
        generator=torch.Generator().manual_seed(options.seed),
    ))

    def shown(text: str) -> str:
        """The text as decoded with ``raw``, else with its control characters but line breaks and
        tabs escaped: a checkpoint's tokenizer and weights can come from someone else."""
        return text if options.raw else escape_controls(text, keep="\n\t")

    # The first token before the prompt is shown: the stream checks its options and allocates its
    # state on the first step, and a refusal there followed the prompt already printed.
    first = next(tokens, None)
    # A prompt of bytes that are not UTF-8 reaches Python as surrogates (\udcff): shown as the text they
    # decode to, U+FFFD for each such byte, as the continuation is; the model was given the bytes.
    sys.stdout.write(shown(options.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")))
    text = TextStream(tokenizer)
    for token in itertools.chain([] if first is None else [first], tokens):
        sys.stdout.write(shown(text.push(int(token[0]))))
        sys.stdout.flush()
    print(shown(text.finish()))
    return 0


@dataclass
class ExportOptions:
    checkpoint: str
    format: str
    quantize: str | None
    out: str | None
    length: int
    allow_unverified: bool


def _default_export_dir(checkpoint: str, format_: str) -> str:
    """Where an export goes without ``out``: ``<run>/export/<format>`` for a run directory. A
    checkpoint or pretrained directory is verified (checksums.json lists its files), and a folder
    added inside it would make it fail verification, so its export goes beside it:
    ``<run>/export/<checkpoint>/<format>`` for a checkpoint of a run, ``<dir>-export/<format>`` else."""
    path = Path(checkpoint)
    if not (path / CHECKSUMS).is_file():
        return os.path.join(checkpoint, "export", format_)
    absolute = path.absolute()
    if absolute.parent.name == "checkpoints":
        return str(absolute.parent.parent / "export" / absolute.name / format_)
    return str(absolute.parent / f"{absolute.name}-export" / format_)


def run_export(options: ExportOptions, choices: dict) -> int:
    from seqmix.export.formats import check_export_options, export_model, summary_lines
    from seqmix.tasks.base import MODEL_FILES
    from seqmix.training.checkpoints import load_run, resolve_checkpoint

    check_export_options(options.format, options.quantize, options.length)
    if options.out is None:
        resolve_checkpoint(options.checkpoint)  # the default out is made from it: a file there is named as such
    out = options.out if options.out is not None else _default_export_dir(options.checkpoint, options.format)
    require_writable_dir("out", out)  # the text itself: Path("") would be the current folder
    out = Path(out)
    model, record = load_run(options.checkpoint, allow_unverified=options.allow_unverified)
    task = _recorded_task(options.checkpoint, record)
    files = {name: (Path(record["directory"]) / name).read_bytes() for name in MODEL_FILES
             if (Path(record["directory"]) / name).is_file()}
    manifest = export_model(model, task, options.format, out, options.quantize, options.length, files)
    graphs = sorted(p.name for p in out.iterdir() if p.suffix in (".onnx", ".pte", ".engine"))
    print(f"exported to {out}: " + ", ".join(graphs))
    for line in summary_lines(manifest):
        print(line)
    _warn_if_busy()
    print(json.dumps({"manifest": str(out / "manifest.json")}))
    return 0


@dataclass
class TokenizerOptions:
    path: str
    format: str
    text_column: str
    decode_errors: str
    vocab_size: int
    min_frequency: int
    out: str
    overwrite: bool


def run_tokenizer(options: TokenizerOptions, choices: dict) -> int:
    from seqmix.tasks.documents import DocumentSource
    from seqmix.tokenization import train_bpe

    require_int("tokenizer", "vocab_size", options.vocab_size, 257, "the 256 bytes and the separator at least")
    require_int("tokenizer", "min_frequency", options.min_frequency)
    require_bool("tokenizer", "overwrite", options.overwrite)
    require_writable_file("out", options.out)  # the text itself: Path("") would be the current folder
    out = Path(options.out)
    if out.exists() and not options.overwrite:
        raise SeqmixError(f"out={options.out!r} already exists; choose another path, or pass overwrite=true to replace it")
    source = DocumentSource(options.path, options.format, options.decode_errors, owner="tokenizer", options="")
    _refuse_output_in_corpus(out, options.path, source.files)

    def texts():
        for where, row in source.rows({"text_column": options.text_column}):
            if not isinstance(row["text_column"], str):
                raise SeqmixError(f"tokenizer: {where} column {options.text_column!r} holds "
                                  f"{kind_of(row['text_column'])}, not text")
            yield row["text_column"]

    tokenizer = train_bpe(texts(), options.vocab_size, out, options.min_frequency)
    print(f"wrote {out}: {tokenizer.vocab_size:,} tokens (separator id {tokenizer.separator}); train with "
          f"{PROGRAM} train task=text {shell_override('task.path', options.path)} {shell_override('task.tokenizer', out)}")
    return 0


def _refuse_output_in_corpus(out: Path, corpus: str, files: list[Path]) -> None:
    """Refuse a tokenizer's ``out`` that is one of the corpus's files (overwrite=true replaced the corpus
    with the tokenizer) or would become one (inside the corpus folder, or matched by its glob: the
    ``seqmix train`` command printed after it read the tokenizer as a document and failed)."""
    from seqmix.tasks.documents import inside_corpus

    target = Path(os.path.realpath(out))
    if any(Path(os.path.realpath(file)) == target for file in files):
        raise SeqmixError(f"out={str(out)!r} is a file of the corpus path={corpus!r}; write the tokenizer elsewhere")
    if inside_corpus(corpus, out):
        raise SeqmixError(f"out={str(out)!r} is inside the corpus path={corpus!r}, so training on that corpus would read "
                          "the tokenizer as a document; write it outside the corpus")


def shell_override(key: str, value) -> str:
    """``key=value`` as one shell word that Hydra reads back as ``value`` (a path with spaces or
    other letters than ASCII's was printed bare, and failed pasted back: split by the shell, or
    refused by Hydra's lexer): quoted for Hydra (its quotes escaped), then for the shell."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if re.fullmatch(r"[A-Za-z0-9_./:+-]+", text):
        return f"{key}={text}"
    quoted = "'" + text.replace("'", "\\'") + ("\\" if text.endswith("\\") else "") + "'"
    word = f"{key}={quoted}"
    # In double quotes, the way one types it, unless the shell would read something there.
    return f'"{word}"' if not set(word) & set('"$`\\!') else shlex.quote(word)


@dataclass
class GatherOptions:
    root: str
    csv: str | None
    overwrite: bool


def run_gather(options: GatherOptions, choices: dict) -> int:
    from seqmix.tables import records_table, write_csv
    from seqmix.training.runs import collect_runs

    # An empty root is Path(""), the current folder: searched unasked.
    if not options.root.strip() or not Path(options.root).is_dir():
        raise SeqmixError(f"root={options.root!r} is not a directory")
    if options.csv is not None:
        require_writable_file("csv", options.csv)
        if Path(options.csv).exists() and not options.overwrite:
            # It replaced any file named, a run's own run.json included.
            raise SeqmixError(f"csv={options.csv!r} already exists; choose another path, or pass overwrite=true to replace it")
    rows, problems = collect_runs(options.root)
    for problem in problems:
        print(f"{PROGRAM} gather: {escape_controls(problem)}", file=sys.stderr)
    print(records_table(rows) if rows else "(no runs found)")
    if options.csv is not None:
        write_csv(rows, options.csv)
        # stdout carries the table alone, so it can be piped.
        print(f"wrote {options.csv}", file=sys.stderr)
    return 0


@dataclass
class TourOptions:
    width: int
    length: int
    batch: int
    piece: int
    repeats: int


def run_tour(options: TourOptions, choices: dict) -> int:
    from seqmix.showcase import format_tour, tour

    for name in ("width", "length", "batch", "piece", "repeats"):
        require_int("tour", name, getattr(options, name))
    rows = tour(width=options.width, length=options.length, batch=options.batch, piece=options.piece, repeats=options.repeats)
    print(f"Every mixer at D={options.width}, L={options.length}, B={options.batch}, "
          f"streamed {options.piece} tokens per step (float32):")
    print(format_tour(rows))
    worst = max(row.max_stream_error for row in rows if row.max_stream_error is not None)
    print(f"\nLargest forward-vs-streaming difference: {worst:.2e} (float32 rounding; the tests check float64 to 1e-9)")
    _warn_if_busy()
    return 0


def compose_bench(overrides: list[str]) -> tuple[DictConfig, dict]:
    from seqmix.export.bench import compose_bench_config

    return compose_bench_config(overrides), {}


def run_bench(config: DictConfig, choices: dict) -> int:
    from seqmix.export.bench import BenchSpec
    from seqmix.export.bench import run_bench as run

    spec = BenchSpec.from_config(config.bench)
    outcome = run(spec)
    print(outcome.report)
    for path in outcome.paths:
        print(f"wrote {path}")
    _warn_if_busy()
    return 1 if spec.strict and outcome.failed else 0


def compose_search(overrides: list[str]) -> tuple[DictConfig, dict]:
    from seqmix.search import compose_search_config

    names = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("search=")]
    rest = [o for o in overrides if not o.lstrip("+").startswith("search=")]
    if len(names) != 1:
        searches = config_groups().get("search", [])
        raise SeqmixError(f"give one search=<name>, one of {searches} (conf/search/<name>.yaml)")
    return compose_search_config(names[0], rest), {"search": names[0]}


def run_search(config: DictConfig, choices: dict) -> int:
    import logging

    import optuna

    from seqmix.export.latency import check_runtime, deployed_latency
    from seqmix.search import SearchSettings
    from seqmix.search import run_search as search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Every trial's ONNX export repeats the same benign notices; keep the log to one line a trial.
    for message in ("Exporting a model while it is in training mode", "# The axis name", "`isinstance(treespec, LeafSpec)`"):
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    settings = SearchSettings.from_config(config.search)
    if settings.measures_latency:
        check_runtime(settings.runtime, field="search.runtime")
    outcome = search(config, measure_latency=deployed_latency if settings.measures_latency else None)
    print(f"\nthis worker ran {outcome.trials_run} trial(s); the study has {len(outcome.study.trials)}")
    for note in outcome.notes:
        print(f"note: {escape_controls(note)}")
    for path in outcome.files:
        print(f"wrote {path}")
    if not any(trial.state == optuna.trial.TrialState.COMPLETE for trial in outcome.study.get_trials(deepcopy=False)):
        # A search whose every trial failed found nothing: a failed run, whatever it wrote.
        _print_error("search", f"no trial of study {settings.study_name!r} completed; the lines 'trial N: ...: failed: ...' above say why")
        return 1
    return 0


COMMANDS = {
    command.name: command
    for command in (
        Command("train", "train a model on a task, evaluate it, checkpoint it, show a sample", run_train,
                groups=("model", "task", "train", LAUNCHER_GROUP), options="train/default.yaml", sweeps=True,
                job_dir="train.out_dir",
                examples=("seqmix train model=megalodon task=mqar train.max_steps=500 train.out_dir=runs/m",
                          "seqmix train train.resume=true train.out_dir=runs/m",
                          "seqmix train -m model=mega,tcnca task=mqar train.out_dir=runs/sweep",
                          "seqmix train -m hydra/launcher=slurm hydra.launcher.partition=gpu model=mega,tcnca ...",
                          "torchrun --nproc_per_node=2 -m seqmix train ...",
                          "torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT "
                          "--rdzv-id=ID -m seqmix train ...")),
        Command("tokenizer", "train a BPE tokenizer on your corpus (a tokenizer.json for task.tokenizer)", run_tokenizer,
                config_name="tokenizer", schema=TokenizerOptions, options="tokenizer.yaml",
                examples=("seqmix tokenizer path='notes/**/*.md' vocab_size=4000 out=runs/notes-bpe.json",)),
        Command("evaluate", "score a trained run on its task's validation set", run_evaluate,
                config_name="evaluate", schema=EvaluateOptions, options="evaluate.yaml", examples=("seqmix evaluate checkpoint=runs/m",)),
        Command("generate", "stream text from a model trained on text, with its saved tokenizer", run_generate,
                config_name="generate", schema=GenerateOptions, options="generate.yaml",
                examples=("seqmix generate checkpoint=runs/m 'prompt=\"class \"' tokens=200 temperature=0",)),
        Command("export", "export to ONNX, ExecuTorch or TensorRT, verified against eager and timed", run_export,
                config_name="export", schema=ExportOptions, options="export.yaml",
                examples=("seqmix export checkpoint=runs/m", "seqmix export checkpoint=runs/m format=executorch quantize=int8")),
        Command("describe", "print a model's layers, parameters, streaming state and receptive fields", run_describe,
                groups=("model", "task"), examples=("seqmix describe model=megalodon", "seqmix describe model=mega model.depth=8",
                                                    "seqmix describe model=mega task=mqar")),
        Command("search", "search architectures with Optuna against accuracy and deployed latency", run_search,
                groups=("search", "task", "model", LAUNCHER_GROUP), compose=compose_search, sweeps=True,
                sweep_dir="${search.out_dir}/workers",
                examples=("seqmix search search=mqar search.n_trials=40",
                          "seqmix search search=mqar search.storage=journal:/shared/mqar.log search.worker=1",
                          "seqmix search -m hydra/launcher=local search=mqar search.worker=0,1")),
        Command("bench", "time mixers and presets across runtimes and lengths, check papers' claims, or what lowering buys",
                run_bench, groups=("bench",), options="bench/default.yaml", compose=compose_bench,
                examples=("seqmix bench bench=smoke", "seqmix bench bench=operators", "seqmix bench bench=paper_claims",
                          "seqmix bench bench=lowering \"bench.lowering.runs=[runs/a,runs/b]\" bench.presets=[]",
                          "seqmix bench bench.lengths=[1024,4096] bench.out_dir=runs/bench")),
        Command("gather", "one table of the runs below a directory", run_gather,
                config_name="gather", schema=GatherOptions, options="gather.yaml", examples=("seqmix gather root=runs/sweep csv=table.csv",)),
        Command("tour", "every mixer and compute path, parallel vs streamed, with forward times", run_tour,
                config_name="tour", schema=TourOptions, options="tour.yaml", examples=("seqmix tour width=128",)),
    )
}


# --- help ---------------------------------------------------------------------------------------


def overview() -> str:
    """``seqmix --help``: the commands."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROGRAM} <command> [key=value ...] [--help] [--cfg]", f"       {PROGRAM} --version", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", f"'{PROGRAM} <command> --help' lists a command's options and config groups.",
              "Overrides use Hydra's syntax: key=value, group=preset, +key=value adds a key, ~key removes one."]
    return "\n".join(lines)


def version_line() -> str:
    """``seqmix --version``: seqmix's version, and the torch and Python it runs on (what a bug report needs)."""
    import platform

    import torch

    from seqmix import __version__

    return f"{PROGRAM} {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def command_help(command: Command) -> str:
    """``seqmix <command> --help``: usage, examples, the options with their defaults, the config groups."""
    sweep = " [-m]" if command.sweeps else ""
    lines = [f"usage: {PROGRAM} {command.name}{sweep} [key=value ...] [--cfg] [--config-dir DIR]", "", command.summary + "."]
    if command.examples:
        lines += ["", "examples:"] + [f"  {example}" for example in command.examples]
    if command.options:
        prefix = command.options.split("/")[0] + "." if "/" in command.options else ""
        lines += ["", f"options ({prefix}<key>=<value>; defaults from conf/{command.options}):"]
        text = (CONF_DIR / command.options).read_text()
        lines += [f"  {line}" for line in text.splitlines() if line.strip() and not line.startswith(("defaults:", "  - "))]
    groups = config_groups()
    if command.groups:
        lines += ["", "config groups (<group>=<option>):"]
        lines += [f"  {group}: {', '.join(groups.get(group, []))}" for group in command.groups]
    lines += ["", "--cfg (or --cfg job) prints the composed config: every key an override can set."]
    if command.sweeps:
        lines += ["-m/--multirun sweeps every combination of comma-separated values, one run directory each."]
    return "\n".join(lines)


# --- entry point ------------------------------------------------------------------------------------


def _sweep(command: Command, argv: list[str]) -> int:
    """Hand a ``-m`` command line to Hydra's launcher (``hydra/launcher=...``: in this process, or as
    submitit jobs on this machine or a SLURM cluster); each job runs ``command``.

    A group the primary config does not pick by default is added (``search=tiny`` becomes
    ``+search=tiny``), as the command's own composition adds it. Hydra writes no ``.hydra/`` into a
    job's directory (``hydra.output_subdir=null``): it wrote there before the job ran, so a job
    refused for a run already in its directory rewrote that run's files; a job's run.json records
    its config and overrides. A job run in this process that fails is told and the sweep goes on
    to the next; the sweep's status is then the first failure's, after a line naming every failed job.
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import open_dict

    sweeping = os.getpid()
    failed: list[tuple[int, str]] = []

    def job(config: DictConfig) -> None:
        # A launched job is a fresh process that never passed through main().
        _write_any_character()
        apply_thread_policy()
        keep_freed_memory()
        runtime = HydraConfig.get().runtime
        if command.job_dir is not None:
            with open_dict(config):
                OmegaConf.update(config, command.job_dir, runtime.output_dir)
        try:
            choices = {**OmegaConf.to_container(runtime.choices), OVERRIDES: list(HydraConfig.get().overrides.task)}
            with _hydra_app_set_aside():
                status = command.run(config, choices)
        except (SeqmixError, MemoryError, RuntimeError) as error:
            status = _told_failure(command.name, error)
        if status and os.getpid() != sweeping:
            sys.exit(status)  # the launcher's job process: its status is how the launcher learns of the failure
        if status:
            failed.append((status, f"#{HydraConfig.get().job.num} in {runtime.output_dir}"))

    defaults = compose_config([], config_name=command.config_name, with_choices=True).hydra.runtime.choices
    groups = config_groups()
    launchers = [a.split("=", 1)[1] for a in argv if a.startswith(f"{LAUNCHER_GROUP}=")]
    if set(launchers) & set(groups.get(LAUNCHER_GROUP, [])) and not _submitit_launcher_installed():
        raise SeqmixError(f"{LAUNCHER_GROUP}={launchers[-1]} needs Hydra's submitit launcher: pip install 'seqmix[launcher]'")
    argv = [f"+{argument}" if argument.split("=", 1)[0] in groups and argument.split("=", 1)[0] not in defaults
            else argument for argument in argv]
    if command.sweep_dir is not None and not any(argument.startswith("hydra.sweep.dir=") for argument in argv):
        argv.append(f"hydra.sweep.dir={command.sweep_dir}")
    argv.append("hydra.output_subdir=null")
    if command.job_dir is not None:
        _check_sweep_before_launch(command, argv)
    store_code_defaults()
    # Hydra reads the command line from sys.argv; and it raises instead of printing a traceback, so
    # that a mistake or a failed job is named in one line.
    program_argv, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [f"{PROGRAM} {command.name}", *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(config_path=str(CONF_DIR), config_name=command.config_name, version_base="1.3")(job)()
    except HydraException as error:
        raise SeqmixError(composition_problem(error, argv, command.config_name)) from None
    except Exception as error:
        reason = _launched_job_error(error)
        if reason is None:
            raise
        raise SeqmixError(reason) from None
    finally:
        sys.argv = program_argv
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR")
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    if failed:
        _print_error(command.name, f"{len(failed)} job{'s' if len(failed) > 1 else ''} of the sweep failed: "
                                   f"{first_few(job for _, job in failed)}")
        return failed[0][0]
    return 0


def _check_sweep_before_launch(command: Command, argv: list[str]) -> None:
    """Compose every job's config, and refuse a sweep into a folder that holds an earlier sweep
    (its multirun.yaml) unless it resumes, before Hydra writes anything: a bad value in the second
    job's combination (model=mega,llama) was told after the first job had trained and Hydra's
    sweeper had written multirun.yaml (into runs/default by default), and a repeated sweep rewrote
    the earlier one's. The folder is checked where it is one value: train.out_dir, train.resume
    and hydra.sweep.dir not swept, and the default job folders."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides([argument for argument in argv if not argument.startswith("-")])
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except HydraException:
        return  # told by Hydra itself when it reads the command line
    configs = [compose_config([o for o in job if not o.lstrip("+~").startswith("hydra")], config_name=command.config_name)
               for job in jobs]
    keys = {override.get_key_element().lstrip("+~") for override in overrides}
    swept = {override.get_key_element().lstrip("+~") for override in overrides if override.is_sweep_override()}
    if not configs or swept & {command.job_dir, "train.resume", "hydra.sweep.dir"} or "hydra.sweep.subdir" in keys:
        return
    given = [override.value() for override in overrides if override.get_key_element().lstrip("+~") == "hydra.sweep.dir"]
    folder = Path(str(given[-1]) if given else str(OmegaConf.select(configs[0], command.job_dir)))
    if (folder / "multirun.yaml").is_file() and not OmegaConf.select(configs[0], "train.resume"):
        raise SeqmixError(f"{command.job_dir}={str(folder)!r} already holds a sweep (its multirun.yaml), whose runs its jobs "
                          f"would meet in their folders; pass train.resume=true to continue them, or choose another "
                          f"{command.job_dir}")


def _submitit_launcher_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("hydra_plugins.hydra_submitit_launcher") is not None


@contextmanager
def _hydra_app_set_aside():
    """Let a sweep's job compose configs (``compose_config``, as a search does for its presets): Hydra
    refuses to initialise while its application is running, so that is set aside until the job ends."""
    from hydra.core.global_hydra import GlobalHydra

    global_hydra = GlobalHydra.instance()
    application = global_hydra.hydra
    global_hydra.clear()
    try:
        yield
    finally:
        global_hydra.clear()
        if application is not None:
            global_hydra.initialize(application)


def _launched_job_error(error: Exception) -> str | None:
    """What a submitit job that refused its input said (the line ``job`` printed before exiting), with
    where its logs are; None when ``error`` is not such a job's end."""
    try:
        from submitit.core.utils import UncompletedJobError
    except ImportError:
        return None
    marker = f"{PROGRAM} "
    lines = str(error).splitlines()
    said = [line.split(": error: ", 1)[1] for line in lines if line.startswith(marker) and ": error: " in line]
    if not isinstance(error, UncompletedJobError) or not said:
        return None
    result_file = lines[0].split(" with path ", 1)[-1]
    return f"{said[-1]} (a job of the sweep; its logs are in {Path(result_file).parent})"


def _config_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Split ``--cfg`` (print the composed config and stop) from the other arguments: -> (the rest, whether
    it was given). Hydra's own ``--cfg job`` is taken as the same; ``--cfg hydra`` and ``--cfg all`` are
    refused, since seqmix keeps Hydra's settings to itself."""
    rest, shown = [], False
    for index, argument in enumerate(argv):
        if argument == "--cfg":
            shown = True
        elif shown and argv[index - 1] == "--cfg" and argument in ("job", "hydra", "all"):
            if argument != "job":
                raise SeqmixError(f"--cfg {argument}: seqmix prints the command's own config (--cfg, or --cfg job); "
                                  "Hydra's settings are not among the keys an override can set")
        else:
            rest.append(argument)
    return rest, shown


SWEEP_HYDRA_KEYS = ("hydra.launcher.", "hydra.sweep.dir", "hydra.sweep.subdir")
"""The Hydra settings a sweep may override, besides ``hydra/launcher=<seqmix's preset>``: its launcher's
options and where it writes. Hydra calls what its other settings name (``hydra.callbacks.<x>._target_``,
a logging handler's factory), so ``-m +hydra.callbacks.x._target_=builtins.open`` ran that call."""


def _refuse_sweep_hydra_settings(argv: list[str]) -> None:
    """Refuse, in a sweep, an override of a Hydra setting outside SWEEP_HYDRA_KEYS, a ``_target_``
    anywhere in one, and a launcher that is not one of seqmix's presets."""
    launchers = config_groups().get(LAUNCHER_GROUP, [])
    for argument in argv:
        key, _, value = argument.partition("=")
        key = key.lstrip("+~")
        if not (key == "hydra" or key.startswith(("hydra.", "hydra/"))):
            continue
        if key == LAUNCHER_GROUP:
            if value not in launchers:
                raise SeqmixError(f"{argument!r}: a sweep runs on one of seqmix's launchers, {launchers} "
                                  f"(conf/{LAUNCHER_GROUP}/), or Hydra's own without {LAUNCHER_GROUP}")
            continue
        allowed = key.startswith(SWEEP_HYDRA_KEYS) and not any(part.startswith("_") for part in key.split("."))
        if not allowed:
            raise SeqmixError(f"{argument!r}: a sweep may set {LAUNCHER_GROUP}, hydra.launcher.<option> and "
                              "hydra.sweep.dir or subdir; Hydra would call what its other settings name")


def _refuse_sweep_secrets(argv: list[str]) -> None:
    """Refuse, in a sweep, an override holding a URL's password: Hydra prints every job's overrides
    and writes them into the sweep folder (multirun.yaml, each job's .hydra/), readable by others."""
    for argument in argv:
        if mask_url_secrets(argument) != argument:
            raise SeqmixError(f"{mask_url_secrets(argument)!r} holds a password, which a sweep would print and write into "
                              "its folder's records; give it another way (for PostgreSQL: PGPASSWORD or ~/.pgpass) and "
                              "leave it out of the URL")


def _refuse_hydra_settings(command: Command, argv: list[str]) -> None:
    """Refuse an override of Hydra's own settings (``hydra.run.dir=...``, ``hydra/launcher=...``) outside a
    sweep: a single run goes where the command's options say, and Hydra would have ignored it without a word."""
    for argument in argv:
        key = argument.split("=", 1)[0].lstrip("+~")
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            where = ("only to sweeps (-m); a single run writes where its options say (e.g. train.out_dir)"
                     if command.sweeps else f"to sweeps only, and {PROGRAM} {command.name} does not sweep")
            raise SeqmixError(f"{argument!r}: Hydra's own settings apply {where}")


def _config_dir_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``--config-dir DIR`` (an extra config directory, searched first) from the other arguments."""
    rest, extra = [], []
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--config-dir" or argument.startswith("--config-dir="):
            directory = argument.split("=", 1)[1] if "=" in argument else next(arguments, None)
            if directory is None:
                raise SeqmixError("--config-dir needs a directory: --config-dir DIR")
            if not directory or not Path(directory).is_dir():
                raise SeqmixError(f"--config-dir={directory!r} is not a directory")
            extra.append(f"hydra.searchpath=[file://{Path(directory).resolve()}]")
        else:
            rest.append(argument)
    return rest, extra


def _write_any_character() -> None:
    """Let stdout and stderr write every character in any encoding: one their encoding lacks (an
    ASCII or Latin-1 terminal, PYTHONIOENCODING=ascii) is written as a backslash escape (``\\xb7``,
    ``\\u2212``), where it would end the command with a UnicodeEncodeError. Models generate any text,
    and tables and reports use a few symbols (·, −, ×)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _print_error(command: str, text: str) -> None:
    """One error on stderr, ``seqmix <command>: error: <text>``. The text can quote files someone
    else wrote, so its control characters but line breaks are shown escaped (``escape_controls``)."""
    shown = escape_controls(mask_url_secrets(text), keep="\n")
    print(f"{PROGRAM} {command}: error: {shown}", file=sys.stderr)


def _told_failure(command: str, error: BaseException) -> int:
    """Tell ``error`` in one line and return the exit status: 2 for a SeqmixError (bad input), or the
    ``exit_status`` it carries (1 for one raised after work it kept, such as a partial export), 1 for
    memory running out (the machine's limit); re-raise anything else, a bug whose traceback is wanted."""
    if isinstance(error, SeqmixError):
        _print_error(command, str(error))
        return getattr(error, "exit_status", 2)
    reason = _out_of_memory_text(error)
    if reason is None:
        raise error
    _print_error(command, reason)
    return 1


def _out_of_memory_text(error: BaseException) -> str | None:
    """One line for a failed allocation, None for any other error. Python raises MemoryError,
    torch's CPU allocator a RuntimeError ("can't allocate memory: you tried to allocate N bytes"),
    its CUDA one torch.OutOfMemoryError (a RuntimeError, "out of memory")."""
    text = str(error)
    if not isinstance(error, MemoryError) and "can't allocate memory" not in text and "out of memory" not in text.lower():
        return None
    tried = re.search(r"tried to allocate (\d+) bytes", text)
    what = f"an allocation of {int(tried.group(1)) / 2**30:,.1f} GiB failed" if tried else (
        text.splitlines()[0][:200] if text.strip() else type(error).__name__)
    return (f"out of memory: {what}; lower what scales memory (batch_size, length, tokens, the model's width or depth), "
            "or free memory")


def _os_error_text(error: OSError) -> str:
    """``error`` as its reason and the file(s) it names, without the errno's number."""
    if error.strerror is None:
        return str(error)
    files = [repr(os.fspath(name)) for name in (error.filename, error.filename2) if name is not None]
    return f"{error.strerror}: {' -> '.join(files)}" if files else error.strerror


_PYTHON_SHOWWARNING = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command: seqmix's own warnings as one line, without the
    source file and line of a Python warning; any other warning as Python shows it."""
    if not issubclass(category, SeqmixWarning):
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)
        return
    text = escape_controls(str(message).removeprefix("seqmix: "))
    print(f"{PROGRAM}: warning: {text}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Run ``seqmix <command> [overrides]``; the exit status is 0, 1 (the command failed) or 2 (bad input)."""
    try:
        return _main(argv)
    except BrokenPipeError:
        return _reader_gone()


READER_GONE = 128 + signal.SIGPIPE
"""The status of a command whose reader went away: a shell's for a process that SIGPIPE ended (141),
as ``yes | head`` gives, which ``set -o pipefail`` scripts tell from a failure (1)."""


def _reader_gone() -> int:
    """The reader of stdout went away (``seqmix generate ... | head``): its choice, not an error, so
    stop quietly with READER_GONE instead of a BrokenPipeError traceback; stdout goes to /dev/null so
    that output still buffered, flushed at exit, raises nothing either."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return READER_GONE


def _main(argv: list[str] | None) -> int:
    _write_any_character()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        if argv[1:]:
            print(f"{PROGRAM}: error: {argv[0]} takes no arguments, got {argv[1:]}", file=sys.stderr)
            return 2
        print(version_line())
        return 0
    name, argv = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{PROGRAM}: error: unknown command {name!r}; the commands are {list(COMMANDS)}", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    if {"-h", "--help"} & set(argv):
        print(command_help(command))
        return 0
    # Kineto prints start/stop markers each time the CPU profiler runs (the benchmarks' memory
    # measurement, once per cell); it reads this when the profiler first starts.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    apply_thread_policy()
    keep_freed_memory()
    warnings.showwarning = _show_warning
    try:
        if {"-m", "--multirun"} & set(argv):
            if not command.sweeps:
                raise SeqmixError(f"-m/--multirun sweeps only apply to {[c for c, cmd in COMMANDS.items() if cmd.sweeps]}")
            if {"--cfg", "-c"} & set(argv):
                raise SeqmixError("--cfg prints the config of one run; leave out -m to see it (it was Hydra's ValueError)")
            _refuse_sweep_hydra_settings(argv)
            _refuse_sweep_secrets(argv)
            return _sweep(command, argv)
        argv, show_config = _config_flag(argv)
        argv, search_path = _config_dir_overrides(argv)
        flags = [argument for argument in argv if argument.startswith("-")]
        if flags:
            raise SeqmixError(f"unknown flag {flags[0]!r}; {PROGRAM} {name} takes key=value overrides, --help, --cfg"
                              + (", -m" if command.sweeps else "") + " and --config-dir")
        _refuse_hydra_settings(command, argv)
        config, choices = compose_command(command, [*search_path, *argv])
        if show_config:
            print(OmegaConf.to_yaml(config), end="")
            return 0
        options = options_of(config, command.schema, name) if command.schema else config
        return command.run(options, choices)
    except (SeqmixError, MemoryError, RuntimeError) as error:
        return _told_failure(name, error)
    except BrokenPipeError:
        return _reader_gone()
    except OSError as error:
        # Outputs are checked before the work starts; what the system refuses later (a full disk, a
        # folder removed under the run) is the machine's doing, told in one line that names the file.
        _print_error(name, _os_error_text(error))
        return 1
    except TrainingStopped as stopped:
        # Resuming is train's; a search queues its interrupted trial again instead.
        told = str(stopped) if name == "train" else f"stopped by {stopped.signal_name}"
        print(f"{PROGRAM} {name}: {escape_controls(told)}", file=sys.stderr)
        return stopped.exit_status
    except KeyboardInterrupt:
        print(f"\n{PROGRAM} {name}: interrupted", file=sys.stderr)
        return 130
