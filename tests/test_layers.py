"""The package's layers import only downward (docs/architecture.md, "Layers"), read from the source with
``ast``: a module may import its own package and the packages of lower layers, never a higher or a
sibling one, and no library module imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "icot_jax"

LAYERS: dict[str, int] = {
    "errors": 0,
    "config": 1,
    "data": 2, "models": 2, "removal": 2, "sharding": 2, "rundir": 2,
    "checkpoint": 3, "train": 3, "generate": 3, "adaptive": 3,
    "build": 4, "runs": 4,
    "loop": 5, "evaluation": 5, "aot": 5,
    "commands": 6,
    "cli": 7,
}
"""Top-level package (or module) of ``icot_jax`` -> its layer; the same table as docs/architecture.md."""


def package_of(module: str) -> str | None:
    """``icot_jax.train.step`` -> ``train``; None for modules outside ``icot_jax`` and for ``icot_jax`` itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "icot_jax" and len(parts) > 1 else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``icot_jax`` import in ``path``, function-level ones included
    (``from icot_jax import x`` counts as importing ``icot_jax.x``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "icot_jax":
                found += [(node.lineno, f"icot_jax.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; use absolute icot_jax imports")
    return [(line, module) for line, module in found if module.split(".")[0] == "icot_jax"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted(ROOT.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {package_of(module_name(path)) for path in SOURCES} - {None}
    assert packages <= set(LAYERS), f"add {sorted(packages - set(LAYERS))} to LAYERS and docs/architecture.md"


def upward_imports(path: Path, importer: str | None) -> list[str]:
    """The imports of ``path`` (a module of package ``importer``) that go to its own layer or higher."""
    upward = []
    for line, module in imported_modules(path):
        target = package_of(module)
        if importer is None or target is None or target == importer:
            continue
        if LAYERS[target] >= LAYERS[importer]:
            upward.append(f"{path.name}:{line} ({importer}, layer {LAYERS[importer]}) imports {module} "
                          f"({target}, layer {LAYERS[target]})")
    return upward


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_go_only_downward(path):
    upward = upward_imports(path, package_of(module_name(path)))
    assert not upward, "\n".join(upward)


def test_the_check_sees_upward_and_sibling_imports(tmp_path):
    """A layer-2 module importing the loop (layer 5), the CLI, or a sibling of its own layer is caught;
    its own package and lower layers are not."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom icot_jax.config import Config\nfrom icot_jax.removal import remove_cot\n"
                   "def f():\n    from icot_jax.loop import training\n    from icot_jax import cli, data\n")
    assert [line.split(" imports ")[1].split()[0] for line in upward_imports(bad, "removal")] == [
        "icot_jax.loop", "icot_jax.cli", "icot_jax.data"]
