"""The layout contract: every DVC stage depends on exactly the package modules its stage module imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

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


def dvc_code_deps(stage: dict) -> set[Path]:
    """The files under src/ that a dvc.yaml stage lists as deps (folders expanded)."""
    out: set[Path] = set()
    deps = stage.get("do", stage)["deps"]
    for dep in deps:
        if not str(dep).startswith("src/"):
            continue
        for item in ["sngan", "vqvae"] if "${item}" in dep else [None]:
            path = REPO / (dep.replace("${item}", item) if item else dep)
            out.update(path.rglob("*.py") if path.is_dir() else [path])
    return out


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_has_its_module(dvc_stages):
    assert set(dvc_stages) == set(STAGE_MODULES)
    for stage, module in STAGE_MODULES.items():
        assert module_file(module) is not None, f"{stage}: no module {module}"
        cmd = dvc_stages[stage].get("do", dvc_stages[stage])["cmd"]
        assert cmd.startswith("spikemax "), cmd


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_dvc_deps_are_exactly_the_imported_modules(dvc_stages, stage):
    wanted = closure(STAGE_MODULES[stage])
    listed = dvc_code_deps(dvc_stages[stage])
    rel = lambda paths: sorted(str(p.relative_to(REPO)) for p in paths)  # noqa: E731
    assert rel(wanted - listed) == [], f"dvc.yaml stage {stage} misses modules it imports"
    assert rel(listed - wanted) == [], f"dvc.yaml stage {stage} lists modules it does not import"


def test_the_closure_follows_lazy_and_relative_imports():
    files = closure("spikemax.stages.maximize")
    assert PKG / "stages" / "maximize.py" in files
    assert PKG / "__init__.py" in files
    assert PKG / "optim" / "tt.py" in files  # through optim/__init__'s relative import
    assert PKG / "stages" / "report.py" not in files


def test_only_stage_modules_and_the_cli_run_stages():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "stages" or rel.name == "cli.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spikemax.stages"):
                pytest.fail(f"{rel} imports {node.module}: only cli.py runs stages")
            if isinstance(node, ast.FunctionDef):
                assert node.name != "run_stage", f"{rel} defines run_stage outside stages/"
