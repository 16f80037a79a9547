"""Estimators that never materialise the Jacobian.

* :func:`frobenius_norm` -- Hutchinson / random projections: ``||J||_F^2 = E ||J v||^2 = E ||J^T u||^2`` for
  probes with identity covariance (Rademacher). Reports the standard error and the number of probes.
  When the smaller side of ``J`` is no larger than the probe count, the exact value costs no more and is
  computed instead (``method="exact"``).
* :func:`top_singular` / :func:`spectral_norm` -- block power (subspace) iteration on ``J^T J`` through jvp
  and vjp (or, when the iterated subspace would span all of J -- few outputs -- the exact J from its smaller side,
  which is then both exact and cheaper), with a Rayleigh-Ritz step on ``J V``: ``J V = U S W^T`` gives singular values ``S``, right vectors
  ``V W`` (input space) and left vectors ``U`` (output space). The residual ``||J^T u_i - s_i v_i|| / s_1``
  is the convergence test (it is free: ``J^T U`` is the next iteration's vjp).

References: Hutchinson (1990), "A stochastic estimator of the trace of the influence matrix ...";
Halko, Martinsson & Tropp (2011), "Finding structure with randomness", for the subspace iteration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError, RuntimeFailure
from .core import Target, prepare

__all__ = ["frobenius_norm", "spectral_norm", "top_singular", "FrobeniusEstimate", "SingularEstimate"]


@dataclass(frozen=True)
class FrobeniusEstimate:
    value: float          # estimate of ||J||_F
    stderr: float         # standard error of ``value`` (0 when exact)
    probes: int           # probes used (jvps or vjps)
    method: str           # "hutchinson" | "exact"
    side: str             # "input" (jvp probes) | "output" (vjp probes)
    path: str             # vmap | batched | loop

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "stderr": self.stderr, "probes": self.probes, "method": self.method,
                "side": self.side, "path": self.path}


@dataclass(frozen=True)
class SingularEstimate:
    values: tuple[float, ...]          # top-k singular values, descending
    right: torch.Tensor = field(repr=False)   # (k, *input_shape), unit norm
    left: torch.Tensor = field(repr=False)    # (k, *output_shape), unit norm
    residuals: tuple[float, ...] = ()  # ||J^T u_i - s_i v_i|| / s_1
    iterations: int = 0
    converged: bool = False
    tol: float = 0.0
    matvecs: int = 0                   # jvp + vjp evaluations
    path: str = "vmap"

    @property
    def spectral_norm(self) -> float:
        return self.values[0] if self.values else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "residuals": list(self.residuals), "iterations": self.iterations,
                "converged": self.converged, "tol": self.tol, "matvecs": self.matvecs, "path": self.path}


def _target(model_or_target: Any, x: Any, kw: dict[str, Any]) -> Target:
    if isinstance(model_or_target, Target):
        return model_or_target
    return prepare(model_or_target, x, **kw)


def _rademacher(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    r = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(device=like.device, dtype=like.dtype)
    return r * 2 - 1


def frobenius_norm(model: Any, x: Any = None, *, probes: int = 32, seed: int = 0, side: str = "auto",
                   batch: int = 16, **kw: Any) -> FrobeniusEstimate:
    """Estimate ``||J||_F`` with ``probes`` Rademacher probes (batched ``batch`` at a time).

    ``side="output"`` uses vjps (cheaper when the output is small), ``"input"`` jvps, ``"auto"`` the smaller
    side. Extra keywords (input=, output=, wrt=, dtype=, device=, logits=) go to :func:`prepare`.
    """
    t = _target(model, x, kw)
    if probes < 2:
        raise InputError("probes must be at least 2 (the standard error needs two)")
    if side == "auto":
        side = "output" if t.m <= t.n else "input"
    dim = t.m if side == "output" else t.n
    shape = t.out_shape if side == "output" else t.in_shape
    apply = t.vjp_many if side == "output" else t.jvp_many
    like = t.y if side == "output" else t.x
    if dim <= probes:  # exact: the basis of the small side
        total = 0.0
        for a in range(0, dim, batch):
            b = min(dim, a + batch)
            E = torch.zeros(b - a, dim, dtype=like.dtype, device=like.device)
            E[torch.arange(b - a), torch.arange(a, b)] = 1
            R = apply(E.reshape(b - a, *shape))
            total += float(R.double().pow(2).sum())
        return FrobeniusEstimate(math.sqrt(total), 0.0, dim, "exact", side,
                                 (t.vjp_path if side == "output" else t.jvp_path) or "vmap")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sq: list[float] = []
    done = 0
    while done < probes:
        c = min(batch, probes - done)
        P = _rademacher((c, *shape), gen, like)
        R = apply(P)
        sq.extend(R.double().reshape(c, -1).pow(2).sum(1).tolist())
        done += c
    mean = sum(sq) / len(sq)
    var = sum((s - mean) ** 2 for s in sq) / (len(sq) - 1)
    se_sq = math.sqrt(var / len(sq))
    value = math.sqrt(max(mean, 0.0))
    stderr = se_sq / (2 * value) if value > 0 else 0.0
    if not math.isfinite(value):
        raise RuntimeFailure("the Frobenius-norm estimate is not finite (NaN/inf derivatives)")
    return FrobeniusEstimate(value, stderr, len(sq), "hutchinson", side,
                             (t.vjp_path if side == "output" else t.jvp_path) or "vmap")


def top_singular(model: Any, x: Any = None, *, k: int = 1, tol: float | None = None, max_iter: int = 300,
                 oversample: int | None = None, seed: int = 0, **kw: Any) -> SingularEstimate:
    """Top-``k`` singular values and vectors of ``J`` by subspace iteration on ``J^T J`` (jvp + vjp).

    ``tol`` is the relative residual ``||J^T u_i - s_i v_i|| / s_1`` every one of the k pairs must reach
    (default 1e-4 in float32, 1e-8 in float64). The result says whether it converged.
    """
    t = _target(model, x, kw)
    if k < 1:
        raise InputError("k must be at least 1")
    r = min(t.m, t.n)
    if k > r:
        raise InputError(f"k={k} is more than min(m, n) = {r}, the number of singular values")
    if tol is None:
        tol = 1e-4 if t.dtype != torch.float64 else 1e-8
    p = oversample if oversample is not None else min(max(2, k), r - k)
    c = k + p
    if r <= 4 * c:  # J's small side is within a few block sizes: the exact J costs r passes, fewer than iterating
        return _exact_singular(t, k)  # (each iteration costs 2c, and convergence takes several)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    V = torch.randn(t.n, c, generator=gen, dtype=torch.float64).to(device=t.device, dtype=work)
    V, _ = torch.linalg.qr(V)
    matvecs = 0
    prev = None
    residuals = [float("inf")] * k
    S = U = Vr = None
    it = 0
    converged = False
    for it in range(1, max_iter + 1):
        Y = t.jvp_many(V.t().reshape(c, *t.in_shape).to(t.dtype)).reshape(c, t.m).to(work)  # rows = (J V)^T
        Uf, S, Wh = torch.linalg.svd(Y.t(), full_matrices=False)    # J V = Uf S Wh
        Vr = V @ Wh.t()                                                 # right vectors (n, c)
        Z = t.vjp_many(Uf.t().reshape(c, *t.out_shape).to(t.dtype)).reshape(c, t.n).to(work)  # (J^T U)^T
        matvecs += 2 * c
        if not torch.isfinite(S).all() or not torch.isfinite(Z).all():
            raise RuntimeFailure("NaN/inf in jvp/vjp during the singular-value iteration")
        s1 = float(S[0]) if float(S[0]) > 0 else 1.0
        res = (Z[:k] - S[:k, None] * Vr.t()[:k]).norm(dim=1) / s1
        residuals = [float(v) for v in res]
        U = Uf
        if float(S[0]) == 0.0 or max(residuals) <= tol:
            converged = True
            break
        V, _ = torch.linalg.qr(Z.t())
        prev = S
    assert S is not None and U is not None and Vr is not None
    right = Vr.t()[:k].reshape(k, *t.in_shape).to(t.dtype)
    left = U.t()[:k].reshape(k, *t.out_shape).to(t.dtype)
    path = t.jvp_path if t.jvp_path == t.vjp_path else f"jvp:{t.jvp_path}, vjp:{t.vjp_path}"
    return SingularEstimate(tuple(float(s) for s in S[:k]), right, left, tuple(residuals), it, converged,
                            float(tol), matvecs, path or "vmap")


def _exact_singular(t: Target, k: int) -> SingularEstimate:
    """Top-k singular triplets from the exact J, built from its smaller side (m vjps or n jvps)."""
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    if t.m <= t.n:
        E = torch.eye(t.m, dtype=t.y.dtype, device=t.y.device).reshape(t.m, *t.out_shape)
        J = t.vjp_many(E).reshape(t.m, t.n).to(work)
        path = t.vjp_path
    else:
        E = torch.eye(t.n, dtype=t.x.dtype, device=t.x.device).reshape(t.n, *t.in_shape)
        J = t.jvp_many(E).reshape(t.n, t.m).t().to(work)
        path = t.jvp_path
    if not torch.isfinite(J).all():
        raise RuntimeFailure("NaN/inf in the Jacobian during the singular-value computation")
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    right = Vh[:k].reshape(k, *t.in_shape).to(t.dtype)
    left = U.t()[:k].reshape(k, *t.out_shape).to(t.dtype)
    return SingularEstimate(tuple(float(v) for v in S[:k]), right, left, tuple(0.0 for _ in range(k)), 0, True, 0.0,
                            min(t.m, t.n), f"exact ({path or 'vmap'})")


def spectral_norm(model: Any, x: Any = None, **kw: Any) -> SingularEstimate:
    """The largest singular value of ``J`` (``.spectral_norm``) with its vectors; see :func:`top_singular`."""
    kw.pop("k", None)
    return top_singular(model, x, k=1, **kw)
