"""A summary of a Jacobian: shapes, norms, rank estimate, largest entries (what ``jacaudit jacobian`` prints)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .core import JacobianInfo

__all__ = ["JacobianSummary", "summarize"]

_SVD_MAX = 4096  # above this many rows and columns, the spectral norm comes from the estimator


@dataclass(frozen=True)
class JacobianSummary:
    input: str
    output: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    jacobian_shape: tuple[int, ...]
    frobenius: float
    spectral: float | None
    spectral_method: str            # "svd" | "power-iteration"
    rank: int | None
    rank_tol: float | None
    largest: tuple[dict[str, Any], ...]   # {"output_index": [...], "input_index": [...], "value": v}
    info: dict[str, Any]
    finite: bool
    warnings: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    singular_values: tuple[float, ...] | None = None   # all of them, largest first, when the SVD ran

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "input_shape": list(self.input_shape),
                "output_shape": list(self.output_shape), "jacobian_shape": list(self.jacobian_shape),
                "frobenius_norm": self.frobenius, "spectral_norm": self.spectral,
                "spectral_method": self.spectral_method, "rank": self.rank, "rank_tol": self.rank_tol,
                "largest_entries": [dict(e) for e in self.largest], "computation": dict(self.info),
                "finite": self.finite, "warnings": list(self.warnings), "settings": dict(self.settings)}


def _unravel(i: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for d in reversed(shape):
        out.append(i % d if d else 0)
        i //= d if d else 1
    return list(reversed(out))


def summarize(J: torch.Tensor, info: JacobianInfo, *, input: str = "input", output: str = "output",
              top: int = 5, target=None, warnings: tuple[str, ...] = (), settings: dict | None = None
              ) -> JacobianSummary:
    out_s, in_s = tuple(info.output_shape), tuple(info.input_shape)
    m = 1
    for d in out_s:
        m *= d
    n = J.numel() // max(m, 1)
    M = J.reshape(m, n)
    finite = bool(torch.isfinite(M).all())
    Md = M.double()
    fro = float(Md.norm())
    spectral = None
    rank = None
    rank_tol = None
    method = "svd"
    svals = None
    if finite and min(m, n) <= _SVD_MAX:
        s = torch.linalg.svdvals(Md)
        spectral = float(s[0]) if s.numel() else 0.0
        eps = torch.finfo(J.dtype).eps if J.is_floating_point() else 1e-7
        rank_tol = float(spectral * max(m, n) * eps)
        rank = int((s > rank_tol).sum())
        svals = tuple(float(v) for v in s)
    elif finite and target is not None:
        from .estimators import spectral_norm
        est = spectral_norm(target)
        spectral = est.spectral_norm
        method = "power-iteration"
    k = min(top, M.numel())
    largest = []
    if k:
        vals, idx = Md.abs().reshape(-1).topk(k)
        for i in idx.tolist():
            r, c = divmod(i, n)
            largest.append({"output_index": _unravel(r, out_s), "input_index": _unravel(c, in_s),
                            "value": float(Md.reshape(-1)[i])})
    return JacobianSummary(input, output, in_s, out_s, tuple(J.shape), fro, spectral, method, rank, rank_tol,
                           tuple(largest), info.to_dict(), finite, tuple(warnings), dict(settings or {}),
                           singular_values=svals)
