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

:func:`saliency` runs methods over samples and builds the frozen :class:`SaliencyResult`;
:func:`jacaudit.analyses.sanity.sanity_check` is the parameter-randomisation test.
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

from ..engine.gradients import GroupGrads, Scorer, grouped_gradients, make_scorer
from ..errors import DataError, InputError, RuntimeFailure
from . import maps as M
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
                raise InputError(f"unknown --method {mm!r}; use {', '.join(METHODS)} or all")
            if mm not in out:
                out.append(mm)
    if not out:
        raise InputError("no --method given")
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
            raise InputError(f"--target {k} must not be negative")
        return k
    if labels and target in labels:
        return labels.index(target)
    if labels:
        low = [lab.lower() for lab in labels]
        if target.lower() in low:
            return low.index(target.lower())
        raise InputError(f"--target {target!r} is not a class index or a label in --labels")
    raise InputError(f"--target {target!r} is a label but no --labels file was given")


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
    sanity: bool = False
    sanity_layers: int | None = None
    sanity_threshold: float = 0.5
    sanity_inputs: int = 4
    thumb: int = 128
    top_k: int = 3


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60].strip("._") or "input"


def saliency(model: Any, samples: Sequence[Any], options: SaliencyOptions | None = None, *,
             preprocess: Any = None, out_dir: str | None = None, masks: dict[str, np.ndarray] | None = None,
             failures: Sequence[tuple[str, str]] = (), progress: Callable[[int], None] | None = None,
             timings: dict[str, float] | None = None) -> tuple[Any, list[str]]:
    """Run the methods on ``samples`` (from :mod:`jacaudit.data`); write heatmap/overlay PNGs and raw .npy to
    ``out_dir/maps`` when given. Returns (SaliencyResult, warnings). ``masks`` maps a sample's name to a boolean
    (H, W) object mask (the share of saliency mass inside is reported)."""
    from ..results import Image
    from ..results.saliency import (ClassScore, Concentration, FailedInput, InputSaliency, MethodMap,
                                    SaliencyResult)

    o = options or SaliencyOptions()
    timings = timings if timings is not None else {}
    if o.reduction not in ("max-abs", "l2"):
        raise InputError("--reduce must be max-abs or l2")
    if o.baseline not in BASELINES:
        raise InputError(f"unknown --baseline {o.baseline!r}; use one of {', '.join(BASELINES)}")
    scorer = make_scorer(model, o.input_name, o.output, o.use_logits)
    fixed = resolve_target(o.target, o.labels)
    layout = preprocess.layout if preprocess is not None else "NCHW"
    warnings: list[str] = []
    if scorer.score == "output":
        warnings.append("the model's output is differentiated as it is (no Softmax input reachable): if it "
                        "is a probability, saliency describes the probability, not the logit")
    maps_dir = os.path.join(out_dir, "maps") if out_dir else None
    if maps_dir:
        os.makedirs(maps_dir, exist_ok=True)
    dtype = model.dtype or torch.float32
    inputs_out = []
    kept_for_sanity: list[tuple[Any, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]] = []
    prob_looks = None
    t0 = time.perf_counter()
    counter = 0
    for bs in range(0, len(samples), max(1, o.batch_size)):
        batch = list(samples[bs:bs + o.batch_size])
        from ..data import stack
        x = stack(batch, device=model.device, dtype=dtype)
        extra = {}
        if batch[0].extra:
            extra = {k: torch.as_tensor(np.stack([s.extra[k] for s in batch])).to(model.device)
                     for k in batch[0].extra}
        targets = None if fixed is None else torch.full((x.shape[0],), fixed, dtype=torch.long)
        results: dict[str, Attribution] = {}
        base: Attribution | None = None
        for m in o.methods:
            if m == "gradxinput" and base is not None:
                results[m] = Attribution(m, base.grad * x, base.targets, base.ref_scores, base.ref_probs,
                                         grad=base.grad)
                continue
            if m == "grad" and base is not None:
                results[m] = Attribution(m, base.grad, base.targets, base.ref_scores, base.ref_probs,
                                         grad=base.grad)
                continue
            a = attribute(scorer, x, m, targets=targets, steps=o.steps, baseline=o.baseline, samples=o.samples,
                          sigma=o.sigma, preprocess=preprocess, seed=o.seed + bs, chunk_rows=o.chunk_rows,
                          extra=extra)
            results[m] = a
            if base is None:
                base = a
                targets = a.targets
        assert base is not None
        probs = base.ref_probs
        if probs is None and scorer.score == "output" and prob_looks is None:
            s = base.ref_scores
            prob_looks = bool((s >= 0).all() and torch.allclose(s.sum(1), torch.ones(s.shape[0], dtype=s.dtype),
                                                                atol=1e-3))
            if prob_looks:
                warnings.append("the output looks like probabilities (non-negative, rows sum to 1): the "
                                "attributions are of the probability; export the logits for logit saliency")
        for i, smp in enumerate(batch):
            k = counter
            counter += 1
            sc = base.ref_scores[i].double()
            pr = probs[i].double() if probs is not None else None
            order = torch.argsort(sc, descending=True)[: o.top_k].tolist()

            def cs(j: int) -> ClassScore:
                lab = o.labels[j] if o.labels and j < len(o.labels) else None
                return ClassScore(int(j), lab, float(sc[j]), None if pr is None else float(pr[j]))

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
                red = M.reduce_channels(attr, layout, o.reduction)
                heat = M.heatmap_rgb(red)
                stem = f"{k:04d}-{_safe(smp.name)}.{m}"
                npy_path = heat_path = over_path = None
                over = M.overlay_rgb(pixels, red) if pixels is not None and red.ndim == 2 and \
                    red.shape == pixels.shape[:2] else None
                if maps_dir:
                    npy_path = os.path.join(maps_dir, stem + ".npy")
                    np.save(npy_path, attr[None].astype(np.float32))
                    heat_path = os.path.join(maps_dir, stem + ".heatmap.png")
                    with open(heat_path, "wb") as f:
                        f.write(M.png_bytes(heat)[0])
                    if over is not None:
                        over_path = os.path.join(maps_dir, stem + ".overlay.png")
                        with open(over_path, "wb") as f:
                            f.write(M.png_bytes(over)[0])
                rel = (lambda p: None if p is None else os.path.relpath(p, out_dir))
                hd, hw, hh = M.png_bytes(heat, o.thumb)
                himg = Image(M.b64(hd), hw, hh, alt=f"{m} heatmap of {smp.name}", path=rel(heat_path))
                oimg = None
                if over is not None:
                    od, ow, oh = M.png_bytes(over, o.thumb)
                    oimg = Image(M.b64(od), ow, oh, alt=f"{m} overlay on {smp.name}", path=rel(over_path))
                gap = a.completeness_gap
                mf = None
                if mask is not None and red.ndim == 2:
                    mf = M.mask_fraction(red, mask)
                mlist.append(MethodMap(
                    method=m, heatmap=himg, overlay=oimg, npy=rel(npy_path),
                    concentration=Concentration(**M.concentration(red)), total=float(attr.sum()),
                    completeness_gap=None if gap is None else float(gap[i]),
                    f_x=None if a.f_x is None else float(a.f_x[i]),
                    f_baseline=None if a.f_baseline is None else float(a.f_baseline[i]), mask_fraction=mf))
            inputs_out.append(InputSaliency(name=smp.name, source=smp.source, synthetic=bool(smp.synthetic),
                                            top=[cs(j) for j in order], target=cs(tgt), thumbnail=thumb,
                                            maps=mlist))
            if o.sanity and len(kept_for_sanity) < o.sanity_inputs:
                kept_for_sanity.append((smp, x[i:i + 1], base.targets[i:i + 1],
                                        {m: M.reduce_channels(results[m].attr[i].cpu().numpy(), layout, o.reduction)
                                         for m in results}))
        if progress:
            progress(len(batch))
    timings["saliency"] = round(time.perf_counter() - t0, 4)
    sanity = []
    if o.sanity and kept_for_sanity:
        t1 = time.perf_counter()
        sanity = sanity_check(model, scorer, kept_for_sanity, o, preprocess, layout)
        timings["sanity"] = round(time.perf_counter() - t1, 4)
        for s in sanity:
            if s.flagged:
                warnings.append(f"sanity check: {s.method} maps barely change when the model's weights are "
                                f"randomised (Spearman {s.final_spearman:.2f} >= {s.threshold}); they reflect the "
                                "input more than the model")
    warnings.extend(w for w in scorer.warnings if w not in warnings)
    for inp in inputs_out:
        for mm in inp.maps:
            if mm.completeness_gap is not None and mm.completeness_gap > 0.1:
                warnings.append(f"IG completeness gap on {inp.name} is {100 * mm.completeness_gap:.1f}%: "
                                "raise --steps")
                break
    res = SaliencyResult(
        methods=list(o.methods), target="top1" if fixed is None else str(o.target), score=scorer.score,
        score_tensor=scorer.score_tensor, reduction=o.reduction, input_name=scorer.input_name,
        preprocess=None if preprocess is None else preprocess.describe(),
        ig_baseline=o.baseline if "ig" in o.methods else None, ig_steps=o.steps if "ig" in o.methods else None,
        smoothgrad_samples=o.samples if "smoothgrad" in o.methods else None,
        smoothgrad_sigma=o.sigma if "smoothgrad" in o.methods else None,
        inputs=inputs_out, failures=[FailedInput(p, e) for p, e in failures], sanity=sanity)
    return res, warnings
