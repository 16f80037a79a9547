"""PGD, projected gradient descent on the negative loss (Madry et al. 2018, "Towards deep learning models resistant
to adversarial attacks", ICLR), in the L-inf and L2 balls, with a seeded random start (recipes in
:mod:`jacaudit.engine.attacks`).

Shapes: ``u`` (N, *sample shape) in attack units, ``y`` (N,) labels; ``eps`` / ``alpha`` floats or per-sample (N,)
tensors. Returns the final iterate, detached.
"""
from __future__ import annotations

from typing import Callable

import torch

from .base import Box, l2_norms, loss_and_grad, per_sample

__all__ = ["pgd", "L2_DIVISION_EPS"]

#: added to ||grad|| before the L2 step (torchattacks' ``eps_for_division``)
L2_DIVISION_EPS = 1e-10


def pgd(f: Callable[..., torch.Tensor], u: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, box: Box, *,
        steps: int = 10, alpha: float | torch.Tensor | None = None, norm: str = "linf", random_start: bool = True,
        generator: torch.Generator | None = None, extra: dict[str, torch.Tensor] | None = None,
        noise: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Projected gradient descent (ascent on the loss) from ``u`` within the eps-ball (see the module
    docstring); ``eps`` and ``alpha`` may be per-sample tensors (N,). The random start's numbers are ``noise``
    when given (:func:`~jacaudit.engine.attacks.base.input_noise`: per input), else drawn from ``generator``
    for the whole batch. Returns the final iterate."""
    e = per_sample(eps, u)
    a = per_sample(alpha if alpha is not None else eps * (2.5 / steps), u)
    u = u.detach()
    adv = u.clone()
    if random_start:
        if norm == "linf":
            if noise is None:
                noise = torch.rand(u.shape, generator=generator, dtype=u.dtype)
            adv = box.clip(adv + (noise.to(u.device) * 2 - 1) * e)
        else:
            if noise is None:
                n = torch.randn(u.shape, generator=generator, dtype=u.dtype)
                r = torch.rand((u.shape[0],) + (1,) * (u.dim() - 1), generator=generator, dtype=u.dtype)
            else:
                n, r = noise
            n, r = n.to(u.device), r.to(u.device)
            adv = box.clip(adv + n * (r / l2_norms(n)) * e)
    for _ in range(int(steps)):
        g, _, _ = loss_and_grad(f, adv, y, extra)
        if norm == "linf":
            stepped = adv + a * g.sign()
            delta = torch.clamp(stepped - u, min=-e, max=e)
        else:
            stepped = adv + a * g / (l2_norms(g) + L2_DIVISION_EPS)
            delta = stepped - u
            delta = delta * torch.clamp(e / l2_norms(delta), max=1.0)
        adv = box.clip(u + delta).detach()
    return adv
