"""The docs stay true: README.md and the topic docs beside the code.

Every Markdown file of the repository (outside hidden folders and run outputs) is checked: its
relative links and their anchors resolve, its ```python blocks run as written, every repository
path it names exists (with every test it names), and no tools/*.py script it names is missing.
README.md stays small enough to read: 16 KB at most.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_LIMIT = 16 * 1024
OUTPUT_FOLDERS = {"runs", "outputs", "bench_results", "gpu_results", "build", "dist", "__pycache__", "node_modules"}


def _is_doc(path: Path) -> bool:
    parts = path.relative_to(ROOT).parts
    return not any(p.startswith(".") or p in OUTPUT_FOLDERS or p.endswith(".egg-info") for p in parts[:-1])


DOCS = sorted(p for p in ROOT.rglob("*.md") if _is_doc(p))
TOPIC_DOCS = [ROOT / folder / "README.md" for folder in ("mixers", "conf", "export", "compile", "tools", "tests")]

LINK = re.compile(r"\]\(([^)\s]+)\)")
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)
FENCE = re.compile(r"```.*?```", flags=re.S)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", flags=re.M)
TOOLS_SCRIPT = re.compile(r"tools/\w+\.py")
# A path from the repository root into one of its top-level folders, not part of a longer path or name.
REPO_PATH = re.compile(r"(?<![\w/.<>-])((?:mixers|export|compile|conf|tools|tests)/[\w./-]*\w)")
TEST_NAME = re.compile(r"::(test_\w+)")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lowercased, punctuation dropped, spaces to hyphens."""
    anchors, seen = set(), {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_the_docs_are_found():
    names = {_name(p) for p in DOCS}
    assert "README.md" in names and all(_name(p) in names for p in TOPIC_DOCS), sorted(names)


def test_readme_is_at_most_16_kb():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into the topic docs (limit {README_LIMIT})"


def test_readme_shows_the_five_operators_and_only_registered_mixers():
    """The README's tour shows what list_mixers() prints; a mixer added later need not edit it."""
    import ast

    import seqmix

    shown = re.search(r"print\(seqmix\.list_mixers\(\)\)\s*#\s*(\[.*?\])", README.read_text(encoding="utf-8"))
    assert shown, "the README's Python tour should print seqmix.list_mixers() with its output as a comment"
    names = set(ast.literal_eval(shown.group(1)))
    assert {"ema", "cema", "tcn", "gated_attention", "softmax_attention"} <= names <= set(seqmix.list_mixers())


def test_readme_links_every_topic_doc():
    targets = {(ROOT / t).resolve() for t in LINK.findall(README.read_text(encoding="utf-8"))}
    missing = [_name(p) for p in TOPIC_DOCS if p.resolve() not in targets]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_relative_links_and_anchors_resolve(doc):
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target} (no heading #{anchor} in {path.name})")
        elif ROOT not in path.parents and path != ROOT:
            broken.append(f"{target} (outside the repository)")
    assert not broken, f"{_name(doc)} links to: {broken}"


@pytest.mark.parametrize("doc", [d for d in DOCS if PYTHON_BLOCK.search(d.read_text(encoding="utf-8"))], ids=_name)
def test_python_blocks_run(doc):
    for block in PYTHON_BLOCK.findall(doc.read_text(encoding="utf-8")):
        exec(compile(block, str(doc), "exec"), {"__name__": "__doc_example__"})


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_named_tools_scripts_exist(doc):
    missing = sorted({s for s in TOOLS_SCRIPT.findall(doc.read_text(encoding="utf-8")) if not (ROOT / s).is_file()})
    assert not missing, f"{_name(doc)} names tools scripts that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_named_repository_paths_and_tests_exist(doc):
    """Paths like tests/test_fuzz.py::test_x: the file exists and defines the test (``::test_y`` goes with the line's last file)."""
    missing = []
    for line in doc.read_text(encoding="utf-8").splitlines():
        last_file = None
        for match in re.finditer(rf"{REPO_PATH.pattern}|{TEST_NAME.pattern}", line):
            path, test = match.group(1), match.group(2)
            if path is not None:
                path = path.rstrip(".")
                if not (ROOT / path).exists():
                    missing.append(path)
                last_file = ROOT / path if path.endswith(".py") else None
            elif last_file is not None and last_file.is_file():
                if not re.search(rf"^def {test}\(", last_file.read_text(encoding="utf-8"), flags=re.M):
                    missing.append(f"{_name(last_file)}::{test}")
    assert not missing, f"{_name(doc)} names what does not exist: {sorted(set(missing))}"
