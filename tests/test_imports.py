"""Module boundaries: no module uses another module's private (``_name``) functions or constants.

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
    probe.write_text("from kalm_jax.mep import _hidden\nfrom kalm_jax import model\nmodel._secret\n")
    try:
        assert _private_uses(probe) == [
            "kalm_jax._import_check_probe: from kalm_jax.mep import _hidden",
            "kalm_jax._import_check_probe: kalm_jax.model._secret",
        ]
    finally:
        probe.unlink()
