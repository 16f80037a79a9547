"""Gradient saliency maps: vanilla gradient, gradient x input, SmoothGrad, Integrated Gradients.

Every method differentiates one scalar per sample -- the *target score*: the pre-softmax logit of the target
class when the model ends in a Softmax whose input we can reach (ONNX), else the model's output -- with respect
to the model input only (parameters are frozen). The target class (top-1 by default) is picked inside the same
forward pass that the gradient uses: each sample's reference row (the clean input) comes first in its group.

Methods (``attribute(model, x, method, ...)`` returns the signed, unreduced attribution in the input's shape):

* ``grad`` -- Simonyan, Vedaldi & Zisserman (2014), "Deep Inside Convolutional Networks": ``dS/dx``; the
  heatmap is ``|dS/dx|`` reduced over channels by max-abs (as in the paper) or L2.
* ``gradxinput`` -- Shrikumar et al. (2016), "Not Just a Black Box": ``x * dS/dx``.
* ``smoothgrad`` -- Smilkov et al. (2017), "SmoothGrad: removing noise by adding noise": the mean gradient
  over N noisy copies ``x + N(0, sigma^2)``, sigma = ``sigma_frac * (x_max - x_min)`` where the range is the
  tensor range of 0..255 pixels under the preprocessing (else the sample's own range), as in the paper.
  The N samples are batched (and chunked to ``chunk_rows``).
* ``ig`` -- Sundararajan, Taly & Yan (2017), "Axiomatic Attribution for Deep Networks": ``(x - b) *
  integral_0^1 dS/dx(b + a (x - b)) da`` by the trapezoid rule on ``steps`` intervals (steps + 1 batched
  evaluations, which give F(x) and F(b) for free). Baselines: ``black`` (pixel 0 mapped through the
  preprocessing), ``blur`` (Gaussian blur of the input, sigma = size/10; blur commutes with the per-channel
  affine preprocessing), ``noise`` (uniform 0..255 pixel noise through the preprocessing, seeded), ``zero``
  (the zero tensor). Completeness gap: ``|sum(attr) - (F(x) - F(b))| / |F(x) - F(b)|``.

:func:`saliency` is the analysis (``run(model, inputs, options) -> AnalysisOutput``, see
:mod:`jacaudit.analyses.base`): the frozen :class:`SaliencyResult`, metrics, warnings and the maps as artifacts
(it writes no files). The methods live in :mod:`jacaudit.analyses.attribution` on the shared primitive
:func:`jacaudit.engine.gradients.grouped_gradients`; :func:`jacaudit.analyses.sanity.sanity_check` is the
parameter-randomisation test.

Metrics (ids ``saliency.<name>[<subject>]``; the gate turns them into checks)
-----------------------------------------------------------------------------
* ``ig_completeness_gap[<input>]`` (IG only): op ``>``, warn 0.1, no default fail.
* ``sanity_spearman@method=<m>[model]`` (with the sanity test): the final |Spearman| of the cascade, op ``>=``,
  warn at the sanity threshold (0.5). Skipped (no evidence, never pass) when no layer could be randomised.
* ``mask_outside@method=<m>[<input>]`` (with an object mask): the share of the saliency mass *outside* the mask,
  op ``>``. The thresholds follow the mask's area ``a`` (a map that ignores the object, e.g. a uniform one, puts
  ``1 - a`` outside), through the *inside density* ``d = mass share inside / a``: warn when the mass inside is
  below ``min(1.5 a, (1 + a) / 2)`` (``d < 1.5`` for masks up to half the image; the cap keeps the rule reachable
  for large masks), fail when it is below ``a`` (``d < 1``: no more on the object than chance). Skipped when the
  map is zero everywhere or the mask is empty / the whole image.

Measured on the shipped samples (default options: top-1 logit, max-abs, IG 50 steps black baseline, SmoothGrad
25 samples; images read with the inferred preprocessing, masks beside them; ``outside`` = raw share outside,
``d`` = inside density)::

    shortcut_cnn.onnx, *_marker.png   area   grad            gradxinput      smoothgrad      ig
      00_triangle_marker             0.094   0.890 d=1.17    0.836 d=1.74    0.901 d=1.06    0.853 d=1.57
      01_cross_marker                0.105   0.864 d=1.30    0.854 d=1.39    0.889 d=1.06    0.824 d=1.68
      02_circle_marker               0.080   0.897 d=1.29    0.901 d=1.24    0.893 d=1.34    0.879 d=1.51
    shapes_cnn.onnx, examples/*.png
      00_triangle                    0.094   0.408 d=6.30    0.312 d=7.32    0.789 d=2.24    0.858 d=1.52
      01_cross                       0.105   0.479 d=4.98    0.369 d=6.02    0.719 d=2.69    0.691 d=2.95
      02_circle                      0.080   0.344 d=8.19    0.275 d=9.06    0.765 d=2.93    0.733 d=3.34
      03_square                      0.063   0.571 d=6.76    0.408 d=9.33    0.895 d=1.65    0.840 d=2.52
      04_triangle                    0.120   0.336 d=5.53    0.239 d=6.34    0.715 d=2.38    0.819 d=1.51
      05_cross                       0.184   0.583 d=2.27    0.611 d=2.11    0.773 d=1.24    0.722 d=1.51

(SmoothGrad's noise is seeded per input, from the seed and the input's name; these figures were measured with
the earlier per-batch seeding and move by ~0.05 with the noise draw.) With ``grad`` the
raw outside share separates the two models by 0.864 vs 0.583 (a ratio of 1.48), the density by 1.30 vs 2.27
(1.75), and the density does not depend on the object's size (a 6% mask has a chance outside share of 0.94, an
18% one 0.82), so the rule is on the density. Chosen: warn ``d < 1.5``, fail ``d < 1``. Result: every shortcut
marker image warns with ``grad`` (none fails: its maps sit slightly above chance, d 1.2-1.3); no shapes image
fails with any method, and with ``grad`` none warns (SmoothGrad warns on 05_cross; IG passes at d 1.51-1.52).
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..engine.gradients import (GroupGrads, Scorer, TargetNeeded, TargetSpec, grouped_gradients, make_scorer,
                                parse_target_spec)
from ..errors import DataError, InputError, RuntimeFailure
from . import maps as M
from .base import AnalysisOutput, Artifact
from .attribution import BASELINES, METHODS, Attribution, attribute, baseline_for
from .sanity import sanity_check

def parse_methods(text: str | Sequence[str]) -> list[str]:
    items = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    out: list[str] = []
    for m in items:
        m = {"gradient": "grad", "vanilla": "grad", "gxi": "gradxinput", "grad*input": "gradxinput",
             "integrated-gradients": "ig", "integratedgradients": "ig"}.get(m, m)
        for mm in (METHODS if m == "all" else (m,)):
            if mm not in METHODS:
                raise InputError(f"unknown saliency method {mm!r}; use {', '.join(METHODS)} or all")
            if mm not in out:
                out.append(mm)
    if not out:
        raise InputError("no saliency method given")
    return out


def read_labels(path: str | None) -> list[str] | None:
    """A labels file: one label per line (.txt), or a JSON list / {index: label} object."""
    if not path:
        return None
    import json
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise DataError(f"{path}: cannot read labels ({e.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: labels file is not UTF-8 text") from None
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict):
            try:
                idx = {int(k): str(v) for k, v in data.items()}
            except ValueError:
                raise DataError(f"{path}: JSON labels object must map class indices to labels") from None
            return [idx.get(i, str(i)) for i in range(max(idx) + 1)] if idx else []
        if isinstance(data, list):
            return [str(v) for v in data]
        raise DataError(f"{path}: JSON labels must be a list or an object")
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_target(target: str | int | None, labels: list[str] | None) -> int | None:
    """'top1'/None -> None (per-sample top-1); an int or digit string -> that index; else a label."""
    if target is None or (isinstance(target, str) and target.lower() in ("top1", "top-1", "")):
        return None
    if isinstance(target, int) or (isinstance(target, str) and target.lstrip("-").isdigit()):
        k = int(target)
        if k < 0:
            raise InputError(f"target class {k} must not be negative")
        return k
    if labels and target in labels:
        return labels.index(target)
    if labels:
        low = [lab.lower() for lab in labels]
        if target.lower() in low:
            return low.index(target.lower())
        raise InputError(f"target {target!r} is neither a class index nor one of the labels")
    raise InputError(f"target {target!r} is a label, but no labels were given")


# ---------------------------------------------------------------------------------------------------------
# The whole analysis
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SaliencyOptions:
    methods: list[str] = field(default_factory=lambda: ["grad"])
    target: str | int | None = "top1"
    labels: list[str] | None = None
    reduction: str = "max-abs"
    steps: int = 50
    baseline: str = "black"
    samples: int = 25
    sigma: float = 0.15
    seed: int = 0
    batch_size: int = 16
    chunk_rows: int = 64
    use_logits: bool = True
    input_name: str | None = None
    output: str | None = None
    #: an internal tensor to differentiate with respect to (e.g. an embedding's output); None: the input
    wrt: str | None = None
    #: names of the features of a rank-2 (batch, features) input, in column order
    feature_names: list[str] | None = None
    sanity: bool = False
    sanity_layers: int | None = None
    sanity_threshold: float = 0.5
    sanity_inputs: int = 4
    thumb: int = 128
    top_k: int = 3


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60].strip("._") or "input"


def _heat_max(m: np.ndarray) -> float:
    """The map value at the top of the heatmap's colour scale: :func:`maps.normalise` divides by the 99.5th
    percentile of the non-negative map (the maximum when that is 0; 1 for an all-zero map) and clips at 1."""
    v = np.nan_to_num(np.asarray(m, dtype=np.float64).clip(min=0))
    top = float(np.percentile(v, 99.5)) if v.size else 0.0
    if top <= 0:
        top = float(v.max()) if v.size and v.max() > 0 else 1.0
    return top


def _overlay_takes_mask() -> bool:
    import inspect

    try:
        return "mask" in inspect.signature(M.overlay_rgb).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


#: object-mask rule (see the module docstring for the measurements behind it): the inside density is the mass
#: share inside the mask over its area share (1 = a map that ignores the object, like a uniform one)
MASK_WARN_DENSITY = 1.5
MASK_FAIL_DENSITY = 1.0

_MASK_DESCRIPTION = (
    "share of the saliency mass outside the object mask. Judged against the mask's area a (a map that ignores the "
    "object puts 1 - a of its mass outside): warn when the mass inside is less than min(1.5 a, (1 + a) / 2) -- an "
    "inside density (mass share / area share) below 1.5 for masks up to half the image --, fail when it is less "
    "than a (no more on the object than chance). Measured: a shortcut model that looks at a corner marker has "
    "density 1.2-1.3 (grad), an object-attending model 2.3-8.2")


def _mask_metric(method: str, subject: str, red: np.ndarray, mask: np.ndarray) -> tuple[Any, float | None]:
    """(the ``mask_outside`` metric, the mass share inside) for one map and its object mask."""
    from ..gate import Metric

    k = np.asarray(mask).astype(bool)
    area = float(k.mean()) if k.size else 0.0
    name = f"mask_outside@method={method}"
    total = float(np.nan_to_num(np.asarray(red, dtype=np.float64)).clip(min=0).sum())
    if total <= 0:
        return Metric(name, subject, None, ">", status="skipped", description=_MASK_DESCRIPTION,
                      note="the map is zero everywhere (no gradient reaches the input): no evidence"), None
    inside = M.mask_fraction(red, k)
    if area <= 0 or area >= 1:
        return Metric(name, subject, 1.0 - inside, ">", status="skipped", description=_MASK_DESCRIPTION,
                      note=f"the object mask is {'empty' if area <= 0 else 'the whole image'}: no evidence",
                      properties={"mask_area": area}), inside
    warn_inside = min(MASK_WARN_DENSITY * area, (1 + area) / 2)
    fail_inside = MASK_FAIL_DENSITY * area
    density = inside / area
    return Metric(name, subject, 1.0 - inside, ">", warn=1.0 - warn_inside, fail=1.0 - fail_inside,
                  description=_MASK_DESCRIPTION,
                  note=f"inside density {density:.2f} (mask area {100 * area:.1f}%)",
                  properties={"mask_area": area, "inside_density": density, "mass_inside": inside}), inside


@dataclass(frozen=True)
class SaliencyPlan:
    """What every batch needs besides the model (picklable; the same on the driver and on workers)."""

    options: SaliencyOptions
    methods: list[str]
    preprocess: Any
    masks: dict[str, Any]
    outline: bool


class SaliencyContext:
    """A worker's view of the model for saliency: the scorer (and the fixed target), built once per process."""

    def __init__(self, model: Any, plan: SaliencyPlan):
        o = plan.options
        self.model, self.plan = model, plan
        self.spec_t = parse_target_spec(o.target) if isinstance(o.target, str) else None
        self.scorer = make_scorer(model, o.input_name, o.output, o.use_logits, target=self.spec_t, wrt=o.wrt)
        if self.spec_t is None:
            self.fixed = resolve_target(o.target, o.labels)
        else:
            self.fixed = None if self.spec_t.kind == "argmax" else 0  # index / sum: one candidate


def make_saliency_plan(options: SaliencyOptions, *, preprocess: Any = None,
                       masks: dict[str, np.ndarray] | None = None) -> SaliencyPlan:
    o = options
    if o.reduction not in ("max-abs", "l2"):
        raise InputError(f"channel reduction must be max-abs or l2, not {o.reduction!r}")
    if o.baseline not in BASELINES:
        raise InputError(f"unknown IG baseline {o.baseline!r}; use one of {', '.join(BASELINES)}")
    methods = parse_methods(o.methods)
    if "ig" in methods and o.steps < 1:
        raise InputError(f"IG steps must be at least 1 (got {o.steps})")
    if "smoothgrad" in methods and o.samples < 1:
        raise InputError(f"SmoothGrad samples must be at least 1 (got {o.samples})")
    return SaliencyPlan(o, methods, preprocess, dict(masks or {}), _overlay_takes_mask())


def saliency_batch(bctx: SaliencyContext, entries: Sequence[Any], slot0: int) -> dict[str, Any]:
    """One batch of entries (``slot0``: the run index of the first; each entry's id is its report subject) ->
    its inputs, metrics, warnings and artifacts as plain data (JSON-able, arrays in ``arrays``)."""
    from ..distributed.shards import plain
    from ..gate import Metric
    from ..results import Image
    from ..results.saliency import ClassScore, Concentration, InputSaliency, MethodMap
    from ..data import stack

    plan, model, scorer = bctx.plan, bctx.model, bctx.scorer
    o, methods, preprocess, masks = plan.options, plan.methods, plan.preprocess, plan.masks
    t0 = time.perf_counter()
    layout = preprocess.layout if preprocess is not None else "NCHW"
    dtype = model.dtype or torch.float32
    batch = [e.sample for e in entries]
    ids = [e.id for e in entries]
    warnings: list[str] = []
    metrics: list[Any] = []
    arrays: dict[str, np.ndarray] = {}
    art_paths: list[str] = []
    seen_warn = set(scorer.warnings)

    def artifact(path: str, data: Any) -> None:
        key = f"art{len(art_paths)}"
        arrays[key] = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
        art_paths.append(path)

    x = stack(batch, device=model.device, dtype=dtype)
    extra = {}
    if batch[0].extra:
        extra = {k: torch.as_tensor(np.stack([s.extra[k] for s in batch])).to(model.device)
                 for k in batch[0].extra}
    tokens = None
    if scorer.wrt:  # differentiate an internal tensor: the inputs are held, its value is the point
        extra = {scorer.input_name: x, **extra}
        tokens = x
        x = scorer.point(extra)
        if not x.is_floating_point():
            raise InputError(f"tensor {scorer.wrt!r} is {x.dtype}, not a float tensor: it has no derivative")
        x = x.to(dtype)
        if x.dim() < 1 or x.shape[0] != len(batch):
            raise InputError(f"tensor {scorer.wrt!r} has shape {tuple(x.shape)}: its first axis is not the "
                             f"batch of {len(batch)} input(s)")
    kind = _input_kind(x, preprocess)
    if kind == "features" and o.feature_names is not None and len(o.feature_names) != x.shape[1]:
        raise InputError(f"{len(o.feature_names)} feature names for {x.shape[1]} features of input "
                         f"{scorer.input_name!r}")
    targets = None if bctx.fixed is None else torch.full((x.shape[0],), bctx.fixed, dtype=torch.long)
    results: dict[str, Attribution] = {}
    base: Attribution | None = None
    for m in methods:
        if m in ("grad", "gradxinput") and base is not None:
            attr = base.grad if m == "grad" else base.grad * x
            results[m] = Attribution(m, attr, base.targets, base.ref_scores, base.ref_probs, grad=base.grad)
            continue
        a = attribute(scorer, x, m, targets=targets, steps=o.steps, baseline=o.baseline, samples=o.samples,
                      sigma=o.sigma, preprocess=preprocess, seed=o.seed, chunk_rows=o.chunk_rows, extra=extra,
                      ids=ids)
        results[m] = a
        if base is None:
            base = a
            targets = a.targets
    if base is None:  # pragma: no cover (parse_methods gives at least one)
        raise RuntimeFailure("internal: no saliency method ran")
    probs = base.ref_probs
    prob_looks = None
    if probs is None and scorer.score == "output":
        s = base.ref_scores
        prob_looks = bool((s >= 0).all() and torch.allclose(s.sum(1), torch.ones(s.shape[0], dtype=s.dtype),
                                                            atol=1e-3))
    inputs_out = []
    zero_maps = n_maps = 0
    for i, smp in enumerate(batch):
        k = slot0 + i
        subject = ids[i]
        sc = base.ref_scores[i].double()
        pr = probs[i].double() if probs is not None else None
        order = torch.argsort(sc, descending=True)[: o.top_k].tolist()

        def cs(j: int) -> ClassScore:
            lab = o.labels[j] if o.labels and j < len(o.labels) and scorer.select is None else None
            return ClassScore(int(j), lab, float(sc[j]), None if pr is None else float(pr[j]),
                              coords=scorer.coords(j))

        tgt = int(base.targets[i])
        pixels = smp.pixels
        if pixels is None and preprocess is not None and smp.array.ndim == 3:
            try:
                pixels = preprocess.pixels_to_rgb(preprocess.from_tensor(smp.array))
            except Exception:
                pixels = None
        thumb = None
        if pixels is not None:
            data, w, h = M.png_bytes(pixels, o.thumb)
            thumb = Image(M.b64(data), w, h, alt=f"input {smp.name}")
        mlist = []
        mask = masks.get(smp.name) if masks else None
        for m, a in results.items():
            attr = a.attr[i].detach().cpu().numpy()
            n_maps += 1
            zf = float((attr == 0).mean()) if attr.size else 1.0
            metrics.append(_zero_metric(m, subject, zf))
            if zf >= 1.0:
                zero_maps += 1
                warnings.append(f"the {m} map of {smp.name} is zero everywhere: the explained score "
                                f"({_explained(scorer, tgt)}) does not depend on the input here; the map "
                                "says nothing about what the model uses")
            ranking = None
            if kind in ("features", "sequence"):
                toks = None if tokens is None else tokens[i].detach().cpu().numpy()
                ranking, red = _ranking(attr, kind, o.reduction, o.feature_names, toks)
                heat = M.heatmap_rgb(np.repeat(np.repeat(red.reshape(1, -1), 12, 0),
                                               max(1, 384 // max(1, red.size)), 1))
            else:
                red = M.reduce_channels(attr, layout, o.reduction)
                heat = M.heatmap_rgb(red)
            stem = f"maps/{k:04d}-{_safe(smp.name)}.{m}"
            over = None
            outlined = False
            if pixels is not None and red.ndim == 2 and red.shape == pixels.shape[:2]:
                if mask is not None and plan.outline:
                    over = M.overlay_rgb(pixels, red, mask=mask)
                    outlined = True
                else:
                    over = M.overlay_rgb(pixels, red)
            npy_path, heat_path = stem + ".npy", stem + ".heatmap.png"
            artifact(npy_path, attr[None].astype(np.float32))
            artifact(heat_path, M.png_bytes(heat)[0])
            hd, hw, hh = M.png_bytes(heat, o.thumb)
            himg = Image(M.b64(hd), hw, hh, alt=f"{m} heatmap of {smp.name}", path=heat_path)
            oimg = None
            if over is not None:
                over_path = stem + ".overlay.png"
                artifact(over_path, M.png_bytes(over)[0])
                od, ow, oh = M.png_bytes(over, o.thumb)
                oimg = Image(M.b64(od), ow, oh, alt=f"{m} overlay on {smp.name}", path=over_path)
            gap = a.completeness_gap
            gap_i = None if gap is None else float(gap[i])
            mf = None
            if mask is not None and red.ndim == 2 and kind == "image":
                if np.asarray(mask).shape != red.shape:
                    warnings.append(f"mask of {smp.name}: shape {np.asarray(mask).shape} differs from the "
                                    f"map's {red.shape}; not used")
                else:
                    metric, mf = _mask_metric(m, subject, red, mask)
                    metrics.append(metric)
            if gap_i is not None:
                fx, fb = float(a.f_x[i]), float(a.f_baseline[i])
                # F(x) ~ F(baseline): the relative gap divides by a near-zero score change and judges
                # nothing (the attribution is then near zero by construction): no evidence, said so
                flat = _ig_flat(fx, fb)
                metrics.append(Metric(
                    "ig_completeness_gap", subject, gap_i, ">", warn=IG_GAP_WARN, fail=IG_GAP_FAIL,
                    status="skipped" if flat else None,
                    description="IG completeness gap |sum(attr) - (F(x) - F(baseline))| / |F(x) - F(baseline)|: "
                                "the trapezoid rule's error; raise the IG steps when it is large (above "
                                f"{IG_GAP_FAIL:g} the attribution does not add up to the score change and "
                                "means nothing)",
                    note=(f"F(x) = {fx:.4g} and F(baseline) = {fb:.4g} differ by less than {IG_FLAT:g} of "
                          f"their size: the relative gap ({gap_i:.3g}) is no evidence; choose another baseline"
                          if flat else f"{o.steps} IG steps, {o.baseline} baseline")))
            mlist.append(MethodMap(
                method=m, heatmap=himg, overlay=oimg, npy=npy_path,
                concentration=None if ranking is not None else Concentration(**M.concentration(
                    red if red.ndim == 2 else red.reshape(1, -1))),
                total=float(attr.sum()),
                completeness_gap=gap_i, f_x=None if a.f_x is None else float(a.f_x[i]),
                f_baseline=None if a.f_baseline is None else float(a.f_baseline[i]), mask_fraction=mf,
                heat_max=_heat_max(red), mask_outlined=outlined, ranking=ranking, zero_fraction=zf))
        inputs_out.append(InputSaliency(name=smp.name, source=smp.source, synthetic=bool(smp.synthetic),
                                        top=[cs(j) for j in order], target=cs(tgt), thumbnail=thumb,
                                        maps=mlist, target_coords=scorer.coords(tgt),
                                        target_region=_region(scorer)))
    warnings += [w for w in scorer.warnings if w not in seen_warn]
    return {"slot0": slot0, "n_entries": len(entries), "n": len(batch), "failures": [],
            "inputs": plain(inputs_out), "metrics": plain(metrics), "warnings": warnings, "kind": kind,
            "prob_looks": prob_looks, "zero_maps": zero_maps, "n_maps": n_maps,
            "targets": [int(t) for t in base.targets.tolist()], "artifact_paths": art_paths, "arrays": arrays,
            "timings": {"saliency": time.perf_counter() - t0}}


def saliency(model: Any, samples: Sequence[Any], options: SaliencyOptions | None = None, *,
             preprocess: Any = None, masks: dict[str, np.ndarray] | None = None,
             failures: Sequence[tuple[str, str]] = (), progress: Callable[[int], None] | None = None,
             timings: dict[str, float] | None = None, executor: Callable[..., list] | None = None
             ) -> AnalysisOutput:
    """Run the methods on ``samples`` (from :mod:`jacaudit.data`, or a
    :class:`~jacaudit.data.dataset.DatasetIndex` whose entry ids are the report subjects).

    Returns an :class:`~jacaudit.analyses.base.AnalysisOutput`: ``result`` the :class:`SaliencyResult`,
    ``metrics`` (``ig_completeness_gap`` per input, ``sanity_spearman@method=M``, ``mask_outside@method=M`` per
    masked input; see the module docstring), ``warnings``, ``artifacts`` (per input and method
    ``maps/<stem>.npy`` -- the raw signed attribution with a batch axis --, ``maps/<stem>.heatmap.png`` and
    ``maps/<stem>.overlay.png``; the images' ``path`` and the maps' ``npy`` are these relative paths), and
    ``partial`` when ``failures`` (``(path, error)`` of inputs that could not be read) is not empty. ``masks``
    maps a sample's name to a boolean (H, W) object mask. Writes no files.

    The batches (consecutive ``batch_size`` slices) are computed by :func:`saliency_batch` here, in order, or by
    ``executor(plan)`` (e.g. sharded on Ray, resumed from shards), which returns their records in order;
    the aggregate (and the sanity test, on the first inputs) runs here, so both give the same report."""
    o = options or SaliencyOptions()
    timings = timings if timings is not None else {}
    index = saliency_index(samples)
    plan = make_saliency_plan(o, preprocess=preprocess, masks=masks)
    bctx = SaliencyContext(model, plan)
    t0 = time.perf_counter()
    if executor is None:
        from ..distributed.shards import decode_record, encode_record

        B = max(1, int(o.batch_size))
        records = []
        for s in range(0, len(index.entries), B):
            records.append(decode_record(*encode_record(saliency_batch(bctx, index.entries[s:s + B], s))))
            if progress:
                progress(records[-1]["n"])
    else:
        records = executor(plan)
    timings["saliency"] = round(time.perf_counter() - t0, 4)
    return aggregate_saliency(bctx, index, records, failures=failures, timings=timings)


def saliency_index(samples: Any) -> Any:
    """Samples -> a DatasetIndex whose entry ids are the report subjects (a repeated name gets ``#2``, ...)."""
    from ..data.dataset import DatasetIndex, Entry

    if isinstance(samples, DatasetIndex):
        return samples
    seen: dict[str, int] = {}
    ents = []
    for k, smp in enumerate(samples):
        n_seen = seen.get(smp.name, 0)
        seen[smp.name] = n_seen + 1
        ents.append(Entry(smp.name if n_seen == 0 else f"{smp.name}#{n_seen + 1}", k, None, sample=smp))
    return DatasetIndex(ents, "", False, all(s.pixels is not None for s in samples), total=len(ents))


def aggregate_saliency(bctx: SaliencyContext, index: Any, records: Sequence[dict[str, Any]], *,
                       failures: Sequence[tuple[str, str]] = (), timings: dict[str, float] | None = None
                       ) -> AnalysisOutput:
    from ..data import stack
    from ..gate import Metric
    from ..results import _from
    from ..results.saliency import FailedInput, InputSaliency, SaliencyResult

    plan, model, scorer = bctx.plan, bctx.model, bctx.scorer
    o, methods, preprocess = plan.options, plan.methods, plan.preprocess
    timings = timings if timings is not None else {}
    layout = preprocess.layout if preprocess is not None else "NCHW"
    records = sorted(records, key=lambda r: r["slot0"])
    failures = list(failures)
    warnings: list[str] = []
    if scorer.score == "output":
        warnings.append("the model's output is differentiated as it is (no Softmax input reachable): if it "
                        "is a probability, saliency describes the probability, not the logit")
    inputs_out, metrics, artifacts = [], [], []
    prob_warned = False
    for r in records:
        for p, msg in r.get("failures", []):
            failures.append((p, msg))
            warnings.append(msg)
        if not r.get("n"):
            continue
        if r["prob_looks"] and not prob_warned:
            warnings.append("the output looks like probabilities (non-negative, rows sum to 1): the "
                            "attributions are of the probability; export the logits for logit saliency")
        prob_warned = prob_warned or r["prob_looks"] is not None
        inputs_out += [_from(InputSaliency, d) for d in r["inputs"]]
        metrics += [_from(Metric, d) for d in r["metrics"]]
        warnings += r["warnings"]
        for j, path in enumerate(r["artifact_paths"]):
            a = r["arrays"][f"art{j}"]
            artifacts.append(Artifact(path, a.tobytes() if path.endswith(".png") else a))
    recs = [r for r in records if r.get("n")]
    if not recs:
        raise DataError("no input could be computed" + (f" ({failures[0][1]})" if failures else ""))
    kind = recs[0]["kind"]
    sanity: list = []
    if o.sanity and scorer.wrt:
        warnings.append(f"sanity check: not run when differentiating the internal tensor {scorer.wrt!r}")
    elif o.sanity:
        # the first inputs of the run, rebuilt from the records (their maps from the saved attributions)
        kept = []
        dtype = model.dtype or torch.float32
        for r in recs:
            for i in range(r["n"]):
                if len(kept) >= o.sanity_inputs:
                    break
                e = index.entries[r["slot0"] + i]
                maps_i = {}
                for m in methods:
                    path = next(p for p in r["artifact_paths"] if p.startswith(f"maps/{r['slot0'] + i:04d}-")
                                and p.endswith(f".{m}.npy"))
                    attr = r["arrays"][f"art{r['artifact_paths'].index(path)}"][0]
                    maps_i[m] = M.reduce_channels(attr, layout, o.reduction)
                kept.append((e.sample, stack([e.sample], device=model.device, dtype=dtype),
                             torch.tensor([r["targets"][i]], dtype=torch.long), maps_i))
        if kept:
            t1 = time.perf_counter()
            opts_m = o if list(o.methods) == methods else _with_methods(o, methods)
            sanity = sanity_check(model, scorer, kept, opts_m, preprocess, layout)
            timings["sanity"] = round(time.perf_counter() - t1, 4)
            for sc_ in sanity:
                metrics.append(_sanity_metric(sc_, len(kept)))
                if sc_.flagged:
                    warnings.append(f"sanity check: {sc_.method} maps barely change when the model's weights are "
                                    f"randomised (Spearman {sc_.final_spearman:.2f} >= {sc_.threshold}); they "
                                    "reflect the input more than the model")
                elif not sc_.steps:
                    warnings.append(f"sanity check: no layer of the model could be randomised; the {sc_.method} "
                                    "maps are not checked")
    warnings.extend(w for w in scorer.warnings if w not in warnings)
    for inp in inputs_out:
        for mm in inp.maps:
            if mm.completeness_gap is not None and mm.completeness_gap > IG_GAP_WARN and \
                    mm.f_x is not None and mm.f_baseline is not None and _ig_flat(mm.f_x, mm.f_baseline):
                warnings.append(f"IG on {inp.name}: F(x) = {mm.f_x:.4g} and F(baseline) = {mm.f_baseline:.4g} "
                                "are nearly equal, so the completeness gap is not judged; choose another baseline")
                break
            if mm.completeness_gap is not None and mm.completeness_gap > IG_GAP_WARN:
                worse = (": the attribution does not add up to F(x) - F(baseline) and means nothing"
                         if mm.completeness_gap > IG_GAP_FAIL else "")
                warnings.append(f"IG completeness gap on {inp.name} is {100 * mm.completeness_gap:.1f}%{worse}; "
                                f"raise the IG steps (now {o.steps})")
                break
    res = SaliencyResult(
        methods=list(methods), target="top1" if bctx.fixed is None and bctx.spec_t is None else str(o.target),
        score=scorer.score,
        score_tensor=scorer.score_tensor, reduction=o.reduction, input_name=scorer.input_name,
        preprocess=None if preprocess is None else preprocess.describe(),
        ig_baseline=o.baseline if "ig" in methods else None, ig_steps=o.steps if "ig" in methods else None,
        smoothgrad_samples=o.samples if "smoothgrad" in methods else None,
        smoothgrad_sigma=o.sigma if "smoothgrad" in methods else None,
        inputs=inputs_out, failures=[FailedInput(p, e) for p, e in failures], sanity=sanity,
        target_spec=scorer.explained, output_shape=None if scorer.out_shape is None else list(scorer.out_shape),
        input_kind=kind or "image", wrt=scorer.wrt)
    return AnalysisOutput(result=res, metrics=metrics, warnings=warnings, artifacts=artifacts,
                          partial=bool(failures))


#: IG completeness gap thresholds: warn above 10% (the trapezoid rule is coarse), fail above 50% (the
#: attribution's total is off by half the score change: it explains nothing; 86-114% were seen on real models)
IG_GAP_WARN = 0.1
IG_GAP_FAIL = 0.5
IG_FLAT = 0.05   # |F(x) - F(b)| below this share of |F(x)|, |F(b)|: the relative gap is not judged


def _ig_flat(fx: float, fb: float) -> bool:
    """F(x) and F(baseline) nearly equal: a gap relative to their difference judges nothing."""
    return abs(fx - fb) < IG_FLAT * max(abs(fx), abs(fb), 1e-12)


def _input_kind(x: torch.Tensor, preprocess: Any) -> str:
    """image (C, H, W per sample), features (F), sequence (T, D) or tensor (anything else)."""
    r = x.dim() - 1
    return {3: "image", 1: "features", 2: "sequence"}.get(r, "tensor")


def _ranking(attr: np.ndarray, kind: str, reduction: str, names: Sequence[str] | None,
             tokens: np.ndarray | None) -> tuple[list, np.ndarray]:
    """(the features / positions by magnitude, largest first; the magnitudes in input order)."""
    from ..results.saliency import Attributed

    a = np.asarray(attr, dtype=np.float64)
    if kind == "features":
        signed, mag = a.reshape(-1), np.abs(a.reshape(-1))
        labels = [str(names[j]) if names is not None else f"feature {j}" for j in range(mag.size)]
    else:
        signed = a.sum(axis=-1)
        mag = np.sqrt((a * a).sum(axis=-1)) if reduction == "l2" else np.abs(a).max(axis=-1)
        tok = tokens.reshape(-1) if tokens is not None and tokens.ndim == 1 and tokens.size == mag.size else None
        labels = [f"position {j}" + (f" (token {int(tok[j])})" if tok is not None else "") for j in range(mag.size)]
    total = float(mag.sum())
    order = np.argsort(-mag, kind="stable")
    out = [Attributed(index=int(j), name=labels[j], value=float(signed[j]), magnitude=float(mag[j]),
                      share=float(mag[j] / total) if total > 0 else 0.0) for j in order]
    return out, mag


def _explained(scorer: Scorer, target: int) -> str:
    if scorer.select is not None and scorer.select.kind == "sum":
        return f"sum of {scorer.score_tensor}{_region(scorer)}"
    c = scorer.coords(target)
    return f"{scorer.score_tensor}[{', '.join(map(str, c or []))}]"


def _region(scorer: Scorer) -> str | None:
    """A sum target's slice in the output's coordinates, e.g. [4, 0:2100]."""
    sel = scorer.select
    if sel is None or sel.kind != "sum":
        return None
    shape = scorer.out_shape or ()
    parts = []
    for d, size in enumerate(shape):
        it = sel.items[d] if d < len(sel.items) else slice(None)
        if isinstance(it, slice):
            a, b, _ = it.indices(size)
            parts.append(f"{a}:{b}")
        else:
            parts.append(str(it % size if size else it))
    return "[" + ", ".join(parts) + "]"


def _zero_metric(method: str, subject: str, zf: float) -> Any:
    """``map_zero_fraction@method=M[input]``: the share of the input's elements with a zero attribution; a map
    that is zero everywhere is skipped (no evidence), never passed."""
    from ..gate import Metric

    desc = ("share of the input's elements whose attribution is exactly 0; 1 means the explained score does not "
            "depend on the input at this point (e.g. a detector score that is zero there), and the map says "
            "nothing")
    if zf >= 1.0:
        return Metric(f"map_zero_fraction@method={method}", subject, zf, ">", status="skipped", description=desc,
                      note="the map is zero everywhere: no evidence about what the model uses")
    return Metric(f"map_zero_fraction@method={method}", subject, zf, ">", description=desc)


def _with_methods(o: SaliencyOptions, methods: list[str]) -> SaliencyOptions:
    from dataclasses import replace

    return replace(o, methods=list(methods))


def _sanity_metric(check: Any, n_inputs: int) -> Any:
    """``sanity_spearman@method=M`` on the model: the final |Spearman| of the cascade (skipped when nothing
    could be randomised: no evidence)."""
    from ..gate import Metric

    name = f"sanity_spearman@method={check.method}"
    desc = ("|Spearman rank correlation| between the original |map| and the map after randomising every layer's "
            "parameters from the output backwards (Adebayo et al. 2018), mean over the checked inputs; a map that "
            "barely changes does not depend on what the model learned")
    if not check.steps:
        return Metric(name, "model", None, ">=", status="skipped", description=desc,
                      note="no layer of the model has parameters that could be randomised: no evidence")
    v = abs(float(check.final_spearman))
    return Metric(name, "model", v, ">=", warn=float(check.threshold), description=desc,
                  note=f"{len(check.steps)} layer(s) randomised, {n_inputs} input(s)",
                  properties={"layers": len(check.steps), "inputs": n_inputs})
