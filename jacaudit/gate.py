"""The gate: metrics + thresholds (+ a baseline report) -> checks -> the report's status and the exit code.

Plain data, no torch. Measuring and judging stay apart: an analysis returns :class:`Metric` values (a name, a
subject, a number, which direction is worse, and the thresholds it proposes by default); the gate turns every
metric that has a threshold -- its own default, or one given by the user -- into a :class:`Check`.

Threshold grammar (``--fail-on`` / ``--warn-on``, ``fail_on`` / ``warn_on`` in config, ``JACAUDIT_FAIL_ON``)::

    NAME[SUBJECT] OP VALUE          e.g.  flip_rate@eps=0.01>0.05
                                          derivative_rel_error[dir 2]>1e-4
                                          sanity_spearman>=0.5
                                          mask_outside_fraction[*marker*]>0.6

NAME and SUBJECT may hold ``*`` / ``?`` wildcards; without ``[SUBJECT]`` the threshold applies to every subject.
OP is one of ``>  >=  <  <=`` and says when the value is bad. Several thresholds: repeat the option, or
separate them with ``;``. A user threshold replaces the default of its level (warn or fail) for the metrics it
matches; a threshold that matches no metric is an error (a typo must not pass silently).

Statuses: ``fail`` / ``warn`` when the value crosses that threshold, ``pass`` otherwise; ``error`` when the value
is missing or not finite; ``skipped`` when the analysis itself says there is no evidence (inconclusive). The
report's status is ``fail`` when a check fails or errs, ``warn`` when one warns, else ``pass``; the exit code is 1
when the status is ``fail`` (0 with ``--exit-zero``).
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from .errors import InputError
from .results.checks import SEVERITY, BaselineChange, BaselineComparison, Check, MetricValue

__all__ = ["Metric", "Threshold", "parse_threshold", "parse_thresholds", "evaluate", "compare_baseline",
           "load_baseline", "report_status", "exit_code_for", "check_id", "metric_values"]

_OPS = (">=", "<=", ">", "<")


@dataclass(frozen=True)
class Metric:
    """A number an analysis measured, with the direction that is worse and its proposed thresholds."""

    name: str
    subject: str
    value: float | None
    op: str = ">"
    warn: float | None = None
    fail: float | None = None
    #: forced status when the analysis cannot reach a verdict: "skipped" (no evidence) or "error"
    status: str | None = None
    #: context for the message (why skipped, what the value means)
    note: str = ""
    description: str = ""
    properties: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Threshold:
    name: str          # glob
    subject: str | None  # glob; None = every subject
    op: str
    value: float
    level: str         # "warn" | "fail"
    source: str = "cli"
    text: str = ""

    def matches(self, m: Metric) -> bool:
        if not fnmatch.fnmatchcase(m.name, self.name):
            return False
        return self.subject is None or fnmatch.fnmatchcase(m.subject, self.subject)


_RX = re.compile(r"^\s*(?P<name>[^\[\]<>]+?)\s*(?:\[(?P<subject>[^\]]*)\])?\s*(?P<op>>=|<=|>|<)\s*"
                 r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf)\s*$")


def parse_threshold(text: str, level: str, source: str = "cli") -> Threshold:
    m = _RX.match(text)
    if m is None:
        raise InputError(f"cannot read threshold {text!r}: use NAME[SUBJECT]>VALUE, e.g. "
                         "'flip_rate@eps=0.01>0.05' (ops: > >= < <=)")
    return Threshold(m["name"].strip(), None if m["subject"] is None else m["subject"].strip(), m["op"],
                     float(m["value"]), level, source, text.strip())


def parse_thresholds(items: Iterable[str] | str | None, level: str, source: str = "cli") -> list[Threshold]:
    """Thresholds from repeated options / a config list / one ``;``-separated string."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    out = []
    for it in items:
        for part in str(it).split(";"):
            if part.strip():
                out.append(parse_threshold(part, level, source))
    return out


def check_id(command: str, name: str, subject: str) -> str:
    return f"{command}.{name}[{subject}]"


def _bad(value: float, op: str, thr: float) -> bool:
    return {">": value > thr, ">=": value >= thr, "<": value < thr, "<=": value <= thr}[op]


def _num(v: float | None) -> str:
    return "n/a" if v is None else repr(float(v))


def _judge(command: str, m: Metric, thresholds: Sequence[Threshold]) -> Check | None:
    warn = (m.op, m.warn) if m.warn is not None else None
    fail = (m.op, m.fail) if m.fail is not None else None
    source = "default"
    for t in thresholds:
        if t.matches(m):
            if t.level == "fail":
                fail = (t.op, t.value)
            else:
                warn = (t.op, t.value)
            source = t.source
    if warn is None and fail is None and m.status is None:
        return None  # a metric, not a check
    op = (fail or warn or (m.op, None))[0]
    value = m.value
    note = f" ({m.note})" if m.note else ""
    if m.status is not None:
        status = m.status
        message = m.note or status
    elif value is None or not math.isfinite(value):
        status = "error"
        message = f"{m.name} = {_num(value)}: no finite value to judge{note}"
    elif fail is not None and _bad(value, *fail):
        status = "fail"
        message = f"{m.name} = {_num(value)} {fail[0]} fail threshold {_num(fail[1])}{note}"
    elif warn is not None and _bad(value, *warn):
        status = "warn"
        message = f"{m.name} = {_num(value)} {warn[0]} warn threshold {_num(warn[1])}{note}"
    else:
        bound = fail or warn
        neg = {">": "<=", ">=": "<", "<": ">=", "<=": ">"}[bound[0]]
        message = (f"{m.name} = {_num(value)} {neg} {'fail' if fail else 'warn'} threshold "
                   f"{_num(bound[1])}{note}")
        status = "pass"
    return Check(id=check_id(command, m.name, m.subject), command=command, check=m.name, subject=m.subject,
                 status=status, value=None if value is None or not math.isfinite(value) else float(value), op=op,
                 warn=None if warn is None else float(warn[1]), fail=None if fail is None else float(fail[1]),
                 threshold_source=source, message=message, description=m.description,
                 properties={k: float(v) for k, v in m.properties.items()
                             if isinstance(v, (int, float)) and math.isfinite(float(v))})


def evaluate(command: str, metrics: Sequence[Metric], thresholds: Sequence[Threshold] = ()) -> list[Check]:
    """Judge every metric that has a threshold (or a forced status); user thresholds must match a metric."""
    for t in thresholds:
        if not any(t.matches(m) for m in metrics):
            names = sorted({m.name for m in metrics})
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise InputError(f"threshold {t.text or t.name!r} matches no metric of `jacaudit {command}`; "
                             f"metrics here: {shown or 'none'}")
    checks = [c for c in (_judge(command, m, thresholds) for m in metrics) if c is not None]
    seen: set[str] = set()
    for c in checks:
        if c.id in seen:
            raise ValueError(f"internal: two checks with the id {c.id}")
        seen.add(c.id)
    return checks


def metric_values(command: str, metrics: Sequence[Metric]) -> list[MetricValue]:
    return [MetricValue(id=check_id(command, m.name, m.subject), name=m.name, subject=m.subject,
                        value=None if m.value is None or not math.isfinite(m.value) else float(m.value),
                        op=m.op, description=m.description) for m in metrics]


# ---------------------------------------------------------------------------------------------------------
# Baseline comparison
# ---------------------------------------------------------------------------------------------------------
def load_baseline(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise InputError(f"baseline report not found: {path}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read baseline report {path}: {e}") from None
    if not isinstance(d, dict) or "kind" not in d:
        raise InputError(f"{path} is not a jacaudit report (no 'kind')")
    return d


def _worse_by(value: float, base: float, op: str) -> float:
    """Relative worsening (positive = worse) of ``value`` against ``base`` for a metric where ``op`` is bad."""
    d = (value - base) if op in (">", ">=") else (base - value)
    if d == 0:
        return 0.0
    if base == 0:
        return math.copysign(math.inf, d)
    return d / abs(base)


def compare_baseline(command: str, checks: list[Check], metrics: Sequence[MetricValue], baseline: dict[str, Any],
                     path: str, max_regression: float | None = None) -> tuple[list[Check], BaselineComparison]:
    """Compare by id with a previous report of the same command.

    Every check gets the baseline's value and status. With ``max_regression`` (a relative worsening, e.g. 0.1 =
    10% worse), a value that worsened by more fails its check, and metrics without thresholds that worsened by more
    become failing checks of their own; without it, regressions and improvements are listed only.
    """
    if baseline.get("kind") != command:
        raise InputError(f"baseline report {path} is from `jacaudit {baseline.get('kind')}`, not `{command}`")
    old_checks = {c["id"]: c for c in baseline.get("checks") or [] if isinstance(c, dict) and "id" in c}
    old_metrics = {m["id"]: m for m in baseline.get("metrics") or [] if isinstance(m, dict) and "id" in m}
    old_values = {**{k: m.get("value") for k, m in old_metrics.items()},
                  **{k: c.get("value") for k, c in old_checks.items()}}
    regressions: list[BaselineChange] = []
    improvements: list[BaselineChange] = []
    out: list[Check] = []
    by_id = {c.id: c for c in checks}

    def change_of(cid: str, value: float | None, op: str, status: str) -> BaselineChange | None:
        b = old_values.get(cid)
        bstat = old_checks.get(cid, {}).get("status")
        rel = None
        if isinstance(b, (int, float)) and value is not None:
            rel = _worse_by(float(value), float(b), op)
        sev_up = bstat is not None and SEVERITY.get(status, 0) > SEVERITY.get(bstat, 0)
        sev_down = bstat is not None and SEVERITY.get(status, 0) < SEVERITY.get(bstat, 0)
        if rel is None and not (sev_up or sev_down):
            return None
        if (rel is not None and rel > 1e-12) or sev_up:
            msg = f"{cid}: {_num(b)} -> {_num(value)}" + (f" ({_pct(rel)} worse)" if rel is not None else "") + \
                  (f"; status {bstat} -> {status}" if sev_up else "")
            return BaselineChange(cid, value, None if b is None else float(b), status, bstat, rel, msg)
        if (rel is not None and rel < -1e-12) or sev_down:
            msg = f"{cid}: {_num(b)} -> {_num(value)}" + (f" ({_pct(-rel)} better)" if rel is not None else "")
            return BaselineChange(cid, value, None if b is None else float(b), status, bstat, rel, msg)
        return None

    for c in checks:
        b = old_values.get(c.id)
        ch = change_of(c.id, c.value, c.op, c.status)
        c2 = replace(c, baseline=float(b) if isinstance(b, (int, float)) else None,
                     baseline_status=old_checks.get(c.id, {}).get("status"))
        if ch is not None and ch.change is not None and ch.change > 1e-12:
            regressions.append(ch)
            if max_regression is not None and ch.change > max_regression and c2.status in ("pass", "warn"):
                c2 = replace(c2, status="fail", message=f"{c.message}; regressed from {_num(b)} to {_num(c.value)} "
                             f"({_pct(ch.change)} worse, allowed {_pct(max_regression)})")
        elif ch is not None and ch.change is None and ch.status != ch.baseline_status and \
                SEVERITY.get(ch.status, 0) > SEVERITY.get(ch.baseline_status or "", 0):
            regressions.append(ch)
        elif ch is not None:
            improvements.append(ch)
        out.append(c2)
    for m in metrics:
        if m.id in by_id:
            continue
        ch = change_of(m.id, m.value, m.op, "pass")
        if ch is None or ch.change is None:
            continue
        if ch.change > 1e-12:
            regressions.append(ch)
        else:
            improvements.append(ch)
        if max_regression is not None:
            bad = ch.change > max_regression
            msg = (f"{m.name} = {_num(m.value)}, baseline {_num(ch.baseline)}: " +
                   (f"{_pct(ch.change)} worse, allowed {_pct(max_regression)}" if bad else
                    f"within the allowed regression {_pct(max_regression)}"))
            out.append(Check(id=m.id, command=command, check=m.name, subject=m.subject,
                             status="fail" if bad else "pass", value=m.value, op=m.op, warn=None, fail=None,
                             threshold_source="baseline", message=msg, baseline=ch.baseline,
                             baseline_status=None, description=m.description))
    now = {c.id for c in checks} | {m.id for m in metrics}
    comparison = BaselineComparison(
        path=str(path), created=baseline.get("created"), max_regression=max_regression,
        regressions=regressions, improvements=improvements,
        new=sorted(c.id for c in checks if c.id not in old_values),
        missing=sorted(k for k in old_checks if k not in now))
    return out, comparison


def _pct(v: float | None) -> str:
    if v is None:
        return "n/a"
    if math.isinf(v):
        return "inf%"
    return f"{100 * v:.3g}%"


# ---------------------------------------------------------------------------------------------------------
def report_status(checks: Sequence[Check]) -> str:
    """fail when a check fails or errs, warn when one warns, else pass."""
    if any(c.status in ("fail", "error") for c in checks):
        return "fail"
    if any(c.status == "warn" for c in checks):
        return "warn"
    return "pass"


def exit_code_for(status: str, exit_zero: bool = False) -> int:
    """1 for a failing status, 4 for an inconclusive one (no evidence either way), else 0; 0 with ``exit_zero``."""
    from .errors import EXIT_GATE, EXIT_INCONCLUSIVE, EXIT_OK

    if exit_zero:
        return EXIT_OK
    return {"fail": EXIT_GATE, "inconclusive": EXIT_INCONCLUSIVE}.get(status, EXIT_OK)
