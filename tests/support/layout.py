"""The import closure of a spikemax module (what a DVC stage must depend on), shared by layout and DVC tests."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.project import REPO

SRC = REPO / "src"
PKG = SRC / "spikemax"
# DVC stage -> its stage module (train_generator is a foreach stage: one module for both generators).
STAGE_MODULES = {
    "prepare": "spikemax.stages.prepare",
    "train_snn": "spikemax.stages.train_snn",
    "train_generator": "spikemax.stages.train_generator",
    "check_generators": "spikemax.stages.check_generators",
    "tune": "spikemax.stages.tune",
    "maximize": "spikemax.stages.maximize",
    "analyze": "spikemax.stages.analyze",
    "summarize": "spikemax.stages.summarize",
    "report": "spikemax.stages.report",
}


def module_file(name: str) -> Path | None:
    """The source file of module `name` inside spikemax (a package's __init__.py), None if not ours."""
    if name != "spikemax" and not name.startswith("spikemax."):
        return None
    base = SRC.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imports(path: Path, name: str) -> set[str]:
    """Module names a file imports anywhere (lazy imports in functions too), relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            # `from pkg import mod` imports a submodule when one of that name exists.
            out.update(f"{mod}.{a.name}" for a in node.names if module_file(f"{mod}.{a.name}") is not None)
    return out


def closure(name: str) -> set[Path]:
    """Every spikemax source file that importing `name` can execute (parent packages included)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        mod = todo.pop()
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            sub = ".".join(parts[:i])
            if sub not in seen and module_file(sub) is not None:
                seen.add(sub)
                todo.extend(_imports(module_file(sub), sub))  # type: ignore[arg-type]
    return {module_file(m) for m in seen}  # type: ignore[misc]
