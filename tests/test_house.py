"""The house rules: the package's rooms and their import directions, one source per notebook."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rpnlab.lab import nbclean

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rpnlab"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# What each room may import of rpnlab (besides itself). The detector stands alone.
ALLOWED = {
    "rpnlab.config": set(),
    "rpnlab.detector": {"rpnlab.config"},
    "rpnlab.data": {"rpnlab.config", "rpnlab.detector"},
    "rpnlab.engine": {"rpnlab.config", "rpnlab.detector", "rpnlab.data"},
    "rpnlab.lab": {"rpnlab.config", "rpnlab.detector", "rpnlab.data", "rpnlab.engine"},
    "rpnlab.cli": {"rpnlab.config", "rpnlab.detector", "rpnlab.data", "rpnlab.engine", "rpnlab.lab"},
}
MAX_LINES = 500
LONG_REASON = "Longer than"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def import_graph() -> dict[str, set[str]]:
    """module -> the rpnlab modules it imports, anywhere in the file (function-level included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {f for f in found if f in modules and f != name}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = {m: {t for t in ts if not (m.endswith("__init__") or t == m.rsplit(".", 1)[0])}
             for m, ts in import_graph().items()}
    # A package's __init__ re-exporting its own modules is not a cycle with them.
    for m in list(graph):
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_rooms_import_only_downstream():
    wrong = []
    for module, targets in import_graph().items():
        room = _room(module)
        if room not in ALLOWED:
            continue
        for target in targets:
            if _room(target) != room and _room(target) not in ALLOWED[room]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_detector_is_self_contained():
    graph = import_graph()
    detector = [m for m in graph if m.startswith("rpnlab.detector")]
    assert len(detector) >= 10
    for module in detector:
        assert all(t.startswith(("rpnlab.detector", "rpnlab.config")) for t in graph[module]), module


def test_long_modules_say_why():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert LONG_REASON in doc, f"{path.relative_to(ROOT)} has {text.count(chr(10))} lines and no reason"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_pair_in_sync(path):
    assert nbclean.pair_problems(path) == []


def test_pair_check_catches_an_edit(tmp_path):
    import shutil

    src = NOTEBOOKS[0]
    shutil.copy(src, tmp_path / src.name)
    script = tmp_path / src.with_suffix(".py").name
    script.write_text(src.with_suffix(".py").read_text().replace("# %%\n", "# %%\nx = 1  # edited\n", 1))
    problems = nbclean.pair_problems(tmp_path / src.name)
    assert problems and "differs" in problems[0]
    script.unlink()
    assert "missing" in nbclean.pair_problems(tmp_path / src.name)[0]
