"""Adversarial probes in the input's original units: FGSM, PGD (L-inf and L2) and the minimal flipping epsilon.

Everything happens in the *attack space* ``u``: the data in its original units (image pixels as a fraction of
the pixel range, [0, 1]; raw array / table values otherwise). :class:`Box` maps ``u`` to the model input
(``x = scale * u + shift``, the per-channel affine part of the preprocessing) and holds the valid range
``[lo, hi]`` every perturbed input is clipped to. So an epsilon means the same whether the normalisation lives
inside the model or in the preprocessing.

The recipes (documented, so that a hand-written reference reproduces them bit for bit):

* loss: cross-entropy of the scored logits against the label, summed over the batch (per-sample gradients do
  not depend on how inputs are batched);
* FGSM (Goodfellow et al. 2015): ``u' = clip(u + eps * sign(grad), lo, hi)``;
* PGD L-inf (Madry et al. 2018): random start ``u + (2 * rand - 1) * eps`` clipped, then ``steps`` times
  ``a = u' + alpha * sign(grad)``, ``delta = clamp(a - u, -eps, eps)``, ``u' = clip(u + delta, lo, hi)``;
* PGD L2: random start ``delta = r * eps * n / ||n||`` (``n`` normal, ``r`` uniform in [0, 1]), then steps of
  ``alpha * grad / (||grad|| + 1e-10)``, ``delta`` projected onto the L2 ball of radius eps, clipped;
* random numbers come from one ``torch.Generator`` seeded with the given seed, drawn on the CPU in the input's
  dtype, batch after batch in order (``rand`` for L-inf, ``randn`` then ``rand`` per batch for L2).

These are the recipes of torchattacks' FGSM / PGD / PGDL2 (which the tests compare with), with the loss summed
instead of averaged (the sign, and the L2-normalised step, are the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["Box", "Objective", "loss_and_grad", "margin", "fgsm", "pgd", "L2_DIVISION_EPS"]

#: added to ||grad|| before the L2 step (torchattacks' ``eps_for_division``)
L2_DIVISION_EPS = 1e-10


@dataclass
class Box:
    """Attack space -> model input (``x = scale * u + shift``) and the valid range of ``u``."""

    scale: torch.Tensor   # broadcastable to (N, *sample shape)
    shift: torch.Tensor
    lo: float
    hi: float
    units: str = "input units"

    def model_input(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.scale + self.shift

    def attack_point(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.shift) / self.scale).clamp(self.lo, self.hi)

    def clip(self, u: torch.Tensor) -> torch.Tensor:
        return u.clamp(self.lo, self.hi)

    def to(self, device: Any, dtype: Any) -> "Box":
        return Box(self.scale.to(device=device, dtype=dtype), self.shift.to(device=device, dtype=dtype), self.lo,
                   self.hi, self.units)


@dataclass
class Objective:
    """u (N, ...) -> class scores (N, K) to attack: the scorer's logits, or log-probabilities when the model
    only gives probabilities (``log_probs``). ``extra`` holds the other (fixed) model inputs, batch-aligned."""

    scorer: Any                                   # jacaudit.engine.gradients.Scorer
    box: Box
    log_probs: bool = False

    def __call__(self, u: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        z, _ = self.scorer(self.box.model_input(u), extra or {})
        if self.log_probs:
            z = torch.log(z.clamp_min(torch.finfo(z.dtype).tiny))
        return z


def margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Label score minus the best other score, per row (negative: misclassified)."""
    zy = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf"))
    return zy - other.max(1).values


def loss_and_grad(f: Callable[..., torch.Tensor], u: torch.Tensor, y: torch.Tensor,
                  extra: dict[str, torch.Tensor] | None = None, with_margin: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(gradient of the summed cross-entropy w.r.t. u, the scores at u (detached), the margin's gradient or
    None). One forward; a second backward only ``with_margin``."""
    u = u.detach().requires_grad_(True)
    with torch.enable_grad():
        z = f(u, extra)
        loss = F.cross_entropy(z, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, u, retain_graph=with_margin)
        gm = None
        if with_margin:
            (gm,) = torch.autograd.grad(margin(z, y).sum(), u)
    return g, z.detach(), gm


def fgsm(u: torch.Tensor, grad: torch.Tensor, eps: float | torch.Tensor, box: Box) -> torch.Tensor:
    """``clip(u + eps * sign(grad))``."""
    return box.clip(u + eps * grad.sign())


def _per_sample(v: float | torch.Tensor, u: torch.Tensor) -> torch.Tensor | float:
    if isinstance(v, torch.Tensor):
        return v.to(device=u.device, dtype=u.dtype).reshape((-1,) + (1,) * (u.dim() - 1))
    return v


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(p=2, dim=1).reshape((-1,) + (1,) * (t.dim() - 1))


def pgd(f: Callable[..., torch.Tensor], u: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, box: Box, *,
        steps: int = 10, alpha: float | torch.Tensor | None = None, norm: str = "linf", random_start: bool = True,
        generator: torch.Generator | None = None, extra: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Projected gradient descent (ascent on the loss) from ``u`` within the eps-ball (see the module
    docstring); ``eps`` and ``alpha`` may be per-sample tensors (N,). Returns the final iterate."""
    e = _per_sample(eps, u)
    a = _per_sample(alpha if alpha is not None else eps * (2.5 / steps), u)
    u = u.detach()
    adv = u.clone()
    if random_start:
        if norm == "linf":
            noise = torch.rand(u.shape, generator=generator, dtype=u.dtype).to(u.device)
            adv = box.clip(adv + (noise * 2 - 1) * e)
        else:
            n = torch.randn(u.shape, generator=generator, dtype=u.dtype).to(u.device)
            r = torch.rand((u.shape[0],) + (1,) * (u.dim() - 1), generator=generator, dtype=u.dtype).to(u.device)
            adv = box.clip(adv + n * (r / _l2(n)) * e)
    for _ in range(int(steps)):
        g, _, _ = loss_and_grad(f, adv, y, extra)
        if norm == "linf":
            stepped = adv + a * g.sign()
            delta = torch.clamp(stepped - u, min=-e, max=e)
        else:
            stepped = adv + a * g / (_l2(g) + L2_DIVISION_EPS)
            delta = stepped - u
            delta = delta * torch.clamp(e / _l2(delta), max=1.0)
        adv = box.clip(u + delta).detach()
    return adv
