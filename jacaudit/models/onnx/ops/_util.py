"""Small helpers shared by op modules."""
from __future__ import annotations

from typing import Any, Sequence

import torch


def ints(t: Any) -> list[int]:
    """An int list from a shape-like input (tensor, list, or None -> [])."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def axis(a: int, rank: int) -> int:
    """Normalise a possibly-negative axis."""
    return a + rank if a < 0 else a


def axes(a: Sequence[int], rank: int) -> list[int]:
    return [axis(int(x), rank) for x in a]


def clamp_closed(x: torch.Tensor, lo: Any = None, hi: Any = None) -> torch.Tensor:
    """``Min(hi, Max(x, lo))`` for a floating ``x`` (ONNX Clip: ``numpy.clip`` values; ``lo > hi`` gives ``hi``;
    NaN stays NaN), with a derivative that is jacaudit's convention and not one torch release's.

    Convention (the kinks of Clip, ReLU6, HardSigmoid, ...): ``d/dx = 1`` on the closed interval
    ``lo <= x <= hi`` -- a value exactly at a bound passes the gradient, as TensorFlow's ``clip_by_value`` and
    ``torch.clamp`` up to torch 2.13 do -- and 0 outside; ``d/dlo = 1`` where ``x < lo``, ``d/dhi = 1`` where
    the result would exceed ``hi``. (ONNX defines no derivative.) ``torch.clamp`` is not used for this: from
    torch 2.14 its derivative at a bound is 0.5 with tensor bounds and 0 with number bounds. Two ``where``
    define the derivative in reverse mode, forward mode and under vmap alike. ``lo``/``hi``: a tensor
    broadcastable to ``x`` (0-d typically), a Python number, or None (no bound).
    """
    y = x
    if lo is not None:
        y = torch.where(x < lo, lo, x)  # NaN < lo is False: NaN stays
    if hi is not None:
        y = torch.where(y > hi, hi, y)
    return y
