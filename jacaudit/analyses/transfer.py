"""Which learned features carry over to new data: per-feature Jacobian sensitivity scores.

``transfer(model, source, options, target=None) -> AnalysisOutput``; ``source`` / ``target`` are
:class:`jacaudit.data.dataset.LabelledData` (labels are not used).

Input features
    For each input feature j (a column of a (batch, features) input, or a channel of an image, its elements
    pooled) and each output k: ``mean |dy_k/dx_j|`` over the samples (and the feature's elements), and the
    scale-free ``mean |dy_k/dx_j| * std(x_j)``. Aggregated over the outputs: the same with ``|dy_k/dx_j|``
    replaced by the L2 norm over k of ``dy_k/dx_j`` (the column norm of J). Exact per-sample gradients, one
    reverse pass per output per batch (samples are independent); ``y`` are the logits when the model ends in a
    Softmax. With more than ``max_outputs`` outputs only the predicted class's score is differentiated.

Intermediate features (``layers``: tensor names; the model must expose internal tensors)
    For a layer ``h = g(x)`` and a feature ``k`` (a slice along ``feature_axis``: a channel of (N, C, H, W), a
    unit of (N, C)) with ``m_k`` elements:

    * ``gradient_rms_k = sqrt(E_x ||dh_k/dx||_F^2 / m_k)`` -- estimated without materialising a Jacobian:
      ``||J_k||_F^2 = E_v ||J_k v||^2`` for Rademacher probes ``v`` of the input (Hutchinson), and one jvp ``J v``
      gives every feature of every named layer at once; unbiased for the squared norm, with its standard error
      over the probes. When the input has no more elements than the probe count, the input basis is used instead
      (``method="exact"``); a layer of single-element features (an (N, C) tensor, at most 4 x probes units) is
      exact by one vjp per unit (``"exact per unit"``): there a Hutchinson estimate of a rank-one Jacobian is at its
      noisiest (relative standard error of the squared norm ~ sqrt(2 / (samples x probes))).
    * ``sensitivity_k = gradient_rms_k * sigma_x / std(h_k)``, ``sigma_x^2 = tr Cov(x) / n`` the data's mean
      per-element variance: the RMS first-order change of ``h_k`` under isotropic input noise of the data's own
      spread, in units of ``h_k``'s spread over the data. Dimensionless and invariant to rescaling ``h_k`` or
      ``x``; exactly 1 for a linear feature of isotropic data, below 1 for a feature that follows the data's
      main directions of variation, large for one that reacts to directions the data does not vary in (or
      swings faster than the data moves): brittle, specialised.
    * ``influence_k = E_x sum_{e in k} |dy/dh_e|`` with ``y`` the predicted class's score and ``h`` overridden
      (a vjp with respect to the internal tensor); ``influence_scaled_k = influence_k * std(h_k)``.

    Verdict (:class:`~jacaudit.results.transfer.VerdictRule`): *dead* when ``std(h_k)`` or ``gradient_rms_k``
    is zero within ``dead_tolerance`` of the layer's median; else *over-specialised* when ``sensitivity_k``
    exceeds ``overspecialised_above``; else *reusable*. ``borderline`` marks estimates within two standard errors
    of the threshold.

Layer sweep (``layers`` holding ``"all"``)
    :func:`main_path_layers`: the main path's stage outputs, found by evaluating the model (a tensor is on the main
    path when overriding it with its value at another input gives that input's scores; the last tensor of each run
    of same-shaped main-path tensors is kept), scored like named layers: the scores per depth.

Jacobian attention maps (``attention_wrt``, optionally ``attention_out``)
    :func:`attention_maps`: per-input-position influence ``||dy/de[t]||`` w.r.t. a [batch, positions, features]
    tensor (the embedding output when the inputs are token ids: then no input-feature scores), and the
    position-to-position map ``A[t_out, t_in] = ||dh[t_out]/de[t_in]||_F`` to a later tensor.

Domain shift (``target``)
    The same scores on the target data (each dataset with its own ``sigma_x``; the same probe sequence on both, so
    the estimator's noise largely cancels in the ratios); per feature the standardised mean
    difference, the log ratios of the std and of the sensitivity, and their largest magnitude (the shift); the
    most shifted first; per layer the median shift and the share above ``shift_above``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..gate import Metric
from ..results.transfer import (AttentionMaps, AttentionRow, EstimatorNote, FeatureScore, FeatureShift, InputFeature, InputSensitivity,
                                LayerResult, LayerScores, LayerShift, TransferResult, VerdictRule)
from .base import AnalysisOutput

__all__ = ["TransferOptions", "transfer", "input_sensitivity", "layer_statistics", "LayerStats"]


@dataclass(frozen=True)
class TransferOptions:
    layers: tuple[str, ...] = ()
    #: axis of the features in each layer tensor (batch axis = 0); negative counts from the end; None: the last
    #: axis for an image model laid out NHWC, else 1 (NCHW, (N, C))
    feature_axis: int | None = None
    probes: int = 16
    batch_size: int = 32
    seed: int = 0
    max_outputs: int = 16
    #: Jacobian attention maps: a [batch, positions, features] tensor to differentiate with respect to, and
    #: optionally a later [batch, positions', features'] tensor for the position-to-position map
    attention_wrt: str | None = None
    attention_out: str | None = None
    attention_rows: int = 8
    feature_names: tuple[str, ...] | None = None
    classes: tuple[str, ...] | None = None
    use_logits: bool = True
    input_name: str | None = None
    output: str | None = None
    # the verdict rule
    overspecialised_above: float = 2.0
    dead_tolerance: float = 1e-6
    shift_above: float = 0.5
    freeze_reusable: float = 0.75
    finetune_overspecialised: float = 0.25
    retrain_dead: float = 0.5


def _batches(n: int, b: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + b)) for s in range(0, n, b)]


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def _feeds(model: Any, data: Any, main: str, fixed: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, dict]:
    from .. import data as D

    samples = data.samples
    n = len(samples)
    x = D.stack(samples, device=model.device, dtype=model.dtype)
    extra: dict[str, torch.Tensor] = {}
    for k in sorted({k for s in samples for k in s.extra}):
        if any(k not in s.extra for s in samples):
            raise InputError(f"input {k!r} is given for some samples only")
        extra[k] = torch.stack([torch.as_tensor(s.extra[k]) for s in samples]).to(model.device)
    for k, v in (fixed or {}).items():
        if k not in extra:
            v = v.to(model.device)
            extra[k] = v.expand((n,) + tuple(v.shape[1:])) if v.dim() and v.shape[0] == 1 else \
                v[None].expand((n,) + tuple(v.shape))
    missing = [s.name for s in model.inputs if s.name != main and s.name not in extra]
    if missing:
        raise InputError(f"the model has other inputs without data: {', '.join(missing)}")
    return x, extra


def input_scale(x: torch.Tensor) -> float:
    """sigma_x: sqrt(tr Cov(x) / n), the mean per-element variance of the samples (rows of ``x``)."""
    if x.shape[0] < 2:
        raise InputError("the data needs at least 2 samples (feature spreads are measured over it)")
    flat = x.detach().double().reshape(x.shape[0], -1)
    return float(flat.var(dim=0, unbiased=True).mean().sqrt())


# ---------------------------------------------------------------------------------------------------------
# Input features
# ---------------------------------------------------------------------------------------------------------
def _groups(x: torch.Tensor, channel_axis: int | None) -> tuple[str, torch.Tensor]:
    """(kind, x moved to (N, F, e)): the features of the input and their elements."""
    if x.dim() == 2:
        return "features", x[:, :, None]
    ax = channel_axis if channel_axis is not None else 1
    return "channels", x.movedim(ax, 1).reshape(x.shape[0], x.shape[ax], -1)


def input_sensitivity(scorer: Any, x: torch.Tensor, extra: dict[str, torch.Tensor], *, names: Sequence[str] | None,
                      classes: Sequence[str] | None, max_outputs: int, batch: int, channel_axis: int | None = None
                      ) -> tuple[InputSensitivity, torch.Tensor]:
    """Global sensitivity of the scores to each input feature over the rows of ``x`` (see the module docstring).
    Returns it and the predicted class per row."""
    n = x.shape[0]
    kind, xg = _groups(x, channel_axis)
    F = xg.shape[1]
    std = xg.detach().double().transpose(0, 1).reshape(F, -1).std(dim=1, unbiased=True)
    sum_abs: torch.Tensor | None = None        # (K, F) sums of |g| over rows and elements
    sum_agg = torch.zeros(F, dtype=torch.float64)
    preds = torch.empty(n, dtype=torch.long)
    K = None
    single = False
    for s, e in _batches(n, batch):
        xb = x[s:e].detach().clone().requires_grad_(True)
        ex = {k: v[s:e] for k, v in extra.items()}
        with torch.enable_grad():
            sc, _ = scorer(xb, ex)
            if K is None:
                K = int(sc.shape[1])
                single = K > max_outputs
                sum_abs = torch.zeros(1 if single else K, F, dtype=torch.float64)
            pb = sc.detach().argmax(1)
            preds[s:e] = pb.cpu()
            rows = [sc.gather(1, pb[:, None]).sum()] if single else [sc[:, k].sum() for k in range(K)]
            sq = torch.zeros(e - s, F, xg.shape[2], dtype=torch.float64)
            for k, r in enumerate(rows):
                (g,) = torch.autograd.grad(r, xb, retain_graph=k < len(rows) - 1, allow_unused=True)
                g = torch.zeros_like(xb) if g is None else g
                _, gg = _groups(g, channel_axis)
                gg = gg.detach().double().cpu()
                sum_abs[k] += gg.abs().sum(dim=(0, 2))
                sq += gg.pow(2)
            sum_agg += sq.sqrt().sum(dim=(0, 2))
    assert sum_abs is not None and K is not None
    count = n * xg.shape[2]
    mean_abs = sum_abs / count
    agg = sum_agg / count
    std_l = [float(v) for v in std]
    if names is not None and len(names) != F:
        raise InputError(f"{len(names)} feature names for {F} {kind} of the input")
    fnames = list(names) if names is not None else [f"{'feature' if kind == 'features' else 'channel'} {j}"
                                                    for j in range(F)]
    if single:
        outs = ["predicted class"]
        rule = (f"the model scores {K} outputs, more than {max_outputs}: only each sample's predicted class is "
                "differentiated")
    else:
        outs = [classes[k] if classes and len(classes) == K else str(k) for k in range(K)]
        rule = f"every output ({K})"
    scaled = [float(agg[j]) * std_l[j] for j in range(F)]
    order = sorted(range(F), key=lambda j: (-scaled[j], j))
    rank = {j: r + 1 for r, j in enumerate(order)}
    feats = [InputFeature(fnames[j], j, std_l[j], float(agg[j]), scaled[j],
                          [float(mean_abs[k, j]) for k in range(mean_abs.shape[0])],
                          [float(mean_abs[k, j]) * std_l[j] for k in range(mean_abs.shape[0])], rank[j])
             for j in order]
    raw = [fnames[j] for j in sorted(range(F), key=lambda j: (-float(agg[j]), j))]
    method = "exact per-sample gradients: one reverse pass per output per batch"
    return InputSensitivity(kind, outs, rule, method, n, feats, raw), preds


# ---------------------------------------------------------------------------------------------------------
# Intermediate features
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Raw per-feature statistics of one layer over one dataset (float64, CPU)."""

    tensor: str
    shape: tuple[int, ...]
    axis: int
    mean: torch.Tensor            # (C,)
    std: torch.Tensor             # (C,)
    grad_sq: torch.Tensor         # (C,) E_x ||dh_k/dx||_F^2 / m_k
    grad_sq_se: torch.Tensor      # (C,) its standard error
    influence: torch.Tensor       # (C,) E_x sum_e |dy/dh_e|
    m: int
    method: str
    probes: int


def _features(h: torch.Tensor, axis: int) -> torch.Tensor:
    """(N, ...) -> (N, C, m): the features along ``axis`` and their elements."""
    return h.movedim(axis, 1).reshape(h.shape[0], h.shape[axis], -1)


def _jvp(f: Callable, x: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """J v for every output of ``f`` (forward mode; the double-vjp trick where forward mode is not supported)."""
    try:
        return list(torch.func.jvp(f, (x,), (v,))[1])
    except Exception:
        xr = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            ys = f(xr)
            us = [torch.zeros_like(y, requires_grad=True) for y in ys]
            (g,) = torch.autograd.grad(ys, xr, us, create_graph=True, allow_unused=True)
            if g is None:
                return [torch.zeros_like(y) for y in ys]
            ts = torch.autograd.grad(g, us, v, allow_unused=True)
        return [torch.zeros_like(y) if t is None else t.detach() for t, y in zip(ts, ys)]


def layer_statistics(model: Any, x: torch.Tensor, extra: dict[str, torch.Tensor], layers: Sequence[str],
                     preds: torch.Tensor, *, input_name: str, output: str | None, use_logits: bool,
                     feature_axis: int, probes: int, seed: int, batch: int, max_exact_units: int | None = None,
                     progress: Callable[[int], None] | None = None) -> list[LayerStats]:
    """Per-feature mean, std, input-gradient energy and influence for each layer. The energy is exact on the input
    basis when the input has no more elements than ``probes``; exact by one vjp per unit for a layer of single-
    element features (an (N, C) tensor) with at most ``max_exact_units`` units (default 4 x probes: at most ~4x
    the probes' cost); else Hutchinson."""
    from ..engine.gradients import grouped_gradients, make_scorer

    n = x.shape[0]
    n_in = int(np.prod(x.shape[1:]))
    exact = n_in <= probes
    P = n_in if exact else probes
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    L = len(layers)
    sums: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    sumsq: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    q_sum: list[torch.Tensor] = [None] * L  # type: ignore[list-item]   # per feature: sum over rows of mean_p q
    q_var: list[torch.Tensor] = [None] * L  # type: ignore[list-item]   # sum over rows of var_p(q) / P
    infl: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    shapes: list[tuple[int, ...]] = []
    axes: list[int] = []
    scorers = [make_scorer(model, input_name, output, use_logits=use_logits, wrt=t) for t in layers]
    for s, e in _batches(n, batch):
        xb = x[s:e].detach()
        ex = {k: v[s:e] for k, v in extra.items()}
        feeds = {input_name: xb, **ex}
        with torch.no_grad():
            hs = model.run(feeds, outputs=list(layers))
        if not shapes:
            for t, h in zip(layers, hs):
                if not isinstance(h, torch.Tensor) or not h.is_floating_point():
                    raise InputError(f"layer {t!r} is {getattr(h, 'dtype', type(h).__name__)}, not a float tensor")
                if h.dim() < 2 or h.shape[0] != xb.shape[0]:
                    raise InputError(f"layer {t!r} has shape {tuple(h.shape)}: not (batch, features, ...) with "
                                     f"the batch axis first (a batch of {xb.shape[0]} gave {h.shape[0] if h.dim() else 0})")
                ax = feature_axis if feature_axis >= 0 else h.dim() + feature_axis
                if not 1 <= ax < h.dim():
                    raise InputError(f"feature axis {feature_axis} is not an axis after the batch axis of layer "
                                     f"{t!r} (shape {tuple(h.shape)})")
                shapes.append(tuple(int(d) for d in h.shape[1:]))
                axes.append(ax)
            for i in range(L):
                C = shapes[i][axes[i] - 1]
                sums[i], sumsq[i], q_sum[i], q_var[i], infl[i] = (torch.zeros(C, dtype=torch.float64)
                                                                   for _ in range(5))
            cap = 4 * probes if max_exact_units is None else max_exact_units
            per_unit = [not exact and int(np.prod(shapes[i])) == shapes[i][axes[i] - 1] <= cap for i in range(L)]
        if s == 0:  # sums are taken about the first batch's means (no cancellation when mean >> std)
            shift = [_features(h.detach(), axes[i]).double().cpu().mean(dim=(0, 2)) for i, h in enumerate(hs)]
        for i, h in enumerate(hs):
            hf = _features(h.detach(), axes[i]).double().cpu() - shift[i][None, :, None]
            sums[i] += hf.sum(dim=(0, 2))
            sumsq[i] += hf.pow(2).sum(dim=(0, 2))

        def f(xi: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(model.run({input_name: xi, **ex}, outputs=list(layers)))

        unit_layers = [i for i in range(L) if per_unit[i]]
        if unit_layers:  # (N, C) layers: one vjp per unit gives every sample's exact gradient (samples independent)
            xr = xb.clone().requires_grad_(True)
            with torch.enable_grad():
                outs = model.run({input_name: xr, **ex}, outputs=[layers[i] for i in unit_layers])
                for i, hu in zip(unit_layers, outs):
                    hu = _features(hu, axes[i])[:, :, 0]
                    for k in range(hu.shape[1]):
                        (g,) = torch.autograd.grad(hu[:, k].sum(), xr, retain_graph=True, allow_unused=True)
                        if g is not None:
                            q_sum[i][k] += float(g.detach().double().pow(2).sum())
        qs: list[list[torch.Tensor]] = [[] for _ in range(L)]  # per layer: P tensors (B, C)
        for p in range(P if not all(per_unit) else 0):
            if exact:
                v = torch.zeros(n_in, dtype=xb.dtype)
                v[p] = 1
                v = v.reshape(xb.shape[1:]).expand_as(xb).contiguous().to(xb.device)
            else:
                v = (torch.randint(0, 2, xb.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(xb.dtype).to(xb.device)
            ts = _jvp(f, xb, v)
            for i, t in enumerate(ts):
                qs[i].append(_features(t.detach(), axes[i]).double().cpu().pow(2).sum(dim=2))
        for i in range(L):
            if per_unit[i]:
                continue
            Q = torch.stack(qs[i], dim=1)  # (B, P, C)
            if exact:
                q_sum[i] += Q.sum(dim=1).sum(dim=0)
            else:
                q_sum[i] += Q.mean(dim=1).sum(dim=0)
                q_var[i] += (Q.var(dim=1, unbiased=True) / P).sum(dim=0)
        for i, t in enumerate(layers):
            try:
                gg = grouped_gradients(scorers[i], hs[i].detach(), 1, targets=preds[s:e], chunk_rows=max(1, e - s),
                                       extra=feeds)
            except RuntimeError as err:
                if "does not require grad" not in str(err):
                    raise
                raise InputError(f"layer {t!r} does not feed the scored tensor {scorers[i].score_tensor!r} (it comes "
                                 "after it, or off the path to it): its influence is undefined") from None
            infl[i] += _features(gg.grads.detach(), axes[i]).double().cpu().abs().sum(dim=2).sum(dim=0)
        if progress:
            progress(e - s)
    out = []
    for i, t in enumerate(layers):
        C = shapes[i][axes[i] - 1]
        m = int(np.prod(shapes[i])) // C
        cnt = n * m
        d = sums[i] / cnt
        var = (sumsq[i] - cnt * d.pow(2)) / max(1, cnt - 1)
        std = var.clamp_min(0).sqrt()
        mean = shift[i] + d
        method, passes = ("exact", P) if exact else (("exact per unit", C) if per_unit[i] else ("hutchinson", P))
        out.append(LayerStats(t, shapes[i], axes[i], mean, std, q_sum[i] / (n * m), q_var[i].sqrt() / (n * m),
                              infl[i] / n, m, method, passes))
    return out


# ---------------------------------------------------------------------------------------------------------
# --layer all: the main path's stage outputs
# ---------------------------------------------------------------------------------------------------------
def main_path_layers(model: Any, x: torch.Tensor, extra: dict[str, torch.Tensor], input_name: str,
                     score_tensor: str, max_layers: int = 16) -> tuple[list[str], str]:
    """The main path's stage outputs, found by evaluation alone (no knowledge of the file format):

    1. candidates: the internal float tensors of shape (batch, features, ...) on two distinct inputs ``a``, ``b``;
    2. main path: a candidate ``t`` every path from the input to the output passes through -- checked by
       overriding ``t`` with its value at ``b`` while feeding ``a``: the scored tensor (the logits, or the
       output) must be its value at ``b`` (tensors after the scored one never pass);
    3. stage outputs: of each run of consecutive main-path tensors with the same shape, the last one (a block's
       output before the resolution or the width changes); at most ``max_layers``, evenly spaced.

    Returns the tensor names (in graph order) and a note saying how they were found."""
    skip = {score_tensor} | {o.name for o in model.outputs} | {i.name for i in model.inputs}
    names = [t for t in model.internal_tensors() if t not in skip]
    if not names:
        raise InputError("this model exposes no internal tensors (an ONNX graph does): --layer all needs them")
    if x.shape[0] >= 2 and not torch.equal(x[0], x[1]):
        a, b = x[0:1], x[1:2]
        ea, eb = ({k: v[0:1] for k, v in extra.items()}, {k: v[1:2] for k, v in extra.items()})
    else:
        g = torch.Generator(device="cpu").manual_seed(7)
        a = x[0:1]
        b = a + (torch.randn(a.shape, generator=g, dtype=torch.float64) * (float(a.double().std()) or 1.0) * 0.5
                 ).to(a.dtype).to(a.device)
        ea = eb = {k: v[0:1] for k, v in extra.items()}
    out_name = score_tensor
    with torch.no_grad():
        va = model.run({input_name: a, **ea}, outputs=names)
        vb = model.run({input_name: b, **eb}, outputs=names)
        ya = model.run({input_name: a, **ea}, outputs=[out_name])[0]
        yb = model.run({input_name: b, **eb}, outputs=[out_name])[0]
    if torch.allclose(ya, yb, rtol=1e-5, atol=1e-7):
        raise InputError("--layer all: two different inputs give the same output, so the main path cannot be told")
    cands = [(t, ta, tb) for t, ta, tb in zip(names, va, vb)
             if isinstance(ta, torch.Tensor) and ta.is_floating_point() and ta.dim() >= 2 and ta.shape[0] == 1
             and ta.shape == tb.shape and not torch.equal(ta, tb)]
    main: list[tuple[str, tuple[int, ...]]] = []
    tol = 1e-4 * (float(yb.abs().max()) + 1e-6)
    for t, _ta, tb in cands:
        try:
            with torch.no_grad():
                y = model.run({input_name: a, **ea}, outputs=[out_name], overrides={t: tb})[0]
        except Exception:
            continue
        if y.shape == yb.shape and float((y - yb).abs().max()) <= tol:
            main.append((t, tuple(int(d) for d in tb.shape[1:])))
    stages = [t for i, (t, sh) in enumerate(main) if i + 1 == len(main) or main[i + 1][1] != sh]
    if len(stages) > max_layers:
        idx = sorted({round(k * (len(stages) - 1) / (max_layers - 1)) for k in range(max_layers)})
        stages = [stages[i] for i in idx]
    if not stages:
        raise InputError("--layer all found no main-path tensor of shape (batch, features, ...); name the layers")
    note = (f"--layer all: {len(stages)} stage output(s) of {len(main)} main-path tensor(s) among {len(cands)} "
            "candidate(s) (a tensor is on the main path when overriding it with its value at another input gives "
            "that input's output; of each run of same-shaped main-path tensors the last is kept)")
    return stages, note


# ---------------------------------------------------------------------------------------------------------
# Jacobian attention maps
# ---------------------------------------------------------------------------------------------------------
def _predict(scorer: Any, x: torch.Tensor, extra: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    out = []
    for s, e in _batches(x.shape[0], batch):
        with torch.no_grad():
            sc, _ = scorer(x[s:e], {k: v[s:e] for k, v in extra.items()})
        out.append(sc.argmax(1).cpu())
    return torch.cat(out)


def attention_maps(model: Any, x: torch.Tensor, extra: dict[str, torch.Tensor], preds: torch.Tensor, *,
                   input_name: str, output: str | None, use_logits: bool, wrt: str, out_tensor: str | None,
                   probes: int, seed: int, batch: int, rows: int, names: Sequence[str]) -> AttentionMaps:
    """Implicit attention through the Jacobian, for a [batch, positions, features] tensor ``e`` (``wrt``):

    * per input position t: ``||dy/de[t]||_2`` over the features, ``y`` the predicted class's score (one vjp per
      sample, exact);
    * with ``out_tensor`` h (also [batch, positions', features']): ``A[t', t] = ||dh[t']/de[t]||_F`` -- per output
      position t', Rademacher probes u on h[t'] (the basis when h has no more features than ``probes``: exact)
      and one vjp each give ``||u^T J[t', t]||^2`` for every t at once, an unbiased estimate of the square.

    Values are means over the samples; the first ``rows`` samples are kept one by one."""
    from ..engine.gradients import grouped_gradients, make_scorer

    sc = make_scorer(model, input_name, output, use_logits=use_logits, wrt=wrt)
    n = x.shape[0]
    infl = []
    mats = []
    method, P = "exact", 0
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    T = Tout = None
    for s, e in _batches(n, batch):
        feeds = {input_name: x[s:e], **{k: v[s:e] for k, v in extra.items()}}
        with torch.no_grad():
            ev = model.run(feeds, outputs=[wrt])[0].detach()
        if not ev.is_floating_point() or ev.dim() != 3 or ev.shape[0] != e - s:
            raise InputError(f"attention maps need a float [batch, positions, features] tensor: {wrt!r} has "
                             f"shape {tuple(ev.shape)} ({ev.dtype})")
        T = int(ev.shape[1])
        gg = grouped_gradients(sc, ev, 1, targets=preds[s:e], chunk_rows=max(1, e - s), extra=feeds)
        infl.append(gg.grads.detach().double().cpu().pow(2).sum(2).sqrt())       # (B, T)
        if out_tensor:
            er = ev.clone().requires_grad_(True)
            with torch.enable_grad():
                h = model.run(feeds, outputs=[out_tensor], overrides={wrt: er})[0]
                if h.dim() != 3 or h.shape[0] != e - s:
                    raise InputError(f"attention maps need a [batch, positions, features] output tensor: "
                                     f"{out_tensor!r} has shape {tuple(h.shape)}")
                if not h.requires_grad:
                    raise InputError(f"{out_tensor!r} does not depend on {wrt!r}")
                Tout, D = int(h.shape[1]), int(h.shape[2])
                exact = D <= probes
                method, P = ("exact", D) if exact else ("hutchinson", probes)
                M = torch.zeros(e - s, Tout, T, dtype=torch.float64)
                for to in range(Tout):
                    for p in range(P):
                        u = torch.zeros_like(h)
                        if exact:
                            u[:, to, p] = 1
                        else:
                            u[:, to] = (torch.randint(0, 2, (e - s, D), generator=gen, dtype=torch.int8) * 2 - 1
                                        ).to(h.dtype).to(h.device)
                        (g,) = torch.autograd.grad(h, er, u, retain_graph=True, allow_unused=True)
                        if g is not None:
                            M[:, to] += g.detach().double().cpu().pow(2).sum(2)
                M = M if exact else M / P
            mats.append(M.sqrt())
    I = torch.cat(infl)
    keep = list(range(min(rows, n)))
    toks = x.detach().cpu() if not x.is_floating_point() and x.dim() == 2 else None
    row_list = []
    for i in keep:
        v = I[i]
        top = [int(j) for j in torch.argsort(v, descending=True)[:2]]
        row_list.append(AttentionRow(names[i], [int(t) for t in toks[i]] if toks is not None else None,
                                     [float(a) for a in v], top, int(preds[i])))
    share = (I / I.sum(1, keepdim=True).clamp_min(1e-300)).mean(0)
    Mm = torch.cat(mats) if mats else None
    return AttentionMaps(
        wrt=wrt, out_tensor=out_tensor, n_inputs=n, positions_in=int(T or 0), positions_out=Tout,
        influence_mean=[float(a) for a in I.mean(0)], influence_share_mean=[float(a) for a in share], rows=row_list,
        matrix_mean=[[float(a) for a in r] for r in Mm.mean(0)] if Mm is not None else None,
        matrix_first=[[float(a) for a in r] for r in Mm[0]] if Mm is not None else None,
        method=method if out_tensor else None, probes=P if out_tensor else None)


# ---------------------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------------------
def _median(vals: list[float]) -> float:
    return float(np.median(vals)) if vals else 0.0


def _scores(st: LayerStats, sigma: float, n: int, data: str, o: TransferOptions) -> LayerScores:
    C = st.mean.shape[0]
    std = [float(v) for v in st.std]
    mean = [float(v) for v in st.mean]
    grad = [math.sqrt(max(0.0, float(v))) for v in st.grad_sq]
    grad_se = [float(se) / (2 * g) if g > 0 else 0.0 for se, g in zip(st.grad_sq_se, grad)]
    ref_std = _median([v for v in std if v > 0]) or 0.0
    ref_grad = _median([v for v in grad if v > 0]) or 0.0
    tol = o.dead_tolerance
    T = o.overspecialised_above
    feats: list[FeatureScore] = []
    for k in range(C):
        infl = float(st.influence[k])
        if std[k] <= tol * max(abs(mean[k]), ref_std) or std[k] == 0:
            feats.append(FeatureScore(k, mean[k], std[k], grad[k], grad_se[k], None, None, infl, infl * std[k],
                                      "dead", False, "no variance over the data"))
            continue
        if grad[k] <= tol * ref_grad or grad[k] == 0:
            feats.append(FeatureScore(k, mean[k], std[k], grad[k], grad_se[k], None, None, infl, infl * std[k],
                                      "dead", False, "zero input gradient"))
            continue
        s = grad[k] * sigma / std[k]
        se = grad_se[k] * sigma / std[k]
        v = "over-specialised" if s > T else "reusable"
        feats.append(FeatureScore(k, mean[k], std[k], grad[k], grad_se[k], s, se, infl, infl * std[k], v,
                                  abs(s - T) < 2 * se, ""))
    cnt = {v: sum(1 for f in feats if f.verdict == v) for v in ("reusable", "over-specialised", "dead")}
    tot_inf = sum(f.influence_scaled for f in feats)
    over_inf = sum(f.influence_scaled for f in feats if f.verdict == "over-specialised")
    sens = [f.sensitivity for f in feats if f.sensitivity is not None]
    return LayerScores(data, n, sigma, feats, cnt["reusable"] / C, cnt["over-specialised"] / C, cnt["dead"] / C,
                       over_inf / tot_inf if tot_inf > 0 else None,
                       float(np.median(sens)) if sens else None, float(np.quantile(sens, 0.9)) if sens else None)


def _shift(src: LayerScores, tgt: LayerScores, o: TransferOptions) -> LayerShift:
    rows = []
    for a, b in zip(src.features, tgt.features):
        ms = (b.mean - a.mean) / a.std if a.std > 0 else (0.0 if b.mean == a.mean else float("inf"))
        sl = math.log(b.std / a.std) if a.std > 0 and b.std > 0 else None
        kl = math.log(b.sensitivity / a.sensitivity) if a.sensitivity and b.sensitivity else None
        sh = max([abs(ms)] + [abs(v) for v in (sl, kl) if v is not None])
        rows.append(FeatureShift(a.index, ms, sl, kl, sh, a.verdict, b.verdict))
    rows.sort(key=lambda r: (-r.shift, r.index))
    vals = [r.shift for r in rows]
    return LayerShift(rows, float(np.median(vals)), float(max(vals)),
                      sum(1 for v in vals if v > o.shift_above) / len(vals),
                      sum(1 for r in rows if r.verdict_source != r.verdict_target),
                      sum(1 for r in rows if r.verdict_source == "reusable" and r.verdict_target == "over-specialised"))


def _suggest(sc: LayerScores, shift: LayerShift | None, o: TransferOptions) -> tuple[str, str]:
    on = "on the target data" if sc.data == "target" else "on the source data"
    sh = shift.shifted_fraction if shift is not None else 0.0
    if sc.dead_fraction >= o.retrain_dead - 1e-12:
        return "re-train", (f"{100 * sc.dead_fraction:.0f}% of the features are dead {on} (>= "
                            f"{100 * o.retrain_dead:.0f}%): re-initialise or prune the layer")
    ft = o.finetune_overspecialised - 1e-12
    if sc.overspecialised_fraction >= ft or sh >= ft:
        why = []
        if sc.overspecialised_fraction >= ft:
            why.append(f"{100 * sc.overspecialised_fraction:.0f}% over-specialised {on}")
        if sh >= ft:
            why.append(f"{100 * sh:.0f}% of the features shifted")
        return "fine-tune", " and ".join(why) + f" (>= {100 * o.finetune_overspecialised:.0f}%)"
    live = sum(1 for f in sc.features if f.verdict != "dead")
    reuse = sum(1 for f in sc.features if f.verdict == "reusable") / live if live else 0.0
    if reuse >= o.freeze_reusable - 1e-12:
        return "freeze", (f"{100 * reuse:.0f}% of the live features are reusable {on} (>= "
                          f"{100 * o.freeze_reusable:.0f}%)" + (", few shifted" if shift is not None else ""))
    return "fine-tune (low learning rate)", (f"{100 * reuse:.0f}% of the live features reusable {on}: between the "
                                             "freeze and fine-tune rules")


# ---------------------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------------------
def transfer(model: Any, source: Any, options: TransferOptions, *, target: Any = None, preprocess: Any = None,
             image: bool = False, fixed: dict[str, torch.Tensor] | None = None, source_name: str = "",
             target_name: str | None = None, progress: Callable[[int, int], None] | None = None,
             timings: dict[str, float] | None = None) -> AnalysisOutput:
    """Input-feature and intermediate-feature sensitivity on ``source`` (and ``target``); see the docstring."""
    from ..engine.gradients import TargetNeeded, make_scorer

    o = options
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    warnings: list[str] = list(source.warnings) + (list(target.warnings) if target is not None else [])
    spec = model.input_spec(o.input_name)
    scorer = make_scorer(model, spec.name, o.output, use_logits=o.use_logits)
    layer_note = None
    if "all" in o.layers and "all" not in set(model.internal_tensors()):
        x0, extra0 = _feeds(model, source, spec.name, fixed)
        found, layer_note = main_path_layers(model, x0, extra0, spec.name, scorer.score_tensor)
        named = [t for t in o.layers if t != "all"]
        o = replace(o, layers=tuple(named + [t for t in found if t not in named]))
    if o.layers:
        known = set(model.internal_tensors())
        if not known:
            raise InputError("this model exposes no internal tensors (an ONNX graph does): intermediate features "
                             "cannot be scored; leave out the layers for the input-feature scores")
        from ..models.base import did_you_mean
        for t in o.layers:
            if t not in known:
                raise InputError(f"no tensor named {t!r} in the graph{did_you_mean(t, list(known))} (inspect "
                                 "--tensors lists the candidates)")
        if len(set(o.layers)) != len(o.layers):
            raise InputError("a layer is named twice")
    if o.probes < 2:
        raise InputError("probes must be at least 2 (the standard error needs two)")
    channel_axis = None
    if image and preprocess is not None:
        channel_axis = 1 if preprocess.layout == "NCHW" else -1
    feature_axis = o.feature_axis if o.feature_axis is not None else (-1 if channel_axis == -1 else 1)
    names = list(o.feature_names) if o.feature_names else None
    if names is None and image and preprocess is not None:
        names = list(preprocess.channels) if preprocess.channels != "L" else ["L"]

    sets = [("source", source)] + ([("target", target)] if target is not None else [])
    total = sum(len(d.samples) for _, d in sets) * (1 + (1 if o.layers else 0))
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress:
            progress(done, total)

    ins: dict[str, InputSensitivity] = {}
    stats: dict[str, list[LayerStats]] = {}
    sigmas: dict[str, float] = {}
    counts: dict[str, int] = {}
    kind = "image" if image else None
    attention = None
    for which, data in sets:
        t1 = time.perf_counter()
        x, extra = _feeds(model, data, spec.name, fixed)
        if kind is None:
            kind = "features" if x.dim() == 2 else "tensor"
        counts[which] = x.shape[0]
        try:
            if x.is_floating_point():
                sigmas[which] = input_scale(x)
                ins[which], preds = input_sensitivity(scorer, x, extra, names=names, classes=o.classes,
                                                      max_outputs=o.max_outputs, batch=o.batch_size,
                                                      channel_axis=channel_axis)
            else:
                if o.layers:
                    raise InputError(f"input {spec.name!r} is {x.dtype}: layer features are differentiated with "
                                     "respect to a float input (for token ids, use the attention maps with respect "
                                     "to the embedding output)")
                if not o.attention_wrt:
                    raise InputError(f"input {spec.name!r} is {x.dtype}, not float: it has no derivative; name a "
                                     "float [batch, positions, features] tensor (e.g. the embedding output) for "
                                     "the attention maps")
                preds = _predict(scorer, x, extra, o.batch_size)
        except TargetNeeded as e:
            raise InputError(f"transfer scores a classifier's outputs: output {e.output!r} has shape (batch, "
                             f"{', '.join(map(str, e.shape))}); choose a class-score output") from None
        tick(x.shape[0])
        rows_per_pass = o.batch_size if scorer.batched else 1  # a fixed-batch graph: one sample per pass
        if which == "source" and o.attention_wrt:
            t3 = time.perf_counter()
            attention = attention_maps(model, x, extra, preds, input_name=spec.name, output=o.output,
                                       use_logits=o.use_logits, wrt=o.attention_wrt, out_tensor=o.attention_out,
                                       probes=o.probes, seed=o.seed + 2, batch=rows_per_pass, rows=o.attention_rows,
                                       names=[sm.name for sm in data.samples])
            timings["attention"] = round(time.perf_counter() - t3, 4)
        timings[f"inputs_{which}"] = round(time.perf_counter() - t1, 4)
        if o.layers:
            t2 = time.perf_counter()
            stats[which] = layer_statistics(model, x, extra, o.layers, preds, input_name=spec.name,
                                            output=o.output, use_logits=o.use_logits, feature_axis=feature_axis,
                                            probes=o.probes, seed=o.seed,  # common random numbers
                                            batch=rows_per_pass, progress=tick)
            timings[f"layers_{which}"] = round(time.perf_counter() - t2, 4)
    warnings += [w for w in scorer.warnings if w not in warnings]

    layers: list[LayerResult] = []
    for i, t in enumerate(o.layers):
        st = stats["source"][i]
        src = _scores(st, sigmas["source"], counts["source"], "source", o)
        tgt = shift = None
        if target is not None:
            st_t = stats["target"][i]
            if st_t.shape != st.shape:
                raise InputError(f"layer {t!r} has shape {list(st.shape)} on the source data and {list(st_t.shape)} "
                                 "on the target data: the features cannot be matched")
            tgt = _scores(st_t, sigmas["target"], counts["target"], "target", o)
            shift = _shift(src, tgt, o)
        use = tgt or src
        sug, why = _suggest(use, shift, o)
        C = len(src.features)
        summary = (f"{t}: {100 * use.reusable_fraction:.0f}% reusable, {100 * use.overspecialised_fraction:.0f}% "
                   f"over-specialised, {100 * use.dead_fraction:.0f}% dead of {C} features"
                   + (" (target data)" if tgt is not None else "")
                   + (f"; {100 * shift.shifted_fraction:.0f}% shifted" if shift is not None else "")
                   + f" -> {sug}")
        layers.append(LayerResult(t, list(st.shape), st.axis, C, st.m, st.method, st.probes, src, tgt, shift,
                                  summary, sug, why))
        if all(f.verdict == "dead" for f in use.features):
            warnings.append(f"layer {t!r}: every feature is dead on the {use.data} data")

    rule = VerdictRule(
        text=(f"dead: std(h_k) <= {o.dead_tolerance:g} x max(|mean(h_k)|, the layer's median std), or the input "
              f"gradient <= {o.dead_tolerance:g} x the layer's median; over-specialised: normalised sensitivity > "
              f"{o.overspecialised_above:g}; reusable: otherwise. A feature is shifted when its shift > "
              f"{o.shift_above:g}. Per layer (on the target data when given): re-train when >= "
              f"{100 * o.retrain_dead:.0f}% dead; fine-tune when >= {100 * o.finetune_overspecialised:.0f}% "
              f"over-specialised or shifted; freeze when >= {100 * o.freeze_reusable:.0f}% of the live features "
              "are reusable; else fine-tune with a low learning rate."),
        overspecialised_above=o.overspecialised_above, dead_tolerance=o.dead_tolerance, shift_above=o.shift_above,
        freeze_reusable=o.freeze_reusable, finetune_overspecialised=o.finetune_overspecialised,
        retrain_dead=o.retrain_dead)
    methods = sorted({lr.method for lr in layers})
    est = EstimatorNote(
        method=", ".join(methods) if methods else "none",
        probes=max([lr.probes for lr in layers], default=0),
        description=("||dh_k/dx||_F^2 = E_v ||(J v)_k||^2 over Rademacher input probes v: one forward-mode jvp per "
                     "probe and batch gives every feature of every layer; unbiased for the squared norm, the "
                     "standard error is over the probes (the data is fixed; it is itself estimated from the probes, "
                     "so treat it as approximate). Exact (the input basis, one jvp per input element) when the input "
                     "has no more elements than the probe count; exact per unit (one vjp per unit) for a layer of "
                     "single-element features with at most 4 x probes units."))
    classes = list(o.classes) if o.classes else None
    result = TransferResult(
        input_name=spec.name, score_tensor=scorer.score_tensor, score="logit" if scorer.score == "logit" else "output",
        classes=classes, source_data=source_name, target_data=target_name, n_source=counts["source"],
        n_target=counts.get("target"), input_kind=kind or "tensor", inputs=ins.get("source"),
        inputs_target=ins.get("target"), layers=layers, rule=rule, estimator=est, layer_selection=layer_note,
        attention=attention)
    metrics = _metrics(result, o)
    timings["analysis"] = round(time.perf_counter() - t0, 4)
    return AnalysisOutput(result=result, metrics=metrics, warnings=warnings,
                          partial=bool(source.failures) or bool(target is not None and target.failures))


def _metrics(r: TransferResult, o: TransferOptions) -> list[Metric]:
    ms: list[Metric] = []
    if r.inputs is not None:
        for f in r.inputs.features:
            ms.append(Metric("input_sensitivity", f.name, f.scaled, ">",
                             description="mean |dy/dx_j| x std(x_j) on the source data (L2 over the outputs)"))
    if r.inputs_target is not None:
        for f in r.inputs_target.features:
            ms.append(Metric("target_input_sensitivity", f.name, f.scaled, ">",
                             description="mean |dy/dx_j| x std(x_j) on the target data"))
    for lr in r.layers:
        s = lr.source
        # the proposed (warn) thresholds judge the data the model will meet: the target data when given
        w = None if lr.target is not None else 0.5
        ms += [Metric("overspecialised_fraction", lr.tensor, s.overspecialised_fraction, ">", warn=w,
                      description=f"share of the layer's features with normalised sensitivity > "
                                  f"{o.overspecialised_above:g} (source data)"),
               Metric("dead_fraction", lr.tensor, s.dead_fraction, ">", warn=w,
                      description="share of the layer's features with no variance or no input gradient (source)"),
               Metric("reusable_fraction", lr.tensor, s.reusable_fraction, "<",
                      description="share of the layer's features judged reusable (source data)"),
               Metric("sensitivity_median", lr.tensor, s.sensitivity_median, ">",
                      status="skipped" if s.sensitivity_median is None else None,
                      note="every feature is dead" if s.sensitivity_median is None else "",
                      description="median normalised sensitivity of the live features (source data)")]
        if lr.target is not None and lr.shift is not None:
            t = lr.target
            ms += [Metric("target_overspecialised_fraction", lr.tensor, t.overspecialised_fraction, ">", warn=0.5,
                          description="share of the layer's features over-specialised on the target data"),
                   Metric("target_dead_fraction", lr.tensor, t.dead_fraction, ">", warn=0.5,
                          description="share of the layer's features dead on the target data"),
                   Metric("shift_fraction", lr.tensor, lr.shift.shifted_fraction, ">", warn=0.5,
                          description=f"share of the features whose shift exceeds {o.shift_above:g}"),
                   Metric("shift_median", lr.tensor, lr.shift.median_shift, ">",
                          description="median per-feature shift (max of |standardised mean difference|, |ln std "
                                      "ratio|, |ln sensitivity ratio|)"),
                   Metric("shift_newly_overspecialised", lr.tensor, float(lr.shift.newly_overspecialised), ">",
                          description="features reusable on the source and over-specialised on the target")]
    return ms
