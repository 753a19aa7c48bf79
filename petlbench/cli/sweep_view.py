"""How `petlbench run` shows a sweep: one method per event of `petlbench.run.sweep.sweep`, a progress bar while
runs execute, the end-of-sweep table and what to do next. Renders only; the sweep decides."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, TaskID

from petlbench.cli.console import err, error_line, fail, out, progress_bar
from petlbench.cli.estimate_tables import auto_batch_table, probe_line
from petlbench.cli.tables import result_line, runs_table, summary_table
from petlbench.errors import PetlbenchError
from petlbench.estimate.client import Estimating
from petlbench.executors import RunFinished, RunStarted
from petlbench.executors.process import Terminated
from petlbench.fmt import fmt_bytes, fmt_knob, fmt_seconds
from petlbench.results import stored_statuses
from petlbench.run.sweep import (
    AutoBatchPlanned,
    Finished,
    Guarded,
    Planned,
    ProbeFinished,
    Reporting,
    SearchFinished,
    Skipped,
    SweepEvent,
    SweepRequest,
    sweep,
)


def running_text(labels: list[str], shown: int = 2) -> str:
    """Progress text for the runs in flight: 'lora rank=4 bs=8 fp32', or '3 running: a · b · +1'."""
    if len(labels) <= 1:
        return labels[0] if labels else "waiting"
    more = [f"+{len(labels) - shown}"] if len(labels) > shown else []
    return f"{len(labels)} running: " + " · ".join([*labels[:shown], *more])


class SweepView:
    """Prints a sweep as its events arrive; `finished` holds the last event, `interrupted` what to say on Ctrl-C."""

    def __init__(self) -> None:
        self.stack = ExitStack()
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.running: dict[str, str] = {}
        self.planned: Planned | None = None
        self.auto_planned: AutoBatchPlanned | None = None
        self.searches: list[SearchFinished] = []
        self.limit: int | None = None
        self.where: Path | None = None
        self.finished: Finished | None = None
        self.finished_now = 0  # runs that ended in this invocation (stored)

    def show(self, events: Iterator[SweepEvent]) -> Finished | None:
        with self.stack:
            for event in events:
                self.render(event)
        return self.finished

    def render(self, event: SweepEvent) -> None:
        if isinstance(event, Planned):
            self._planned(event)
        elif isinstance(event, Guarded) and event.cost.seconds is not None:
            out.print(
                f"device auto → cpu: predicted {fmt_seconds(event.cost.seconds)} on this CPU "
                f"(largest peak {fmt_bytes(event.cost.largest_peak)})",
                style="dim",
            )
        elif isinstance(event, Estimating):
            self._estimating(event)
        elif isinstance(event, Skipped):
            self._skipped(event)
        elif isinstance(event, RunStarted | RunFinished):
            self._run_event(event)
        elif isinstance(event, AutoBatchPlanned):
            self._auto_batch(event)
        elif isinstance(event, ProbeFinished):
            self.finished_now += not event.reused
            self._console().print(probe_line(event.result, event.fits, event.reused, event.limit))
        elif isinstance(event, SearchFinished):
            self._search(event)
        elif isinstance(event, Reporting):
            self._stop_progress()
            self.stack.enter_context(out.status(f"writing the report (figures) to {event.out}/"))
        elif isinstance(event, Finished):
            self._stop_progress()
            self.finished = event

    def _console(self) -> Console:
        return self.progress.console if self.progress is not None else out

    def _planned(self, event: Planned) -> None:
        self.planned, self.where = event, event.where
        plan = event.plan
        out.print(
            f"[bold]{event.suite.name}[/bold]: {len(event.runs)} runs on {event.device} → {event.where}/ "
            f"({len(plan.done)} done, {len(plan.todo)} to run"
            + (f", {len(plan.retry)} retried" if plan.retry else "")
            + ")"
            + ("" if event.executor == "local" else f" · {event.executor}")
        )
        for note in event.notes:
            err.print(f"note: {note}")

    def _start_progress(self) -> Progress:
        if self.progress is None:
            assert self.planned is not None
            self.progress = self.stack.enter_context(progress_bar(eta=True))
            todo = len(self.planned.plan.todo)
            self.task = self.progress.add_task(
                "starting", total=todo, seed_s=self.planned.seed_s, parallel=self.planned.parallel
            )
        return self.progress

    def _stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _estimating(self, event: Estimating) -> None:
        if self.progress is None:
            self.progress = self.stack.enter_context(progress_bar("estimating"))
            self.task = self.progress.add_task("starting (importing torch)", total=event.total)
        assert self.task is not None
        self.progress.update(self.task, completed=event.done, total=event.total, description=event.label)
        if event.done == event.total:
            self.progress.stop()
            self.progress = self.task = None

    def _skipped(self, event: Skipped) -> None:
        for result in event.results:
            out.print(result_line(result))
        out.print(
            f"--skip-predicted-oom: {len(event.results)} of {event.considered} runs predicted over "
            f"{fmt_bytes(event.limit)} and skipped"
            + (f"; {event.unestimated} could not be estimated and will run" if event.unestimated else "")
        )
        if self.planned is not None:
            progress = self._start_progress()
            assert self.task is not None
            progress.update(self.task, total=len(self.planned.plan.todo) - len(event.results))

    def _run_event(self, event: RunStarted | RunFinished) -> None:
        progress = self._start_progress()
        assert self.task is not None
        if isinstance(event, RunStarted):
            self.running[event.spec.run_id] = event.spec.label()
        else:
            self.running.pop(event.result.run_id, None)
            self.finished_now += 1
            progress.console.print(result_line(event.result))
            progress.advance(self.task)
        progress.update(self.task, description=running_text(list(self.running.values())))

    def _auto_batch(self, event: AutoBatchPlanned) -> None:
        self.auto_planned, self.limit, self.where = event, event.limit, event.where
        r = event.suite.batch_range
        out.print(
            f"[bold]{event.suite.name}[/bold]: batch_size auto in [{r.min}, {r.max}] (multiples of {r.multiple_of}) "
            f"under {fmt_bytes(event.limit)}, {len(event.templates)} configurations on {event.templates[0].device} "
            f"→ {event.where}/"
        )

    def _search(self, event: SearchFinished) -> None:
        self.searches.append(event)
        outcome = event.outcome
        best = outcome.search.best if outcome.search else None
        t = outcome.template
        knob = f" {fmt_knob(t.knob_name, t.knob)}" if t.knob_name else ""
        out.print(
            f"→ {t.method}{knob} {t.precision}: max feasible batch {best if best else 'none'}"
            f" (predicted {outcome.predicted})",
            style="bold",
        )

    # -- the end ------------------------------------------------------------------------------------------------

    def interrupted(self, code: int) -> None:
        """Ctrl-C (130) or SIGTERM (143): what finished is stored; how to resume."""
        self._stop_progress()
        if self.searches and self.limit is not None:
            outcomes = [s.outcome for s in self.searches]
            out.print(auto_batch_table(outcomes, self.limit, title="finished searches"))
        held = len(stored_statuses(self.where)) if self.where is not None else 0
        where = f"{self.where}/" if self.where is not None else "the results folder"
        err.print(
            f"interrupted: {self.finished_now} runs finished in this session; {where} holds {held} results; run the "
            "same command to resume"
        )


def summary(finished: Finished, quickstart: bool) -> None:
    """The end of `petlbench run`: every row of the suite (marking this invocation's), the counts, the failures,
    and the next step."""
    if finished.outcomes and finished.limit is not None:
        title = f"{finished.suite.name}: max feasible batch per configuration"
        out.print(auto_batch_table(finished.outcomes, finished.limit, title=title))
    elif finished.rows:
        if not finished.results:
            out.print(f"nothing to run: every run already has a result in {finished.where}/ (--force re-runs)")
        now = {r.run_id for r in finished.results}
        title = f"{finished.suite.name}: {len(finished.rows)} runs" + (
            f" ({len(now)} ran now, *)" if now and len(now) < len(finished.rows) else ""
        )
        out.print(summary_table(finished.rows, title=title, now=now))
    if finished.results:
        counts = "  ".join(f"{status}: {n}" for status, n in finished.counts.items())
        out.print(f"{counts}  → {finished.where}/")
    for line, count in finished.config_errors.items():
        err.print(error_line(line + (f" ({count} runs)" if count > 1 else "")))
    if finished.config_errors:
        err.print(
            f"{sum(finished.config_errors.values())} runs failed on their configuration or data; the other results "
            f"are in {finished.where}/"
        )
    if finished.report_error:
        err.print(f"note: no report ({finished.report_error})")
    if finished.report is not None:
        out.print(f"report: {finished.report.html}  ({len(finished.report.figures)} figures, also report.md)")
    if quickstart and not finished.config_errors:
        explain = f"petlbench explain {finished.where} --method fact --batch-size 32 --vs 'lora rank=8'"
        out.print(
            f"next: open the report; `{explain}` says why one method needs more memory than another",
            style="dim",
        )


def dry_run(view: SweepView) -> None:
    """`run --dry-run`: the runs (or auto-batch configurations) that would execute."""
    if view.auto_planned is not None:
        out.print(runs_table(view.auto_planned.templates, title="configurations to search (shown at auto_batch.min)"))
        return
    planned = view.planned
    if planned is None:
        return
    if not planned.plan.todo:
        out.print(f"nothing to run: all {len(planned.runs)} runs already have results in {planned.where}/")
        return
    out.print(runs_table(planned.plan.todo, title="runs to execute"))
    out.print(f"dry run: {len(planned.plan.todo)} runs would execute; nothing was run")


def show_sweep(request: SweepRequest) -> int:
    """Run the sweep, printing it as it goes; the exit code (errors exit 2 through `fail`, interrupts 130/143)."""
    view = SweepView()
    try:
        finished = view.show(sweep(request))
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated); the sweep stopped every worker
        code = 143 if isinstance(exc, Terminated) else 130
        view.interrupted(code)
        return code
    except PetlbenchError as exc:
        fail(exc)
    assert finished is not None
    if finished.dry_run:
        dry_run(view)
        return 0
    summary(finished, quickstart=request.quickstart)
    return finished.exit_code
