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

from ..errors import DataError, InputError, RuntimeFailure
from . import maps as M

METHODS = ("grad", "gradxinput", "smoothgrad", "ig")
BASELINES = ("black", "blur", "noise", "zero")


# ---------------------------------------------------------------------------------------------------------
# The scored function
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Scorer:
    """x (N, ...) -> scores (N, K) to differentiate, and probabilities (N, K) or None."""

    model: Any
    input_name: str
    score_tensor: str
    score: str  # "logit" | "probability" | "output"
    prob_tensor: str | None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    batched: bool = True
    warnings: list[str] = field(default_factory=list)

    def _run(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        outs = [self.score_tensor] + ([self.prob_tensor] if self.prob_tensor else [])
        feeds = {self.input_name: x, **extra}
        return list(self.model.run(feeds, outputs=outs))

    def __call__(self, x: torch.Tensor, extra: dict[str, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        extra = extra or {}
        n = x.shape[0]
        if self.batched:
            try:
                res = self._run(x, extra)
                if res[0].dim() >= 1 and res[0].shape[0] == n:
                    return self._shape(res, n)
                if n == 1:
                    return self._shape(res, n)
            except InputError:
                raise
            except Exception:
                if n == 1:
                    raise
            self.batched = False
            self.warnings.append("the model does not run batched (fixed batch size in the graph?); inputs are "
                                 "evaluated one at a time, which is slower")
        parts = [self._run(x[i:i + 1], {k: v[i:i + 1] for k, v in extra.items()}) for i in range(n)]
        res = [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]
        return self._shape(res, n)

    @staticmethod
    def _shape(res: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = res[0]
        if s.dim() == 0:
            s = s.reshape(1, 1)
        s = s.reshape(n, -1) if s.shape[0] == n else s.reshape(1, -1).expand(n, -1)
        p = res[1].reshape(n, -1) if len(res) > 1 else None
        return s, p


def make_scorer(model: Any, input_name: str | None = None, output: str | None = None, use_logits: bool = True
                ) -> Scorer:
    """Pick the tensor to differentiate: the logits feeding a final Softmax when reachable (ONNX), else the
    output itself."""
    spec_in = model.input_spec(input_name)
    out = model.output_spec(output).name
    logits = None
    if use_logits:
        logits = model.softmax_input(out)
    if logits:
        return Scorer(model, spec_in.name, logits, "logit", out)
    return Scorer(model, spec_in.name, out, "output", None)


# ---------------------------------------------------------------------------------------------------------
# The batched gradient engine
# ---------------------------------------------------------------------------------------------------------
@dataclass
class GroupGrads:
    grads: torch.Tensor           # (R, ...) gradient of each row's target score
    scores: torch.Tensor          # (R,) each row's target score
    targets: torch.Tensor         # (N,) target class per group
    ref_scores: torch.Tensor      # (N, K) scores of each group's reference row
    ref_probs: torch.Tensor | None


def grouped_gradients(scorer: Scorer, rows: torch.Tensor, group: int, targets: torch.Tensor | None = None,
                      chunk_rows: int = 64, extra: dict[str, torch.Tensor] | None = None) -> GroupGrads:
    """Gradients of target scores for ``rows`` laid out as N groups of ``group`` consecutive rows.

    Row 0 of each group is its reference (the clean input): where ``targets`` is None the group's target is
    the argmax of the reference row's scores, taken inside the same forward pass as the gradient. Rows are
    processed in chunks of ``chunk_rows`` (groups may span chunks; the reference row comes first)."""
    R = rows.shape[0]
    n = R // group
    chunk_rows = max(1, int(chunk_rows))
    tgt = torch.full((n,), -1, dtype=torch.long) if targets is None else targets.clone().long()
    single = R <= chunk_rows
    grads = rows if single else torch.empty_like(rows)  # one chunk: keep autograd's tensor, no copy
    scores = torch.empty(R, dtype=rows.dtype)
    ref_scores: torch.Tensor | None = None
    ref_probs: torch.Tensor | None = None
    extra = extra or {}
    for s in range(0, R, chunk_rows):
        e = min(R, s + chunk_rows)
        xb = rows[s:e].detach().requires_grad_(True)
        gid = torch.arange(s, e) // group
        ex = {k: v[gid] for k, v in extra.items()}
        with torch.enable_grad():
            sc, pr = scorer(xb, ex)
            if ref_scores is None:
                ref_scores = torch.full((n, sc.shape[1]), float("nan"), dtype=sc.dtype)
                ref_probs = None if pr is None else torch.full((n, pr.shape[1]), float("nan"), dtype=pr.dtype)
            is_ref = (torch.arange(s, e) % group) == 0
            if is_ref.any():
                ref_rows = torch.nonzero(is_ref).flatten()
                g_ids = gid[ref_rows]
                ref_scores[g_ids] = sc[ref_rows].detach().to(ref_scores.dtype)
                if pr is not None:
                    ref_probs[g_ids] = pr[ref_rows].detach().to(ref_probs.dtype)
                unknown = tgt[g_ids] < 0
                if unknown.any():
                    tgt[g_ids[unknown]] = sc[ref_rows[unknown]].detach().argmax(dim=1)
            t = tgt[gid]
            if (t < 0).any():
                raise RuntimeFailure("internal: a group's reference row was not evaluated first")
            if (t >= sc.shape[1]).any():
                raise InputError(f"target class {int(t.max())} is out of range: the model scores "
                                 f"{sc.shape[1]} classes")
            sel = sc.gather(1, t[:, None]).squeeze(1)
            (g,) = torch.autograd.grad(sel.sum(), xb)
        if single:
            grads = g
        else:
            grads[s:e] = g
        scores[s:e] = sel.detach().to(scores.dtype)
    if not torch.isfinite(grads).all():
        raise RuntimeFailure("the gradient contains NaN or inf (the model is not differentiable here)")
    return GroupGrads(grads, scores, tgt, ref_scores, ref_probs)


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


def baseline_for(x: torch.Tensor, kind: str, preprocess: Any = None, seed: int = 0) -> torch.Tensor:
    """The IG baseline (same shape as x), see the module docstring."""
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
              extra: dict[str, torch.Tensor] | None = None) -> Attribution:
    """One method on a batch ``x`` (N, ...). ``targets`` (N,) fixes the classes; None = top-1 per sample."""
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
            raise InputError("--samples must be at least 1")
        gen = torch.Generator().manual_seed(int(seed))
        std = sigma * _range_of(x, preprocess)
        noise = torch.randn((n, samples) + tuple(x.shape[1:]), generator=gen, dtype=x.dtype) * std.unsqueeze(1)
        rows = torch.cat([x.unsqueeze(1), x.unsqueeze(1) + noise], dim=1).reshape((n * (samples + 1),) + x.shape[1:])
        gg = grouped_gradients(scorer, rows, samples + 1, targets, chunk_rows, extra)
        g = gg.grads.reshape((n, samples + 1) + tuple(x.shape[1:]))
        return Attribution(method, g[:, 1:].mean(1), gg.targets, gg.ref_scores, gg.ref_probs, grad=g[:, 0])
    if method == "ig":
        if steps < 1:
            raise InputError("--steps must be at least 1")
        b = baseline if isinstance(baseline, torch.Tensor) else baseline_for(x, baseline, preprocess, seed)
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
        from .sanity import sanity_check
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
