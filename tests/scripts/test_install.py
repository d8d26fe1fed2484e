"""scripts/install.sh installs only when .venv is not up to date with pyproject.toml,
the extras and TORCH_REQUIREMENT, so that `bash scripts/serve.sh` restarts in seconds.

It runs on a copy of the script beside a stand-in `.venv/bin/python` that records what
it was asked to do instead of installing anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../../pip-calls.log"
"""


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install.sh", project / "scripts" / "install.sh")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    python = project / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return project


def _install(project: Path, extras: str, **env: str) -> list[str]:
    """Run install.sh; the pip commands it ran."""
    log = project / "pip-calls.log"
    log.unlink(missing_ok=True)
    subprocess.run(
        ["bash", str(project / "scripts" / "install.sh"), extras],
        env={key: value for key, value in os.environ.items() if key != "TORCH_REQUIREMENT"} | env,
        check=True,
        timeout=60,
    )
    return log.read_text().splitlines() if log.exists() else []


def test_install_runs_once_then_only_when_pyproject_extras_or_torch_change(
    tmp_path: Path,
) -> None:
    project = _project(tmp_path)
    first = _install(project, "worker,embedded")
    assert any("--editable .[worker,embedded]" in call for call in first), first
    assert _install(project, "worker,embedded") == []  # up to date: nothing to do

    assert _install(project, "dev") != []  # other extras: their own install, and stamp
    assert _install(project, "worker,embedded") == []  # ... which leaves the first one
    assert _install(project, "dev") == []

    assert _install(project, "worker,embedded", TORCH_REQUIREMENT="torch>=2.6") != []
    with (project / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# changed\n")
    assert _install(project, "dev") != []


def test_a_failed_install_is_tried_again(tmp_path: Path) -> None:
    project = _project(tmp_path)
    python = project / ".venv" / "bin" / "python"
    python.write_text(FAKE_PYTHON + "exit 1\n")
    with pytest.raises(subprocess.CalledProcessError):
        _install(project, "worker,embedded")
    python.write_text(FAKE_PYTHON)
    assert _install(project, "worker,embedded") != []


def test_the_license_is_an_spdx_string_that_the_required_setuptools_reads() -> None:
    # The `{ text = ... }` table makes setuptools >= 77 warn on every install.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    # PEP 639 license expressions are read from setuptools 77 on.
    requires = pyproject["build-system"]["requires"]
    assert any(line.replace(" ", "").startswith("setuptools>=77") for line in requires), requires
