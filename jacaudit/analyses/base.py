"""The analysis contract: ``run(model, inputs, options) -> AnalysisOutput``.

An analysis measures; it does not judge, print or write. It returns

* ``result`` -- the frozen result dataclass of its kind (``jacaudit/results/<kind>.py``);
* ``metrics`` -- :class:`jacaudit.gate.Metric` values (with the thresholds it proposes by default): the gate turns
  them into checks, so the verdicts, JUnit/SARIF and the exit code all come from one place;
* ``warnings`` -- one-line strings for the user;
* ``artifacts`` -- named files (PNG bytes, arrays) the CLI writes beside the report (paths relative to it);
* ``partial`` -- some inputs could not be used (the command exits 2 after writing the report).

No Typer, Rich or file writes here, and no option *flag* names in error messages (the Python API has no flags).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Artifact", "AnalysisOutput"]


@dataclass(frozen=True)
class Artifact:
    """A file the CLI writes beside the report: ``data`` is bytes, or an array (written as .npy)."""

    path: str
    data: Any


@dataclass
class AnalysisOutput:
    result: Any
    metrics: list = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    partial: bool = False
