"""Estimate vs measurement, one row per run: the table scripts/gpu-validate.sh publishes.

    python scripts/calibration.py RESULTS_DIR SUITE OUT_DIR [--exact]

Joins the measured rows of `RESULTS_DIR/SUITE/` with the estimate rows of `RESULTS_DIR/SUITE.estimate/` on
run_id and writes `OUT_DIR/estimate-vs-measured.csv` (bytes) and `.md` (human units, plus a summary of the
relative errors). Errors are estimate − measured, relative to measured. Columns:

- `allocated`: the headline, CUDA `max_memory_allocated` (or the CPU tracker), vs the estimate's;
- `tracked`: the device run's own tensor-tracker peak (a CUDA run's breakdown step, 512-B rounded) vs the
  estimate's tracked peak: kernel and autocast differences, apart from the allocator;
- `reserved`: `max_memory_reserved` vs the allocator model's prediction (the estimate's peak where it has none);
- `nvml`: the driver's peak for the process vs predicted reserved + the card's context (what FITS judges);
- `context`: NVML − reserved (what lives outside the allocator: driver, CUDA context, libraries) vs the card
  preset's context estimate;
- `infer`: the inference peak, estimated vs measured.

With `--exact` (CPU runs) any estimate that differs from the measurement by a byte is an error (exit 1).
Torch-free: reads parquet only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petlbench.errors import PetlbenchError
from petlbench.fmt import fmt_bytes, fmt_knob
from petlbench.results import estimate_dir, load_results, suite_dir

if TYPE_CHECKING:
    import pandas as pd


def _first(row: Mapping[Any, Any], *columns: str) -> float | None:
    return next((v for v in (_num(row.get(c)) for c in columns) if v is not None), None)


def _sum(row: Mapping[Any, Any], a: str, b: str) -> float | None:
    x, y = _num(row.get(a)), _num(row.get(b))
    return None if x is None or y is None else x + y


def _outside(row: Mapping[Any, Any]) -> float | None:
    driver, reserved = _num(row.get("peak_driver_bytes")), _num(row.get("peak_reserved_bytes"))
    return None if driver is None or reserved is None else driver - reserved


View = Callable[[Mapping[Any, Any]], float | None]
PAIRS: tuple[tuple[str, View, View], ...] = (  # (column in the output, measured value, estimated value)
    ("allocated", lambda m: _num(m.get("peak_allocated_bytes")), lambda e: _num(e.get("peak_allocated_bytes"))),
    (
        "tracked",
        lambda m: _num(m.get("mem_tracked_peak_bytes")),
        lambda e: _first(e, "mem_tracked_peak_bytes", "peak_allocated_bytes"),
    ),
    (
        "reserved",
        lambda m: _num(m.get("peak_reserved_bytes")),
        lambda e: _first(e, "peak_reserved_bytes", "peak_allocated_bytes"),
    ),
    (
        "nvml",
        lambda m: _num(m.get("peak_driver_bytes")),
        lambda e: _sum(e, "peak_reserved_bytes", "context_bytes") or _num(e.get("peak_allocated_bytes")),
    ),
    ("context", _outside, lambda e: _num(e.get("context_bytes"))),
    ("infer", lambda m: _num(m.get("peak_infer_bytes")), lambda e: _num(e.get("peak_infer_bytes"))),
)


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def compare(measured: pd.DataFrame, estimated: pd.DataFrame) -> pd.DataFrame:
    """One row per measured run that has an estimate: bytes, absolute and relative errors per view."""
    import pandas as pd

    est = {str(r["run_id"]): r for r in estimated.to_dict("records")} if len(estimated) else {}
    rows: list[dict[str, Any]] = []
    for m in measured.to_dict("records") if len(measured) else []:
        e = est.get(str(m["run_id"]))
        if e is None:
            continue
        row: dict[str, Any] = {
            "run_id": m["run_id"],
            "tuner": m.get("tuner"),
            "knob": fmt_knob(m.get("knob_name") if isinstance(m.get("knob_name"), str) else None, _num(m.get("knob"))),
            "precision": m.get("precision"),
            "batch_size": int(m["batch_size"]),
            "device": m.get("device"),
            "status": m.get("status"),
            "attn_kernel": m.get("attn_kernel"),
            "estimate_approximate": bool(_num(e.get("estimate_approximate"))),
            "estimate_bytes": _num(e.get("peak_allocated_bytes")),
            "estimate_infer_bytes": _num(e.get("peak_infer_bytes")),
        }
        row["estimate_reserved_bytes"] = _num(e.get("peak_reserved_bytes"))
        row["estimate_context_bytes"] = _num(e.get("context_bytes"))
        for name, measured_view, estimate_view in PAIRS:
            actual, predicted = measured_view(m), estimate_view(e)
            row[f"{name}_bytes"] = actual
            ok = actual is not None and predicted is not None and actual > 0 and m.get("status") == "ok"
            row[f"{name}_abs_error_bytes"] = predicted - actual if ok and predicted is not None and actual else None
            row[f"{name}_rel_error"] = predicted / actual - 1 if ok and predicted is not None and actual else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    if len(frame):
        frame = frame.sort_values(["tuner", "knob", "precision", "batch_size"], kind="stable").reset_index(drop=True)
    result: pd.DataFrame = frame
    return result


def _pct(value: Any) -> str:
    number = _num(value)
    return "-" if number is None else f"{100 * number:+.2f}%"


def _bytes(value: Any) -> str:
    number = _num(value)
    return "-" if number is None else fmt_bytes(number)


def markdown(frame: pd.DataFrame, title: str) -> str:
    """The comparison as markdown: a summary of relative errors, then one line per run."""
    lines = [f"# {title}", ""]
    if not len(frame):
        return "\n".join([*lines, "No run has both a measurement and an estimate.", ""])
    lines.append("| view | runs | median rel. error | max abs. rel. error |")
    lines.append("| --- | --- | --- | --- |")
    for name, *_ in PAIRS:
        errors = frame[f"{name}_rel_error"].dropna()
        if len(errors):
            worst = errors.abs().max()
            lines.append(f"| {name} | {len(errors)} | {_pct(errors.median())} | {100 * worst:.2f}% |")
    lines += ["", "Estimate − measured, relative to measured. `≈`: approximate estimate (see estimate_note).", ""]
    header = (
        "| tuner | knob | precision | batch | status | estimate | allocated | err | tracked | err | "
        "reserved est. | reserved | err | nvml | err | context est. | context | err | infer est. | infer | err | "
        "kernel |"
    )
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in frame.to_dict("records"):
        mark = "≈" if r["estimate_approximate"] else ""
        lines.append(
            f"| {r['tuner']} | {r['knob']} | {r['precision']} | {r['batch_size']} | {r['status']} | "
            f"{mark}{_bytes(r['estimate_bytes'])} | "
            f"{_bytes(r['allocated_bytes'])} | {_pct(r['allocated_rel_error'])} | "
            f"{_bytes(r['tracked_bytes'])} | {_pct(r['tracked_rel_error'])} | "
            f"{_bytes(r['estimate_reserved_bytes'])} | "
            f"{_bytes(r['reserved_bytes'])} | {_pct(r['reserved_rel_error'])} | "
            f"{_bytes(r['nvml_bytes'])} | {_pct(r['nvml_rel_error'])} | "
            f"{_bytes(r['estimate_context_bytes'])} | {_bytes(r['context_bytes'])} | {_pct(r['context_rel_error'])} | "
            f"{_bytes(r['estimate_infer_bytes'])} | {_bytes(r['infer_bytes'])} | {_pct(r['infer_rel_error'])} | "
            f"{r['attn_kernel'] if isinstance(r['attn_kernel'], str) else '-'} |"
        )
    return "\n".join([*lines, ""])


def mismatches(frame: pd.DataFrame) -> list[str]:
    """Runs whose estimate differs from the measured peak (training or inference) by any byte."""
    bad = []
    for r in frame.to_dict("records"):
        for name in ("allocated", "infer"):
            if r["status"] == "ok" and _num(r[f"{name}_abs_error_bytes"]) not in (0.0, None):
                delta = int(r[f"{name}_abs_error_bytes"])
                bad.append(
                    f"{r['run_id']} {r['tuner']} {r['knob']} bs={r['batch_size']} {r['precision']}: {name} "
                    f"estimate − measured = {delta:+,} B"
                )
    return bad


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    exact = "--exact" in args
    args = [a for a in args if a != "--exact"]
    if len(args) != 3:
        print("usage: python scripts/calibration.py RESULTS_DIR SUITE OUT_DIR [--exact]", file=sys.stderr)
        return 2
    results_dir, suite, out = Path(args[0]), args[1], Path(args[2])
    try:
        measured = load_results([suite_dir(results_dir, suite)])
        estimated = load_results([estimate_dir(results_dir, suite)])
    except PetlbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    frame = compare(measured, estimated)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "estimate-vs-measured.csv", index=False)
    text = markdown(frame, f"{suite}: estimated vs measured peak memory")
    (out / "estimate-vs-measured.md").write_text(text)
    print(text)
    print(f"{len(frame)} run(s) compared → {out}/estimate-vs-measured.csv, .md")
    if not len(frame):
        print("error: no run has both a measurement and an estimate", file=sys.stderr)
        return 1
    failed = [r for r in frame.to_dict("records") if r["status"] != "ok"]
    for r in failed:
        print(f"error: run {r['run_id']} ({r['tuner']} bs={r['batch_size']}) ended {r['status']}", file=sys.stderr)
    if exact:
        bad = mismatches(frame)
        for line in bad:
            print(f"error: not exact: {line}", file=sys.stderr)
        if not bad and not failed:
            print(f"exact: all {len(frame)} estimates equal the measured bytes (training and inference peaks)")
        return 1 if bad or failed else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
