"""The one command skeleton: options -> one analysis -> gate -> report -> writes, stdout, exit code.

A command module declares its own options and a body; :func:`audit_command` adds the report and gate options
(:func:`jacaudit.cli.options.report_params`) and runs the body through :func:`run`, which does, in this order:

1. error mapping (one line on stderr, the documented exit code; ``--debug`` for the traceback),
2. validation of the report options (formats, thresholds, the baseline report) before anything is computed,
3. runtime set-up (threads, allocator) when the command computes,
4. the body: ``body(ctx) -> Outcome`` -- loads the model and data, calls ONE analysis, returns its output,
5. the gate: metrics + thresholds (+ baseline) -> checks -> status and exit code,
6. the writes: artifacts, then report files (atomic), ``--junit``, ``--sarif``, ``$GITHUB_STEP_SUMMARY``,
7. stdout: exactly the report JSON with ``--json``, else the command's summary and the checks table.

Exit codes: 0 nothing failed (or ``--exit-zero``), 1 a check failed, 2 usage/input error or some inputs were
skipped (``partial``), 3 runtime failure.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import typer

from .common import deferred_messages, err, gradient_path, handle_errors, info, out, setup_runtime, state, warn
from .options import report_params

__all__ = ["ReportOptions", "Outcome", "Context", "audit_command", "run"]


@dataclass(frozen=True)
class ReportOptions:
    out_dir: Path
    formats: str
    json_out: bool
    junit: Path | None
    sarif: Path | None
    fail_on: list[str] | None
    warn_on: list[str] | None
    baseline_report: Path | None
    max_regression: float | None
    exit_zero: bool


_REPORT_FIELDS = tuple(f for f in ReportOptions.__dataclass_fields__)


@dataclass
class Outcome:
    """What a command body hands to the runner."""

    output: Any                       # jacaudit.analyses.base.AnalysisOutput
    model: Any = None                 # a loaded Model or a ModelIdentity
    settings: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    summary: Callable[[Any], None] | None = None  # prints the human summary of the report on stdout
    exit_floor: int = 0               # e.g. 2 for `inspect` on unsupported ops
    inconclusive: bool = False        # the analysis could not reach a verdict (said in the status)


class Context:
    """Given to a command body: timings and the one progress helper."""

    def __init__(self, out_dir: Path | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.out_dir = out_dir            # --out (a dataset command keeps its shards there)
        self.after_reports: list[Callable[[], None]] = []  # run once the reports are written (e.g. shard clean-up)

    def timed(self, key: str):
        from ..results import timed
        return timed(self.timings, key)

    def progress(self, description: str, total: int | None = None) -> "_Progress":
        return _Progress(description, total)


class _Progress:
    """A transient Rich progress bar on stderr; off when stderr is not a terminal, with --quiet, or for one item.

    ``with ctx.progress("saliency", n) as p: p.advance(k)`` / ``p.update(done, total)``."""

    def __init__(self, description: str, total: int | None) -> None:
        self.description, self.total = description, total
        self._p = None
        self._task = None

    def __enter__(self) -> "_Progress":
        if not state.quiet and err.is_terminal and (self.total is None or self.total > 1):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=err, transient=True)
            self._p.__enter__()
            self._task = self._p.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def advance(self, n: int = 1) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def update(self, done: int, total: int | None = None) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=done, total=total)


def _thresholds(ro: ReportOptions, command: str) -> list:
    from .. import gate
    from ..config import option_source

    out_ = []
    for level, items, key in (("fail", ro.fail_on, "fail_on"), ("warn", ro.warn_on, "warn_on")):
        out_ += gate.parse_thresholds(items, level, option_source(command, key))
    return out_


def run(command: str, ro: ReportOptions, body: Callable[[Context], Outcome], *, computes: bool = True) -> None:
    """Run one command (see the module docstring). Raises ``typer.Exit`` with the exit code."""
    t_start = time.perf_counter()
    code = 0
    out_existed = os.path.exists(ro.out_dir)
    with _no_empty_out(ro.out_dir, out_existed), handle_errors():
        with deferred_messages():  # notes and warnings of a failed run never precede its error line
            from .. import gate
            from ..report import parse_formats, render, write_atomic, write_reports
            from ..results import make_report, to_json

            fmts = parse_formats(ro.formats)
            thresholds = _thresholds(ro, command)
            baseline = gate.load_baseline(str(ro.baseline_report)) if ro.baseline_report else None
            if ro.max_regression is not None and baseline is None:
                from ..errors import InputError
                raise InputError("--max-regression needs --baseline-report")
            check_writable(ro)  # before anything is computed
            if computes:
                setup_runtime()
            ctx = Context(ro.out_dir)
            outcome = body(ctx)
            res = outcome.output
            checks = gate.evaluate(command, res.metrics, thresholds)
            metrics = gate.metric_values(command, res.metrics)
            comparison = None
            if baseline is not None:
                checks, comparison = gate.compare_baseline(command, checks, metrics, baseline,
                                                           str(ro.baseline_report), ro.max_regression)
            status = gate.report_status(checks)
            if status in ("pass", "warn") and outcome.inconclusive:  # nothing failed, and no evidence either way
                status = "inconclusive"
            code = gate.exit_code_for(status, ro.exit_zero)
            if res.partial:
                status = "partial" if status != "fail" else status
                code = code or 2
            code = code or outcome.exit_floor
            ctx.timings["total"] = round(time.perf_counter() - t_start, 4)
            report = make_report(command, res.result, model=outcome.model, settings=outcome.settings,
                                 timings=ctx.timings, warnings=res.warnings, exit_code=code, status=status,
                                 device=outcome.device, checks=checks, metrics=metrics, baseline=comparison,
                                 runtime=state.runtime, gradients=gradient_path(outcome.model))
            written = _write_artifacts(res.artifacts, ro.out_dir)
            n_artifacts = len(written)
            written += write_reports(report, str(ro.out_dir), fmts) if fmts else []
            for path, fmt in ((ro.junit, "junit"), (ro.sarif, "sarif")):
                if path is not None:
                    write_atomic(path, render(report, fmt))
                    written.append(str(path))
            from ..report.summary import append_job_summary
            summary_path = append_job_summary(report)
            for fn in ctx.after_reports:
                fn()
    for w in res.warnings:
        warn(w)
    if ro.json_out:
        import sys
        sys.stdout.write(to_json(report))
        sys.stdout.flush()
    else:
        if outcome.summary is not None:
            outcome.summary(report)
        print_checks(report)
    artifact_paths = set(written[:n_artifacts])
    for p in written:
        if p not in artifact_paths:
            info(f"wrote {p}")
    if artifact_paths:
        folders = sorted({os.path.dirname(p) for p in artifact_paths})
        info(f"wrote {len(artifact_paths)} file(s) into {', '.join(folders[:4])}{' ...' if len(folders) > 4 else ''}")
    if summary_path:
        info(f"appended the summary to {summary_path}")
    if res.partial:
        err.print("some inputs were skipped (see the report); exit 2", style="yellow", markup=False)
    raise typer.Exit(code)


@contextlib.contextmanager
def _no_empty_out(out_dir: Path, existed: bool):
    """A failed run leaves no empty --out folder behind (one it created)."""
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                for root, dirs, files in os.walk(out_dir, topdown=False):
                    if not files and not os.listdir(root):
                        os.rmdir(root)
        raise


def _writable_folder(path: Path, option: str, shown: Path) -> None:
    """``path`` is a folder we can write into, or can be created (its nearest existing parent is a writable
    folder). Nothing is created here."""
    from ..errors import InputError

    p = Path(os.path.abspath(path))
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{option} {shown}: {p} is a file, not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise InputError(f"{option} {shown}: the folder {p} is not writable")
        return
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option} {shown}: cannot create it, {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {shown}: cannot create it, the folder {parent} is not writable")


def check_writable(ro: ReportOptions) -> None:
    """--out, --junit and --sarif can be written: checked before the computation, so a long run never ends in
    an unwritable path (exit 2, one line)."""
    _writable_folder(ro.out_dir, "--out", ro.out_dir)
    for path, option in ((ro.junit, "--junit"), (ro.sarif, "--sarif")):
        if path is not None:
            check_file_writable(path, option)


def check_file_writable(path: Path | str, option: str) -> None:
    """A file ``path`` can be written (created with its folders): else InputError naming ``option``."""
    from ..errors import InputError

    p = Path(os.path.abspath(path))
    if p.is_dir():
        raise InputError(f"{option} {path}: is a folder; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{option} {path}: the file is not writable")
    _writable_folder(p.parent, option, Path(path))


def _write_artifacts(artifacts: list, out_dir: Path) -> list[str]:
    """Artifacts (relative paths) into ``out_dir``, atomically; arrays as .npy. Paths may not leave the folder."""
    if not artifacts:
        return []
    import io

    from ..errors import RuntimeFailure
    from ..report import write_atomic

    base = os.path.realpath(out_dir)
    paths = []
    for a in artifacts:
        target = os.path.realpath(os.path.join(base, a.path))
        if os.path.commonpath([base, target]) != base:
            raise RuntimeFailure(f"internal: artifact path {a.path!r} leaves the report folder")
        data = a.data
        if not isinstance(data, (bytes, bytearray)):
            import numpy as np
            buf = io.BytesIO()
            np.save(buf, np.asarray(data))
            data = buf.getvalue()
        write_atomic(target, bytes(data))
        paths.append(os.path.join(str(out_dir), a.path))
    return paths


_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "error": "bold red", "skipped": "dim"}


def print_checks(report: Any) -> None:
    """The checks table on stdout, then the status line."""
    from rich.table import Table
    from rich.text import Text

    checks = list(report.checks)
    if checks:
        t = Table("status", "check", "subject", "message", box=None, title="checks", title_justify="left")
        order = {"fail": 0, "error": 1, "warn": 2, "skipped": 3, "pass": 4}
        shown = sorted(checks, key=lambda c: order.get(c.status, 5))
        limit = 40
        for c in shown[:limit]:
            t.add_row(Text(c.status.upper(), style=_STYLE.get(c.status, "")), Text(c.check), Text(c.subject),
                      Text(c.message))
        out.print(t)
        if len(shown) > limit:
            out.print(f"... and {len(shown) - limit} more checks (see the report)", markup=False)
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "warn", "fail", "error", "skipped")}
    tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no checks"
    out.print(Text.assemble("status: ", (str(report.status).upper(), _STYLE.get(report.status, "bold")),
                            f" ({tally})"))
    if report.baseline is not None:
        b = report.baseline
        out.print(f"baseline {b.path}: {len(b.regressions)} regression(s), {len(b.improvements)} improvement(s)",
                  markup=False)
        for ch in b.regressions[:10]:
            out.print(f"  regressed: {ch.message}", markup=False)


def audit_command(app: typer.Typer, name: str, *, computes: bool = True) -> Callable:
    """Register ``fn(**options, ctx) -> Outcome`` as ``jacaudit <name>`` with the report and gate options added.

    ``fn``'s docstring is the command's help. The body receives a :class:`Context` as ``ctx``."""
    def deco(fn: Callable[..., Outcome]) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        hints = typing.get_type_hints(fn, include_extras=True)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
                  if p.name != "ctx"]
        extra = [inspect.Parameter(pn, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
                 for pn, ann, default in report_params(name)]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params] + extra

        def wrapper(**kwargs: Any) -> None:
            ro = ReportOptions(**{k: kwargs.pop(k) for k in _REPORT_FIELDS})
            run(name, ro, lambda ctx: fn(**kwargs, ctx=ctx), computes=computes)

        wrapper.__name__ = fn.__name__
        wrapper.__doc__ = fn.__doc__
        wrapper.__module__ = fn.__module__
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        app.command(name)(wrapper)
        return fn
    return deco
