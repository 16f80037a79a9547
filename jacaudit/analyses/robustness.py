"""Robustness of a classifier over a dataset: FGSM and PGD over an epsilon sweep, the minimal flipping epsilon,
Jacobian norms and adversarial sensitivity directions, and gradient-masking checks.

``robustness(model, data, box, options) -> AnalysisOutput``. The attack recipes are in
:mod:`jacaudit.engine.attacks`; epsilons are in the attack space's units (:class:`~jacaudit.engine.attacks.Box`:
image pixels as a fraction of the pixel range, raw values for arrays), so normalisation inside or outside the
model gives the same answer.

Never a false "robust": a robust accuracy is only as good as the gradients the attacks follow. Each symptom of
gradient masking (Athalye, Carlini & Wagner 2018; Carlini et al. 2019, "On evaluating adversarial robustness";
Croce & Hein 2020) is a check with its evidence: probability outputs (the log is attacked, and said so),
zero / non-finite gradients, autodiff slopes that disagree with finite differences, PGD much stronger than FGSM
(or weaker), robust accuracy that does not fall with epsilon, and accuracy that survives a huge epsilon.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..engine.attacks import Box, Objective, fgsm, loss_and_grad, margin, pgd
from ..errors import InputError
from ..gate import Metric
from ..results import Image
from ..results.robustness import (AdversarialExample, Direction, FailedInput, FlipEpsilons, InputRobustness,
                                  MaskingFinding, NormSummary, RobustnessResult, SweepPoint)
from .base import AnalysisOutput, Artifact

__all__ = ["RobustnessOptions", "robustness", "image_box", "array_box", "parse_eps"]


@dataclass(frozen=True)
class RobustnessOptions:
    eps: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)
    #: L2 radii for PGD-L2 (None: eps * sqrt(d), the L2 length of an L-inf step of size eps)
    eps_l2: tuple[float, ...] | None = None
    pgd_norms: tuple[str, ...] = ("linf",)
    pgd_steps: int = 10
    #: PGD step size as a fraction of eps (default 2.5 / steps, Madry et al.)
    pgd_alpha: float | None = None
    random_start: bool = True
    bisect_steps: int = 4
    directions: int = 3
    norm_limit: int | None = 64
    probes: int = 32
    #: subspace-iteration cap per input (a non-converged input is said in the warnings)
    max_iter: int = 100
    batch_size: int = 32
    seed: int = 0
    classes: tuple[str, ...] | None = None
    use_logits: bool = True
    input_name: str | None = None
    output: str | None = None
    worst: int = 4
    fd_inputs: int = 16
    #: thresholds of the masking checks the analysis proposes (warn)
    gap_warn: float = 0.6


def parse_eps(text: str | Sequence[float]) -> tuple[float, ...]:
    """``0.001,0.003`` or fractions ``2/255,8/255`` -> sorted unique positive floats."""
    if not isinstance(text, str):
        vals = [float(v) for v in text]
    else:
        vals = []
        for part in text.split(","):
            p = part.strip()
            if not p:
                continue
            try:
                if "/" in p:
                    a, b = p.split("/", 1)
                    vals.append(float(a) / float(b))
                else:
                    vals.append(float(p))
            except (ValueError, ZeroDivisionError):
                raise InputError(f"epsilon {p!r} is not a number (e.g. 0.01 or 8/255)") from None
    if not vals:
        raise InputError("no epsilon given")
    if any(not math.isfinite(v) or v <= 0 for v in vals):
        raise InputError(f"every epsilon must be a positive number; got {text}")
    return tuple(sorted(set(vals)))


# ---------------------------------------------------------------------------------------------------------
# The attack space
# ---------------------------------------------------------------------------------------------------------
def image_box(pp: Any) -> Box:
    """Pixels as a fraction of 0..255, in the tensor's layout and channel order -> the model input through the
    per-channel affine preprocessing ``pp`` (:class:`jacaudit.data.Preprocess`)."""
    c = pp.n_channels
    zero = pp.to_tensor(np.zeros((1, 1, c)))
    full = pp.to_tensor(np.full((1, 1, c), 255.0))
    shift = torch.as_tensor(np.asarray(zero, dtype=np.float64))
    scale = torch.as_tensor(np.asarray(full, dtype=np.float64)) - shift
    return Box(scale, shift, 0.0, 1.0, "pixel value as a fraction of the pixel range (0-255 -> 0-1)")


def array_box(arrays: np.ndarray, given: tuple[float, float] | None) -> tuple[Box, str]:
    """Raw values: identity map; the range given, else [0, 1] when the data lies in it, else the data's
    min / max. Returns the box and where its range came from."""
    one, zero = torch.ones(()), torch.zeros(())
    if given is not None:
        lo, hi = given
        src = "given"
    else:
        lo, hi = float(np.min(arrays)), float(np.max(arrays))
        if lo >= 0.0 and hi <= 1.0:
            lo, hi, src = 0.0, 1.0, "[0, 1]: the data lies in it"
        else:
            src = "the data's min / max"
    if not hi > lo:
        raise InputError(f"the valid input range [{lo:g}, {hi:g}] is empty; give the range explicitly")
    return Box(one, zero, float(lo), float(hi), "the input's raw values"), src


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def _batches(n: int, b: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + b)) for s in range(0, n, b)]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _q(vals: Sequence[float]) -> dict[str, float]:
    a = np.asarray([v for v in vals if v is not None and math.isfinite(v)], dtype=np.float64)
    if not a.size:
        return {}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p95": float(np.quantile(a, 0.95)),
            "max": float(a.max()), "min": float(a.min())}


def _hist(vals: Sequence[float], bins: int = 10) -> tuple[list[float], list[int]]:
    a = np.asarray([v for v in vals if v is not None and math.isfinite(v)], dtype=np.float64)
    if not a.size:
        return [], []
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-6
    counts, edges = np.histogram(a, bins=bins, range=(lo, hi))
    return [float(e) for e in edges], [int(c) for c in counts]


def _share(mask: torch.Tensor) -> float:
    """Share of True in a boolean tensor, exactly (count / n in float64)."""
    return int(mask.sum()) / max(1, int(mask.numel()))


def _fmt(e: float) -> str:
    return f"{e:.6g}"


class _Runner:
    """The objective over the dataset in batches, with the batch-aligned extra feeds."""

    def __init__(self, obj: Objective, u0: torch.Tensor, y: torch.Tensor, extra: dict[str, torch.Tensor],
                 batch: int):
        self.obj, self.u0, self.y, self.extra, self.batch = obj, u0, y, extra, batch
        self.n = u0.shape[0]

    def ex(self, s: int, e: int, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if idx is not None:
            return {k: v[idx] for k, v in self.extra.items()}
        return {k: v[s:e] for k, v in self.extra.items()}

    def scores(self, u: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        out = []
        for s, e in _batches(u.shape[0], self.batch):
            sub = None if idx is None else idx[s:e]
            with torch.no_grad():
                out.append(self.obj(u[s:e], self.ex(s, e, sub)).detach())
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------------------
def robustness(model: Any, data: Any, box: Box, options: RobustnessOptions, *, preprocess: Any = None,
               image: bool = False, fixed: dict[str, torch.Tensor] | None = None, range_source: str = "",
               progress: Callable[[int, int], None] | None = None,
               timings: dict[str, float] | None = None) -> AnalysisOutput:
    """Probe ``data`` (:class:`jacaudit.data.dataset.LabelledData`) with FGSM and PGD; see the module docstring.

    ``box`` maps the attack space to the model input; ``image`` says the samples are images laid out by
    ``preprocess`` (pictures in the report); ``fixed`` holds other model inputs (batch 1, broadcast)."""
    import time

    from .. import data as D
    from ..engine.core import Target
    from ..engine.estimators import frobenius_norm, top_singular
    from ..engine.gradients import TargetNeeded, make_scorer

    o = options
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    warnings: list[str] = list(data.warnings)
    spec = model.input_spec(o.input_name)
    scorer = make_scorer(model, spec.name, o.output, use_logits=o.use_logits)
    samples = data.samples
    n = len(samples)
    dev = model.device
    x = D.stack(samples, device=dev, dtype=model.dtype)
    dtype = x.dtype
    box = box.to(dev, dtype)
    u0 = box.attack_point(x)
    outside = float(((box.model_input(u0) - x).abs() > 1e-4 * (1 + x.abs())).float().mean())
    if outside > 0.01:
        warnings.append(f"{100 * outside:.1f}% of the input values lie outside the valid range "
                        f"[{box.lo:g}, {box.hi:g}] and were clipped to it before attacking")
    extra: dict[str, torch.Tensor] = {}
    keys = sorted({k for s in samples for k in s.extra})
    for k in keys:
        if any(k not in s.extra for s in samples):
            raise InputError(f"input {k!r} is given for some samples only")
        extra[k] = torch.stack([torch.as_tensor(s.extra[k]) for s in samples]).to(dev)
    for k, v in (fixed or {}).items():
        if k not in extra:
            extra[k] = v.to(dev).expand((n,) + tuple(v.shape[1:])) if v.dim() and v.shape[0] == 1 else \
                v.to(dev)[None].expand((n,) + tuple(v.shape))
    missing = [s.name for s in model.inputs if s.name != spec.name and s.name not in extra]
    if missing:
        raise InputError(f"the model has other inputs without data: {', '.join(missing)}; give them as fixed "
                         "feeds (one value for every sample) or in the .npz")

    obj = Objective(scorer, box)
    B = max(1, int(o.batch_size))
    runner = _Runner(obj, u0, torch.zeros(n, dtype=torch.long, device=dev), extra, B)
    try:
        z_raw = runner.scores(u0)
    except TargetNeeded as e:
        raise InputError(f"robustness attacks a classifier: output {e.output!r} has shape (batch, "
                         f"{', '.join(map(str, e.shape))}), not one score per class; choose the class-score "
                         "output (detector and sequence outputs are not attacked)") from None
    if z_raw.shape[1] < 2:
        raise InputError(f"output {scorer.score_tensor!r} gives one score per sample; robustness needs at least "
                         "two class scores (for a sigmoid output, export the two-class logits)")
    # probabilities without a Softmax node to step back from: attack their log (= the logits up to a constant)
    score_kind = "logit" if scorer.score == "logit" else "output"
    findings: list[MaskingFinding] = []
    looks_prob = bool((z_raw >= -1e-6).all() and ((z_raw.sum(1) - 1).abs() < 1e-3).all())
    if score_kind == "output" and looks_prob:
        obj.log_probs = True
        score_kind = "log-probability"
        findings.append(MaskingFinding("probability_outputs", True,
                                       f"output {scorer.score_tensor!r} looks like probabilities (rows are "
                                       "non-negative and sum to 1) and no Softmax input is reachable: the log of "
                                       "the probabilities was attacked; saturated probabilities can hide "
                                       "gradients, attack a logits output if the model has one"))
        warnings.append(findings[-1].evidence)
    elif score_kind == "logit":
        findings.append(MaskingFinding("probability_outputs", False,
                                       f"the model ends in a Softmax: its input {scorer.score_tensor!r} (the "
                                       "logits) was attacked, not the probabilities"))
    else:
        findings.append(MaskingFinding("probability_outputs", False,
                                       f"output {scorer.score_tensor!r} does not look like probabilities: "
                                       "attacked as logits"))
    K = int(z_raw.shape[1])
    z0 = z_raw if not obj.log_probs else runner.scores(u0)

    # labels
    if data.labels is not None:
        y = torch.as_tensor(data.labels, dtype=torch.long, device=dev)
        if int(y.max()) >= K:
            raise InputError(f"label {int(y.max())} is out of range: the model scores {K} classes")
    else:
        y = z0.argmax(1)
        warnings.append("the data has no labels: the model's own predictions are the labels (clean accuracy 1 "
                        "by construction); robust accuracy is then the share of predictions that survive")
    runner.y = y
    classes = list(o.classes) if o.classes and len(o.classes) == K else None
    if o.classes and len(o.classes) != K:
        warnings.append(f"{len(o.classes)} labels for {K} classes: labels not used")

    def cname(k: int) -> str:
        return classes[k] if classes else str(k)

    # clean gradients (loss and margin), in batches
    g0 = torch.empty_like(u0)
    gm = torch.empty_like(u0)
    work_total = (n * (1 + len(o.eps) * (1 + o.pgd_steps * len(o.pgd_norms)) + o.bisect_steps * o.pgd_steps)
                  + min(n, o.norm_limit or n) * 2 + min(n, 64) * o.pgd_steps)
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress:
            progress(done, work_total)

    for s, e in _batches(n, B):
        g, _, gmb = loss_and_grad(obj, u0[s:e], y[s:e], runner.ex(s, e), with_margin=True)
        g0[s:e], gm[s:e] = g, gmb
        tick(e - s)
    pred0 = z0.argmax(1)
    correct0 = pred0 == y
    m0 = margin(z0, y)
    clean_acc = _share(correct0)
    gnorm = _flat(g0).norm(dim=1)
    finite = torch.isfinite(_flat(g0)).all(1)
    zero_grad = (gnorm == 0) & finite
    timings["clean"] = round(time.perf_counter() - t0, 4)

    # ---- FGSM sweep
    t1 = time.perf_counter()
    sweep: list[SweepPoint] = []
    first_flip: dict[int, tuple[str, float]] = {}
    first_adv = torch.zeros_like(u0)
    fgsm_flip_eps: list[float | None] = [None] * n
    ratio_max = 0.0
    g0_safe = torch.where(torch.isfinite(g0), g0, torch.zeros_like(g0))

    def record(attack: str, eps: float, adv: torch.Tensor, linear: bool, linf: bool = True
               ) -> tuple[SweepPoint, torch.Tensor]:
        """One sweep point; an L-inf point also feeds the observed ratio and each input's first flip."""
        nonlocal ratio_max
        z = runner.scores(adv)
        pred = z.argmax(1)
        m = margin(z, y)
        drop = (m0 - m)
        flipped = pred != pred0
        d = adv - u0
        dz = _flat(z - z0).norm(dim=1)
        dn = _flat(d).norm(dim=1)
        ratios = torch.where(dn > 0, dz / dn.clamp_min(1e-30), torch.zeros_like(dz))
        rmax = float(ratios.max()) if ratios.numel() else 0.0
        if not linf:
            return SweepPoint(attack, float(eps), _share(pred == y), _share(flipped), float(drop.mean()),
                              float(drop.max()), None, None, None, rmax), flipped
        ratio_max = max(ratio_max, rmax)
        pred_change = actual = lin = None
        if linear:
            pc = _flat(gm * d).sum(1)
            ac = m - m0
            pred_change, actual = float(pc.mean()), float(ac.mean())
            den = float(pc.abs().mean())
            lin = float((ac - pc).abs().mean()) / den if den > 0 else None
        for i in torch.nonzero(flipped).flatten().tolist():
            if i not in first_flip or eps < first_flip[i][1]:
                first_flip[i] = (attack, eps)
                first_adv[i] = adv[i]
        return SweepPoint(attack, float(eps), _share(pred == y), _share(flipped),
                          float(drop.mean()), float(drop.max()), pred_change, actual, lin, rmax), flipped

    for eps in o.eps:
        adv = fgsm(u0, g0_safe, eps, box)
        pt, flipped = record("fgsm", eps, adv, True)
        sweep.append(pt)
        for i in torch.nonzero(flipped).flatten().tolist():
            if fgsm_flip_eps[i] is None:
                fgsm_flip_eps[i] = float(eps)
        tick(n)
    timings["fgsm"] = round(time.perf_counter() - t1, 4)

    # ---- PGD sweep
    t2 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(int(o.seed))
    d_in = int(u0[0].numel())
    eps_l2 = tuple(o.eps_l2) if o.eps_l2 else tuple(e * math.sqrt(d_in) for e in o.eps)
    alpha_frac = o.pgd_alpha if o.pgd_alpha is not None else 2.5 / o.pgd_steps
    pgd_flip_first: list[int | None] = [None] * n  # index into o.eps of the first L-inf sweep point that flips

    def run_pgd(eps_t: torch.Tensor | float, norm: str, u: torch.Tensor, yy: torch.Tensor,
                idx: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
        out = []
        for s, e in _batches(u.shape[0], B):
            ee = eps_t[s:e] if isinstance(eps_t, torch.Tensor) else eps_t
            sub = None if idx is None else idx[s:e]
            out.append(pgd(obj, u[s:e], yy[s:e], ee, box, steps=o.pgd_steps, alpha=ee * alpha_frac, norm=norm,
                           random_start=o.random_start, generator=g, extra=runner.ex(s, e, sub)))
            tick((e - s) * o.pgd_steps)
        return torch.cat(out)

    for norm in o.pgd_norms:
        radii = o.eps if norm == "linf" else eps_l2
        for k, eps in enumerate(radii):
            adv = run_pgd(float(eps), norm, u0, y, None, gen)
            attack = "pgd-linf" if norm == "linf" else "pgd-l2"
            if norm != "linf":
                sweep.append(record(attack, eps, adv, False, linf=False)[0])
                continue
            pt, flipped = record(attack, eps, adv, False)
            sweep.append(pt)
            for i in torch.nonzero(flipped).flatten().tolist():
                if pgd_flip_first[i] is None:
                    pgd_flip_first[i] = k
    timings["pgd"] = round(time.perf_counter() - t2, 4)

    # ---- minimal flipping epsilon (PGD L-inf), bisection between sweep points
    flip_eps_res = None
    pgd_min: list[float | None] = [None] * n
    if "linf" in o.pgd_norms:
        t3 = time.perf_counter()
        gen_b = torch.Generator(device="cpu").manual_seed(int(o.seed) + 1)
        # bounds in float64 (the sweep's epsilons exactly); PGD casts each midpoint to the input's dtype
        lo = torch.zeros(n, dtype=torch.float64, device=dev)
        hi = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
        for i in range(n):
            if not bool(correct0[i]):
                pgd_min[i] = 0.0
            elif pgd_flip_first[i] is not None:
                k = pgd_flip_first[i]
                hi[i] = o.eps[k]
                lo[i] = o.eps[k - 1] if k > 0 else 0.0
        todo = torch.nonzero(torch.isfinite(hi)).flatten()
        if todo.numel() and o.bisect_steps > 0:
            for _ in range(int(o.bisect_steps)):
                mid = (lo[todo] + hi[todo]) / 2
                adv = run_pgd(mid, "linf", u0[todo], y[todo], todo, gen_b)
                z = runner.scores(adv, todo)
                fl = z.argmax(1) != pred0[todo]
                hi[todo] = torch.where(fl, mid, hi[todo])
                lo[todo] = torch.where(fl, lo[todo], mid)
        for i in todo.tolist():
            pgd_min[i] = float(hi[i])
        vals = [v for v in pgd_min if v is not None]
        edges, counts = _hist(vals)
        flipped_vals = [v for v in vals if v > 0]
        flip_eps_res = FlipEpsilons(pgd_min, float(np.median(flipped_vals)) if flipped_vals else None,
                                    sum(v is None for v in pgd_min), sum(v == 0.0 for v in vals),
                                    int(o.bisect_steps), edges, counts)
        timings["bisection"] = round(time.perf_counter() - t3, 4)

    # ---- Jacobian norms and sensitivity directions (per input)
    t4 = time.perf_counter()
    n_norm = n if o.norm_limit is None else min(n, int(o.norm_limit))
    frob: list[float | None] = [None] * n
    frob_se: list[float | None] = [None] * n
    spec_n: list[float | None] = [None] * n
    svals: list[list[float]] = [[] for _ in range(n)]
    cos_f: list[float | None] = [None] * n
    cos_g: list[float | None] = [None] * n
    rights: dict[int, torch.Tensor] = {}
    fmethod, fprobes, converged, matvecs = "exact", 0, 0, 0
    for i in range(n_norm):
        ex_i = {k: v[i:i + 1] for k, v in extra.items()}
        t = Target(lambda v, ex_i=ex_i: obj(v, ex_i), u0[i:i + 1], name=spec.name, output_name=scorer.score_tensor)
        fe = frobenius_norm(t, probes=o.probes, seed=o.seed + i)
        frob[i], frob_se[i], fmethod, fprobes = fe.value, fe.stderr, fe.method, fe.probes
        k = max(1, min(o.directions, K, d_in))
        se = top_singular(t, k=k, seed=o.seed + i, max_iter=o.max_iter)
        converged += int(se.converged)
        matvecs += se.matvecs
        spec_n[i] = se.spectral_norm
        svals[i] = [float(v) for v in se.values]
        v1 = se.right[0].reshape(-1).to(torch.float64)
        gi = g0_safe[i].reshape(-1).to(torch.float64)
        sg = gi.sign()
        if float(sg.norm()) > 0 and float(v1.norm()) > 0:
            cos_f[i] = abs(float(sg @ v1)) / (float(sg.norm()) * float(v1.norm()))
            cos_g[i] = abs(float(gi @ v1)) / (float(gi.norm()) * float(v1.norm()))
        rights[i] = se.right.detach()
        tick(2)
    norms = None
    if n_norm:
        fq, sq_ = _q(frob), _q(spec_n)
        sq_mean = float(np.mean([f * f for f in frob if f is not None]))
        se_mean = float(np.mean([s for s in frob_se if s is not None]))
        he, hc = _hist(spec_n)
        norms = NormSummary(n_norm, fmethod, fprobes, fq, se_mean, sq_mean, sq_, converged, ratio_max, matvecs,
                            he, hc)
        if converged < n_norm:
            warnings.append(f"the singular-value iteration did not converge on {n_norm - converged} of {n_norm} "
                            "inputs (their spectral norms are lower bounds)")
    timings["norms"] = round(time.perf_counter() - t4, 4)

    # ---- gradient masking: the margin's autodiff slope vs central differences along the FGSM direction, at the
    # smallest epsilon and a tenth of it. A correct gradient agrees better as the step shrinks (curvature fades);
    # an input is flagged only when the disagreement (> 50%) holds at both steps. The margin, unlike the loss,
    # does not saturate on confident inputs.
    fd_checked, fd_bad, fd_examples = 0, 0, []
    h = float(o.eps[0])
    nfd = min(n, int(o.fd_inputs))
    if nfd:
        gen_fd = torch.Generator(device="cpu").manual_seed(int(o.seed) + 2)
        idx = torch.arange(nfd, device=dev)
        dirs = g0_safe[:nfd].sign()
        rad = (torch.randint(0, 2, dirs.shape, generator=gen_fd).to(dev, dtype) * 2 - 1)
        dirs = torch.where(_flat(dirs).abs().sum(1).reshape((-1,) + (1,) * (dirs.dim() - 1)) > 0, dirs, rad)
        gm_safe = torch.where(torch.isfinite(gm[:nfd]), gm[:nfd], torch.zeros_like(gm[:nfd]))
        rel: list[list[tuple[float, float] | None]] = []
        for step in (h, h / 10):
            mu = margin(runner.scores(u0[:nfd] + step * dirs, idx), y[:nfd])
            md = margin(runner.scores(u0[:nfd] - step * dirs, idx), y[:nfd])
            central = (mu - md) / 2
            predicted = _flat(gm_safe * step * dirs).sum(1)
            row = []
            for i in range(nfd):
                c, p = float(central[i]), float(predicted[i])
                floor = 1e-4 * step * (1 + abs(float(m0[i])))
                row.append(None if max(abs(c), abs(p)) <= floor else (c, p))
            rel.append(row)
        for i in range(nfd):
            a, b = rel[0][i], rel[1][i]
            if a is None and b is None:
                continue
            fd_checked += 1
            bad = [v is not None and abs(v[0] - v[1]) > 0.5 * max(abs(v[0]), abs(v[1])) for v in (a, b)]
            if all(bad):
                fd_bad += 1
                if len(fd_examples) < 3:
                    fd_examples.append(f"{samples[i].name}: margin change {a[0]:.3g} vs the gradient's "
                                       f"{a[1]:.3g} at eps {_fmt(h)}, {b[0]:.3g} vs {b[1]:.3g} at {_fmt(h / 10)}")
    fd_frac = fd_bad / fd_checked if fd_checked else None
    findings.append(MaskingFinding(
        "fd_disagreement", bool(fd_frac is not None and fd_frac > 0.25),
        (f"on {fd_checked} input(s), the margin's change along the FGSM direction (central differences at eps "
         f"{_fmt(h)} and {_fmt(h / 10)}) disagrees with the gradient's first-order prediction by more than 50% at "
         f"both steps on {fd_bad}" + (": " + "; ".join(fd_examples) if fd_examples else "")) if fd_checked else
        "no input changed its margin measurably at the smallest epsilon: no finite-difference evidence"))

    # ---- a huge epsilon must break the model (else the gradients do not lead anywhere)
    big_eps = 0.5 * (box.hi - box.lo)
    big_acc = None
    if "linf" in o.pgd_norms and n:
        gen_big = torch.Generator(device="cpu").manual_seed(int(o.seed) + 3)
        nb = min(n, 64)
        big_steps = max(20, int(o.pgd_steps))  # a fixed, patient recipe: the probe must not depend on --pgd-steps
        adv = torch.cat([pgd(obj, u0[s:e], y[s:e], big_eps, box, steps=big_steps, alpha=big_eps * 2.5 / big_steps,
                             random_start=o.random_start, generator=gen_big, extra=runner.ex(s, e))
                         for s, e in _batches(nb, B)])
        tick(nb * o.pgd_steps)
        big_acc = _share(runner.scores(adv, torch.arange(nb, device=dev)).argmax(1) == y[:nb])
    timings["masking"] = round(time.perf_counter() - t4, 4)

    # ---- worst inputs: their first flipping perturbation as pictures
    artifacts: list[Artifact] = []
    examples: list[AdversarialExample] = []
    order = sorted(first_flip, key=lambda i: (first_flip[i][1], float(m0[i])))
    for i in order[: o.worst]:
        attack, eps = first_flip[i]
        adv_i = first_adv[i]
        z = runner.scores(adv_i[None], torch.tensor([i], device=dev))
        stem = f"adversarial/{i:04d}"
        npy = f"{stem}_{attack}_eps{_fmt(eps)}.npy"
        artifacts.append(Artifact(npy, adv_i.detach().cpu().numpy()))
        orig = pert = advimg = None
        if image and preprocess is not None:
            orig = _picture(u0[i], preprocess, f"{samples[i].name}: original")
            pert = _picture(_amplify(adv_i - u0[i]), preprocess, f"{samples[i].name}: perturbation, amplified")
            advimg = _picture(adv_i, preprocess, f"{samples[i].name}: adversarial ({attack}, eps {_fmt(eps)})")
        examples.append(AdversarialExample(samples[i].name, attack, float(eps), cname(int(y[i])),
                                           cname(int(pred0[i])), cname(int(z.argmax(1)[0])), orig, pert, advimg,
                                           npy))
    directions: list[Direction] = []
    show = sorted(rights, key=lambda i: -(spec_n[i] or 0))[: min(o.worst, len(rights))]
    for i in show:
        R = rights[i]
        for r in range(R.shape[0]):
            v = R[r][0] if R[r].dim() == u0.dim() else R[r]
            npy = f"directions/{i:04d}_v{r + 1}.npy"
            artifacts.append(Artifact(npy, v.detach().cpu().numpy()))
            img = _picture(_amplify(v), preprocess, f"{samples[i].name}: direction {r + 1}") if image and \
                preprocess is not None else None
            directions.append(Direction(samples[i].name, r + 1, svals[i][r], img, npy))

    per_input = [InputRobustness(samples[i].name, samples[i].source, int(y[i]), classes[int(y[i])] if classes
                                 else None, int(pred0[i]), float(m0[i]), fgsm_flip_eps[i], pgd_min[i],
                                 float(gnorm[i]) if math.isfinite(float(gnorm[i])) else float("nan"),
                                 frob[i], frob_se[i], spec_n[i], svals[i], cos_f[i], cos_g[i])
                 for i in range(n)]

    # ---- masking findings from the sweep
    by = {(p.attack, p.eps): p for p in sweep}
    gaps = [(e, by[("fgsm", e)].robust_accuracy - by[("pgd-linf", e)].robust_accuracy) for e in o.eps
            if ("pgd-linf", e) in by]
    if gaps:
        e_max, gmax = max(gaps, key=lambda t: t[1])
        e_min, gmin = min(gaps, key=lambda t: t[1])
        findings.append(MaskingFinding("pgd_much_stronger", gmax > o.gap_warn,
                                       f"largest FGSM - PGD robust-accuracy gap {gmax:.3f} at eps {_fmt(e_max)}: "
                                       + ("the single step misses what the iterations find (a locally "
                                          "non-linear loss: FGSM numbers cannot be trusted)" if gmax > o.gap_warn
                                          else "FGSM and PGD agree within the tolerance")))
        findings.append(MaskingFinding("pgd_weaker_than_fgsm", gmin < -0.1,
                                       f"PGD robust accuracy exceeds FGSM's by {-gmin:.3f} at eps {_fmt(e_min)}"
                                       if gmin < 0 else "PGD is at least as strong as FGSM at every epsilon"))
    strongest = [min(by[(a, e)].robust_accuracy for a in ("fgsm", "pgd-linf") if (a, e) in by) for e in o.eps]
    rises = [strongest[k + 1] - strongest[k] for k in range(len(strongest) - 1)]
    rise = max([0.0, *rises])
    findings.append(MaskingFinding("accuracy_rises_with_eps", rise > 0.05,
                                   f"robust accuracy rises by {rise:.3f} between consecutive epsilons" if rise > 0
                                   else "robust accuracy never rises with epsilon"))
    if big_acc is not None:
        findings.append(MaskingFinding("huge_eps_survives", big_acc > 0.1,
                                       f"PGD at eps {_fmt(big_eps)} (half the valid range, {big_steps} steps) leaves robust accuracy "
                                       f"{big_acc:.3f}" + (": the gradients do not lead to an adversarial input "
                                                          "(masked or obfuscated)" if big_acc > 0.1 else "")))
    nz, nnf = int(zero_grad.sum()), int((~finite).sum())
    findings.append(MaskingFinding("zero_gradients", nz > 0,
                                   f"{nz} of {n} input(s) have an all-zero loss gradient" + (
                                       " (" + ", ".join(samples[i].name for i in
                                                        torch.nonzero(zero_grad).flatten().tolist()[:3]) + ")"
                                       if nz else "")))
    findings.append(MaskingFinding("nonfinite_gradients", nnf > 0,
                                   f"{nnf} of {n} input(s) have NaN/inf in the loss gradient"))
    for f in findings:
        if f.flagged and f.evidence not in warnings:
            warnings.append(f"gradient masking? {f.name}: {f.evidence}")

    result = RobustnessResult(
        input_name=spec.name, score_tensor=scorer.score_tensor, score=score_kind, labels_source=data.source,
        classes=classes, n_inputs=n, n_total=data.total, clean_accuracy=clean_acc, units=box.units,
        range=[float(box.lo), float(box.hi)], range_source=range_source, eps=[float(e) for e in o.eps],
        eps_l2=[float(e) for e in eps_l2] if "l2" in o.pgd_norms else None,
        pgd={"steps": int(o.pgd_steps), "alpha": f"{alpha_frac:g} x eps", "random_start": bool(o.random_start),
             "norms": list(o.pgd_norms), "bisection_steps": int(o.bisect_steps), "seed": int(o.seed)},
        sweep=sweep, flip_eps=flip_eps_res, norms=norms, inputs=per_input, examples=examples,
        directions=directions, masking=findings, failures=[FailedInput(p, m) for p, m in data.failures],
        input_kind="image" if image else ("features" if u0.dim() == 2 else "tensor"))
    metrics = _metrics(result, o, nz, nnf, n, fd_frac, fd_checked, big_acc, big_eps, gaps, rise)
    if n and nz + nnf == n:  # no attack had a gradient to follow: the sweep is no evidence of robustness
        note = "no input has a usable loss gradient (all zero or non-finite): the attacks could not move"
        metrics = [m if not any(m.name.startswith(p) for p in _SWEEP_METRICS) else
                   Metric(m.name, m.subject, m.value, m.op, m.warn, m.fail, "skipped", note, m.description,
                          m.properties) for m in metrics]
    timings["analysis"] = round(time.perf_counter() - t0, 4)
    return AnalysisOutput(result=result, metrics=metrics, warnings=warnings, artifacts=artifacts,
                          partial=bool(data.failures))


def _amplify(d: torch.Tensor) -> torch.Tensor:
    """A signed tensor -> [0, 1] around 0.5 (0.5 + 0.5 d / s, s the 99th percentile of |d|, clipped)."""
    a = d.detach().abs().reshape(-1).double()
    m = float(torch.quantile(a, 0.99)) if a.numel() > 1 else float(a.max())
    m = m if m > 0 else float(a.max())
    return (0.5 + 0.5 * d / m).clamp(0, 1) if m > 0 else torch.full_like(d, 0.5)


def _picture(u: torch.Tensor, pp: Any, alt: str) -> Image:
    """An attack-space image (pixel fraction, the tensor's layout / channel order) -> a report Image."""
    from . import maps as M

    a = u.detach().cpu().double().numpy()
    if pp.layout == "NCHW":
        a = a.transpose(1, 2, 0)
    rgb = pp.pixels_to_rgb(np.clip(a, 0, 1) * 255.0)
    side = max(rgb.shape[0], rgb.shape[1])
    scale = max(1, 128 // side) if side < 128 else 1
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    data, w, h = M.png_bytes(rgb, max_side=256)
    return Image(M.b64(data), w, h, alt=alt)


_SWEEP_METRICS = ("robust_accuracy", "flip_rate", "fgsm_", "pgd_", "min_flip_eps", "never_flipped")


def _metrics(r: RobustnessResult, o: RobustnessOptions, nz: int, nnf: int, n: int, fd_frac: float | None,
             fd_checked: int, big_acc: float | None, big_eps: float, gaps: list, rise: float) -> list[Metric]:
    subj = "dataset"
    ms: list[Metric] = [Metric("clean_accuracy", subj, r.clean_accuracy, "<",
                               description=f"accuracy without perturbation (labels: {r.labels_source})")]
    by = {(p.attack, p.eps): p for p in r.sweep}
    name = {"fgsm": "fgsm", "pgd-linf": "pgd", "pgd-l2": "pgd_l2"}
    for p in r.sweep:
        tag = f"@eps={_fmt(p.eps)}"
        ms.append(Metric(f"{name[p.attack]}_robust_accuracy{tag}", subj, p.robust_accuracy, "<",
                         description=f"accuracy under {p.attack} at this epsilon"))
        ms.append(Metric(f"{name[p.attack]}_flip_rate{tag}", subj, p.flip_rate, ">",
                         description=f"share of predictions {p.attack} changes at this epsilon"))
        ms.append(Metric(f"{name[p.attack]}_mean_margin_drop{tag}", subj, p.mean_margin_drop, ">",
                         description="mean margin(clean) - margin(adversarial)"))
    for e in r.eps:
        pts = [by[(a, e)] for a in ("fgsm", "pgd-linf") if (a, e) in by]
        tag = f"@eps={_fmt(e)}"
        ms.append(Metric(f"robust_accuracy{tag}", subj, min(p.robust_accuracy for p in pts), "<",
                         description="accuracy under the strongest L-inf attack run (FGSM or PGD) at this epsilon"))
        ms.append(Metric(f"flip_rate{tag}", subj, max(p.flip_rate for p in pts), ">",
                         description="share of predictions the strongest L-inf attack changes at this epsilon"))
    if r.flip_eps is not None:
        fe = r.flip_eps
        ms.append(Metric("min_flip_eps_median", subj, fe.median, "<",
                         status="skipped" if fe.median is None else None,
                         note="no input flipped within the sweep" if fe.median is None else
                         f"{fe.never_flipped} input(s) never flipped, {fe.misclassified} misclassified clean",
                         description="median minimal flipping epsilon (PGD L-inf, bisection) over the inputs "
                                     "that flip"))
        ms.append(Metric("never_flipped_fraction", subj, fe.never_flipped / max(n, 1), "<",
                         description="share of inputs no epsilon of the sweep flipped"))
    if r.norms is not None:
        nm = r.norms
        ms += [Metric("jacobian_frobenius_mean", subj, nm.frobenius.get("mean"), ">",
                      note=(f"exact from {nm.frobenius_probes} vjps" if nm.frobenius_method == "exact" else
                            f"{nm.frobenius_method}, {nm.frobenius_probes} probes"),
                      properties={"stderr_mean": nm.frobenius_stderr_mean},
                      description="mean ||J||_F of the scores w.r.t. the input (attack units)"),
               Metric("jacobian_frobenius_sq_mean", subj, nm.frobenius_sq_mean, ">",
                      description="mean ||J||_F^2, the Jacobian regulariser's penalty (Hoffman et al. 2019)"),
               Metric("lipschitz_median", subj, nm.spectral.get("median"), ">",
                      description="median spectral norm ||J||_2 (local Lipschitz estimate, L2)"),
               Metric("lipschitz_p95", subj, nm.spectral.get("p95"), ">",
                      description="95th percentile of ||J||_2 over the inputs"),
               Metric("lipschitz_max", subj, nm.spectral.get("max"), ">",
                      description="largest ||J||_2 over the inputs"),
               Metric("observed_lipschitz_max", subj, nm.observed_ratio_max, ">",
                      description="largest ||f(x') - f(x)|| / ||x' - x|| under the probes")]
    # gradient masking (proposed warn thresholds)
    ms.append(Metric("masking_zero_gradients", subj, nz / max(n, 1), ">", warn=0.0,
                     description="share of inputs whose loss gradient is exactly zero (masking, or saturation)"))
    ms.append(Metric("masking_nonfinite_gradients", subj, nnf / max(n, 1), ">", fail=0.0,
                     description="share of inputs with NaN/inf in the loss gradient (the attacks are invalid)"))
    ms.append(Metric("masking_probability_outputs", subj, 1.0 if r.score == "log-probability" else 0.0, ">",
                     warn=0.0, description="1 when only probabilities could be attacked (their log)"))
    ms.append(Metric("masking_fd_disagreement", subj, fd_frac, ">", warn=0.25,
                     status="skipped" if fd_frac is None else None,
                     note="" if fd_frac is not None else "no input changed its loss measurably: no evidence",
                     properties={"inputs_checked": fd_checked},
                     description="share of inputs where the gradient's first-order prediction of the loss change "
                                 "along the FGSM direction misses the central difference by > 50%"))
    if gaps:
        ms.append(Metric("masking_fgsm_pgd_gap", subj, max(g for _, g in gaps), ">", warn=o.gap_warn,
                         description="largest FGSM minus PGD robust accuracy over the sweep (PGD much stronger)"))
        ms.append(Metric("masking_pgd_weaker", subj, max(0.0, max(-g for _, g in gaps)), ">", warn=0.1,
                         description="largest PGD minus FGSM robust accuracy (PGD should be at least as strong)"))
    ms.append(Metric("masking_accuracy_rise", subj, rise, ">", warn=0.05,
                     description="largest rise of robust accuracy between consecutive epsilons"))
    if big_acc is not None:
        ms.append(Metric("masking_huge_eps_accuracy", subj, big_acc, ">", warn=0.1,
                         note=f"PGD at eps {_fmt(big_eps)}",
                         description="robust accuracy under PGD at half the valid range (should be ~0)"))
    return ms
