"""Real DVC in a temp git repo: the project's `prepare` stage runs, and a second repro is a no-op."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_params

DVC = str(Path(sys.executable).with_name("dvc"))


def sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600, check=True)


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    """A git + DVC repo holding the project's stage definitions and tiny params."""
    sh("git", "init", "-q", cwd=tmp_path)
    sh(DVC, "init", "-q", cwd=tmp_path)
    return tmp_path


def test_prepare_stage_repro_then_noop(dvc_repo):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (dvc_repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stages["prepare"]}}))
    shutil.copytree(REPO / "src", dvc_repo / "src")
    write_params(dvc_repo, {"prepare": {"train_size": 200, "test_size": 100}})
    first = sh(DVC, "repro", cwd=dvc_repo)
    assert "Running stage 'prepare'" in first.stdout
    assert (dvc_repo / "data" / "prepared" / "meta.json").is_file()
    assert (dvc_repo / "dvc.lock").is_file()
    second = sh(DVC, "repro", cwd=dvc_repo)
    assert "Running stage" not in second.stdout
    assert "didn't change" in second.stdout or "up to date" in second.stdout
    # Changing the stage's params re-runs it.
    write_params(dvc_repo, {"prepare": {"train_size": 300, "test_size": 100}})
    third = sh(DVC, "repro", cwd=dvc_repo)
    assert "Running stage 'prepare'" in third.stdout
