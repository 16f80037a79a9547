"""How far the first-order model holds: ``||f(x+D) - f(x) - J D|| / ||f(x+D) - f(x)||`` for a few step sizes
along random directions and the top right-singular directions of ``J`` (the directions the output is most
sensitive to). ``J D`` comes from jvp; ``J`` is never formed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .core import Target, prepare

__all__ = ["linearity", "LinearityResult", "LinearityRow"]


@dataclass(frozen=True)
class LinearityRow:
    direction: str        # "random-0", "singular-0", ...
    step: float           # ||D|| / ||x|| (relative step)
    error: float          # ||f(x+D) - f(x) - J D|| / ||f(x+D) - f(x)||


@dataclass(frozen=True)
class LinearityResult:
    rows: tuple[LinearityRow, ...]
    steps: tuple[float, ...]

    def worst_by_step(self) -> dict[float, float]:
        out: dict[float, float] = {}
        for r in self.rows:
            out[r.step] = max(out.get(r.step, 0.0), r.error)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps),
                "rows": [{"direction": r.direction, "step": r.step, "error": r.error} for r in self.rows],
                "worst_by_step": {str(k): v for k, v in self.worst_by_step().items()}}


def linearity(model: Any, x: Any = None, *, steps: Sequence[float] = (1e-3, 1e-2, 1e-1), random: int = 2,
              singular: int = 1, seed: int = 0, singular_vectors: torch.Tensor | None = None,
              **kw: Any) -> LinearityResult:
    """Relative error of the linear model ``f(x) + J D`` at ``||D|| = step * ||x||``.

    ``singular_vectors`` (k, *input_shape) may be passed when already computed; else the top ``singular``
    right-singular vectors are estimated by :func:`jacaudit.engine.estimators.top_singular`.
    """
    t = prepare(model, x, **kw) if not isinstance(model, Target) else model
    g = torch.Generator(device="cpu").manual_seed(seed)
    dirs: list[tuple[str, torch.Tensor]] = []
    for i in range(random):
        dirs.append((f"random-{i}", torch.randn(t.in_shape, generator=g, dtype=torch.float64)))
    if singular:
        if singular_vectors is None:
            from .estimators import top_singular
            singular_vectors = top_singular(t, k=min(singular, t.m, t.n), seed=seed).right
        for i, v in enumerate(singular_vectors[:singular]):
            dirs.append((f"singular-{i}", v.to("cpu", torch.float64)))
    xnorm = float(t.x.double().norm()) or 1.0
    rows = []
    with torch.no_grad():
        for name, d in dirs:
            d = (d / d.norm()).to(t.device, t.dtype)
            jd = t.jvp(d).double()
            for s in steps:
                a = s * xnorm
                dy = (t.f(t.x + a * d) - t.y).double()
                den = float(dy.norm())
                num = float((dy - a * jd).norm())
                rows.append(LinearityRow(name, float(s), num / den if den > 0 else (0.0 if num == 0 else float("inf"))))
    return LinearityResult(tuple(rows), tuple(float(s) for s in steps))
