"""Sensitivity through depth (backprop is the chain rule over per-block Jacobians).

``gradflow_analysis(model, feeds, options) -> AnalysisOutput`` (see :mod:`jacaudit.analyses.base`).

Along the main path h_0 = the input, h_1, ..., h_L (internal tensors) to the output y:

* ``||dy/dh_l||_F`` at every depth (one vjp per output element, or Hutchinson probes for a large output), through
  the model with h_l overridden (every consumer of h_l reads the varied value);
* the spectral norm of each block Jacobian ``dh_{l+1}/dh_l`` (and of the last, ``dy/dh_L``) by power iteration
  (:func:`jacaudit.engine.estimators.top_singular`: jvp + vjp, J never materialised), with its residual;
* the running product of the block norms (an upper bound on the composite's spectral norm).

Main path (found by evaluation alone, no knowledge of the file format): a tensor every input-to-output path
passes through -- to first order: an input tangent pushed through the model with the tensor overridden (so
that only the paths through it carry the tangent) reaches the output unchanged (:func:`main_path`). Residual branches are not on it; a residual block's output is. More than ``max_layers`` of them: evenly
spaced (the last kept), so a block may span several tensors.

Metrics (subject ``d <output> / d h``): ``vanishing_ratio`` = min_l ||dy/dh_l|| / ||dy/dh_L|| (warns below
1e-2, fails below 1e-4), ``exploding_ratio`` = max_l of the same (warns above 1e2, fails above 1e4),
``nonfinite_values`` (fails above 0), and per block ``block_spectral_norm`` (no default thresholds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError
from ..gate import Metric
from .base import AnalysisOutput

__all__ = ["GradflowOptions", "gradflow_analysis", "main_path"]


@dataclass(frozen=True)
class GradflowOptions:
    output_name: str | None = None
    logits: bool = False
    layers: tuple[str, ...] = ()      # named main-path tensors (default: found automatically)
    max_layers: int = 24
    probes: int = 16                  # Hutchinson probes for ||dy/dh|| when the output has more elements
    power_iters: int = 60
    seed: int = 0


def main_path(model: Any, feeds: dict, main: str, output: str, seed: int = 0) -> list[str]:
    """The internal tensors every path from input ``main`` to ``output`` passes through (to first order), in
    graph order.

    Tested on tangents, not values (a saturated chain moves its output by less than the rounding of its values,
    but its tangents keep their relative precision): for a random input tangent v, with t' = dt/dx v and
    y' = dy/dx v, the tensor t is on the main path when pushing t' through the model with t overridden (so only
    paths through t carry it) gives y' back."""
    from ..engine.core import prepare

    skip = {output} | {o.name for o in model.outputs} | {i.name for i in model.inputs}
    names = [t for t in model.internal_tensors() if t not in skip]
    if not names:
        raise InputError("this model exposes no internal tensors (an ONNX graph does; TorchScript submodules are "
                         "not supported): the main path cannot be found")
    x = feeds[main]
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype).to(x.device)
    with torch.no_grad():
        vals = model.run(feeds, outputs=names)
    keep = [(t, a) for t, a in zip(names, vals) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    names = [t for t, _ in keep]

    def f_all(z: torch.Tensor):
        return tuple(model.run({**feeds, main: z}, outputs=[*names, output]))

    try:
        tangents = torch.func.jvp(f_all, (x,), (v,))[1]
    except Exception:
        tangents = torch.autograd.functional.jvp(f_all, x, v)[1]
    ydot = tangents[-1].detach()
    scale = float(ydot.abs().max())
    if not math.isfinite(scale):
        raise InputError("the output's derivative is not finite at this input: the main path cannot be found")
    if scale == 0.0:
        raise InputError("the output does not depend on the input here (a zero derivative): the main path "
                         "cannot be found; name the layers")
    rel = 1e-4 if x.dtype != torch.float64 else 1e-9
    found = []
    for t, tdot in zip(names, tangents[:-1]):
        tdot = tdot.detach()
        if not bool(tdot.abs().max() > 0):
            continue  # constant here: not on a path that carries the input's variation
        try:
            tt = prepare(model, feeds, input=main, output=output, wrt=t)
            y2 = tt.jvp(tdot).detach()
        except Exception:
            continue
        if y2.shape == ydot.shape and float((y2 - ydot).abs().max()) <= rel * scale:
            found.append(t)
    return found


def gradflow_analysis(model: Any, feeds: Any, options: GradflowOptions = GradflowOptions(), *,
                      progress: Callable[[int, int], None] | None = None,
                      timings: dict[str, float] | None = None) -> AnalysisOutput:
    from ..engine.core import prepare
    from ..engine.estimators import frobenius_norm, top_singular
    from ..results import timed
    from ..results.gradflow import GradflowBlock, GradflowDepth, GradflowResult

    o = options
    timings = timings if timings is not None else {}
    main = feeds.input_name
    fd = dict(feeds.feeds)
    warnings = list(feeds.warnings)
    t0 = prepare(model, fd, input=main, output=o.output_name, logits=o.logits)
    out = t0.output_name
    warnings += [n for n in t0.notes if n not in warnings]
    if not o.logits and getattr(model, "softmax_input", lambda _o: None)(t0.output_name):
        warnings.append(f"output {t0.output_name!r} comes out of a Softmax: its derivatives saturate; the "
                        "pre-softmax logits (logits option) are usually what to analyse")
    if o.layers:
        known = set(model.internal_tensors())
        bad = [t for t in o.layers if t not in known]
        if bad:
            from ..models.base import did_you_mean
            raise InputError(f"no tensor named {bad[0]!r} in the graph{did_you_mean(bad[0], sorted(known))} "
                             "(inspect --tensors lists the internal tensors)")
        layers = list(o.layers)
        found = 0
        selection = f"{len(layers)} tensor(s) named"
    else:
        with timed(timings, "main_path"):
            path = main_path(model, fd, main, out, seed=o.seed)
        found = len(path)
        if not path:
            raise InputError("no internal tensor lies on every input-to-output path; name the layers")
        layers = path
        if len(path) > o.max_layers:
            idx = sorted({round(k * (len(path) - 1) / (o.max_layers - 1)) for k in range(o.max_layers)})
            layers = [path[i] for i in idx]
        selection = (f"found automatically: {len(path)} main-path tensor(s) (every input-to-output path passes "
                     "through them: an input tangent routed through one alone reaches the output unchanged)"
                     + (f", {len(layers)} evenly spaced kept" if len(layers) < len(path) else ""))
    chain = [main, *layers]
    depths: list[GradflowDepth] = []
    blocks: list[GradflowBlock] = []
    nonfinite = 0
    total = 2 * len(chain)
    done = 0
    with timed(timings, "gradflow"):
        for d, h in enumerate(chain):
            t = prepare(model, fd, input=main, output=out, wrt=h, logits=False) if d else t0
            fe = frobenius_norm(t, probes=o.probes, seed=o.seed + d)
            v = float(fe.value)
            if not math.isfinite(v):
                nonfinite += 1
            depths.append(GradflowDepth(d, h, [int(s) for s in t.in_shape], v, float(fe.stderr), fe.method, None,
                                        float(t.x.detach().double().norm())))
            done += 1
            if progress is not None:
                progress(done, total)
        prod = 1.0
        for k, src in enumerate(chain):
            dst = chain[k + 1] if k + 1 < len(chain) else out
            t = prepare(model, fd, input=main, output=dst, wrt=src, logits=False)
            try:
                se = top_singular(t, k=1, max_iter=o.power_iters, seed=o.seed + k)
                s, res, conv, it = float(se.values[0]), float(se.residuals[0]), bool(se.converged), int(se.iterations)
            except Exception as e:  # NaN/inf in the block
                from ..errors import RuntimeFailure
                if not isinstance(e, RuntimeFailure):
                    raise
                s, res, conv, it = float("nan"), None, False, 0
                nonfinite += 1
            prod = prod * s
            blocks.append(GradflowBlock(k, src, dst, s, res, conv, it, prod))
            done += 1
            if progress is not None:
                progress(done, total)
    last = depths[-1].grad_norm
    import dataclasses
    if last and math.isfinite(last) and last > 0:
        depths = [dataclasses.replace(dp, ratio=dp.grad_norm / last) for dp in depths]
    ratios = [dp.ratio for dp in depths if dp.ratio is not None and math.isfinite(dp.ratio)]
    unconv = [b for b in blocks if not b.converged]
    if unconv:
        warnings.append(f"power iteration did not converge for {len(unconv)} block(s) in {o.power_iters} "
                        "iterations: their spectral norms are lower estimates")
    if any(dp.grad_method == "hutchinson" for dp in depths):
        warnings.append(f"||dy/dh|| estimated by Hutchinson ({o.probes} probes): the output has more elements "
                        "than probes")
    result = GradflowResult(
        input_name=str(main), output=str(out), output_shape=[int(s) for s in t0.out_shape],
        input_source=str(feeds.source), synthetic_input=bool(feeds.synthetic), layer_selection=selection,
        main_path=found, depths=depths, blocks=blocks, vanishing_ratio=min(ratios) if ratios else None,
        exploding_ratio=max(ratios) if ratios else None, dtype=str(t0.dtype).replace("torch.", ""),
        device=str(t0.device), logits=bool(o.logits), log10_grad=[_lg(d.grad_norm) for d in depths],
        log10_block=[_lg(b.spectral_norm) for b in blocks], log10_product=[_lg(b.running_product) for b in blocks])
    return AnalysisOutput(result=result, metrics=_metrics(result, nonfinite), warnings=warnings)


def _lg(v: float | None) -> float | None:
    return math.log10(v) if v is not None and math.isfinite(v) and v > 0 else None


def _metrics(r, nonfinite: int) -> list[Metric]:
    subject = f"d {r.output} / d h"
    zero = r.depths[-1].grad_norm == 0
    skip = dict(status="skipped", note="the output does not depend on the last main-path tensor (zero "
                                       "derivative): no evidence") if zero else {}
    vd = min((d for d in r.depths if d.ratio is not None), key=lambda d: d.ratio, default=None)
    ed = max((d for d in r.depths if d.ratio is not None), key=lambda d: d.ratio, default=None)
    ms = [Metric("nonfinite_values", subject, float(nonfinite), ">", fail=0.0,
                 description="depths or blocks whose derivatives hold NaN/inf"),
          Metric("vanishing_ratio", subject, r.vanishing_ratio, "<", warn=1e-2, fail=1e-4,
                 **(skip or {"note": f"smallest at depth {vd.depth} ({vd.tensor})" if vd else ""}),
                 description="min over depths of ||dy/dh_l|| / ||dy/dh_L|| (h_L: the last main-path tensor)"),
          Metric("exploding_ratio", subject, r.exploding_ratio, ">", warn=1e2, fail=1e4,
                 **(skip or {"note": f"largest at depth {ed.depth} ({ed.tensor})" if ed else ""}),
                 description="max over depths of ||dy/dh_l|| / ||dy/dh_L||")]
    for b in r.blocks:
        ms.append(Metric("block_spectral_norm", f"block {b.index}: {b.source} -> {b.target}", b.spectral_norm, ">",
                         note="" if b.converged else "power iteration did not converge",
                         description="||dh_{l+1}/dh_l||_2 by power iteration"))
    return ms
