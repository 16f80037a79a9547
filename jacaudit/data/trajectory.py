"""Trajectories of inputs for ``jacaudit geometry``: an array with one input per row (joint configurations over
time), or a straight line between two inputs.

Each row is one input as the model takes it: when the model declares one axis more than a row has (a batch
axis), a batch axis of 1 is added; a model that declares no shape (TorchScript) gets a batch axis of 1 too
(said in the notes)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError, InputError

__all__ = ["Trajectory", "load_trajectory", "line_trajectory", "parse_point"]


@dataclass
class Trajectory:
    points: list[Any]                 # torch tensors, each of the shape the model is run on
    labels: list[str]
    tpos: list[float] | None          # position along a line (0..1), None for an array
    source: str                       # "trajectory" | "line"
    detail: str
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.points[0].shape)


def _row_shape(row: np.ndarray, spec: Any, notes: list[str], where: str) -> tuple[int, ...]:
    shp = getattr(spec, "shape", None)
    if shp is None:
        notes.append(f"{where}: the model declares no input shape; each row of shape {row.shape} is run with a "
                     "batch axis of 1")
        return (1, *row.shape)
    if len(shp) == row.ndim + 1:
        return (1, *row.shape)
    if len(shp) == row.ndim:
        return tuple(row.shape)
    raise DataError(f"{where}: a row has shape {row.shape}; input {spec.name!r} has rank {len(shp)}: give one "
                    "input per row (an array of shape (N, *input_shape_without_batch))")


def _dtype(a: np.ndarray, spec: Any):
    import torch

    dt = getattr(spec, "dtype", None)
    if a.dtype.kind not in "fiu":
        raise DataError(f"array of dtype {a.dtype} cannot be a float input")
    if dt is None:
        return torch.float64 if a.dtype == np.float64 else torch.float32
    return dt if dt.is_floating_point else torch.float32


def _tensors(rows: np.ndarray, spec: Any, notes: list[str], where: str) -> list[Any]:
    import torch

    shp = _row_shape(rows[0], spec, notes, where)
    dt = _dtype(rows, spec)
    return [torch.from_numpy(np.ascontiguousarray(r)).reshape(shp).to(dt) for r in rows]


def load_trajectory(path: str, spec: Any) -> Trajectory:
    """Rows of an .npy (or a CSV of numbers): one input each."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    try:
        a = np.loadtxt(path, delimiter=",", ndmin=2) if path.lower().endswith(".csv") else \
            np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read the trajectory ({str(e).splitlines()[0] if str(e) else e})") from None
    if not isinstance(a, np.ndarray) or a.ndim < 1 or len(a) == 0:
        raise DataError(f"{path}: the trajectory must be an array with one input per row")
    if a.ndim == 1:
        a = a[:, None]
    from . import check_finite

    check_finite(a, path)
    notes: list[str] = []
    pts = _tensors(a, spec, notes, path)
    return Trajectory(pts, [f"#{i}" for i in range(len(pts))], None, "trajectory",
                      f"{path} ({len(pts)} inputs)", notes)


def parse_point(text: str, where: str) -> np.ndarray:
    """An input given as a file (.npy) or as comma-separated numbers."""
    if os.path.exists(text) or text.lower().endswith(".npy"):
        if not os.path.exists(text):
            raise DataError(f"{text}: no such file")
        try:
            a = np.asarray(np.load(text, allow_pickle=False))
        except Exception as e:
            raise DataError(f"{text}: cannot read array ({str(e).splitlines()[0] if str(e) else e})") from None
    else:
        try:
            a = np.array([float(v) for v in text.replace(";", ",").split(",") if v.strip()], dtype=np.float64)
        except ValueError:
            raise InputError(f"{where}: {text!r} is neither an .npy file nor comma-separated numbers") from None
    from . import check_finite

    check_finite(a, f"{where} {text}")
    return a


def line_trajectory(a_text: str, b_text: str, steps: int, spec: Any) -> Trajectory:
    """``steps`` inputs evenly spaced on the segment from A to B (both ends included)."""
    if steps < 2:
        raise InputError("a line needs at least 2 steps")
    a, b = parse_point(a_text, "line start"), parse_point(b_text, "line end")
    if a.shape != b.shape:
        raise InputError(f"the line's ends have shapes {a.shape} and {b.shape}; they must match")
    if a.ndim == 0:
        a, b = a[None], b[None]
    ts = np.linspace(0.0, 1.0, steps)
    rows = np.stack([a + (b - a) * t for t in ts])
    rows[-1] = b
    notes: list[str] = []
    pts = _tensors(rows, spec, notes, "line")
    return Trajectory(pts, [f"#{i}" for i in range(steps)], [float(t) for t in ts], "line",
                      f"line from {a_text} to {b_text} in {steps} steps", notes)
