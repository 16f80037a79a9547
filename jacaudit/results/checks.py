"""Checks: the verdicts of a report, one per (command, check, subject), judged by :mod:`jacaudit.gate`.

Plain data (no torch). The envelope (:class:`jacaudit.results.Report`) carries ``checks`` and, when a baseline
report was given, ``baseline`` (the comparison by check id). JUnit, SARIF and the Markdown job summary are all
rendered from these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CheckStatus = Literal["pass", "warn", "fail", "error", "skipped"]
STATUSES: tuple[str, ...] = ("pass", "warn", "fail", "error", "skipped")
#: how bad a status is; the report's status is the worst of its checks
SEVERITY = {"skipped": 0, "pass": 0, "warn": 1, "fail": 2, "error": 2}


@dataclass(frozen=True)
class Check:
    """One verdict: a measured value judged against thresholds (or a verdict the analysis could not reach)."""

    id: str = field(metadata={"doc": "stable id: <command>.<check>[<subject>]; baseline comparison matches on it"})
    command: str
    check: str = field(metadata={"doc": "the check (metric) name, e.g. forward_rel_error, flip_rate@eps=0.01"})
    subject: str = field(metadata={"doc": "what was checked: an input file, a direction, a method, 'model'"})
    status: CheckStatus = field(metadata={"doc": "pass, warn, fail, error (could not be evaluated), skipped "
                                                 "(no evidence: inconclusive)"})
    value: float | None = field(metadata={"doc": "the measured value (unrounded)"})
    op: Literal[">", ">=", "<", "<="] = field(
        metadata={"doc": "the value is bad when `value op threshold` holds (e.g. '>' : too high is bad)"})
    warn: float | None = field(metadata={"doc": "warn threshold (None: none)"})
    fail: float | None = field(metadata={"doc": "fail threshold (None: none)"})
    threshold_source: str = field(metadata={"doc": "where the thresholds came from: default, cli, config, env"})
    message: str = field(metadata={"doc": "one line of why, with the unrounded value next to the threshold"})
    baseline: float | None = field(default=None, metadata={"doc": "the value in the baseline report, if any"})
    baseline_status: str | None = field(default=None, metadata={"doc": "the status in the baseline report"})
    description: str = field(default="", metadata={"doc": "what the check measures (the same for every subject)"})
    properties: dict[str, float] = field(default_factory=dict,
                                         metadata={"doc": "other numbers behind the verdict (JUnit properties)"})


@dataclass(frozen=True)
class BaselineChange:
    id: str
    value: float | None
    baseline: float | None
    status: str
    baseline_status: str | None
    change: float | None = field(metadata={"doc": "relative change in the bad direction: (worse - better) / |baseline|"
                                                  " (positive = worse)"})
    message: str


@dataclass(frozen=True)
class BaselineComparison:
    """Checks compared by id with a previous report of the same command."""

    path: str
    created: str | None
    max_regression: float | None = field(
        metadata={"doc": "allowed relative worsening before a check fails (None: regressions are listed only)"})
    regressions: list[BaselineChange]
    improvements: list[BaselineChange]
    new: list[str] = field(metadata={"doc": "check ids absent from the baseline"})
    missing: list[str] = field(metadata={"doc": "check ids of the baseline absent now"})


@dataclass(frozen=True)
class MetricValue:
    """A measured number an analysis exposes. Thresholds (``--fail-on name[subject]>x``) turn it into a check."""

    id: str = field(metadata={"doc": "<command>.<name>[<subject>], the id its check would have"})
    name: str
    subject: str
    value: float | None
    op: Literal[">", ">=", "<", "<="] = field(metadata={"doc": "the direction that is worse ('>': higher is worse)"})
    description: str = ""
