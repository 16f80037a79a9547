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
