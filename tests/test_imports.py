"""Module boundaries: no import cycles, and no module uses another module's private (``_name``) names.

What one module needs from another is public in the other (promoted, with a docstring); the check reads every
``from kalm_jax.x import _y`` and every ``x._y`` on an imported kalm_jax module, at any depth of the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kalm_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private_uses(path: Path) -> list[str]:
    name = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kalm_jax") and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in modules:
                    aliases[a.asname or a.name] = full
                elif a.name.startswith("_") and node.module != name:
                    found.append(f"{name}: from {node.module} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kalm_jax"):
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and aliases[node.value.id] != name
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_is_used_across_modules():
    uses = sorted({u for path in sorted(PACKAGE.rglob("*.py")) for u in _private_uses(path)})
    assert not uses, "private names used outside their module (make them public there):\n" + "\n".join(uses)


def test_the_check_sees_a_private_import(tmp_path):
    """The checker itself: a module importing another's private name is reported."""
    probe = PACKAGE / "_import_check_probe.py"
    probe.write_text("from kalm_jax.model.mep import _hidden\nfrom kalm_jax.model import t5gemma2\nt5gemma2._secret\n")
    try:
        assert _private_uses(probe) == [
            "kalm_jax._import_check_probe: from kalm_jax.model.mep import _hidden",
            "kalm_jax._import_check_probe: kalm_jax.model.t5gemma2._secret",
        ]
    finally:
        probe.unlink()


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The kalm_jax modules `path` imports, at any depth of its code (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kalm_jax") and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("kalm_jax"))
    return out & modules


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """No two modules import each other, directly or through others (lazy imports count too)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) - {_module_name(p)} for p in paths}
    assert not _cycles(graph), "import cycles:\n" + "\n".join(" <-> ".join(c) for c in _cycles(graph))


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
