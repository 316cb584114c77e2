"""The package's layout: no import circles, and the library never imports its lowering wrappers.

The import graph is read from the source (every ``import`` and ``from ... import``, those inside
functions included), so a circle closed only by a lazy import is found too.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"mixers": "seqmix", "export": "seqmix.export", "compile": "seqmix.compile"}
# The command line is the application above the library: it runs export and compile commands.
APPLICATION = {"seqmix.cli", "seqmix.__main__"}
# Edges allowed to close a circle, each made only by an import inside a function: the model class's
# save_pretrained/from_pretrained/push_to_hub (the Hugging Face convention) call the module that
# builds models from descriptions.
LAZY_BY_DESIGN = {("seqmix.model.sequence_model", "seqmix.model.pretrained")}


def modules() -> dict[str, Path]:
    """seqmix module name -> its file, for every module of the package."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [part for part in path.relative_to(ROOT / folder).with_suffix("").parts if part != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def outside_functions(node: ast.AST):
    """Every node below ``node`` that runs at import time: function bodies are skipped."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield child
            yield from outside_functions(child)


def imports_of(name: str, path: Path, known: dict[str, Path], at_import_only: bool = False) -> set[str]:
    """The seqmix modules ``name`` imports (only at import time when asked); ``from package import submodule`` counts the submodule."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    tree = ast.parse(path.read_text())
    for node in (outside_functions(tree) if at_import_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    # A package's __init__ only re-exports; edges into it would make every submodule look circular.
    packages = {name for name, path in known.items() if path.name == "__init__.py"}
    return {name: imports_of(name, path, known) - packages for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first search, as the circle it closes."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                found.append([*stack[stack.index(target):], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_through_others():
    edges = graph()
    for source, target in LAZY_BY_DESIGN:
        edges[source] = edges[source] - {target}
    assert circles(edges) == []


def test_the_allowed_circle_edges_are_imports_inside_functions():
    known = modules()
    for source, target in LAZY_BY_DESIGN:
        assert target in graph()[source], f"{source} no longer imports {target}; drop the allowance"
        assert target not in imports_of(source, known[source], known, at_import_only=True)


def test_the_library_never_imports_export_or_compile():
    edges = graph()
    library = [name for name in edges if not name.startswith(("seqmix.export", "seqmix.compile")) and name not in APPLICATION]
    offenders = {name: sorted(t for t in edges[name] if t.startswith(("seqmix.export", "seqmix.compile"))) for name in library}
    assert {name: targets for name, targets in offenders.items() if targets} == {}


def test_every_built_in_mixer_lives_in_the_operators_room():
    import seqmix

    assert all(seqmix.mixer_class(name).__module__.startswith("seqmix.operators.") for name in seqmix.list_mixers())
