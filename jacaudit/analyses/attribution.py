"""Attribution methods on a batch: vanilla gradient, gradient x input, SmoothGrad, Integrated Gradients.

Each method is one call of :func:`attribute` on the shared primitive (:func:`jacaudit.engine.gradients.
grouped_gradients`); it returns the signed, unreduced attribution in the input's shape (see
:mod:`jacaudit.analyses.saliency` for the methods' papers and settings). No files, no reporting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..engine.gradients import Scorer, grouped_gradients
from ..errors import InputError

__all__ = ["METHODS", "BASELINES", "Attribution", "attribute", "baseline_for"]

METHODS = ("grad", "gradxinput", "smoothgrad", "ig")
BASELINES = ("black", "blur", "noise", "zero")


# ---------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Attribution:
    method: str
    attr: torch.Tensor                     # (N, ...) signed, input's shape
    targets: torch.Tensor                  # (N,)
    ref_scores: torch.Tensor               # (N, K)
    ref_probs: torch.Tensor | None
    f_x: torch.Tensor | None = None        # IG: target score at x
    f_baseline: torch.Tensor | None = None  # IG: target score at the baseline
    grad: torch.Tensor | None = None       # the plain gradient at x (a by-product of every method)

    @property
    def completeness_gap(self) -> torch.Tensor | None:
        if self.f_x is None or self.f_baseline is None:
            return None
        diff = (self.f_x - self.f_baseline).double()
        s = self.attr.double().reshape(self.attr.shape[0], -1).sum(1)
        return (s - diff).abs() / diff.abs().clamp_min(1e-12)


def _range_of(x: torch.Tensor, preprocess: Any) -> torch.Tensor:
    """Per-element (broadcastable) input range: preprocessing's tensor range of 0..255 pixels, else per sample."""
    if preprocess is not None and x.dim() == 4:
        lo, hi = preprocess.value_range()
        r = torch.as_tensor(hi - lo, dtype=x.dtype)
        shape = [1, -1, 1, 1] if preprocess.layout == "NCHW" else [1, 1, 1, -1]
        if r.numel() == (x.shape[1] if preprocess.layout == "NCHW" else x.shape[3]):
            return r.reshape(shape)
    flat = x.reshape(x.shape[0], -1)
    r = (flat.max(1).values - flat.min(1).values).clamp_min(1e-12)
    return r.reshape([-1] + [1] * (x.dim() - 1))


def baseline_for(x: torch.Tensor, kind: str, preprocess: Any = None, seed: int = 0,
                 ids: Sequence[str] | None = None) -> torch.Tensor:
    """The IG baseline (same shape as x), see the module docstring. ``noise``: one numpy generator seeded with
    ``seed`` for the batch, or with ``ids`` (the inputs' stable ids) one per input, seeded from (seed, id)."""
    if kind == "noise" and ids is not None:
        from ..engine.attacks import stream_seed

        if len(ids) != x.shape[0]:
            raise InputError(f"{len(ids)} input ids for a batch of {x.shape[0]}")
        return torch.cat([baseline_for(x[k:k + 1], kind, preprocess, stream_seed(seed, "ig-noise", i))
                          for k, i in enumerate(ids)])
    if kind == "zero":
        return torch.zeros_like(x)
    img = preprocess is not None and x.dim() == 4
    if kind == "black":
        if not img:
            return torch.zeros_like(x)
        h, w = (x.shape[2], x.shape[3]) if preprocess.layout == "NCHW" else (x.shape[1], x.shape[2])
        b = preprocess.to_tensor(np.zeros((h, w, preprocess.n_channels)))
        return torch.as_tensor(b, dtype=x.dtype).expand_as(x).clone()
    if kind == "noise":
        g = np.random.default_rng(seed)
        if img:
            h, w = (x.shape[2], x.shape[3]) if preprocess.layout == "NCHW" else (x.shape[1], x.shape[2])
            arr = np.stack([preprocess.to_tensor(g.uniform(0, 255, size=(h, w, preprocess.n_channels)))
                            for _ in range(x.shape[0])])
            return torch.as_tensor(arr, dtype=x.dtype)
        flat = x.reshape(x.shape[0], -1)
        lo = flat.min(1).values.reshape([-1] + [1] * (x.dim() - 1))
        hi = flat.max(1).values.reshape([-1] + [1] * (x.dim() - 1))
        u = torch.as_tensor(g.uniform(0, 1, size=tuple(x.shape)), dtype=x.dtype)
        return lo + u * (hi - lo)
    if kind == "blur":
        if x.dim() != 4:
            raise InputError("the blur baseline needs an image input (rank 4)")
        nchw = preprocess is None or preprocess.layout == "NCHW"
        t = x if nchw else x.permute(0, 3, 1, 2)
        sigma = max(t.shape[2], t.shape[3]) / 10.0
        radius = max(1, int(3 * sigma))
        k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / sigma) ** 2)
        k = k / k.sum()
        c = t.shape[1]
        pad_h, pad_w = min(radius, t.shape[2] - 1), min(radius, t.shape[3] - 1)
        out = t
        if pad_w > 0:
            kw = k[radius - pad_w: radius + pad_w + 1]
            out = torch.nn.functional.pad(out, (pad_w, pad_w, 0, 0), mode="reflect")
            out = torch.nn.functional.conv2d(out, (kw / kw.sum()).reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        if pad_h > 0:
            kh = k[radius - pad_h: radius + pad_h + 1]
            out = torch.nn.functional.pad(out, (0, 0, pad_h, pad_h), mode="reflect")
            out = torch.nn.functional.conv2d(out, (kh / kh.sum()).reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        return out if nchw else out.permute(0, 2, 3, 1).contiguous()
    raise InputError(f"unknown IG baseline {kind!r}; use one of {', '.join(BASELINES)}")


def attribute(scorer: Scorer, x: torch.Tensor, method: str, *, targets: torch.Tensor | None = None,
              steps: int = 50, baseline: str | torch.Tensor = "black", samples: int = 25, sigma: float = 0.15,
              preprocess: Any = None, seed: int = 0, chunk_rows: int = 64,
              extra: dict[str, torch.Tensor] | None = None, ids: Sequence[str] | None = None) -> Attribution:
    """One method on a batch ``x`` (N, ...). ``targets`` (N,) fixes the classes; None = top-1 per sample.

    Random numbers (SmoothGrad's noise, the ``noise`` IG baseline): with ``ids`` (the inputs' stable ids) each
    input's own, seeded from (``seed``, its id) (:func:`jacaudit.engine.attacks.stream_seed`; SmoothGrad:
    ``randn((samples, *sample shape))`` from a CPU generator per input), so they do not depend on the batch;
    without, one generator seeded with ``seed`` for the batch."""
    x = x.detach()
    n = x.shape[0]
    if not x.is_floating_point():
        raise InputError(f"saliency needs a float input; {scorer.input_name!r} is {x.dtype}")
    if method in ("grad", "gradxinput"):
        gg = grouped_gradients(scorer, x, 1, targets, chunk_rows, extra)
        attr = gg.grads if method == "grad" else gg.grads * x
        return Attribution(method, attr, gg.targets, gg.ref_scores, gg.ref_probs, grad=gg.grads)
    if method == "smoothgrad":
        if samples < 1:
            raise InputError(f"SmoothGrad samples must be at least 1 (got {samples})")
        std = sigma * _range_of(x, preprocess)
        if ids is not None:
            from ..engine.attacks import stream_seed

            if len(ids) != n:
                raise InputError(f"{len(ids)} input ids for a batch of {n}")
            draws = [torch.randn((samples,) + tuple(x.shape[1:]), dtype=x.dtype,
                                 generator=torch.Generator().manual_seed(stream_seed(seed, "smoothgrad", i)))
                     for i in ids]
            noise = torch.stack(draws) * std.unsqueeze(1)
        else:
            gen = torch.Generator().manual_seed(int(seed))
            noise = torch.randn((n, samples) + tuple(x.shape[1:]), generator=gen, dtype=x.dtype) * std.unsqueeze(1)
        rows = torch.cat([x.unsqueeze(1), x.unsqueeze(1) + noise], dim=1).reshape((n * (samples + 1),) + x.shape[1:])
        gg = grouped_gradients(scorer, rows, samples + 1, targets, chunk_rows, extra)
        g = gg.grads.reshape((n, samples + 1) + tuple(x.shape[1:]))
        return Attribution(method, g[:, 1:].mean(1), gg.targets, gg.ref_scores, gg.ref_probs, grad=g[:, 0])
    if method == "ig":
        if steps < 1:
            raise InputError(f"IG steps must be at least 1 (got {steps})")
        b = baseline if isinstance(baseline, torch.Tensor) else baseline_for(x, baseline, preprocess, seed, ids)
        b = b.to(x.dtype).expand_as(x)
        # row order per sample: alpha = 1 (the reference), alpha = 0, then the interior points
        alphas = torch.cat([torch.tensor([1.0, 0.0]), torch.arange(1, steps, dtype=torch.float64) / steps])
        w = torch.full((steps + 1,), 1.0 / steps, dtype=torch.float64)
        w[:2] = 0.5 / steps
        a = alphas.to(x.dtype).reshape((1, -1) + (1,) * (x.dim() - 1))
        rows = (b.unsqueeze(1) + a * (x - b).unsqueeze(1)).reshape((n * (steps + 1),) + x.shape[1:])
        gg = grouped_gradients(scorer, rows, steps + 1, targets, chunk_rows, extra)
        g = gg.grads.reshape((n, steps + 1) + tuple(x.shape[1:]))
        avg = torch.einsum("s,ns...->n...", w.to(g.dtype), g)  # trapezoid weights, no float64 copy of g
        attr = (x - b) * avg
        sc = gg.scores.reshape(n, steps + 1)
        return Attribution(method, attr, gg.targets, gg.ref_scores, gg.ref_probs, f_x=sc[:, 0], f_baseline=sc[:, 1],
                           grad=g[:, 0])
    raise InputError(f"unknown saliency method {method!r}; use one of {', '.join(METHODS)} or all")


