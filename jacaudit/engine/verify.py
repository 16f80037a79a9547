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
   Adjoint consistency: ``u^T (J v)`` from jvp against ``(u^T J) v`` from vjp.
3. A verdict: ``pass`` when the forward check and every conclusive direction pass, else ``fail``.
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
             ) -> tuple[list[float], list[np.ndarray], list[float]]:
    """Central differences at ``h0 / 2**j`` and the one-sided asymmetry ``||D+ - D-||`` at each step
    (O(h) where f is smooth; O(1) at a kink, where central differences settle on the mean slope)."""
    steps, D, asym = [], [], []
    f0 = fn(x)
    for j in range(_N_STEPS):
        h = h0 / 2 ** j
        fp, fm = fn(x + h * v), fn(x - h * v)
        steps.append(h)
        D.append((fp - fm) / (2 * h))
        asym.append(float(np.linalg.norm((fp - f0) / h - (f0 - fm) / h)))
    return steps, D, asym


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
def verify(model: Any, x: Any = None, *, input: str | None = None, output: str | None = None,
           wrt: str | None = None, logits: bool = False, directions: int = 3, seed: int = 0,
           dtype: str | torch.dtype | None = "float64", device: str | torch.device | None = None,
           rtol: float | None = None, forward_tol: float = 1e-4) -> VerifyResult:
    """Check the engine's derivatives (and, for ONNX, the interpreter's forward) against references.

    ``x`` is the input (tensor or dict by input name; None: a seeded random input from the declared
    shape). ``dtype`` is the engine's dtype (float64 by default, for tight checks). ``rtol`` overrides
    the relative tolerance of the derivative check (default 2e-3 against float32 onnxruntime, 1e-6
    against the model in float64); ``forward_tol`` bounds ``max|interp - ort| / max|ort|``.
    """
    from ..models.base import Model

    if directions < 1:
        raise InputError("directions must be at least 1")
    warnings: list[str] = []
    if x is None:
        if not isinstance(model, Model):
            raise InputError("verify needs an input x for a plain callable")
        x = _synthetic_feeds(model, seed)
        warnings.append("no input given: a seeded random input from the declared shape (synthetic)")
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
    # the model's reference forward (onnxruntime for ONNX; None: differences through the model in float64)
    ref = t.model.reference([t.output_name], wrt=t.name) if isinstance(t.model, Model) else None
    is_onnx = ref is not None
    if ref is not None:
        feeds = _feeds_of(t.model, x, input, t)
        wrt_name = t.name
        np_feeds = {k: v for k, v in feeds.items() if k != wrt_name}

        def ort_fn(xw: np.ndarray) -> np.ndarray:
            return np.asarray(ref({**np_feeds, wrt_name: xw})[0], dtype=np.float64)

        x_np = t.x.detach().to("cpu", torch.float64).numpy()
        try:
            y_ref = ort_fn(x_np)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"onnxruntime failed on this input: {first}") from None
        if y_ref.shape != y_engine.shape:
            fwd = ForwardCheck("onnxruntime", None, None, forward_tol, False,
                               f"shape {y_engine.shape} vs onnxruntime's {y_ref.shape}")
        else:
            diff = np.abs(y_engine - y_ref)
            max_abs = float(diff.max()) if diff.size else 0.0
            denom = float(np.abs(y_ref).max()) if y_ref.size else 0.0
            max_rel = max_abs / denom if denom > 0 else (0.0 if max_abs == 0 else math.inf)
            ok = bool(np.isfinite(y_engine).all()) and max_rel <= forward_tol
            fwd = ForwardCheck("onnxruntime", max_abs, max_rel, forward_tol, ok)
        ref_dtype = "float64" if ref.dtype == "float64" else "float32"
    else:
        fwd = ForwardCheck("none", None, None, None, True,
                           "no onnxruntime for this model: derivatives checked against differences through "
                           "the model itself in float64")

    def model_fn(xw: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return t64.f(torch.from_numpy(xw).to(t64.device)).to("cpu", torch.float64).numpy()

    x64 = t64.x.detach().to("cpu", torch.float64).numpy()
    f0_model = float(np.linalg.norm(model_fn(x64)))

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_rms = float(np.sqrt(np.mean(x64 ** 2))) if x64.size else 0.0
    scale = x_rms if x_rms > 1e-3 else 1.0
    checks: list[DirectionCheck] = []
    adj_errs: list[float] = []
    for k in range(directions):
        v = torch.randn(t.in_shape, generator=gen, dtype=torch.float64)
        v = v / v.pow(2).mean().sqrt() * scale
        u = torch.randn(t.out_shape, generator=gen, dtype=torch.float64)
        jv_t = t.jvp(v.to(t.device, t.dtype))
        jv = jv_t.detach().to("cpu", torch.float64).numpy()
        # adjoint: u.(Jv) vs (J^T u).v
        jtu = t.vjp(u.to(t.device, t.dtype)).detach().to("cpu", torch.float64)
        a = float((u * torch.from_numpy(jv)).sum())
        b = float((jtu * v).sum())
        denom = float(u.norm() * np.linalg.norm(jv) + jtu.norm() * v.norm()) or 1.0
        adj_errs.append(abs(a - b) / denom)
        vn = v.numpy()
        check = None
        if ort_fn is not None:
            steps, D, asym = _central(ort_fn, x_np, vn, _FD[ref_dtype]["h0"])
            st, err, tol, fdn, spread, note = _assess(jv, steps, D, asym, float(np.linalg.norm(y_ref)), ref_dtype,
                                                      rtol, final=ref_dtype == "float64")
            check = DirectionCheck(k, "onnxruntime", st, err, tol, float(np.linalg.norm(jv)), fdn, spread,
                                   tuple(steps), tuple(float(np.linalg.norm(d)) for d in D), note)
        if check is None or check.status in ("non-differentiable", "inconclusive"):
            h0 = _FD["float64"]["h0"] * (1.0 if check is None else 1e-2)
            steps, D, asym = _central(model_fn, x64, vn, h0)
            st, err, tol, fdn, spread, note = _assess(jv, steps, D, asym, f0_model, "float64",
                                                      rtol if check is None else None, final=True)
            if t.dtype != torch.float64:  # the engine's jvp carries float32 rounding: ~1e-3 through deep nets
                tol = max(tol, _F32_ENGINE_RTOL)
                if st == "fail" and err <= tol:
                    st = "pass"
            prev = check
            if prev is not None:
                if prev.status == "non-differentiable" and st == "pass":
                    st = "non-differentiable"  # piecewise-constant at the reference's steps: say so
                note = (f"onnxruntime: {prev.note}; re-checked through the interpreter in float64 with steps "
                        f"{steps[0]:.3g}..{steps[-1]:.3g}" + (f": {note}" if note else ""))
            check = DirectionCheck(k, "model-float64", st, err, tol, float(np.linalg.norm(jv)), fdn, spread,
                                   tuple(steps), tuple(float(np.linalg.norm(d)) for d in D), note)
        checks.append(check)
    adj_tol = 1e-9 if t.dtype == torch.float64 else 1e-4
    adj = AdjointCheck(max(adj_errs), adj_tol, max(adj_errs) <= adj_tol)
    if not np.isfinite(jv).all():
        warnings.append("NaN/inf in the engine's derivatives")
    nondiff = sum(c.status == "non-differentiable" for c in checks)
    if nondiff == len(checks):
        warnings.append("every direction crosses non-differentiable points: the derivative check is "
                        "inconclusive here (the forward check still counts)")
    elif nondiff:
        warnings.append(f"{nondiff} of {len(checks)} directions cross non-differentiable points "
                        "(reported, not counted as failures)")
    zero = [c for c in checks if c.status in ("pass", "inconclusive") and c.jvp_norm == 0.0 and c.fd_norm == 0.0]
    if zero:
        # J v = 0 and the differences = 0: agreement, but no evidence that a nonzero derivative is right
        checks = [dataclasses.replace(c, status="inconclusive", note="J v and the finite differences are both "
                                      "exactly 0 along this direction: no evidence either way") if c in zero else c
                  for c in checks]
    conclusive = [c for c in checks if c.status in ("pass", "fail")]
    if not conclusive:
        warnings.append("no direction gave a conclusive derivative check (non-differentiable points, zero "
                        "derivatives or differences that do not settle): the verdict is inconclusive")
    failed = not fwd.passed or not adj.passed or any(c.status == "fail" for c in checks)
    verdict = "fail" if failed else ("pass" if conclusive else "inconclusive")
    default_rtol = {k: v["rtol"] for k, v in _FD.items()}
    tols = VerifyTolerances(forward=forward_tol if is_onnx else None, rtol=rtol, default_rtol=default_rtol,
                            adjoint=adj_tol,
                            float32_engine_rtol=_F32_ENGINE_RTOL if t.dtype != torch.float64 else None,
                            nondiff_spread=_NONDIFF_SPREAD, nondiff_ratio=_NONDIFF_RATIO)
    softmax = next((w for w in warnings if "Softmax" in w), None)
    return VerifyResult(verdict=verdict, input_name=str(input or (model.inputs[0].name if isinstance(model, Model)
                                                                  else t.name)),
                        wrt=str(t.name), output=str(t.output_name),
                        reference="onnxruntime" if is_onnx else "model-float64",
                        dtype=str(t.dtype).replace("torch.", ""), device=str(t.device),
                        directions_requested=int(directions), forward=fwd, directions=list(checks), adjoint=adj,
                        tolerances=tols, non_differentiable=sum(c.non_differentiable for c in checks),
                        fd_steps=_N_STEPS, logits=bool(logits), softmax_warning=softmax, warnings=list(warnings))


def _synthetic_feeds(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    feeds = {}
    for s in model.inputs:
        shape = s.concrete_shape(1)
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
