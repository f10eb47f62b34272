"""The layout contract: every DVC stage depends on exactly the package modules its stage module imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.support.layout import PKG, STAGE_MODULES, closure, module_file
from tests.support.project import REPO


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


TESTS = REPO / "tests"
BENCH = REPO / "benchmarks"


def _imported_names(path: Path) -> set[str]:
    """Absolute module names that `path` imports (relative imports resolved against the tests package)."""
    names = set()
    pkg = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                base = f"{parent}.{base}".rstrip(".")
            names.add(base)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_tests_mirror_the_source_and_share_helpers_through_support():
    """Test modules live in unit/, integration/ or e2e/; none imports another test module (shared code is in support/)."""
    for path in TESTS.rglob("test_*.py"):
        rel = path.relative_to(TESTS)
        assert rel.parts[0] in {"unit", "integration", "e2e"}, f"tests/{rel}: put it under unit/, integration/ or e2e/"
        for name in _imported_names(path):
            last = name.rsplit(".", 1)[-1]
            assert not (name.startswith("tests") and last.startswith("test_")), (
                f"tests/{rel} imports test module {name}"
            )
    for sub in ("unit", "integration", "e2e", "support"):
        for folder in [TESTS / sub, *(p for p in (TESTS / sub).rglob("*") if p.is_dir() and p.name != "__pycache__")]:
            assert (folder / "__init__.py").is_file(), (
                f"{folder.relative_to(REPO)} needs __init__.py (unique module names)"
            )


def test_benchmarks_use_public_functions_only():
    """Benchmarks import no private name of spikemax and no stage module's internals."""
    for path in BENCH.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spikemax"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"benchmarks/{path.name} imports private {private} from {node.module}"
