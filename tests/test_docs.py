"""The README stays true to the code: settings, spec fields, commands, the test command."""

from __future__ import annotations

import re
from pathlib import Path

from app.jobs.spec import JobSpec
from app.settings import Settings
from cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`TRAINJOB_{name.upper()}`" in README, (
            f"TRAINJOB_{name.upper()} missing from README"
        )


def test_every_documented_setting_exists() -> None:
    documented = set(re.findall(r"`TRAINJOB_([A-Z_]+)`", README))
    assert documented <= {name.upper() for name in Settings.model_fields}


def test_every_spec_field_is_in_the_reference() -> None:
    for name in JobSpec.model_fields:
        assert f"| `{name}`" in README or f"`{name}` /" in README or f"/ `{name}`" in README, name


def test_every_command_is_listed() -> None:
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in subcommands:
        assert f"`trainjob {command}" in README, command


def test_ci_runs_the_readme_test_command() -> None:
    assert "bash scripts/test.sh" in README
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/serve.sh" in README


def test_linked_docs_exist() -> None:
    for link in re.findall(r"\]\(((?:docs/)[^)]+)\)", README):
        assert (ROOT / link).exists(), link
