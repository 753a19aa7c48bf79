"""Rich renderings for predicted memory: `petlbench estimate`, `run --skip-predicted-oom`, `batch_size: auto`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.text import Text

from petlbench.cli.console import err, out
from petlbench.cli.tables import Col, FitTable, backbone_label, result_line
from petlbench.columns import FitSearch
from petlbench.estimate.client import Estimate, fits, judged_bytes
from petlbench.estimate.gpus import DEFAULT_PRESET, PRESETS, Target
from petlbench.estimate.guard import describe
from petlbench.fmt import first_line, fmt_bytes, fmt_knob, fmt_pct, fmt_seconds
from petlbench.report.fit import fit_cell
from petlbench.results import RunResult
from petlbench.run.batch_search import AutoBatchOutcome
from petlbench.run.predict import Prediction
from petlbench.spec.models import RunSpec


def _varying(runs: Sequence[RunSpec]) -> dict[str, list[str]]:
    """Spec columns that differ between runs (the rest go into the caption)."""
    columns: dict[str, list[str]] = {
        "backbone": [backbone_label(r) for r in runs],
        "precision": [r.precision for r in runs],
        "ckpt": ["yes" if r.grad_checkpointing else "no" for r in runs],
        "seed": [str(r.seed) for r in runs],
    }
    return {k: v for k, v in columns.items() if len(set(v)) > 1}


def _shared(runs: Sequence[RunSpec], varying: Mapping[str, list[str]]) -> str:
    if not runs:
        return ""
    first = runs[0]
    parts = {
        "backbone": backbone_label(first),
        "device": first.device,
        "precision": first.precision,
        "ckpt": "yes" if first.grad_checkpointing else "no",
    }
    return ", ".join(f"{k}: {v}" for k, v in parts.items() if k not in varying)


def device_label(device: str, targets: Sequence[Target]) -> str:
    """How titles name the device: the GPU preset(s) or memory sizes judged on, else the device type."""
    if not targets:
        return device
    return ", ".join(t.label for t in targets) if device == "cuda" else f"cpu, {targets[0].label}"


def _fit_rule(target_metrics: Estimate | None) -> str:
    m = target_metrics.metrics if target_metrics is not None else None
    if m is None or m.context_bytes is None or m.gpu_preset is None:
        return ""
    headroom = f" + headroom {fmt_bytes(m.headroom_bytes)}" if m.headroom_bytes else ""
    return f"; FITS: reserved + context {fmt_bytes(m.context_bytes)}{headroom} ≤ memory"


def fit_text(peak: int | None, limit: int | None) -> Text:
    verdict = fits(peak, limit)
    if verdict is None:
        return Text("-", style="dim")
    return Text("FITS", style="green") if verdict else Text("OOM", style="bold red")


def estimate_table(
    runs: Sequence[RunSpec], estimates: Mapping[str, Estimate], limit: int | None, title: str | None = None
) -> FitTable:
    """One line per run: predicted peak by category, inference peak, and FITS/OOM against `limit`."""
    varying = _varying(runs)
    caption = _shared(runs, varying)
    if limit is not None:
        caption += f"; limit {fmt_bytes(limit)} ({limit:,} B)"
        caption += _fit_rule(next((e for e in estimates.values() if e.metrics is not None), None))
    if any(e.metrics is not None and e.metrics.estimate_approximate for e in estimates.values()):
        caption += "; ≈ approximate (see estimate_note)"
    reserved = any(e.metrics is not None and e.metrics.peak_reserved_bytes is not None for e in estimates.values())
    left = {"run_id", "method", "knob", "fit", *varying}
    names = ("#", "run_id", "method", "knob", "batch", *varying, "peak", *(("reserved",) if reserved else ()))
    names += ("weights", "grads", "optim", "activ.", "infer", "fit", "left")
    # narrow terminal: the breakdown and ids go first; the peak, the verdict and the knob stay
    drops = {"grads": 9, "optim": 8, "weights": 7, "#": 6, "run_id": 5, "infer": 4, "activ.": 3, "left": 2}
    table = FitTable(
        [Col(c, "left" if c in left else "right", drops.get(c, 0)) for c in names], title=title, caption=caption or None
    )
    for i, run in enumerate(runs, 1):
        estimate = estimates.get(run.run_id)
        m = estimate.metrics if estimate is not None else None
        knob = fmt_knob(run.knob_name, run.knob)
        cells: list[str | Text] = [str(i), run.run_id, run.method, knob, str(run.batch_size)]
        cells += [values[i - 1] for values in varying.values()]
        if m is None:
            error = (estimate.error or "not estimated") if estimate is not None else "not estimated"
            cells += [Text("error", style="red"), *([""] * reserved), "", "", "", "", ""]
            cells += [Text(first_line(error, 80), style="red"), ""]
        else:
            peak, judged = m.peak_allocated_bytes, judged_bytes(m)
            mark = "≈" if m.estimate_approximate else ""
            room = "-" if limit is None or judged is None else fmt_pct((limit - judged) / limit)
            cells += [mark + fmt_bytes(peak), *([mark + fmt_bytes(m.peak_reserved_bytes)] if reserved else [])]
            cells += [
                fmt_bytes(m.mem_weights_bytes),
                fmt_bytes(m.mem_grads_bytes),
                fmt_bytes(m.mem_optimizer_bytes),
                fmt_bytes(m.mem_activations_bytes),
                fmt_bytes(m.peak_infer_bytes),
                fit_text(judged, limit),
                room,
            ]
        table.add_row(*cells)
    return table


def max_batch_table(
    templates: Sequence[RunSpec],
    estimates: Mapping[str, Estimate],
    limit: int,
    title: str | None = None,
    cuda: bool = False,
) -> FitTable:
    """`estimate` of a `batch_size: auto` suite: the largest batch predicted to fit, per configuration (CUDA on a
    card: judged by reserved + context + headroom, the `needs` column)."""
    varying = _varying(templates)
    needs = "needs there" if cuda else "peak there"
    names = ("method", "knob", *varying, "max batch", needs, "left", "first over", "over by")
    drops = {"over by": 3, "left": 2, "first over": 1}
    table = FitTable(
        [Col(c, "left" if c in ("method", "knob", *varying) else "right", drops.get(c, 0)) for c in names],
        title=title,
        caption=f"limit {fmt_bytes(limit)} ({limit:,} B)",
    )
    for i, run in enumerate(templates):
        estimate = estimates.get(run.run_id)
        cells: list[str | Text] = [run.method, fmt_knob(run.knob_name, run.knob)]
        cells += [values[i] for values in varying.values()]
        if estimate is None or estimate.error is not None:
            error = estimate.error if estimate is not None and estimate.error else "not estimated"
            cells += [Text("error", style="red"), Text(first_line(error, 80), style="red"), "", "", ""]
        else:
            probes = dict(estimate.probes)
            best, over = estimate.max_batch, estimate.first_over
            at_best = probes.get(best) if best is not None else None
            at_over = probes.get(over) if over is not None else None
            cells += [
                Text(str(best), style="bold") if best is not None else Text("none fits", style="red"),
                fmt_bytes(at_best),
                fmt_bytes(limit - at_best) if at_best is not None else "-",
                str(over) if over is not None else "(max)",
                fmt_bytes(at_over - limit) if at_over is not None else "-",
            ]
        table.add_row(*cells)
    return table


def probe_line(result: RunResult, fit: bool | None, reused: bool, limit: int) -> Text:
    """One auto-batch probe: the run line plus whether it fits the limit."""
    line = result_line(result)
    if fit is True:
        line.append(f"  fits ≤ {fmt_bytes(limit)}", style="green")
    elif fit is False:
        over = "oom" if result.status == "oom" else f"over {fmt_bytes(limit)}"
        line.append(f"  does not fit ({over})", style="yellow")
    if reused:
        line.append("  (stored result)", style="dim")
    return line


def auto_batch_table(outcomes: Sequence[AutoBatchOutcome], limit: int, title: str | None = None) -> FitTable:
    """The max feasible batch per configuration: predicted (estimate) vs confirmed (real runs)."""
    templates = [o.template for o in outcomes]
    varying = _varying(templates)
    names = ("method", "knob", *varying, "predicted", "max feasible", "peak there", "left", "next", "probes")
    drops = {"probes": 4, "left": 3, "next": 2, "peak there": 1}
    columns = [Col(c, "left" if c in ("method", "knob", *varying) else "right", drops.get(c, 0)) for c in names]
    table = FitTable(
        [*columns, Col("note", wrap=True)], title=title, caption=f"memory limit {fmt_bytes(limit)} ({limit:,} B)"
    )
    for i, outcome in enumerate(outcomes):
        run = outcome.template
        cells: list[str | Text] = [run.method, fmt_knob(run.knob_name, run.knob)]
        cells += [values[i] for values in varying.values()]
        predicted = str(outcome.predicted) if outcome.predicted is not None else "-"
        search = outcome.search
        best_result = outcome.best_result
        note = outcome.failure or ""
        if search is None:
            cells += [predicted, Text("unknown", style="red"), "-", "-", "-", str(len(outcome.results))]
        else:
            if search.first_over is None and search.best is not None:
                note = note or "the largest batch allowed fits (raise auto_batch.max)"
            if search.best is None:
                note = note or "even the smallest batch does not fit"
            peak = best_result.metrics.peak_allocated_bytes if best_result is not None else None
            cells += [
                predicted,
                Text(str(search.best), style="bold green") if search.best is not None else Text("none", style="red"),
                fmt_bytes(peak),
                fmt_bytes(limit - peak) if peak is not None else "-",
                f"{search.first_over} ✗" if search.first_over is not None else "-",
                str(len(search.probes)),
            ]
        cells.append(Text(note, style="dim"))
        table.add_row(*cells)
    return table


def fit_table(
    runs: Sequence[RunSpec], estimates: Mapping[str, Estimate], targets: Sequence[Target], title: str | None = None
) -> FitTable:
    """What fits on my GPU: per configuration, the largest batch predicted to fit each card (searched on the
    replay, not limited to the sweep) with its predicted reserved memory (CUDA) or peak (CPU) there."""
    varying = _varying(runs)
    configs: dict[tuple[str, ...], list[FitSearch]] = {}
    for i, run in enumerate(runs):
        key = (run.method, fmt_knob(run.knob_name, run.knob), *(values[i] for values in varying.values()))
        estimate = estimates.get(run.run_id)
        if estimate is not None and estimate.fits and key not in configs:
            configs[key] = estimate.fits
        configs.setdefault(key, [])
    labels = [t.label for t in targets]
    cuda = any(r.device == "cuda" for r in runs)
    table = FitTable(
        [Col(c, "left" if i < 2 + len(varying) else "right") for i, c in enumerate(["method", "knob", *varying])]
        + [Col(label, "right") for label in labels],
        title=title,
        caption=(
            "largest batch predicted to fit, searched (not limited to the sweep), with the predicted "
            + ("reserved memory there; FITS: reserved + context + headroom ≤ memory" if cuda else "peak there")
            + "; +: the search's upper bound fits; none: not even batch 1"
        ),
    )
    for key, found in configs.items():
        by_label = {f.gpu: f for f in found}
        table.add_row(*key, *(fit_cell(by_label.get(label), cuda) for label in labels))
    return table


def show_prediction(p: Prediction) -> None:
    """What `petlbench estimate` prints: the per-run table (or the largest batch per configuration for
    `batch_size: auto`), the largest batch that fits each card, the caveats and a one-line summary."""
    name, runs, estimates, targets = p.suite.name, p.runs, p.estimates, p.targets
    where = device_label(p.device, targets)
    if p.search is not None:
        assert p.limit is not None
        title = f"{name}: largest batch predicted to fit ({where})"
        out.print(max_batch_table(runs, estimates, p.limit, title=title, cuda=p.device == "cuda"))
    else:
        out.print(
            estimate_table(runs, estimates, p.limit, title=f"{name}: predicted peak memory ({where}), {len(runs)} runs")
        )
        if targets:
            out.print(fit_table(runs, estimates, targets, title=f"{name}: largest batch predicted to fit"))
    if p.device == "cuda":
        assumed = targets[0].name if targets else f"{PRESETS[DEFAULT_PRESET].name} (default; no memory to judge)"
        out.print(
            f"CUDA estimate for {assumed}: fake CPU tensors traced as CUDA runs them (its autocast lists, kernels and "
            "attention kernel), replayed through a model of PyTorch's caching allocator (whole blocks, segments, "
            "cuBLAS workspaces); FITS = reserved + context + headroom ≤ the card's memory. Uncalibrated until "
            "scripts/gpu-validate.sh runs on a GPU.",
            style="dim",
        )
    if p.plan is not None:
        out.print(f"time to run this plan: {describe(p.plan, len(runs))} (docs/measurement.md)")
    for e in p.failed:
        err.print(f"estimate failed for {e.run_id}: {first_line(e.error)}")
    what = "configurations searched" if p.search is not None else "runs estimated"
    summary = f"{len(runs)} {what.replace('s ', ' ', 1) if len(runs) == 1 else what} in {fmt_seconds(p.seconds)}"
    if p.limit is not None and p.search is None and targets:
        summary += f": {len(runs) - len(p.over) - len(p.failed)} fit {targets[0].label}, {len(p.over)} over"
    if p.failed:
        summary += f", {len(p.failed)} failed"
    out.print(f"{summary} → {p.folder}/ (memory_source=estimate; measured rows stay in {p.measured}/)")
