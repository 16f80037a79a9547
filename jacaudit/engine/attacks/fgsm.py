"""FGSM, the fast gradient sign method (Goodfellow, Shlens & Szegedy 2015, "Explaining and harnessing adversarial
examples", ICLR): one step of size eps along the sign of the loss gradient, clipped to the valid range.

Shapes: ``u`` and ``grad`` (N, *sample shape) in attack units; ``eps`` a float or a per-sample (N,) tensor.
"""
from __future__ import annotations

import torch

from .base import Box, per_sample

__all__ = ["fgsm"]


def fgsm(u: torch.Tensor, grad: torch.Tensor, eps: float | torch.Tensor, box: Box) -> torch.Tensor:
    """``clip(u + eps * sign(grad))``."""
    return box.clip(u + per_sample(eps, u) * grad.sign())
