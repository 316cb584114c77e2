"""The JavaScript client (tools/js/stream.mjs): the decoder graph, run by onnxruntime-node, streams the
same greedy tokens as eager decoding for every causal preset, and bad directories or arguments are refused.

Needs node on PATH and the client's packages: ``cd tools/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci``
(``make install-test`` runs it where node and npm are installed); skipped with that reason otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from seqmix.model.generation import generate
from conftest import causal_presets, examples

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = ROOT / "tools" / "js"
CLIENT = CLIENT_DIR / "stream.mjs"
CAUSAL_PRESETS = list(causal_presets())
NODE = shutil.which("node")


def missing_node_client() -> str | None:
    """Why the JavaScript client cannot run here, or None when it can."""
    if NODE is None:
        return "node is not on PATH: install Node.js >= 20 to run the JavaScript client"
    if not (CLIENT_DIR / "node_modules" / "onnxruntime-node").is_dir():
        return "onnxruntime-node is not installed: cd tools/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci (or make install-test)"
    return None


MISSING_NODE_CLIENT = missing_node_client()
pytestmark = pytest.mark.skipif(MISSING_NODE_CLIENT is not None, reason=str(MISSING_NODE_CLIENT))


def stream(directory: Path, *arguments: str) -> subprocess.CompletedProcess:
    """``node tools/js/stream.mjs <directory> <arguments>``, finished."""
    return subprocess.run([NODE, str(CLIENT), str(directory), *arguments], capture_output=True, text=True, timeout=120)


def streamed_ids(directory: Path, *arguments: str) -> list[int]:
    """The ids the client generated, from its ``--json`` line."""
    done = stream(directory, *arguments, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)["ids"]


def eager_greedy(model, prompt: list[int], tokens: int) -> list[int]:
    return generate(model, torch.tensor([prompt]), tokens, temperature=0)[0, len(prompt):].tolist()


@pytest.mark.parametrize("preset", CAUSAL_PRESETS)
def test_the_js_client_streams_the_eager_greedy_tokens_for_every_causal_preset(preset, exported_presets):
    model, result = exported_presets(preset)
    prompt = "déf é"  # multi-byte UTF-8: the client encodes the prompt as the model's bytes
    ids = streamed_ids(result.parallel.parent, "--prompt", prompt, "--tokens", "8")
    assert ids == eager_greedy(model, list(prompt.encode()), 8)


@settings(max_examples=examples(8), deadline=None)
@given(preset=st.sampled_from(CAUSAL_PRESETS), prompt=st.lists(st.integers(0, 255), min_size=1, max_size=40),
       tokens=st.integers(1, 6))
def test_the_js_client_matches_eager_for_any_prompt_length_and_token_count(exported_presets, preset, prompt, tokens):
    """Prefill lengths from 1 to 40 tokens in one call, then 1 to 6 single-token calls, fed as --ids."""
    model, result = exported_presets(preset)
    ids = streamed_ids(result.parallel.parent, "--ids", ",".join(map(str, prompt)), "--tokens", str(tokens))
    assert ids == eager_greedy(model, prompt, tokens)


def copy_export(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def drop_step(directory: Path) -> None:
    rewrite_manifest(directory, lambda manifest: manifest.pop("step"))


def remove_graph(directory: Path) -> None:
    (directory / "step.onnx").unlink()


def modify_graph(directory: Path) -> None:
    graph = directory / "step.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))


def point_outside(directory: Path) -> None:
    rewrite_manifest(directory, lambda manifest: manifest["step"].update(file="../step.onnx"))


def hostile_format(directory: Path) -> None:
    rewrite_manifest(directory, lambda manifest: manifest.update(format="onnx\x1b[2J\r"))


def state_entry(change):
    """A damage that applies ``change`` to the manifest's first state entry (in place)."""
    return lambda directory: rewrite_manifest(directory, lambda manifest: change(manifest["step"]["state"][0]))


def manifest_pipe(directory: Path) -> None:
    (directory / "manifest.json").unlink()
    os.mkfifo(directory / "manifest.json")


REFUSALS = {
    "no step section": (drop_step, ["--tokens", "2"], "no step section"),
    "graph missing": (remove_graph, ["--tokens", "2"], "is missing"),
    "graph modified": (modify_graph, ["--tokens", "2"], "sha256"),
    "graph outside the directory": (point_outside, ["--tokens", "2"], "bare file name"),
    "zero tokens": (None, ["--tokens", "0"], "--tokens=0"),
    "prompt and ids": (None, ["--prompt", "a", "--ids", "1"], "exclusive"),
    "ids not numbers": (None, ["--ids", "1,x"], "--ids=1,x"),
    "id outside the vocabulary": (None, ["--ids", "3,256"], "token 256"),
    "empty prompt": (None, ["--prompt", ""], "empty"),
    "unknown option": (None, ["--temperature", "1"], "temperature"),
    # The manifest's text is quoted with its control characters escaped, never acted on by a terminal.
    "control characters in the manifest": (hostile_format, ["--tokens", "2"], "(format onnx\\x1b[2J\\r)"),
    # Each was a Node stack trace, garbage streamed with status 0, or a hang.
    "control characters in a state shape": (state_entry(lambda e: e.update(shape=["batch", "\x1b]0;PWNED\x07"])),
                                            ["--tokens", "2"], 'is not ["batch", counts...]'),
    "a state without its fill": (state_entry(lambda e: e.pop("fill")), ["--tokens", "2"], "fill=undefined is not a finite"),
    "a fill of text": (state_entry(lambda e: e.update(fill="abc")), ["--tokens", "2"], 'fill="abc" is not a finite'),
    "a negative state size": (state_entry(lambda e: e.update(shape=["batch", -1])), ["--tokens", "2"], 'shape=["batch",-1]'),
    "a dtype of __proto__": (state_entry(lambda e: e.update(dtype="__proto__")), ["--tokens", "2"], 'dtype="__proto__"'),
    "a state output the graph lacks": (state_entry(lambda e: e.update(output="nope")), ["--tokens", "2"],
                                       "does not match its manifest"),
    "a state the graph takes in another dtype": (state_entry(lambda e: e.update(dtype="float64")), ["--tokens", "2"],
                                                 "ONNX Runtime refused a call of the decoder graph"),
    "no vocabulary size": (lambda d: rewrite_manifest(d, lambda m: m.pop("vocab_size")), ["--ids", "9999"],
                           "vocab_size=undefined is not a count"),
    "a token range of 1..0": (lambda d: rewrite_manifest(d, lambda m: m["step"]["dynamic_dims"].update(tokens="1..0")),
                              ["--tokens", "2"], 'step.dynamic_dims.tokens="1..0" is not'),
    "a manifest that is a pipe": (manifest_pipe, ["--tokens", "2"], "is not a regular file"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=str)
def test_the_js_client_refuses_a_bad_export_or_argument_with_one_line_and_status_2(case, exported_presets, tmp_path):
    damage, arguments, named = REFUSALS[case]
    _, result = exported_presets("megalodon")
    directory = copy_export(result.parallel.parent, tmp_path / "export")
    if damage is not None:
        damage(directory)
    done = stream(directory, *arguments)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("stream: error: ") and named in done.stderr, done.stderr


@pytest.mark.parametrize("raw", [False, True])
def test_the_js_client_shows_control_characters_escaped_unless_asked_for_raw_text(exported_presets, raw):
    _, result = exported_presets("megalodon")
    prompt = "a\x1b[2Jb\rc\u202e"
    # Bytes, not text: text mode would read the carriage return as a line break.
    done = subprocess.run([NODE, str(CLIENT), str(result.parallel.parent), "--prompt", prompt, "--tokens", "1",
                           *(["--raw"] if raw else [])], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    echoed = prompt if raw else "a\\x1b[2Jb\\rc\\u202e"
    assert done.stdout.startswith(echoed.encode()), done.stdout
