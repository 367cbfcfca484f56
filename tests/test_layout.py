"""The package's layout rules (docs/design.md): sub-packages in layers whose imports only
point down, paper stages that never import one another, no import cycle, small modules and functions."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "llmret"
# Lower layers first; a module may import only from its own sub-package or a lower layer.
LAYERS = (
    {"specs", "schema", "registry"},
    {"atomic_files", "logs", "launch"},
    {"data"},
    {"retrieval"},
    {"training"},
    {"llara", "finetuning", "csplade"},
    {"results"},
    {"sizing"},
    {"plan"},
    {"checks", "settings_doc"},
)
PAPER_STAGES = {"llara", "finetuning", "csplade"}
MAX_LINES = 450
MAX_FUNCTION = 80


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(("llmret", *parts)).removesuffix(".__init__")
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The llmret modules ``name`` imports (at any depth of its code, lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                if target in known and target != name:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known and a.name != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(name: str) -> int:
    (index,) = [i for i, group in enumerate(LAYERS) if top(name) in group]
    return index


def test_every_module_belongs_to_a_layer():
    for name in modules():
        if name != "llmret":
            layer(name)


def test_imports_only_point_down():
    wrong = [
        f"{m} -> {t}"
        for m, targets in graph().items()
        if m != "llmret"
        for t in targets
        if top(t) != top(m) and layer(t) >= layer(m)
    ]
    assert not wrong, "imports that do not point to a lower layer:\n" + "\n".join(sorted(wrong))


def test_paper_stages_never_import_one_another():
    wrong = [
        f"{m} -> {t}"
        for m, targets in graph().items()
        for t in targets
        if top(m) in PAPER_STAGES and top(t) in PAPER_STAGES and top(m) != top(t)
    ]
    assert not wrong


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(g[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(t) :], t]))
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_modules_stay_small():
    big = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by concern): {big}"


def test_functions_stay_short():
    """A function a reader takes in at once: split longer ones into named steps."""
    long = {
        f"{name}.{node.name}": node.end_lineno - node.lineno + 1
        for name, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION
    }
    assert not long, f"functions over {MAX_FUNCTION} lines: {long}"


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The rules above would catch a violation (they are not vacuous)."""
    pkg = tmp_path / "llmret"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from llmret.data import b\nfrom llmret.checks import x\n")
    (pkg / "data" / "b.py").write_text("from llmret.data.a import y\n")
    (pkg / "checks.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "SRC", pkg)
    g = graph()
    assert g["llmret.data.a"] == {"llmret.data.b", "llmret.checks"}
    assert g["llmret.data.b"] == {"llmret.data.a"}
    with pytest.raises(AssertionError, match="llmret.data.a -> llmret.checks"):
        test_imports_only_point_down()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()
