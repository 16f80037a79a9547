"""Verification of the engine's derivatives against references that share no code with it.

1. Forward fidelity (ONNX): the interpreter's output against onnxruntime's on the same input.
2. Derivative check: for ``k`` seeded random directions ``v``, ``J v`` from jvp against central differences
   ``(f(x+hv) - f(x-hv)) / 2h`` through onnxruntime (ONNX) at four step sizes halving from a step chosen for
   the reference's dtype, with Richardson extrapolation ``(4 D(h/2) - D(h)) / 3``. The spread of the
   extrapolated values measures the finite difference's own error (truncation vs rounding); a slope that
   does not settle (kinks crossed, piecewise-constant graphs: it changes by orders of magnitude with the
   step) is reported as *non-differentiable* -- then the check is repeated through the model itself in
   float64 with much smaller steps, which settles unless the point sits on a kink. TorchScript models and
   torch callables have no onnxruntime: the differences go through the model itself in float64.
   A disagreement is a fail only when it reproduces at a second step series 100x smaller (through the model
   in float64 after a float32 reference) and J v is not rounding noise (its linearity residual
   ``||J(v+w) - Jv - Jw|| / ||Jv||`` stays under 0.05); a smaller step that agrees makes it a pass (kinks
   crossed within the larger step). A direction without evidence (J v = FD = 0, a kink at x, rounding-level
   J v, differences that do not settle or need a tolerance over the 0.05 cap) is retried with a new seeded
   direction, or for a kink at a nearby point, up to a small budget; what was tried is in the notes.
   Adjoint consistency: ``u^T (J v)`` from jvp against ``(u^T J) v`` from vjp, at 1e-9 (float64 engine) or
   1e-4, raised to 3x the jvp/vjp linearity residual; directions whose jvp/vjp are rounding noise are left
   out, and with none left the adjoint test is skipped (no evidence).
   The forward check passes below an absolute floor of 64 ulps of the reference's dtype at max(1, max|y|).
3. A verdict: ``fail`` when the forward, the adjoint or a direction fails; ``pass`` when some direction gave
   evidence; else ``inconclusive``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import torch

from ..errors import InputError
from ..results.verify import VerifyAdjoint, VerifyDirection, VerifyForward, VerifyResult, VerifyTolerances
from .core import Target, prepare

__all__ = ["verify", "VerifyResult", "DirectionCheck", "ForwardCheck", "AdjointCheck"]

# steps and tolerances by the dtype of the function differenced
_FD = {
    "float32": {"h0": 2e-2, "eps": 2.0 ** -23, "rtol": 2e-3},
    "float64": {"h0": 1e-4, "eps": 2.0 ** -52, "rtol": 1e-6},
}
_F32_ENGINE_RTOL = 1e-2     # a float32 jvp through 50 layers is off by ~4e-3 (ResNet-50); float64 for tight checks
_N_STEPS = 4                 # h0, h0/2, h0/4, h0/8
_NONDIFF_SPREAD = 0.05       # relative spread of the extrapolated slopes above which a direction is not smooth
_NONDIFF_RATIO = 10.0        # slope magnitudes differing by this factor across steps: piecewise constant


_MAX_TOL = 0.05              # no pass is granted at a wider tolerance: judged at this cap, else inconclusive

# The checks are the report's own plain types (one VerifyResult: jacaudit.results.verify).
ForwardCheck = VerifyForward
AdjointCheck = VerifyAdjoint


def DirectionCheck(index: int, reference: str, status: str, rel_error: float, tol: float, jvp_norm: float,
                   fd_norm: float, fd_spread: float, steps, slope_norms, note: str = "") -> VerifyDirection:
    return VerifyDirection(index=int(index), reference=str(reference), status=str(status),
                           non_differentiable=status == "non-differentiable", rel_error=float(rel_error),
                           tol=float(tol), jvp_norm=float(jvp_norm), fd_norm=float(fd_norm),
                           fd_spread=float(fd_spread), steps=[float(h) for h in steps],
                           slope_norms=[float(v) for v in slope_norms], note=str(note or ""))


# ---------------------------------------------------------------------------------------------------------
# finite differences
# ---------------------------------------------------------------------------------------------------------
def _central(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, v: np.ndarray, h0: float
             ) -> tuple[list[float], list[np.ndarray], list[float], float]:
    """Central differences at ``h0 / 2**j``, the one-sided asymmetry ``||D+ - D-||`` at each step
    (O(h) where f is smooth; O(1) at a kink, where central differences settle on the mean slope) and ||f(x)||."""
    steps, D, asym = [], [], []
    f0 = fn(x)
    for j in range(_N_STEPS):
        h = h0 / 2 ** j
        fp, fm = fn(x + h * v), fn(x - h * v)
        steps.append(h)
        D.append((fp - fm) / (2 * h))
        asym.append(float(np.linalg.norm((fp - f0) / h - (f0 - fm) / h)))
    return steps, D, asym, float(np.linalg.norm(f0))


def _assess(jv: np.ndarray, steps: list[float], D: list[np.ndarray], asym: list[float], f0_norm: float,
            ref_dtype: str, rtol: float | None, final: bool) -> tuple[str, float, float, float, float, str]:
    """-> status ("pass" | "fail" | "non-differentiable" | "inconclusive"), rel_error, tol, fd_norm, spread, note.

    ``final=False`` (a float32 reference that a float64 re-check can follow) answers "inconclusive" when the
    differences have not settled; ``final=True`` allows for their spread and calls a spread above
    ``_NONDIFF_SPREAD`` non-differentiable.
    """
    prm = _FD[ref_dtype]
    R = [(4 * D[j + 1] - D[j]) / 3 for j in range(len(D) - 1)]
    fd = R[-1]
    jn, fn_ = float(np.linalg.norm(jv)), float(np.linalg.norm(fd))
    floor = 4 * prm["eps"] * max(f0_norm, 1e-300) / steps[-1]      # rounding in the smallest difference
    scale = max(jn, fn_, floor, 1e-300)
    spread = float(np.linalg.norm(R[-1] - R[-2])) / scale
    slopes = [float(np.linalg.norm(d)) for d in D]
    err = float(np.linalg.norm(jv - fd)) / scale
    rt = prm["rtol"] if rtol is None else rtol
    tol = rt + 3 * floor / scale
    smax, smin = max(slopes), min(slopes)
    if smax > 0 and (smin == 0 or smax / smin > _NONDIFF_RATIO) and smax > 10 * floor:
        return ("non-differentiable", err, tol, fn_, spread,
                f"finite-difference slope changes by {smax / max(smin, 1e-300):.3g}x across steps "
                f"{steps[0]:.3g}..{steps[-1]:.3g} (piecewise constant / quantised)")
    if err <= tol and tol > _MAX_TOL:
        return _capped(err, tol, fn_, spread, "the differences' rounding floor is as large as the derivative",
                       float(np.linalg.norm(jv - fd)) / max(jn, fn_, 1e-300))
    if err <= tol:
        return "pass", err, tol, fn_, spread, ""
    kink = asym[-1] / scale > max(10 * rt, 1e-2) and asym[-1] > 0.5 * asym[0]
    if kink and final:
        return ("non-differentiable", err, tol, fn_, spread,
                f"one-sided slopes differ by {asym[-1] / scale:.2g} (relative) at every step: a kink "
                "(e.g. ReLU at 0) lies on the direction at x")
    if spread <= rt and not kink:
        return "fail", err, tol, fn_, spread, "the finite differences settled and disagree with jvp"
    if not final:
        return ("inconclusive", err, tol, fn_, spread,
                f"differences through the float32 reference do not settle (spread {spread:.2g}; kinks crossed)")
    if spread > _NONDIFF_SPREAD:
        return ("non-differentiable", err, tol, fn_, spread,
                f"finite differences do not settle (spread {spread:.3g}): kinks crossed within the step")
    tol = tol + 3 * spread
    if err <= tol and tol > _MAX_TOL:
        return _capped(err, tol, fn_, spread, f"the differences' spread ({spread:.2g}) widened the tolerance",
                       float(np.linalg.norm(jv - fd)) / max(jn, fn_, 1e-300))
    if err <= tol:
        return "pass", err, tol, fn_, spread, f"tolerance widened by the differences' spread ({spread:.2g})"
    return "fail", err, tol, fn_, spread, ""


def _capped(err: float, tol: float, fn_: float, spread: float, why: str, rel: float):
    """A tolerance wider than ``_MAX_TOL`` could not have failed a wrong derivative: the direction is judged at
    the cap instead, on the error relative to the derivatives themselves (``rel`` = ||Jv - FD|| / max(||Jv||,
    ||FD||), not to the rounding floor); agreement within the cap is evidence, else it is inconclusive."""
    if rel <= _MAX_TOL:
        return ("pass", rel, _MAX_TOL, fn_, spread,
                f"{why} (bound {tol:.3g}); judged at the cap {_MAX_TOL:g}, which the agreement meets")
    return ("inconclusive", rel, tol, fn_, spread,
            f"{why} (tolerance would be {tol:.3g}, over the cap {_MAX_TOL:g}): agreement within it is no evidence")


# ---------------------------------------------------------------------------------------------------------
_RETRIES = 3                 # extra directions / points tried, in all, when a direction gave no evidence
_ROUNDING = 0.05             # jvp/vjp linearity residual above which their values are rounding noise
_NOISE_FACTOR = 16.0         # the forward floor may rise to this many times the graph's measured float32 rounding
_FWD_ULPS = 64               # the forward check's absolute floor: 64 ulps of the reference's dtype at max(1, |y|)
_NEARBY = 1e-2               # a nearby point: x + 1e-2 * (a seeded direction of x's rms)


def _residual(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """||c - a - b|| / ||a|| for c = A(x + y), a = A x, b = A y: how far A's values along x are from linear --
    the rounding error of A x relative to its size (a true derivative: ~eps; rounding noise: ~1)."""
    num, den = float((c - a - b).norm()), float(a.norm())
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def verify(model: Any, x: Any = None, *, input: str | None = None, output: str | None = None,
           wrt: str | None = None, logits: bool = False, directions: int = 3, seed: int = 0,
           dtype: str | torch.dtype | None = "float64", device: str | torch.device | None = None,
           rtol: float | None = None, forward_tol: float = 1e-4, retries: int = _RETRIES,
           progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Check the engine's derivatives (and, for ONNX, the interpreter's forward) against references.

    ``x`` is the input (tensor or dict by input name; None: a seeded random input from the declared
    shape). ``dtype`` is the engine's dtype (float64 by default, for tight checks). ``rtol`` overrides
    the relative tolerance of the derivative check (default 2e-3 against float32 onnxruntime, 1e-6
    against the model in float64); ``forward_tol`` bounds ``max|interp - ort| / max|ort|`` above an absolute
    floor of 64 ulps of the reference's dtype at ``max(1, max|ort|)``.

    A direction without evidence (J v = FD = 0, a kink at x, J v at its own rounding level, differences that
    do not settle) is retried -- a new seeded direction, or for a kink a nearby point -- up to ``retries``
    extra checks in all. A disagreement is a FAIL only when it reproduces at a second, 100x smaller step
    series (through the model in float64 when the first was float32 onnxruntime). ``progress(done, total)``
    is called after each jvp/vjp and each function evaluation of the finite differences.
    """
    from ..models.base import Model

    if directions < 1:
        raise InputError("directions must be at least 1")
    if retries < 0:
        raise InputError("retries must be at least 0")
    warnings: list[str] = []
    counter = {"done": 0, "total": 0}

    def tick(n: int = 1) -> None:
        counter["done"] += n
        if progress is not None:
            progress(counter["done"], max(counter["total"], counter["done"]))

    def plan(n: int) -> None:
        counter["total"] += n

    series_evals = 1 + 2 * _N_STEPS
    plan(1 + directions * (2 + series_evals))  # forward; per direction jvp, vjp and one series
    if x is None:
        if not isinstance(model, Model):
            raise InputError("verify needs an input x for a plain callable")
        x = _synthetic_feeds(model, seed)
        warnings.append("no input given: a seeded random input from the declared shape (synthetic)")
    if getattr(model, "runtime", "torch") != "torch" and hasattr(model, "with_runtime"):
        # what is verified is the torch interpreter: under runtime onnxruntime/auto a values-only call would be
        # onnxruntime's own forward (the onnxruntime backward has its own check: analyses.verify)
        model = model.with_runtime("torch")
    t = prepare(model, x, input=input, output=output, wrt=wrt, dtype=dtype, device=device, logits=logits)
    if isinstance(model, Model) and not logits and getattr(t.model, "softmax_input", None) is not None:
        if t.model.softmax_input(t.output_name):
            warnings.append(f"output {t.output_name!r} comes out of a Softmax: its gradients saturate; "
                            "use --logits to check the pre-softmax logits")
    # a float64 copy for differencing through the model itself
    if t.dtype == torch.float64:
        t64 = t
    else:
        t64 = prepare(model, x, input=input, output=output, wrt=wrt, dtype=torch.float64, device=device,
                      logits=logits)
    y_engine = t.y.detach().to("cpu", torch.float64).numpy()

    # -- reference -------------------------------------------------------------------------------
    ort_fn = None
    ref_dtype = "float64"
    fwd_atol = None
    # the model's reference forward (onnxruntime for ONNX; None: differences through the model in float64)
    ref = t.model.reference([t.output_name], wrt=t.name) if isinstance(t.model, Model) else None
    is_onnx = ref is not None
    x_np = t.x.detach().to("cpu", torch.float64).numpy()
    if ref is not None:
        feeds = _feeds_of(t.model, x, input, t)
        wrt_name = t.name
        np_feeds = {k: v for k, v in feeds.items() if k != wrt_name}

        def ort_fn(xw: np.ndarray) -> np.ndarray:
            return np.asarray(ref({**np_feeds, wrt_name: xw})[0], dtype=np.float64)

        try:
            y_ref = ort_fn(x_np)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"onnxruntime failed on this input: {first}") from None
        ref_dtype = "float64" if ref.dtype == "float64" else "float32"
        if y_ref.shape != y_engine.shape:
            fwd = ForwardCheck("onnxruntime", None, None, forward_tol, False,
                               f"shape {y_engine.shape} vs onnxruntime's {y_ref.shape}")
        else:
            diff = np.abs(y_engine - y_ref)
            max_abs = float(diff.max()) if diff.size else 0.0
            denom = float(np.abs(y_ref).max()) if y_ref.size else 0.0
            max_rel = max_abs / denom if denom > 0 else (0.0 if max_abs == 0 else math.inf)
            # near-zero outputs (a detector's ~1e-8 scores) carry the reference's absolute rounding, not a
            # relative one: an absolute floor of 64 ulps of its dtype at max(1, max|ref|)
            fwd_atol = _FWD_ULPS * _FD[ref_dtype]["eps"] * max(1.0, denom)
            floor_why = f"{_FWD_ULPS} ulps of {ref_dtype}"
            noise = _float32_rounding(model, x, input, output, wrt, device, logits, t, t64) \
                if ref_dtype == "float32" and max_rel > forward_tol else None
            if noise is not None and _NOISE_FACTOR * noise > fwd_atol:
                # deep graphs whose outputs are small differences of large activations (logits ~0.09 after
                # 50 layers): the reference's float32 rounding is not 64 ulps of the output but that of the
                # computation, measured here as this graph's own float32 vs float64 forward
                fwd_atol = _NOISE_FACTOR * noise
                floor_why = (f"{_NOISE_FACTOR:g}x this graph's float32 rounding, measured as |float32 - float64| "
                             f"= {noise:.3g} of the engine's own forward")
            judged = max_abs / max(denom, fwd_atol / forward_tol) if forward_tol > 0 else max_rel
            ok = bool(np.isfinite(y_engine).all()) and judged <= forward_tol
            note = ""
            if max_rel > forward_tol and ok:
                note = (f"max|onnxruntime| = {denom:.3g}: the error {max_abs:.3g} is under the absolute floor "
                        f"{fwd_atol:.3g} ({floor_why}), so the error is taken relative to floor / tol = "
                        f"{fwd_atol / forward_tol:.3g} instead of max|onnxruntime|")
            fwd = ForwardCheck("onnxruntime", max_abs, max_rel, forward_tol, ok, note, atol=fwd_atol,
                               judged_error=judged)
    else:
        fwd = ForwardCheck("none", None, None, None, True,
                           "no onnxruntime for this model: derivatives checked against differences through "
                           "the model itself in float64")
    tick()

    def model_fn(xw: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return t64.f(torch.from_numpy(xw).to(t64.device)).to("cpu", torch.float64).numpy()

    def counted(fn):
        def g(xw):
            r = fn(xw)
            tick()
            return r
        return g

    def judge(refname: str, xp: np.ndarray, vn: np.ndarray, jv: np.ndarray, h0: float, rt, final: bool) -> dict:
        plan(series_evals)
        fn = ort_fn if refname == "onnxruntime" else model_fn
        steps, D, asym, f0n = _central(counted(fn), xp, vn, h0)
        dt = ref_dtype if refname == "onnxruntime" else "float64"
        st, err, tol, fdn, spread, note = _assess(jv, steps, D, asym, f0n, dt, rt, final)
        if refname == "model-float64" and t.dtype != torch.float64:
            # the engine's jvp carries float32 rounding: ~1e-3 through deep nets
            tol = max(tol, _F32_ENGINE_RTOL)
            if st == "fail" and err <= tol:
                st = "pass"
        return {"reference": refname, "status": st, "rel_error": err, "tol": tol, "fd_norm": fdn,
                "spread": spread, "steps": list(steps), "slopes": [float(np.linalg.norm(d)) for d in D],
                "note": note, "rt": rt}

    def rng(s: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(s)

    x_rms = float(np.sqrt(np.mean(x_np ** 2))) if x_np.size else 0.0
    scale = x_rms if x_rms > 1e-3 else 1.0
    gen = rng(seed)
    gen_aux = rng(seed + 7919)   # auxiliary directions for the rounding (linearity) probes
    gen_retry = rng(seed + 104729)

    def direction_vec(g: torch.Generator) -> torch.Tensor:
        v = torch.randn(t.in_shape, generator=g, dtype=torch.float64)
        return v / v.pow(2).mean().sqrt() * scale

    aux: dict = {}

    def jvp_of(tp, v: torch.Tensor) -> torch.Tensor:
        r = tp.jvp(v.to(tp.device, tp.dtype)).detach().to("cpu", torch.float64)
        tick()
        return r

    def vjp_of(tp, u: torch.Tensor) -> torch.Tensor:
        r = tp.vjp(u.to(tp.device, tp.dtype)).detach().to("cpu", torch.float64)
        tick()
        return r

    def jvp_rounding(tp, v: torch.Tensor, jv: torch.Tensor) -> float:
        key = ("j", id(tp))
        plan(2 if key not in aux else 1)
        if key not in aux:
            w = direction_vec(gen_aux)
            aux[key] = (w, jvp_of(tp, w))
        w, jw = aux[key]
        return _residual(jvp_of(tp, v + w), jv, jw)

    def vjp_rounding(tp, u: torch.Tensor, jtu: torch.Tensor) -> float:
        key = ("v", id(tp))
        plan(2 if key not in aux else 1)
        if key not in aux:
            w = torch.randn(t.out_shape, generator=gen_aux, dtype=torch.float64)
            aux[key] = (w, vjp_of(tp, w))
        w, jw = aux[key]
        return _residual(vjp_of(tp, u + w), jtu, jw)

    def steps_txt(steps) -> str:
        return f"{steps[0]:.3g}..{steps[-1]:.3g}"

    def confirm(tp, xp, vn, v, jv_t, jv, cur: dict) -> dict:
        """A disagreement is a fail only when it reproduces at a second step series (100x smaller; through the
        model in float64 after a float32 reference) and J v is not at its own rounding level."""
        rho = jvp_rounding(tp, v, jv_t)
        if rho > _ROUNDING:
            return {**cur, "status": "inconclusive", "rounding": rho,
                    "note": f"J v is at the rounding level of its own computation (linearity residual "
                            f"||J(v+w) - Jv - Jw|| / ||Jv|| = {rho:.2g} > {_ROUNDING:g}): no evidence "
                            f"either way; differences: {cur['note']}".rstrip(": ")}
        if cur["reference"] == "onnxruntime" and ref_dtype == "float32":
            ref2, h2 = "model-float64", _FD["float64"]["h0"]
        else:
            ref2, h2 = cur["reference"], cur["steps"][0] / 100
        c2 = judge(ref2, xp, vn, jv, h2, cur["rt"], final=True)
        first = (f"disagree at steps {steps_txt(cur['steps'])} through {cur['reference']} (rel error "
                 f"{cur['rel_error']:.3g} > tol {cur['tol']:.3g})")
        if c2["status"] == "fail":
            return {**cur, "confirm_steps": c2["steps"],
                    "note": f"{cur['note'] + '; ' if cur['note'] else ''}the differences {first} and again at "
                            f"steps {steps_txt(c2['steps'])} through {ref2} (rel error {c2['rel_error']:.3g} > "
                            f"tol {c2['tol']:.3g})"}
        if c2["status"] == "pass":
            return {**c2, "confirm_steps": cur["steps"],
                    "note": f"the differences {first}, but at steps {steps_txt(c2['steps'])} through {ref2} "
                            f"they agree (kinks crossed within the larger step): not a failure"}
        return {**c2, "status": "inconclusive", "confirm_steps": c2["steps"],
                "note": f"the differences {first}, which does not reproduce at steps {steps_txt(c2['steps'])} "
                        f"through {ref2} ({c2['status']}: {c2['note']}): no evidence either way"}

    def direction(index: int, tp, xp: np.ndarray, v: torch.Tensor, jv_t: torch.Tensor, retry_of=None,
                  point: str = "x") -> VerifyDirection:
        vn, jv = v.numpy(), jv_t.numpy()
        cur = None
        if ort_fn is not None:
            cur = judge("onnxruntime", xp, vn, jv, _FD[ref_dtype]["h0"], rtol, final=ref_dtype == "float64")
        if cur is None or cur["status"] in ("non-differentiable", "inconclusive"):
            prev = cur
            h0 = _FD["float64"]["h0"] * (1.0 if prev is None else 1e-2)
            cur = judge("model-float64", xp, vn, jv, h0, rtol if prev is None else None, final=True)
            if prev is not None:
                if prev["status"] == "non-differentiable" and cur["status"] == "pass":
                    cur["status"] = "non-differentiable"  # piecewise-constant at the reference's steps: say so
                cur["note"] = (f"onnxruntime: {prev['note']}; re-checked through the interpreter in float64 with "
                               f"steps {steps_txt(cur['steps'])}" + (f": {cur['note']}" if cur["note"] else ""))
        jn = float(np.linalg.norm(jv))
        if cur["status"] in ("pass", "inconclusive") and jn == 0.0 and cur["fd_norm"] == 0.0:
            # J v = 0 and the differences = 0: agreement, but no evidence that a nonzero derivative is right
            cur = {**cur, "status": "inconclusive", "zero": True,
                   "note": "J v and the finite differences are both exactly 0 along this direction: no evidence "
                           "either way"}
        if cur["status"] == "fail":
            cur = confirm(tp, xp, vn, v, jv_t, jv, cur)
        return VerifyDirection(index=int(index), reference=cur["reference"], status=cur["status"],
                               non_differentiable=cur["status"] == "non-differentiable",
                               rel_error=float(cur["rel_error"]), tol=float(cur["tol"]), jvp_norm=jn,
                               fd_norm=float(cur["fd_norm"]), fd_spread=float(cur["spread"]),
                               steps=[float(h) for h in cur["steps"]],
                               slope_norms=[float(s) for s in cur["slopes"]], note=str(cur["note"] or ""),
                               retry_of=retry_of, point=point,
                               confirm_steps=[float(h) for h in cur.get("confirm_steps", [])])

    checks: list[VerifyDirection] = []
    adj_rows: list[tuple] = []   # (target, v, u, jv, jtu) of the directions at x

    def at_x(index: int, v: torch.Tensor, retry_of=None) -> VerifyDirection:
        u = torch.randn(t.out_shape, generator=gen if retry_of is None else gen_retry, dtype=torch.float64)
        jv_t = jvp_of(t, v)
        jtu = vjp_of(t, u)
        adj_rows.append((v, u, jv_t, jtu))
        return direction(index, t, x_np, v, jv_t, retry_of=retry_of)

    for k in range(directions):
        v = direction_vec(gen)
        checks.append(at_x(k, v))
        if not torch.isfinite(adj_rows[-1][2]).all():
            warnings.append("NaN/inf in the engine's derivatives")

    # -- retries: a direction without evidence gets a new seeded direction, or for a kink a nearby point ------
    budget = retries
    nearby = None
    tried: list[str] = []
    for c in list(checks):
        if budget <= 0:
            break
        if c.status in ("pass", "fail"):
            continue
        notes = []
        for attempt in range(2):
            if budget <= 0:
                break
            budget -= 1
            idx = len(checks)
            plan(2 + series_evals)
            if c.status == "non-differentiable" and attempt == 0:
                if nearby is None:
                    w = direction_vec(gen_retry)
                    xn = t.x + (_NEARBY * w).to(t.x.device, t.x.dtype)
                    tn = Target(t.f, xn, name=t.name, output_name=t.output_name, model=t.model)
                    nearby = (tn, xn.detach().to("cpu", torch.float64).numpy())
                tn, xn_np = nearby
                v = direction_vec(gen_retry)
                r = direction(idx, tn, xn_np, v, jvp_of(tn, v), retry_of=c.index, point="nearby")
                what = f"dir {idx} at a nearby point x + {_NEARBY:g}·w"
            else:
                r = at_x(idx, direction_vec(gen_retry), retry_of=c.index)
                what = f"dir {idx} (a new seeded direction)"
            checks.append(r)
            notes.append(f"{what}: {r.status}")
            if r.status in ("pass", "fail"):
                break
        if notes:
            tried.append(f"dir {c.index} ({c.status}) retried: " + "; ".join(notes))
            i = checks.index(c)
            checks[i] = dataclasses.replace(c, note=f"{c.note}; retried: {'; '.join(notes)}")
    if tried:
        warnings.append("directions without evidence were retried (budget "
                        f"{retries}): " + " | ".join(tried))

    # -- adjoint: u^T (J v) vs (u^T J) v, judged above the rounding the jvp/vjp themselves carry ---------------
    adj_base = 1e-9 if t.dtype == torch.float64 else 1e-4
    judged_errs, judged_tols, rounding_dirs, rhos = [], [], 0, []
    for v, u, jv_t, jtu in adj_rows:
        a = float((u * jv_t).sum())
        b = float((jtu * v).sum())
        denom = float(u.norm() * jv_t.norm() + jtu.norm() * v.norm()) or 1.0
        e = abs(a - b) / denom
        if e <= adj_base:
            judged_errs.append(e)
            judged_tols.append(adj_base)
            continue
        rho = max(jvp_rounding(t, v, jv_t), vjp_rounding(t, u, jtu))
        rhos.append(rho)
        if rho > _ROUNDING:
            rounding_dirs += 1
            continue
        judged_errs.append(e)
        judged_tols.append(max(adj_base, 3 * rho))
    rho_max = max(rhos) if rhos else None
    if judged_errs:
        bad = [e > tl for e, tl in zip(judged_errs, judged_tols)]
        adj_status = "fail" if any(bad) else "pass"
        adj_tol = max(judged_tols)
        note = ""
        if adj_tol > adj_base:
            note = f"tolerance raised from {adj_base:g} to 3x the jvp/vjp rounding measured ({rho_max:.2g})"
        if rounding_dirs:
            note = (note + "; " if note else "") + (f"{rounding_dirs} direction(s) at rounding level left out")
        adj = AdjointCheck(max(judged_errs), adj_tol, adj_status == "pass", adj_status, note, rho_max)
    else:
        adj = AdjointCheck(0.0, adj_base, True, "skipped",
                           f"every direction's jvp/vjp is at its rounding level (linearity residual up to "
                           f"{rho_max:.2g} > {_ROUNDING:g}): the adjoint test has no evidence", rho_max)
        warnings.append("u^T (J v) vs (u^T J) v skipped: " + adj.note)

    nondiff = sum(c.status == "non-differentiable" for c in checks if c.point == "x")
    at_x_n = sum(c.point == "x" for c in checks)
    if nondiff == at_x_n:
        warnings.append("every direction at x crosses non-differentiable points: the derivative check at x is "
                        "inconclusive (the forward check still counts)")
    elif nondiff:
        warnings.append(f"{nondiff} of {at_x_n} directions cross non-differentiable points "
                        "(reported, not counted as failures)")
    conclusive = [c for c in checks if c.status in ("pass", "fail")]
    if conclusive and all(c.point != "x" for c in conclusive):
        warnings.append(f"x sits on a kink: the derivative evidence comes from a nearby point "
                        f"(x + {_NEARBY:g}·w), where the engine's J v agrees with the differences")
    if not conclusive:
        warnings.append("no direction gave a conclusive derivative check (non-differentiable points, zero "
                        "derivatives or differences that do not settle): the verdict is inconclusive")
    failed = not fwd.passed or adj.status == "fail" or any(c.status == "fail" for c in checks)
    verdict = "fail" if failed else ("pass" if conclusive else "inconclusive")
    default_rtol = {k: v["rtol"] for k, v in _FD.items()}
    tols = VerifyTolerances(forward=forward_tol if is_onnx else None, rtol=rtol, default_rtol=default_rtol,
                            adjoint=adj.tol,
                            float32_engine_rtol=_F32_ENGINE_RTOL if t.dtype != torch.float64 else None,
                            nondiff_spread=_NONDIFF_SPREAD, nondiff_ratio=_NONDIFF_RATIO, cap=_MAX_TOL,
                            forward_atol=fwd_atol, rounding_residual=_ROUNDING)
    softmax = next((w for w in warnings if "Softmax" in w), None)
    if progress is not None:
        progress(counter["done"], counter["done"])
    return VerifyResult(verdict=verdict, input_name=str(input or (model.inputs[0].name if isinstance(model, Model)
                                                                  else t.name)),
                        wrt=str(t.name), output=str(t.output_name),
                        reference="onnxruntime" if is_onnx else "model-float64",
                        dtype=str(t.dtype).replace("torch.", ""), device=str(t.device),
                        directions_requested=int(directions), forward=fwd, directions=list(checks), adjoint=adj,
                        tolerances=tols, non_differentiable=sum(c.non_differentiable for c in checks),
                        fd_steps=_N_STEPS, logits=bool(logits), softmax_warning=softmax,
                        retries=len(checks) - directions, retry_budget=int(retries), warnings=list(warnings))


def _float32_rounding(model, x, input, output, wrt, device, logits, t, t64) -> float | None:
    """max |f32(x) - f64(x)| of the engine's own forward: how much float32 rounding this graph carries."""
    try:
        t32 = t if t.dtype == torch.float32 else prepare(model, x, input=input, output=output, wrt=wrt,
                                                         dtype=torch.float32, device=device, logits=logits)
        y32 = t32.y.detach().to("cpu", torch.float64)
        y64 = t64.y.detach().to("cpu", torch.float64)
        return float((y32 - y64).abs().max()) if y32.shape == y64.shape and y32.numel() else None
    except Exception:  # a model that cannot run in float32 (or float64): no measured floor, the plain one holds
        return None


def _synthetic_feeds(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    feeds = {}
    for s in model.inputs:
        shape = s.concrete_shape(batch=1)  # the batch axis only: other dynamic dims must be given
        if s.dtype is None or s.dtype.is_floating_point:
            feeds[s.name] = torch.randn(shape, generator=g, dtype=torch.float32)
        elif s.dtype == torch.bool:
            feeds[s.name] = torch.zeros(shape, dtype=torch.bool)
        else:
            feeds[s.name] = torch.zeros(shape, dtype=s.dtype)
    return feeds


def _feeds_of(model, x: Any, input: str | None, t: Target) -> dict[str, np.ndarray]:
    """Numpy feeds for onnxruntime in the model's declared dtypes."""
    if isinstance(x, dict):
        items = dict(x)
    else:
        name = input or model.inputs[0].name
        items = {name: x}
    out = {}
    for k, v in items.items():
        arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        spec = next((s for s in model.inputs if s.name == k), None)
        if spec is not None and spec.dtype is not None:
            arr = arr.astype(torch.empty(0, dtype=spec.dtype).numpy().dtype)
        out[k] = arr
    return out
