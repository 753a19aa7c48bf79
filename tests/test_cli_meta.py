"""Meta-tests over the CLI: every command documents itself with an example; the parent stays torch-free."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands if c.callback is not None)


def test_commands_are_registered() -> None:
    assert {"run", "validate", "tuners", "report", "check"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_with_an_example(name: str) -> None:
    command = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == name)  # type: ignore[union-attr]
    doc = command.callback.__doc__ or ""  # type: ignore[union-attr]
    summary, *_ = doc.strip().splitlines() or [""]
    assert summary, f"{name}: no help text"
    assert f"Example: petlbench {name}" in doc, (
        f"{name}: the docstring must end with an 'Example: petlbench {name} ...' line"
    )
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0
    assert f"Example: petlbench {name}" in " ".join(result.output.split())


def test_parent_side_modules_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import petlbench.cli.app, petlbench.budget, petlbench.report\n"
        "import petlbench.report.pareto, petlbench.report.plots\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parents[1]  # this checkout, whichever one is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)
