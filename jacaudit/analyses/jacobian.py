"""The full Jacobian at one input: shapes, norms, rank, largest entries, optionally local linearity.

``jacobian_analysis(model, feeds, options) -> AnalysisOutput`` (see :mod:`jacaudit.analyses.base`).

Metrics (ids ``jacobian.<name>[<subject>]``, subject = the differentiated pair ``d <output> / d <wrt>``):

* ``nonfinite_entries`` -- NaN/inf entries of J; fails above 0 by default (a derivative that is not a number
  is never a pass);
* ``frobenius_norm``, ``spectral_norm``, ``max_abs_entry``, ``condition_number`` (when J is small enough for
  an SVD) -- no default thresholds: ``--fail-on spectral_norm>50`` makes them checks;
* ``linearity_error@step=<h>`` (``--linearity``) -- the worst relative error of f(x) + J D at that step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..gate import Metric
from .base import AnalysisOutput, Artifact

__all__ = ["JacobianOptions", "jacobian_analysis", "MATRIX_MAX"]

MATRIX_MAX = 64      # J is embedded in the report as a matrix up to this many rows and columns


@dataclass(frozen=True)
class JacobianOptions:
    output_name: str | None = None
    wrt: str | None = None
    logits: bool = False
    mode: str = "auto"
    max_memory: str | None = None
    top: int = 5
    linearity: bool = False
    save: bool = False
    seed: int = 0
    frobenius: bool = False          # Hutchinson estimate of ||J||_F (J not materialised)
    top_k: int | None = None         # top-k singular values by block power iteration (J not materialised)
    probes: int = 32                 # Hutchinson probes


def jacobian_analysis(model: Any, feeds: Any, options: JacobianOptions = JacobianOptions(), *,
                      progress: Callable[[int, int], None] | None = None,
                      timings: dict[str, float] | None = None) -> AnalysisOutput:
    """``feeds`` is a :class:`jacaudit.data.feeds.Feeds`."""
    from ..engine.core import full_jacobian, prepare
    from ..engine.summary import summarize
    from ..results import timed

    o = options
    timings = timings if timings is not None else {}
    with timed(timings, "prepare"):
        t = prepare(model, feeds.feeds, input=feeds.input_name, output=o.output_name, wrt=o.wrt, logits=o.logits)
    warnings = list(t.notes) + list(feeds.warnings)
    softmax_warning = None
    if not o.logits and getattr(model, "softmax_input", lambda _o: None)(t.output_name):
        softmax_warning = (f"output {t.output_name!r} comes out of a Softmax: its gradients saturate; "
                           "differentiate the pre-softmax logits instead (logits option)")
        warnings.append(softmax_warning)
    if o.frobenius or o.top_k:
        return _estimated(t, feeds, o, warnings, softmax_warning, timings)
    with timed(timings, "jacobian"):
        J, jinfo = full_jacobian(t, mode=o.mode, max_memory=o.max_memory, progress=progress)
    finite = bool(torch.isfinite(J).all())
    nonfinite = int((~torch.isfinite(J)).sum())
    if not finite:
        warnings.append(f"the Jacobian holds {nonfinite} NaN/inf entries: norms and rank are not computed")
    elif J.numel() and not bool(J.any()):
        warnings.append("the Jacobian is zero everywhere at this input: the output does not change with the "
                        "input here (piecewise-constant ops such as Floor, Round or ArgMax, or saturation); its "
                        "norms are no evidence of robustness")
    est = None
    with timed(timings, "summary"):
        s = summarize(J, jinfo, input=t.name, output=t.output_name, top=o.top, target=None)
        if s.spectral is None and finite:
            from ..engine.estimators import spectral_norm
            est = spectral_norm(t, seed=o.seed)
            s = dataclasses.replace(s, spectral=est.spectral_norm, spectral_method="power-iteration")
    svals = list(s.singular_values) if s.singular_values is not None else None  # the summary's SVD, not another
    lin = None
    if o.linearity and finite:
        from ..engine.linearity import linearity as lin_fn
        with timed(timings, "linearity"):
            direction = None
            if est is not None:
                direction = est.right[:1]
            elif svals is not None:  # the top right-singular vector (the summary computed values only)
                Vh = torch.linalg.svd(J.reshape(t.m, t.n).detach().double(), full_matrices=False)[2]
                direction = Vh[:1].reshape(1, *t.in_shape).to(t.dtype)
            lin = lin_fn(t, seed=o.seed, singular_vectors=direction)
    small = finite and t.m <= MATRIX_MAX and t.n <= MATRIX_MAX
    M = J.reshape(t.m, t.n).detach().to("cpu", torch.float64) if small else None
    result = _result(s, lin, est, feeds, o, t, M, svals if svals is not None and len(svals) <= 4 * MATRIX_MAX
                     else None, softmax_warning)
    artifacts = [Artifact("jacobian.npy", J.detach().cpu().numpy())] if o.save else []
    subject = f"d {t.output_name} / d {t.name}"
    metrics = [
        Metric("nonfinite_entries", subject, float(nonfinite), ">", fail=0.0,
               description="NaN/inf entries of J"),
        Metric("frobenius_norm", subject, s.frobenius if finite else None, ">",
               description="||J||_F, exact from J"),
        Metric("spectral_norm", subject, s.spectral if finite else None, ">",
               note="" if est is None or est.converged else "power iteration did not converge",
               description="largest singular value of J (SVD, or power iteration for large J)"),
        Metric("max_abs_entry", subject, float(J.detach().abs().max()) if finite and J.numel() else None, ">",
               description="largest |entry| of J"),
    ]
    if svals:
        smin = svals[-1]
        metrics.append(Metric("condition_number", subject, svals[0] / smin if smin > 0 else float("inf"), ">",
                              description="sigma_max / sigma_min of J (inf when J is rank deficient)"))
    if lin is not None:
        for w in result.linearity.worst_by_step:
            metrics.append(Metric(f"linearity_error@step={w.step:g}", subject, w.error, ">",
                                  description="worst ||f(x+D) - f(x) - J D|| / ||f(x+D) - f(x)|| at this step"))
    return AnalysisOutput(result=result, metrics=metrics, warnings=warnings, artifacts=artifacts)


def _estimated(t, feeds, o: JacobianOptions, warnings: list, softmax_warning, timings) -> AnalysisOutput:
    """The estimators only: ||J||_F by Hutchinson (with its standard error) and/or the top-k singular values
    by block power iteration (with residuals); J is never materialised."""
    from ..engine.estimators import frobenius_norm, top_singular
    from ..results import timed
    from ..results.jacobian import (FrobeniusNorm, JacobianComputation, JacobianResult, SingularValue,
                                    SpectralNorm)

    subject = f"d {t.output_name} / d {t.name}"
    metrics = []
    fro = FrobeniusNorm(float("nan"), "none")
    spectral = SpectralNorm(None, "none")
    top = None
    paths = []
    if o.frobenius:
        with timed(timings, "frobenius"):
            fe = frobenius_norm(t, probes=o.probes, seed=o.seed)
        fro = FrobeniusNorm(float(fe.value), fe.method, stderr=float(fe.stderr), probes=int(fe.probes))
        paths.append(fe.path)
        metrics.append(Metric("frobenius_norm", subject, float(fe.value), ">",
                              note=f"{fe.method}, standard error {fe.stderr:.3g}, {fe.probes} probes",
                              properties={"stderr": float(fe.stderr), "probes": int(fe.probes)},
                              description="||J||_F (Hutchinson estimate from random probes; exact when one side "
                                          "of J is no larger than the probe count)"))
    if o.top_k:
        with timed(timings, "top_singular"):
            se = top_singular(t, k=int(o.top_k), seed=o.seed)
        top = [SingularValue(float(v), float(r)) for v, r in zip(se.values, se.residuals)]
        spectral = SpectralNorm(float(se.spectral_norm), "power-iteration", converged=bool(se.converged),
                                iterations=int(se.iterations), residual=float(se.residuals[0]) if se.residuals else None)
        paths.append(se.path)
        if not se.converged:
            warnings.append(f"power iteration did not converge in {se.iterations} iterations (residual "
                            f"{max(se.residuals):.3g} > {se.tol:.3g}): the singular values are approximate")
        metrics.append(Metric("spectral_norm", subject, float(se.spectral_norm), ">",
                              note="" if se.converged else "power iteration did not converge",
                              properties={"residual": float(se.residuals[0]),
                                          "converged": bool(se.converged), "iterations": int(se.iterations)},
                              description="largest singular value of J (block power iteration on J^T J)"))
    comp = JacobianComputation(mode="estimators", path=", ".join(dict.fromkeys(paths)) or "vmap",
                               dtype=str(t.dtype).replace("torch.", ""), device=str(t.device), chunk_size=0,
                               chunks=0, bytes=0, notes=["J was not materialised"] + list(t.notes))
    result = JacobianResult(
        input_name=str(feeds.input_name), wrt=str(t.name), output=str(t.output_name),
        input_shape=[int(d) for d in t.in_shape], output_shape=[int(d) for d in t.out_shape],
        jacobian_shape=[int(d) for d in (*t.out_shape, *t.in_shape)], requested_mode=str(o.mode),
        computation=comp, frobenius=fro, spectral=spectral, rank=None, rank_tol=None, largest=[], finite=True,
        input_source=str(feeds.source), synthetic_input=bool(feeds.synthetic), logits=bool(o.logits),
        softmax_warning=softmax_warning, top_singular=top, estimated=True)
    return AnalysisOutput(result=result, metrics=metrics, warnings=warnings)


def _result(s, lin, est, feeds, o: JacobianOptions, t, matrix, svals, softmax_warning):
    from ..results.jacobian import (FrobeniusNorm, JacobianComputation, JacobianEntry, JacobianLinearity,
                                    JacobianLinearityRow, JacobianResult, SpectralNorm)

    c = dict(s.info)
    comp = JacobianComputation(mode=str(c.get("mode")), path=str(c.get("path")), dtype=str(c.get("dtype")),
                               device=str(c.get("device")), chunk_size=int(c.get("chunk_size") or 0),
                               chunks=int(c.get("chunks") or 0), oom_retries=int(c.get("oom_retries") or 0),
                               bytes=int(c.get("bytes") or 0), notes=[str(n) for n in c.get("notes") or ()])
    if est is not None:
        res = list(est.residuals)
        spectral = SpectralNorm(float(est.spectral_norm), "power-iteration", converged=bool(est.converged),
                                iterations=int(est.iterations), residual=float(res[0]) if res else None)
    elif s.spectral is None:
        spectral = SpectralNorm(None, "none")
    else:
        spectral = SpectralNorm(float(s.spectral), "svd", converged=True)
    linearity = None
    if lin is not None:
        rows = [JacobianLinearityRow(str(r.direction), float(r.step), float(r.error)) for r in lin.rows]
        worst: dict[float, JacobianLinearityRow] = {}
        for r in rows:
            if r.step not in worst or not (r.error <= worst[r.step].error):
                worst[r.step] = r
        linearity = JacobianLinearity(steps=[float(x) for x in lin.steps], rows=rows,
                                      worst_by_step=[worst[k] for k in sorted(worst)])
    return JacobianResult(
        input_name=str(feeds.input_name), wrt=str(s.input), output=str(s.output),
        input_shape=[int(d) for d in s.input_shape], output_shape=[int(d) for d in s.output_shape],
        jacobian_shape=[int(d) for d in s.jacobian_shape], requested_mode=str(o.mode), computation=comp,
        frobenius=FrobeniusNorm(float(s.frobenius), "exact", stderr=0.0),
        spectral=spectral, rank=s.rank, rank_tol=s.rank_tol,
        largest=[JacobianEntry([int(i) for i in e["output_index"]], [int(i) for i in e["input_index"]],
                               float(e["value"])) for e in s.largest],
        finite=bool(s.finite), input_source=str(feeds.source), synthetic_input=bool(feeds.synthetic),
        logits=bool(o.logits), softmax_warning=softmax_warning, linearity=linearity,
        saved="jacobian.npy" if o.save else None,
        matrix=None if matrix is None else [[float(v) for v in row] for row in matrix.tolist()],
        singular_values=svals)
