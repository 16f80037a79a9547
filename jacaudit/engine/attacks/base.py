"""The attack base: the attack space (:class:`Box`), the attacked objective (:class:`Objective`), the summed
cross-entropy's gradient, the margin, and per-sample broadcasting. The recipes are in :mod:`jacaudit.engine.attacks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["Box", "Objective", "loss_and_grad", "margin", "per_sample", "l2_norms", "stream_seed", "input_noise"]


def stream_seed(seed: int, stream: str, input_id: str) -> int:
    """The seed of one input's random numbers in one use (``stream``, e.g. ``pgd-linf/2``): a 63-bit integer
    from BLAKE2b of the run seed, the stream and the input's stable id. It depends on nothing else (not on the
    batch, the worker or the order inputs are computed in), so a sharded run draws what one process draws."""
    import hashlib

    h = hashlib.blake2b(f"{int(seed)}\x1f{stream}\x1f{input_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def input_noise(ids: "list[str]", seed: int, stream: str, shape: tuple[int, ...], dtype: torch.dtype,
                norm: str = "linf") -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
    """PGD's random start per input, stacked (N, *shape), each input from its own CPU generator seeded with
    :func:`stream_seed`: ``rand`` (L-inf), or ``randn`` then one ``rand`` (L2: direction and radius)."""
    rs, ns = [], []
    for i in ids:
        g = torch.Generator(device="cpu").manual_seed(stream_seed(seed, stream, i))
        if norm == "linf":
            rs.append(torch.rand(shape, generator=g, dtype=dtype))
        else:
            ns.append(torch.randn(shape, generator=g, dtype=dtype))
            rs.append(torch.rand((1,) * len(shape), generator=g, dtype=dtype))
    if norm == "linf":
        return torch.stack(rs)
    return torch.stack(ns), torch.stack(rs)

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


def per_sample(v: float | torch.Tensor, u: torch.Tensor) -> torch.Tensor | float:
    if isinstance(v, torch.Tensor):
        return v.to(device=u.device, dtype=u.dtype).reshape((-1,) + (1,) * (u.dim() - 1))
    return v


def l2_norms(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(p=2, dim=1).reshape((-1,) + (1,) * (t.dim() - 1))
