"""The docs describe the tool as it is: every figure the README and docs/ show is made from a shipped suite by
scripts/docs_figures.py, and shows every method that suite has now."""

from __future__ import annotations

import json
import re
from pathlib import Path

from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"


def test_every_figure_shows_every_method_of_its_suite() -> None:
    shown = set(re.findall(r"\((?:docs/)?figures/([\w.-]+)\.png\)", (ROOT / "README.md").read_text()))
    for page in (ROOT / "docs").glob("*.md"):
        shown |= set(re.findall(r"\((?:docs/)?figures/([\w.-]+)\.png\)", page.read_text()))
    assert shown, "the README shows no figure from docs/figures"
    for name in sorted(shown):
        sidecar = FIGURES / f"{name}.json"
        assert sidecar.exists(), f"docs/figures/{name}.png has no {sidecar.name}: run `python scripts/docs_figures.py`"
        facts = json.loads(sidecar.read_text())
        suite = load_suite(ROOT / facts["suite"])
        methods = {r.method for r in expand(suite, "cuda" if "estimate" in facts["commands"][0] else "cpu")}
        missing = sorted(methods - set(facts["methods"]))
        assert not missing, (
            f"docs/figures/{name}.png lacks {', '.join(missing)} of {facts['suite']}: "
            f"run `python scripts/docs_figures.py --only {name}`"
        )


def test_no_tool_output_lands_in_the_repository() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    for folder in ("/results/*", "/reports/", "/gpu-validate-out/"):
        assert folder in ignored, folder
