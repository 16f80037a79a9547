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

* ``ort_backward_rel_error[model]`` -- with ``--runtime auto|onnxruntime`` and an onnxruntime gradient plan for
  the verified input: max|g_onnxruntime - g_torch| / max|g_torch| of the VJP u^T J over a few seeded random
  cotangents u (both float32); fails above ``ORT_BACKWARD_TOL``; *skipped* (inconclusive) when the interpreter's
  VJP is zero or not finite.

When no direction is conclusive the report's status is ``inconclusive`` (exit 4 via the CLI runner).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..gate import Metric
from .base import AnalysisOutput

__all__ = ["VerifyOptions", "verify_analysis", "verify_metrics", "ort_backward_check", "ORT_BACKWARD_TOL"]

#: onnxruntime's VJP against the interpreter's: relative to max|g|, in float32 terms (both run in float32; the
#: two backward graphs sum in different orders)
ORT_BACKWARD_TOL = 1e-4


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
    ob = getattr(r, "ort_backward", None)
    if ob is not None:
        metrics.append(Metric("ort_backward_rel_error", "model", ob.max_rel_error, ">", fail=ob.tol,
                              status="skipped" if ob.status == "inconclusive" else None, note=ob.note,
                              description="max|g_onnxruntime - g_torch| / max|g_torch| of the VJP u^T J over "
                                          f"{ob.cotangents} seeded random cotangents (onnxruntime's backward graph "
                                          "vs the torch interpreter's autograd, float32)",
                              properties={"backward_nodes": float(ob.backward_nodes)}))
    return metrics


def _ort_forward_rel_diff(rt: Any, feeds: dict, ref_outs: list) -> float | None:
    """max over float outputs of max|onnxruntime - interpreter| / max|interpreter| (None: not computed)."""
    import numpy as np

    sess = rt.session()
    if sess is None:
        return None
    try:
        outs = sess.run(None, {k: v.detach().numpy() for k, v in feeds.items()})
    except Exception:  # noqa: BLE001
        return None
    worst = 0.0
    for a, b in zip(outs, ref_outs):
        b = b.detach().numpy()
        if not np.issubdtype(b.dtype, np.floating) or b.size == 0:
            continue
        worst = max(worst, float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30)))
    return worst


def ort_backward_check(model: Any, feeds: dict, input_name: str, *, seed: int = 0, cotangents: int = 3,
                       tol: float = ORT_BACKWARD_TOL):
    """onnxruntime's backward (``model._ort``) against the torch interpreter's VJP at ``feeds``, w.r.t.
    ``input_name``: a :class:`jacaudit.results.verify.VerifyOrtBackward`, or None when the model's runtime is
    torch or onnxruntime has no gradient plan for this input (the interpreter computes its gradients anyway)."""
    import math

    import torch

    from ..results.verify import VerifyOrtBackward

    rt = getattr(model, "_ort", None)
    if rt is None or getattr(model, "runtime", "torch") == "torch" or input_name not in feeds:
        return None
    x0 = feeds[input_name]
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        return None
    base = {k: v.detach() for k, v in feeds.items()}
    out_names = [s.name for s in model.outputs]
    plan = rt.grad.plan(base, [input_name], out_names)
    if plan is None:
        return None
    gen = torch.Generator().manual_seed(int(seed) + 7919)

    def vjp(run, us, point):
        x = point[input_name].clone().requires_grad_(True)
        with torch.enable_grad():
            outs = run({**point, input_name: x})
            pairs = [(o, u) for o, u in zip(outs, us) if u is not None and o.requires_grad]
            if not pairs:
                return torch.zeros_like(x)
            (g,) = torch.autograd.grad([o for o, _ in pairs], [x], [u for _, u in pairs], allow_unused=True)
        return torch.zeros_like(x) if g is None else g.detach()

    def run_ort(f):
        res = rt.grad.run(f, out_names)
        if res is None:
            raise RuntimeError(rt.grad.refused or "onnxruntime refused the gradient")
        return res

    def run_torch(f):
        return model.graph.run(f, outputs=out_names)

    with torch.no_grad():
        ref_outs = model.graph.run(base, outputs=out_names)
    def measure(point: dict) -> tuple[float, int]:
        """(max over cotangents of max|g_ort - g_torch| / max|g_torch|, cotangents judged) at ``point``."""
        worst, judged = 0.0, 0
        with torch.no_grad():
            outs = model.graph.run(point, outputs=out_names)
        for _ in range(max(1, int(cotangents))):
            us = [torch.randn(o.shape, generator=gen, dtype=o.dtype) if o.is_floating_point() else None
                  for o in outs]
            g_t = vjp(run_torch, us, point)
            g_o = vjp(run_ort, us, point)
            scale = float(g_t.abs().max()) if g_t.numel() else 0.0
            if not math.isfinite(scale) or scale == 0.0:
                continue
            err = float((g_o.to(g_t.dtype) - g_t).abs().max()) / scale
            worst = max(worst, err if math.isfinite(err) else float("inf"))
            judged += 1
        return worst, judged

    try:
        worst, judged = measure(base)
        nearby: list[float] = []
        if judged and worst > tol:
            # a unit at a kink (a ReLU input, a max-pool near-tie) that the two float32 forwards round to different
            # sides changes the gradient there and nowhere else: the verdict is taken at two nearby points too
            x0 = base[input_name]
            spread = float(x0.float().std()) if x0.numel() > 1 else 0.0
            step = 1e-3 * (spread if math.isfinite(spread) and spread > 0 else 1.0)
            for _ in range(2):
                dx = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.dtype) * step
                w, j = measure({**base, input_name: x0 + dx})
                if j:
                    nearby.append(w)
    except Exception as e:  # onnxruntime failed at run time: the check fails with the reason
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return VerifyOrtBackward(status="fail", max_rel_error=None, tol=tol, cotangents=int(cotangents),
                                 backward_nodes=int(plan.n_nodes), note=f"onnxruntime's backward failed: {msg}")
    if not judged:
        return VerifyOrtBackward(status="inconclusive", max_rel_error=None, tol=tol, cotangents=int(cotangents),
                                 backward_nodes=int(plan.n_nodes),
                                 note="the interpreter's VJP is zero (or not finite) for every cotangent")
    status = "pass" if worst <= tol else "fail"
    isl = ""
    if getattr(plan, "islands", None):
        from ..models.onnx.ortgrad import island_summary
        isl = f", torch islands: {island_summary(plan.islands)}"
    note = f"{judged} cotangent(s); backward graph of {plan.n_nodes} nodes{isl}"
    if status == "fail" and len(nearby) == 2 and max(nearby) <= tol:
        note = (f"{worst:.2g} at the given input but {max(nearby):.2g} at 2 nearby points (steps of {step:.2g}): a "
                f"unit at a kink rounded to different sides by the two float32 forwards, not the backward graph; "
                f"{judged} cotangent(s), backward graph of {plan.n_nodes} nodes{isl}")
        status, worst = "pass", max(nearby)
    elif status == "fail":
        # onnxruntime's own forward may differ from the interpreter's by more than the tolerance (e.g. its Sigmoid
        # is accurate to ~1e-7 absolute: relative to outputs that saturate near 0 that is 1e-2); then its
        # backward cannot agree more closely, and the disagreement says nothing about the backward graph
        fwd = _ort_forward_rel_diff(rt, base, ref_outs)
        if fwd is not None and fwd > tol:
            status = "inconclusive"
            note = (f"onnxruntime's forward differs from the interpreter's by {fwd:.2g} (relative to max|y|) at "
                    f"this input, more than the tolerance: the backward's {worst:.2g} cannot be judged; "
                    f"{judged} cotangent(s), backward graph of {plan.n_nodes} nodes{isl}")
        elif nearby:
            note = (f"{judged} cotangent(s), backward graph of {plan.n_nodes} nodes{isl}; the disagreement "
                    f"reproduces at "
                    f"nearby points ({', '.join(f'{v:.2g}' for v in nearby)})")
    return VerifyOrtBackward(status=status, max_rel_error=worst, tol=tol, cotangents=int(cotangents),
                             backward_nodes=int(plan.n_nodes), note=note)


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
    if o.wrt is None or o.wrt == feeds.input_name:  # an internal wrt tensor: no onnxruntime gradient plan
        r = replace(r, ort_backward=ort_backward_check(model, feeds.feeds, feeds.input_name, seed=o.seed))
        if r.ort_backward is not None and r.ort_backward.status == "fail":
            r = replace(r, verdict="fail")
    warnings = list(r.warnings) + [w for w in feeds.warnings if w not in r.warnings]
    return AnalysisOutput(result=r, metrics=verify_metrics(r), warnings=warnings)
