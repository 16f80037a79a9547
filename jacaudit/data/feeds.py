"""Feeds for one evaluation point: every model input filled from a data file, or seeded synthetic values.

``jacobian`` and ``verify`` (and the Python API) take one sample: :func:`load_feeds` reads it and fills the other
inputs. Nothing is printed: what a user should know comes back in ``Feeds.notes`` (the CLI shows them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["Feeds", "load_feeds", "parse_shape"]


@dataclass
class Feeds:
    feeds: dict            # input name -> torch tensor, batch axis 1
    input_name: str        # the input the data file (or the synthetic values) fed
    synthetic: bool
    source: str            # the file, or "synthetic"
    notes: list[str] = field(default_factory=list)      # said to the user (info)
    warnings: list[str] = field(default_factory=list)   # go into the report


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise InputError(f"cannot read the shape {text!r}; use e.g. 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"the shape {text!r} must list positive sizes")
    return dims


def load_feeds(model: Any, input: str | None, *, input_name: str | None = None, seed: int = 0,
               shape: str | None = None, preprocess: dict[str, Any] | None = None) -> Feeds:
    """One sample (batch axis 1) for every model input; synthetic (seeded) where no file is given.

    ``preprocess`` holds the keyword arguments of :meth:`jacaudit.data.Preprocess.infer` for image files."""
    import torch

    from .. import data as D

    spec = model.input_spec(input_name)
    full_shape = parse_shape(shape)
    fill = None
    if full_shape is not None and spec.shape is not None:
        if len(full_shape) != len(spec.shape):
            raise InputError(f"the shape has {len(full_shape)} dims; input {spec.name!r} has {len(spec.shape)}")
        fill = {d: v for d, v in zip(spec.shape, full_shape) if not (isinstance(d, int) and d > 0)}
        fill = {k: v for k, v in fill.items() if k is not None} or full_shape[0]
    pp_kw = dict(preprocess or {})
    try:
        pp = D.Preprocess.infer(spec.shape, preset=pp_kw.get("preset"), size=D.parse_size(pp_kw.get("size")),
                                mean=D.parse_floats(pp_kw.get("mean")), std=D.parse_floats(pp_kw.get("std")),
                                scale=pp_kw.get("scale"), layout=pp_kw.get("layout"),
                                channels=pp_kw.get("channels"))
    except Exception:
        if input is not None and D.is_image_path(input):
            raise
        pp = None
    notes: list[str] = []
    warnings: list[str] = []
    extra: dict[str, np.ndarray] = {}
    if input is not None and spec.shape is None and input.lower().endswith((".npy", ".npz")):
        # no declared shape (TorchScript): the array is the whole input, batch axis included
        sample = D.load_arrays(input, None, [spec.name])[0]
        feeds = {spec.name: torch.from_numpy(np.ascontiguousarray(sample.array))}
        for k, v in sample.extra.items():
            feeds[k] = torch.from_numpy(np.ascontiguousarray(v))
        return Feeds(feeds, spec.name, False, input, notes, warnings + _stateless(model, feeds))
    if input is not None:
        samples = D.load_sample(input, pp, spec) if pp is not None else D.load_arrays(input, spec)
        if len(samples) > 1:
            warnings.append(f"{input} holds {len(samples)} samples; the first was used")
        s = samples[0]
        arr = s.array
        extra = dict(s.extra)
        source = input
    else:
        if spec.shape is None and full_shape is not None and len(full_shape) < 2:
            raise InputError(f"the shape includes the batch dimension: e.g. 1,{full_shape[0]} for one sample of "
                             f"{full_shape[0]} values")
        if spec.shape is None and full_shape is not None:
            arr = np.random.default_rng(seed).standard_normal(full_shape[1:]).astype(np.float32)
        elif spec.shape is None:
            raise InputError(f"input {spec.name!r} has no declared shape: give an input file or a shape")
        else:
            arr = D.synthetic_sample(spec, seed=seed, preprocess=pp, fill=fill).array
        source = "synthetic"
        notes.append(f"no input file: a seeded random input of shape {(1, *arr.shape)} (synthetic, seed {seed})")
        warnings.append("the input is synthetic (seeded random values from the declared shape)")
    feeds = {spec.name: torch.from_numpy(np.ascontiguousarray(arr)[None])}
    for k, v in extra.items():
        feeds[k] = torch.from_numpy(np.ascontiguousarray(v)[None])
    for other in model.inputs:
        if other.name not in feeds:
            if other.shape is None:
                raise InputError(f"input {other.name!r} is not in {input or 'the input'} and has no declared "
                                 "shape; give it in an .npz")
            a = D.synthetic_sample(other, seed=seed + 1).array
            feeds[other.name] = torch.from_numpy(np.ascontiguousarray(a)[None])
            warnings.append(f"input {other.name!r}: seeded random values (synthetic)")
    return Feeds(feeds, spec.name, input is None, source, notes, warnings + _stateless(model, feeds))


def _stateless(model: Any, feeds: dict) -> list[str]:
    """A model keeping state between calls: derivatives describe one call (said, never hidden)."""
    check = getattr(model, "check_stateless", None)
    msg = check(feeds) if check is not None else None
    return [msg] if msg else []
