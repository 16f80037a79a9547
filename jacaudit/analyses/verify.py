"""``verify`` as an analysis: the engine's checks (:func:`jacaudit.engine.verify.verify`) exposed as metrics.

Metrics (ids ``verify.<name>[<subject>]``), each judged against the tolerance the check itself used:

* ``forward_rel_error[model]`` -- max|engine - onnxruntime| / max|onnxruntime|; fails above the forward tolerance
  (ONNX only: other formats have no reference forward);
* ``derivative_rel_error[dir k]`` -- ||J v - FD|| / max(||J v||, ||FD||) along seeded direction k; fails above
  that direction's tolerance (rtol + the finite difference's own error, stated in the check). A direction that
  crosses a kink, is piecewise constant, has J v = FD = 0, or agrees only within a widened tolerance gives no
  evidence: its check is *skipped* with the reason, never a pass;
* ``adjoint_rel_error[model]`` -- u^T (J v) vs (u^T J) v; fails above the adjoint tolerance (raised to the
  jvp/vjp rounding measured); *skipped* when every direction's jvp/vjp is rounding noise.

When no direction is conclusive the report's status is ``inconclusive`` (exit 4 via the CLI runner).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..gate import Metric
from .base import AnalysisOutput

__all__ = ["VerifyOptions", "verify_analysis", "verify_metrics"]


@dataclass(frozen=True)
class VerifyOptions:
    output_name: str | None = None
    wrt: str | None = None
    logits: bool = False
    directions: int = 3
    seed: int = 0
    dtype: str = "float64"
    rtol: float | None = None
    forward_tol: float = 1e-4
    retries: int = 3


def verify_metrics(r: Any) -> list[Metric]:
    """Metrics of a :class:`jacaudit.results.verify.VerifyResult`."""
    metrics = []
    f = r.forward
    if f.reference != "none":
        value = f.judged_error if f.judged_error is not None else f.max_rel
        props = {"max_abs": f.max_abs, "max_rel": f.max_rel} if f.max_abs is not None else {}
        if f.atol is not None:
            props["atol"] = f.atol
        metrics.append(Metric("forward_rel_error", "model", value, ">", fail=f.tol,
                              status=None if value is not None else "fail", note=f.note,
                              description=f"max|engine - {f.reference}| / max(max|{f.reference}|, atol / tol) on "
                                          "the input (atol: the absolute floor of the reference's dtype)",
                              properties=props))
    for d in r.directions:
        conclusive = d.status in ("pass", "fail")
        metrics.append(Metric(
            "derivative_rel_error", f"dir {d.index}", d.rel_error, ">", fail=d.tol,
            status=None if conclusive else "skipped",
            note=(d.note if conclusive else f"{d.status}: {d.note}"),
            description=f"||J v - FD|| / max(||J v||, ||FD||): jvp against Richardson-extrapolated central "
                        f"differences through {d.reference}; fail threshold = rtol + the differences' own error",
            properties={"jvp_norm": d.jvp_norm, "fd_norm": d.fd_norm, "fd_spread": d.fd_spread, "tol": d.tol}))
    a = r.adjoint
    metrics.append(Metric("adjoint_rel_error", "model", a.max_rel_error, ">", fail=a.tol,
                          status="skipped" if a.status == "skipped" else None, note=a.note,
                          description="|u^T (J v) - (u^T J) v| relative, over the directions (jvp vs vjp) whose "
                                      "values are above their rounding level",
                          properties={"rounding_residual": a.rounding_residual}
                          if a.rounding_residual is not None else {}))
    return metrics


def verify_analysis(model: Any, feeds: Any, options: VerifyOptions = VerifyOptions(),
                    progress: Any = None) -> AnalysisOutput:
    """``feeds`` is a :class:`jacaudit.data.feeds.Feeds`; the model stays in its stored dtype (verify builds the
    float64 copies it needs)."""
    from ..engine.verify import verify

    o = options
    r = verify(model, feeds.feeds, input=feeds.input_name, output=o.output_name, wrt=o.wrt, logits=o.logits,
               directions=o.directions, seed=o.seed, dtype=o.dtype, rtol=o.rtol, forward_tol=o.forward_tol,
               retries=o.retries, progress=progress)
    r = replace(r, input_source=str(feeds.source), synthetic_input=bool(feeds.synthetic))
    warnings = list(r.warnings) + [w for w in feeds.warnings if w not in r.warnings]
    return AnalysisOutput(result=r, metrics=verify_metrics(r), warnings=warnings)
