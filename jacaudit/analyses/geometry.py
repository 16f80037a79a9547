"""The local geometry of J = d output / d input at one input or along a trajectory.

``geometry_analysis(model, feeds, points, options) -> AnalysisOutput`` (see :mod:`jacaudit.analyses.base`).
``feeds`` (a :class:`jacaudit.data.feeds.Feeds`) holds every model input; ``points`` (optional) replaces the
analysed input, one tensor per trajectory step.

Per input:

* singular values of J (m x n matrix), numerical rank (tolerance ``sigma_max * max(m, n) * eps(dtype)``),
  condition number ``sigma_max / sigma_min`` over the min(m, n) singular values;
* square J: det J and log|det J| (``torch.linalg.slogdet`` in float64, and the sum of log singular values);
* Yoshikawa's manipulability ``sqrt(det(J J^T))`` (the product of the singular values when m <= n);
* singular when ``sigma_min <= threshold`` (the rank tolerance unless given): the lost directions are the right
  singular vectors (null space: input motions with no first-order effect) and the left singular vectors (left
  null space: output motions no input change produces) of the singular values at or below it;
* Gauss-Newton curvature J^T J: its eigenvalues sigma_i^2 and condition number (inf when rank < n);
* normalizing flows: the model's own log-det output vs log|det J|, and the change-of-variables log-density
  ``log N(f(x); 0, I) + log|det J|``.

Large J (past the memory budget, or ``method="lanczos"``): J is never materialised. Lanczos with full
reorthogonalisation on the smaller Gram matrix (J J^T through a vjp then a jvp when m <= n, else J^T J) gives
its extreme eigenvalues sigma_i^2 with residual bounds ``beta_k |s_ki|``; log|det| is then refused (it needs
every singular value).

Along a trajectory, where det J changes sign between consecutive inputs (square J), the singular input between
them is located by bisection on the straight segment.

Metrics (subject ``d <output> / d <wrt>``): ``nonfinite_entries`` (fails above 0), ``condition_number`` (the
largest along the trajectory), ``min_singular_value`` (the smallest), ``singular_inputs`` (warns above 0),
``gauss_newton_condition`` (largest), ``logdet_discrepancy`` (largest; warns above 1e-4, fails above 1e-2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError
from ..gate import Metric
from .base import AnalysisOutput

__all__ = ["GeometryOptions", "geometry_analysis", "lanczos_gram", "jacobian_geometry"]

SHOW_MAX = 16        # input values listed per point up to this many
VECTOR_MAX = 64      # lost-direction vectors listed up to this length
SV_LIST_MAX = 64     # singular values listed per point up to this many (else the largest and smallest 32)


@dataclass(frozen=True)
class GeometryOptions:
    output_name: str | None = None
    wrt: str | None = None
    logits: bool = False
    max_memory: str | None = None
    threshold: float | None = None      # absolute sigma_min threshold (None: the numerical rank tolerance)
    logdet: bool = False                # log|det J| required (refused unless J is square)
    logdet_output: str | None = None    # the model's own log-det output, compared with log|det J|
    density: bool = False               # change-of-variables log-density (standard normal base)
    method: str = "auto"                # auto | svd | lanczos
    lanczos_steps: int = 40
    directions: int = 3                 # lost directions listed per side and point
    locate: bool = True                 # bisect det sign changes between consecutive trajectory inputs
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------
# Lanczos on a Gram matrix (never materialising J)
# ---------------------------------------------------------------------------------------------------------
def lanczos_gram(t: Any, steps: int = 40, seed: int = 0, tol: float | None = None) -> dict[str, Any]:
    """Ritz values of the smaller Gram matrix of a Target's J (J J^T when m <= n, else J^T J): its eigenvalues
    are the squared singular values. Full reorthogonalisation; each step costs one vjp and one jvp.

    Returns ``{"values": sigma (descending), "residuals": beta_k |s_ki| per Ritz value (of sigma^2),
    "converged": per value, "steps": k, "side": "output"|"input", "exact": the Krylov space is invariant}``."""
    m, n = t.m, t.n
    side = "output" if m <= n else "input"
    d = min(m, n)
    work = torch.float64

    def G(v: torch.Tensor) -> torch.Tensor:
        if side == "output":
            g = t.vjp(v.reshape(t.out_shape).to(t.dtype))
            return t.jvp(g).reshape(-1).to(work)
        jv = t.jvp(v.reshape(t.in_shape).to(t.dtype))
        return t.vjp(jv).reshape(-1).to(work)

    k = max(1, min(int(steps), d))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(d, generator=gen, dtype=work).to(t.device)
    q = q / q.norm()
    Q = [q]
    alpha: list[float] = []
    beta: list[float] = []
    exact = False
    for j in range(k):
        w = G(Q[j])
        a = float(Q[j] @ w)
        alpha.append(a)
        w = w - a * Q[j] - (beta[-1] * Q[j - 1] if j > 0 else 0.0)
        Qm = torch.stack(Q)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - Qm.t() @ (Qm @ w)
        b = float(w.norm())
        if j == k - 1:
            beta.append(b)
            break
        scale = max(abs(a), max((abs(x) for x in alpha), default=0.0), 1e-300)
        if b <= 1e-13 * scale:
            beta.append(0.0)
            exact = True
            break
        beta.append(b)
        Q.append(w / b)
    kk = len(alpha)
    T = torch.zeros(kk, kk, dtype=work)
    for i in range(kk):
        T[i, i] = alpha[i]
        if i + 1 < kk:
            T[i, i + 1] = T[i + 1, i] = beta[i]
    theta, S = torch.linalg.eigh(T)
    order = torch.argsort(theta, descending=True)
    theta, S = theta[order], S[:, order]
    last_beta = 0.0 if exact or kk == d else beta[-1]
    res = [abs(last_beta * float(S[-1, i])) for i in range(kk)]
    top = max(float(theta[0]), 1e-300)
    tol = tol if tol is not None else (1e-8 if t.dtype == torch.float64 else 1e-4)
    conv = [r <= tol * top for r in res]
    values = [math.sqrt(max(float(v), 0.0)) for v in theta]
    return {"values": values, "residuals": res, "converged": conv, "steps": kk, "side": side,
            "exact": exact or kk == d}


# ---------------------------------------------------------------------------------------------------------
# one input
# ---------------------------------------------------------------------------------------------------------
def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 1.19e-7


def _flat(x: torch.Tensor, limit: int = SHOW_MAX) -> list[float] | None:
    return [float(v) for v in x.detach().reshape(-1).double().cpu()] if x.numel() <= limit else None


def jacobian_geometry(t: Any, o: GeometryOptions, *, label: str = "#0", index: int = 0, tpos: float | None = None,
                      model: Any = None, feeds: dict | None = None, progress=None) -> tuple[Any, torch.Tensor | None]:
    """A :class:`~jacaudit.results.geometry.GeometryPoint` for a Target (and J as an m x n float64 matrix when
    it was materialised)."""
    from ..engine.core import JacobianTooLarge, full_jacobian
    from ..results.geometry import GaussNewton, GeometryPoint, LostDirection

    m, n = t.m, t.n
    square = m == n
    notes: list[str] = []
    method = o.method
    M = None
    if method not in ("auto", "svd", "lanczos"):
        raise InputError(f"method must be auto, svd or lanczos, not {method!r}")
    if method in ("auto", "svd"):
        try:
            J, _ = full_jacobian(t, max_memory=o.max_memory, progress=progress)
            M = J.reshape(m, n).detach().to("cpu", torch.float64)
            method = "svd"
        except JacobianTooLarge:
            if o.method == "svd":
                raise
            method = "lanczos"
            notes.append("J would exceed the memory budget: Lanczos on the smaller Gram matrix (J not "
                         "materialised)")
    if method == "lanczos" and (o.logdet or o.logdet_output or o.density):
        raise InputError(f"log|det J| needs every singular value of J ({m} x {n}), which Lanczos does not give; "
                         "raise the memory budget so that J can be materialised")
    eps = _eps(t.dtype)
    base = dict(index=index, label=label, t=tpos, input=_flat(t.x))
    if M is not None:
        finite = bool(torch.isfinite(M).all())
        if not finite:
            return GeometryPoint(**base, finite=False, method="svd", singular_values=None, sigma_max=None,
                                 sigma_min=None, rank=None, rank_tol=None, condition_number=None, singular=None,
                                 threshold=o.threshold, manipulability=None, det=None, logdet=None,
                                 notes=["J holds NaN/inf entries: nothing computed"]), M
        full = max(m, n) <= 256
        U, S, Vh = torch.linalg.svd(M, full_matrices=full)
        s = [float(v) for v in S]
        smax = s[0] if s else 0.0
        smin = s[-1] if s else 0.0
        tol = smax * max(m, n) * eps
        rank = int(sum(v > tol for v in s))
        thr = o.threshold if o.threshold is not None else tol
        cond = smax / smin if smin > 0 else float("inf")
        det = logdet = logdet_sv = None
        if square:
            sign, la = torch.linalg.slogdet(M)
            det = float(sign) * math.exp(float(la)) if float(sign) != 0 else 0.0
            logdet = float(la)
            logdet_sv = float(sum(math.log(v) for v in s)) if smin > 0 else float("-inf")
        manip = (math.exp(sum(math.log(v) for v in s)) if smin > 0 else 0.0) if m <= n else 0.0
        lost: list[LostDirection] = []
        lows = [i for i, v in enumerate(s) if v <= thr]
        if n <= VECTOR_MAX:
            rows = list(lows) + (list(range(len(s), n)) if full else [])
            for i in rows[:o.directions]:
                lost.append(LostDirection(s[i] if i < len(s) else 0.0, "input", [float(v) for v in Vh[i]]))
        if m <= VECTOR_MAX:
            cols = list(lows) + (list(range(len(s), m)) if full else [])
            for i in cols[:o.directions]:
                lost.append(LostDirection(s[i] if i < len(s) else 0.0, "output", [float(v) for v in U[:, i]]))
        gn_cond = (smax / smin) ** 2 if (n <= m and smin > 0) else float("inf")
        gn = GaussNewton(eigenvalues=[v * v for v in s[:SV_LIST_MAX]], condition_number=gn_cond,
                         rank_deficit=n - rank, method="svd")
        shown = s if len(s) <= SV_LIST_MAX else s[:SV_LIST_MAX // 2] + s[-SV_LIST_MAX // 2:]
        if len(s) > SV_LIST_MAX:
            notes.append(f"{len(s)} singular values: the largest and smallest {SV_LIST_MAX // 2} are listed")
        pt = GeometryPoint(**base, finite=True, method="svd", singular_values=shown, sigma_max=smax, sigma_min=smin,
                           rank=rank, rank_tol=tol, condition_number=cond, singular=bool(smin <= thr),
                           threshold=thr, manipulability=manip, det=det, logdet=logdet, logdet_sv=logdet_sv,
                           lost=lost, null_dim=n - rank, left_null_dim=m - rank, gauss_newton=gn, notes=notes)
        return pt, M
    # -- Lanczos --------------------------------------------------------------------------------------------
    lz = lanczos_gram(t, steps=o.lanczos_steps, seed=o.seed)
    s = lz["values"]
    smax = s[0]
    tol = smax * max(m, n) * eps
    thr = o.threshold if o.threshold is not None else tol
    complete = lz["exact"]
    smin_conv = lz["converged"][-1] or complete
    smin = s[-1] if complete or len(s) == min(m, n) else s[-1]
    if not complete:
        notes.append(f"Lanczos: {lz['steps']} steps on the {min(m, n)} x {min(m, n)} Gram matrix; the smallest "
                     f"Ritz value {'converged' if smin_conv else 'had not converged (an upper bound on sigma_min)'}")
    cond = smax / smin if smin > 0 else float("inf")
    rank = int(sum(v > tol for v in s)) if complete else None
    gn_cond = (smax / smin) ** 2 if (n <= m and smin > 0) else float("inf")
    gn = GaussNewton(eigenvalues=[v * v for v in s[:SV_LIST_MAX]], condition_number=gn_cond,
                     rank_deficit=(n - rank) if rank is not None else (n - m if m < n else None), method="lanczos",
                     bound="exact" if smin_conv or n > m else "lower-bound")
    manip = (math.exp(sum(math.log(v) for v in s)) if smin > 0 else 0.0) if (m <= n and complete) else None
    pt = GeometryPoint(**base, finite=True, method="lanczos", singular_values=s[:SV_LIST_MAX], sigma_max=smax,
                       sigma_min=smin, rank=rank, rank_tol=tol, condition_number=cond,
                       singular=bool(smin <= thr) if smin_conv else None, threshold=thr, manipulability=manip,
                       det=None, logdet=None, gauss_newton=gn, converged=bool(all(lz["converged"]) or complete),
                       notes=notes)
    return pt, None


# ---------------------------------------------------------------------------------------------------------
# the analysis
# ---------------------------------------------------------------------------------------------------------
def _logdet_of(model: Any, feeds: dict, name: str) -> float:
    with torch.no_grad():
        v = model.run(feeds, outputs=[name])[0]
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        raise InputError(f"log-det output {name!r} has shape {tuple(getattr(v, 'shape', ()))}: one value per "
                         "input is needed (a batch of 1)")
    return float(v.reshape(()).double())


def geometry_analysis(model: Any, feeds: Any, points: Sequence[torch.Tensor] | None = None,
                      options: GeometryOptions = GeometryOptions(), *, labels: Sequence[str] | None = None,
                      tpos: Sequence[float] | None = None, source: str = "point", source_detail: str = "",
                      progress: Callable[[int, int], None] | None = None,
                      timings: dict[str, float] | None = None) -> AnalysisOutput:
    from ..engine.core import prepare
    from ..results import timed
    from ..results.geometry import GeometryResult

    from ..models.base import Model

    o = options
    is_model = isinstance(model, Model)   # else a torch module or a callable of the one input
    timings = timings if timings is not None else {}
    main = feeds.input_name
    base = dict(feeds.feeds)
    xs = list(points) if points is not None else [base[main]]
    if not xs:
        raise InputError("the trajectory holds no inputs")
    labels = list(labels) if labels is not None else [f"#{i}" for i in range(len(xs))]
    tpos = list(tpos) if tpos is not None else [None] * len(xs)
    warnings = list(feeds.warnings)
    pts = []
    Ms = []
    targets = []
    first = None
    with timed(timings, "geometry"):
        for i, x in enumerate(xs):
            fd = {**base, main: x}
            t = prepare(model, fd if is_model else x, input=main, output=o.output_name, wrt=o.wrt, logits=o.logits)
            if first is None:
                first = t
                warnings += [w for w in t.notes if w not in warnings]
                if not o.logits and getattr(model, "softmax_input", lambda _o: None)(t.output_name):
                    warnings.append(f"output {t.output_name!r} comes out of a Softmax: its derivatives saturate; the "
                                    "pre-softmax logits (logits option) are usually what to analyse")
                if (o.logdet or o.logdet_output or o.density) and t.m != t.n:
                    raise InputError(f"log|det J| needs a square Jacobian; J = d {t.output_name} / d {t.name} is "
                                     f"{t.m} x {t.n}")
            elif (t.m, t.n) != (first.m, first.n):
                raise InputError(f"trajectory input {labels[i]} gives J of {t.m} x {t.n}, the first gave "
                                 f"{first.m} x {first.n}: every input must have the same shape")
            pt, M = jacobian_geometry(t, o, label=labels[i], index=i, tpos=tpos[i])
            extra = {}
            if pt.logdet is not None and o.logdet_output:
                lm = _logdet_of(model, fd, o.logdet_output)
                extra.update(logdet_model=lm, logdet_discrepancy=abs(pt.logdet - lm)
                             if math.isfinite(pt.logdet) else float("inf"))
            if pt.logdet is not None and (o.density or o.logdet_output):
                z = t.y.detach().double().reshape(-1)
                extra["log_density"] = (-0.5 * float(z @ z) - 0.5 * z.numel() * math.log(2 * math.pi) + pt.logdet)
            if extra:
                import dataclasses
                pt = dataclasses.replace(pt, **extra)
            pts.append(pt)
            Ms.append(M)
            targets.append(x)
            if progress is not None:
                progress(i + 1, len(xs))
    t = first
    crossings = []
    if o.locate and len(xs) > 1 and t.m == t.n and t.n <= 256:
        with timed(timings, "crossings"):
            crossings = _crossings(model, base, main, xs, pts, o, tpos)
    series = _series(pts)
    maps = _maps(Ms[0], t) if Ms and Ms[0] is not None else []
    singular_points = [p.index for p in pts if p.singular]
    result = GeometryResult(
        input_name=str(main), wrt=str(t.name), output=str(t.output_name), input_shape=[int(d) for d in t.in_shape],
        output_shape=[int(d) for d in t.out_shape], m=int(t.m), n=int(t.n), square=t.m == t.n, source=source,
        source_detail=source_detail or str(feeds.source), synthetic_input=bool(feeds.synthetic and points is None),
        threshold=o.threshold, dtype=str(t.dtype).replace("torch.", ""), device=str(t.device), points=pts,
        singular_points=singular_points, crossings=crossings, series=series, logdet_output=o.logdet_output,
        density=bool(o.density or o.logdet_output), logits=bool(o.logits), maps=maps)
    if crossings:
        warnings.append(f"{len(crossings)} singular input(s) located between trajectory inputs (det J changes sign)")
    return AnalysisOutput(result=result, metrics=_metrics(result), warnings=warnings)


def _crossings(model, base, main, xs, pts, o: GeometryOptions, tpos) -> list:
    """Bisection for det J = 0 on the segment between consecutive inputs whose det has opposite signs."""
    from ..engine.core import full_jacobian, prepare
    from ..models.base import Model
    from ..results.geometry import Crossing, LostDirection

    def det_at(x: torch.Tensor, vectors: bool = False):
        t = prepare(model, {**base, main: x} if isinstance(model, Model) else x, input=main, output=o.output_name, wrt=o.wrt, logits=o.logits)
        J, _ = full_jacobian(t, max_memory=o.max_memory)
        M = J.reshape(t.m, t.n).detach().to("cpu", torch.float64)
        if not vectors:
            return float(torch.linalg.det(M)), None
        U, S, Vh = torch.linalg.svd(M)
        lost = [LostDirection(float(S[-1]), "input", [float(v) for v in Vh[-1]]),
                LostDirection(float(S[-1]), "output", [float(v) for v in U[:, -1]])] if t.n <= VECTOR_MAX else []
        return float(torch.linalg.det(M)), (float(S[-1]), lost)

    out = []
    for i in range(len(pts) - 1):
        a, b = pts[i], pts[i + 1]
        if a.det is None or b.det is None or a.det == 0 or b.det == 0 or (a.det > 0) == (b.det > 0):
            continue
        if a.singular or b.singular:  # an end is itself singular (listed): the sign change is its rounding
            continue
        xa, xb = xs[i].detach(), xs[i + 1].detach()
        lo, hi, dlo = 0.0, 1.0, a.det
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            d, _ = det_at(xa + (xb - xa) * mid)
            if d == 0:
                lo = hi = mid
                break
            if (d > 0) == (dlo > 0):
                lo, dlo = mid, d
            else:
                hi = mid
            if hi - lo <= 1e-14:
                break
        f = 0.5 * (lo + hi)
        x = xa + (xb - xa) * f
        d, (smin, lost) = det_at(x, vectors=True)
        tp = None if tpos[i] is None or tpos[i + 1] is None else tpos[i] + (tpos[i + 1] - tpos[i]) * f
        out.append(Crossing([i, i + 1], f, tp, _flat(x), smin, d, hi - lo, lost))
    return out


MAP_OUTPUTS = 8        # sensitivity maps drawn for up to this many outputs
MAP_PIXELS = 96 * 96   # ... on grids up to this many pixels


def _maps(M: torch.Tensor, t: Any) -> list:
    """Each output's row of J on the input's H x W grid (channels summed), for an image-like input: shape
    (1, C, H, W) or (C, H, W) with C <= 4, or (1, H, W, C) with C <= 4 (channels last)."""
    from ..results.geometry import SensitivityMap

    shp = tuple(t.in_shape)
    if len(shp) == 4 and shp[0] == 1:
        shp = shp[1:]
    if len(shp) != 3 or t.m > MAP_OUTPUTS:
        return []
    if shp[0] <= 4 and shp[1] * shp[2] <= MAP_PIXELS and shp[1] > 1 and shp[2] > 1:
        rows = M.reshape(t.m, *shp).sum(1)                           # (m, H, W)
    elif shp[2] <= 4 and shp[0] * shp[1] <= MAP_PIXELS and shp[0] > 1 and shp[1] > 1:
        rows = M.reshape(t.m, *shp).sum(3)                           # channels last
    else:
        return []
    out = []
    for k in range(t.m):
        r = rows[k]
        i = int(r.abs().argmax())
        out.append(SensitivityMap(k, [[float(v) for v in row] for row in r], [i // r.shape[1], i % r.shape[1]],
                                  float(M[k].abs().sum())))
    return out


def _series(pts) -> Any:
    from ..results.geometry import GeometrySeries

    def lg(v):
        return math.log10(v) if v is not None and math.isfinite(v) and v > 0 else None

    k = max((len(p.singular_values or []) for p in pts), default=0)
    k = min(k, 8)
    sig = [[lg(p.singular_values[j]) if p.singular_values and j < len(p.singular_values) else None for p in pts]
           for j in range(k)]
    return GeometrySeries(sig, [lg(p.condition_number) for p in pts], [lg(p.manipulability) for p in pts],
                          [p.logdet if p.logdet is not None and math.isfinite(p.logdet) else None for p in pts])


def _metrics(r) -> list[Metric]:
    subject = f"d {r.output} / d {r.wrt}"
    pts = r.points
    nonfinite = sum(1 for p in pts if not p.finite)
    ok = [p for p in pts if p.finite]
    n = len(pts)
    over = f" over {n} inputs" if n > 1 else ""

    def worst(key, pick):
        vals = [(getattr(p, key), p) for p in ok if getattr(p, key) is not None]
        if not vals:
            return None, None
        return pick(vals, key=lambda vp: vp[0])

    ms = [Metric("nonfinite_entries", subject, float(nonfinite), ">", fail=0.0,
                 description="inputs whose J holds NaN/inf entries")]
    c, cp = worst("condition_number", max)
    ms.append(Metric("condition_number", subject, c, ">", note=f"at {cp.label}" if cp is not None else "",
                     description=f"largest sigma_max / sigma_min of J{over} (inf when singular)"))
    s, sp = worst("sigma_min", min)
    ms.append(Metric("min_singular_value", subject, s, "<", note=f"at {sp.label}" if sp is not None else "",
                     description=f"smallest singular value of J{over}"))
    undecided = [p for p in ok if p.singular is None]
    thr = "the numerical rank tolerance" if r.threshold is None else f"{r.threshold:g}"
    note = f"threshold: {thr}" + (f"; {len(r.crossings)} located between inputs" if r.crossings else "") + \
        (f"; {len(undecided)} input(s) undecided (Lanczos not converged)" if undecided else "")
    ms.append(Metric("singular_inputs", subject, float(len(r.singular_points) + len(r.crossings)), ">", warn=0.0,
                     note=note, description="inputs where the smallest singular value is at or below the threshold, "
                                            "and singular inputs located between trajectory inputs (det J changes "
                                            "sign)"))
    gvals = [(p.gauss_newton.condition_number, p) for p in ok if p.gauss_newton is not None]
    if gvals:
        g, gp = max(gvals, key=lambda vp: vp[0])
        ms.append(Metric("gauss_newton_condition", subject, g, ">", note=f"at {gp.label}",
                         description=f"largest condition number of J^T J{over} (inf when J^T J is singular)"))
    d, dp = worst("logdet_discrepancy", max)
    if r.logdet_output:
        ms.append(Metric("logdet_discrepancy", subject, d, ">", warn=1e-4, fail=1e-2,
                         note=f"at {dp.label}, vs output {r.logdet_output}" if dp is not None else "",
                         description="largest |log|det J| - the model's own log-det|"))
    return ms
