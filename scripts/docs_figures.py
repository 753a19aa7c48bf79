"""Regenerate the example figures of the README and docs/ from the shipped suites, in one command.

    python scripts/docs_figures.py [--only NAME]

Each figure is made the way a user would make it (`petlbench run` or `petlbench estimate`, then `petlbench report
--format pdf`), copied to docs/figures/ under a stable name, and described by a sidecar `<name>.json`: the suite,
the commands, and the methods the figure shows. tests/test_docs.py fails when a figure's suite has a method its
sidecar does not list, so a figure never silently lags behind its suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"


@dataclass(frozen=True)
class Figure:
    """One published figure: which suite, how its rows are made, which report figure it is."""

    name: str  # file stem under docs/figures/
    suite: str  # relative to the repository root
    make: tuple[str, ...]  # the petlbench command that makes the rows (RESULTS is the results folder)
    folder: str  # the results folder the report reads, below RESULTS
    plot: str  # `--plot` of the report
    prefix: str  # the report figure's file-name prefix
    what: str  # measured or predicted, and of what


FIGURES_MADE = (
    Figure(
        "smoke-breakdown",
        "suites/smoke.yaml",
        ("run", "suites/smoke.yaml", "--device", "cpu", "--jobs", "2"),
        "smoke",
        "breakdown",
        "breakdown-",
        "measured on CPU: the composition of each method's peak memory, tiny ViT",
    ),
    Figure(
        "smoke-params-vs-memory",
        "suites/smoke.yaml",
        ("run", "suites/smoke.yaml", "--device", "cpu", "--jobs", "2"),
        "smoke",
        "pareto",
        "pareto-params-",
        "measured on CPU: trainable parameters vs peak memory, tiny ViT",
    ),
    Figure(
        "memory-estimate-fit",
        "suites/memory.yaml",
        ("estimate", "suites/memory.yaml", "--device", "cuda", "--gpu", "h100-80gb,a100-40gb,rtx-4090"),
        "memory.estimate",
        "memory-batch",
        "fit-memory.estimate-h100-80gb-fp32-",  # one figure per card and precision: the README shows fp32 on an H100
        "predicted, not measured: the largest fp32 batch of ViT-B/16 that fits each of three GPUs",
    ),
)


def petlbench(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "petlbench", *args], cwd=ROOT, check=True)


def methods_of(folder: Path) -> list[str]:
    import pandas as pd

    frame = pd.concat([pd.read_parquet(p, columns=["method"]) for p in folder.glob("*.parquet")])
    return sorted(str(m) for m in frame["method"].unique())


def make(figure: Figure, results: Path, made: set[tuple[str, ...]]) -> None:
    if figure.make not in made:
        petlbench(*figure.make, "--results-dir", str(results))
        made.add(figure.make)
    with tempfile.TemporaryDirectory() as out:
        petlbench("report", str(results / figure.folder), "--plot", figure.plot, "--format", "pdf", "--out", out)
        found = sorted(Path(out).glob(f"{figure.prefix}*.png"))
        if len(found) != 1:
            raise SystemExit(f"{figure.name}: expected one {figure.prefix}*.png in the report, found {found}")
        for suffix in (".png", ".pdf"):
            shutil.copyfile(found[0].with_suffix(suffix), FIGURES / f"{figure.name}{suffix}")
    sidecar = {
        "suite": figure.suite,
        "what": figure.what,
        "commands": [
            "petlbench " + " ".join(figure.make) + " --results-dir RESULTS",
            f"petlbench report RESULTS/{figure.folder} --plot {figure.plot} --format pdf",
        ],
        "methods": methods_of(results / figure.folder),
    }
    (FIGURES / f"{figure.name}.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    print(f"docs/figures/{figure.name}.png: {len(sidecar['methods'])} methods from {figure.suite}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="regenerate this figure only (a name from docs/figures/)")
    parser.add_argument(
        "--results",
        type=Path,
        help="reuse the rows in this results folder, made by the figures' own commands (printed in each sidecar)",
    )
    args = parser.parse_args()
    chosen = [f for f in FIGURES_MADE if args.only in (None, f.name)]
    if not chosen:
        raise SystemExit(f"--only: no figure {args.only!r}; known: {', '.join(f.name for f in FIGURES_MADE)}")
    if args.results is not None:
        made = {f.make for f in chosen}
        for figure in chosen:
            if not (args.results / figure.folder).is_dir():
                raise SystemExit(f"--results: {args.results / figure.folder}: no such folder; run {figure.make}")
            make(figure, args.results, made)
        return 0
    made = set()
    with tempfile.TemporaryDirectory() as results:
        for figure in chosen:
            make(figure, Path(results), made)
    return 0


if __name__ == "__main__":
    sys.exit(main())
