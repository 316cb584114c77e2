"""export/README.md's Deploy clients work as written: the Python one (ONNX Runtime and NumPy) and the
JavaScript one (onnxruntime-node) stream the eager greedy tokens from an exported decoder graph.

The snippets are fenced ``py`` and ``js`` rather than ``python``: tests/test_readme.py runs every
``python`` block as it stands, and these need an export directory on the command line.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqmix.model.generation import generate
from test_js_client import CLIENT_DIR, MISSING_NODE_CLIENT, NODE

ROOT = Path(__file__).resolve().parent.parent
EXPORT_README = ROOT / "export" / "README.md"
PRESET = "megalodon"
"""A preset whose state holds an attention cache (int64 slot positions filled with -1) and recurrent state."""


def deploy_snippet(language: str) -> str:
    """The one ``language`` code block of export/README.md's Deploy subsection."""
    text = EXPORT_README.read_text(encoding="utf-8")
    section = re.search(r"^### Deploy\n(.*?)(?=^#{1,3} )", text, flags=re.S | re.M)
    assert section, "export/README.md has no '### Deploy' subsection"
    blocks = re.findall(rf"^```{language}\n(.*?)^```", section.group(1), flags=re.S | re.M)
    assert len(blocks) == 1, f"the Deploy subsection should hold one ```{language} block, found {len(blocks)}"
    return blocks[0]


def eager_greedy_after_def(model, tokens: int) -> list[int]:
    prompt = list(b"def ")
    return generate(model.eval(), torch.tensor([prompt]), tokens, temperature=0)[0, len(prompt):].tolist()


def test_the_python_deploy_snippet_streams_the_eager_greedy_tokens(exported_presets, tmp_path):
    model, result = exported_presets(PRESET)
    client = tmp_path / "client.py"
    client.write_text(deploy_snippet("py"))
    done = subprocess.run([sys.executable, str(client), str(result.parallel.parent)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = ast.literal_eval(done.stdout.strip())
    assert len(ids) >= 8 and ids == eager_greedy_after_def(model, len(ids))


@pytest.mark.skipif(MISSING_NODE_CLIENT is not None, reason=str(MISSING_NODE_CLIENT))
def test_the_javascript_deploy_snippet_streams_the_eager_greedy_tokens(exported_presets):
    model, result = exported_presets(PRESET)
    # Fed on stdin from tools/js, so that its import of onnxruntime-node resolves to the pinned package.
    done = subprocess.run([NODE, "--input-type=module", "-", str(result.parallel.parent)], input=deploy_snippet("js"),
                          cwd=CLIENT_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = ast.literal_eval(done.stdout.strip())
    assert len(ids) >= 8 and ids == eager_greedy_after_def(model, len(ids))
