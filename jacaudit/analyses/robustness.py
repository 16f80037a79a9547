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
from dataclasses import asdict, dataclass
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

__all__ = ["RobustnessOptions", "robustness", "image_box", "array_box", "parse_eps", "Plan", "BatchContext",
           "make_plan", "compute_batch", "aggregate", "run_batches"]


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


def array_box(arrays: np.ndarray | None, given: tuple[float, float] | None) -> tuple[Box, str]:
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


# ---------------------------------------------------------------------------------------------------------
# The analysis, in three parts: a plan (decided once, on the first batch), one batch of inputs (anywhere: in
# this process or on a worker; its result is plain data), and the aggregate over all batches (here). One process
# and a sharded run go through the same three, so their reports are the same.
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What every batch needs besides the model: the options and what the driver decided on the first batch."""

    options: RobustnessOptions
    box: Box                      # on the CPU, float64
    log_probs: bool               # attack the log of probability outputs
    n_classes: int
    eps_l2: tuple[float, ...]
    alpha_frac: float
    image: bool
    preprocess: Any
    fixed: dict[str, torch.Tensor]
    input_name: str
    labelled: bool
    n_entries: int                # inputs listed for the run (the work estimate)
    score_tensor: str = ""        # the attacked tensor's name
    score: str = "logit"          # the scorer's kind: logit (a Softmax input) or output
    sample_rank: int = 1          # dims of one sample (1: a feature vector)


class BatchContext:
    """A worker's view of the model: the scorer and the objective, built once per process."""

    def __init__(self, model: Any, plan: Plan):
        from ..engine.gradients import make_scorer

        o = plan.options
        self.model, self.plan = model, plan
        self.scorer = make_scorer(model, plan.input_name, o.output, use_logits=o.use_logits)
        self.box = plan.box.to(model.device, model.dtype or torch.float32)
        self.obj = Objective(self.scorer, self.box, log_probs=plan.log_probs)


def _extra(items: Sequence[tuple[Any, Any]], plan: Plan, dev: Any) -> dict[str, torch.Tensor]:
    n = len(items)
    extra: dict[str, torch.Tensor] = {}
    keys = sorted({k for _, s in items for k in s.extra})
    for k in keys:
        if any(k not in s.extra for _, s in items):
            raise InputError(f"input {k!r} is given for some samples only")
        extra[k] = torch.stack([torch.as_tensor(s.extra[k]) for _, s in items]).to(dev)
    for k, v in plan.fixed.items():
        if k not in extra:
            extra[k] = v.to(dev).expand((n,) + tuple(v.shape[1:])) if v.dim() and v.shape[0] == 1 else \
                v.to(dev)[None].expand((n,) + tuple(v.shape))
    return extra


def _sub(extra: dict[str, torch.Tensor], idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return extra if idx is None else {k: v[idx] for k, v in extra.items()}


def _f(v: Any) -> float | None:
    if v is None:
        return None
    return float(v)


def make_plan(model: Any, index: Any, box: Box, options: RobustnessOptions, *, preprocess: Any = None,
              image: bool = False, fixed: dict[str, torch.Tensor] | None = None) -> Plan:
    """Decide, on the first batch that can be read, what the whole run attacks: the scored tensor, whether
    the outputs are probabilities (their log is attacked), the number of classes. Raises InputError for a
    model robustness cannot attack."""
    from .. import data as D
    from ..data.dataset import decode
    from ..engine.gradients import TargetNeeded

    o = options
    spec = model.input_spec(o.input_name)
    missing = [s.name for s in model.inputs if s.name != spec.name and s.name not in (fixed or {})
               and not any(s.name in (e.sample.extra if e.sample is not None else {}) for e in index.entries[:1])]
    if missing:
        raise InputError(f"the model has other inputs without data: {', '.join(missing)}; give them as fixed "
                         "feeds (one value for every sample) or in the .npz")
    B = max(1, int(o.batch_size))
    probe = None
    for s in range(0, len(index.entries), B):
        good, _ = decode(index.entries[s:s + B], preprocess, spec)
        if good:
            probe = good
            break
    if probe is None:
        raise InputError("no sample of the data could be read")
    plan0 = Plan(o, box, False, 0, (), 0.0, image, preprocess, dict(fixed or {}), spec.name, index.labelled,
                 len(index.entries))
    ctx = BatchContext(model, plan0)
    x = D.stack([smp for _, smp in probe], device=model.device, dtype=model.dtype)
    u0 = ctx.box.attack_point(x)
    try:
        with torch.no_grad():
            z_raw = ctx.obj(u0, _extra(probe, plan0, model.device))
    except TargetNeeded as e:
        raise InputError(f"robustness attacks a classifier: output {e.output!r} has shape (batch, "
                         f"{', '.join(map(str, e.shape))}), not one score per class; choose the class-score "
                         "output (detector and sequence outputs are not attacked)") from None
    if z_raw.dim() != 2 or z_raw.shape[1] < 2:
        raise InputError(f"output {ctx.scorer.score_tensor!r} gives one score per sample; robustness needs at "
                         "least two class scores (for a sigmoid output, export the two-class logits)")
    K = int(z_raw.shape[1])
    labels = [e.label for e in index.entries if e.label is not None]
    if labels and max(labels) >= K:
        raise InputError(f"label {max(labels)} is out of range: the model scores {K} classes")
    looks_prob = bool((z_raw >= -1e-6).all() and ((z_raw.sum(1) - 1).abs() < 1e-3).all())
    log_probs = ctx.scorer.score != "logit" and looks_prob
    d_in = int(u0[0].numel())
    eps_l2 = tuple(o.eps_l2) if o.eps_l2 else tuple(e * math.sqrt(d_in) for e in o.eps)
    alpha_frac = o.pgd_alpha if o.pgd_alpha is not None else 2.5 / o.pgd_steps
    plan = Plan(o, box, log_probs, K, eps_l2, alpha_frac, image, preprocess, dict(fixed or {}), spec.name,
                index.labelled, len(index.entries), ctx.scorer.score_tensor, ctx.scorer.score, u0.dim() - 1)
    return plan


def compute_batch(bctx: BatchContext, entries: Sequence[Any], slot0: int) -> dict[str, Any]:
    """One batch of dataset entries (``slot0``: the run index of the first) -> its per-input measurements and
    its candidate pictures, as plain data (JSON-able, plus an ``arrays`` dict of numpy arrays)."""
    import time

    from .. import data as D
    from ..data.dataset import decode
    from ..engine.attacks import input_noise, stream_seed
    from ..engine.core import Target
    from ..engine.estimators import frobenius_norm, top_singular

    t0 = time.perf_counter()
    plan, obj, model = bctx.plan, bctx.obj, bctx.model
    o = plan.options
    box = bctx.box
    dev = model.device
    spec = model.input_spec(plan.input_name)
    slots = {id(e): slot0 + k for k, e in enumerate(entries)}
    good, bad = decode(entries, plan.preprocess, spec)
    rec: dict[str, Any] = {"slot0": slot0, "n_entries": len(entries),
                           "failures": [[e.path or e.id, msg] for e, msg in bad], "arrays": {}, "timings": {}}
    n = len(good)
    rec["n"] = n
    if not n:
        return rec
    ids = [e.id for e, _ in good]
    slot = [slots[id(e)] for e, _ in good]
    x = D.stack([s for _, s in good], device=dev, dtype=model.dtype)
    dtype = x.dtype
    u0 = box.attack_point(x)
    extra = _extra(good, plan, dev)
    outside = ((box.model_input(u0) - x).abs() > 1e-4 * (1 + x.abs())).reshape(n, -1).float().mean(1)

    def scores(u: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return obj(u, _sub(extra, idx)).detach()

    z0 = scores(u0)
    if good[0][0].label is not None:
        y = torch.as_tensor([e.label for e, _ in good], dtype=torch.long, device=dev)
    else:
        y = z0.argmax(1)
    g0, _, gm = loss_and_grad(obj, u0, y, extra, with_margin=True)
    pred0 = z0.argmax(1)
    m0 = margin(z0, y)
    gnorm = _flat(g0).norm(dim=1)
    finite = torch.isfinite(_flat(g0)).all(1)
    g0_safe = torch.where(torch.isfinite(g0), g0, torch.zeros_like(g0))
    rec.update(ids=ids, slots=slot, positions=[e.position for e, _ in good], names=[s.name for _, s in good],
               sources=[s.source for _, s in good], y=y.tolist(), pred0=pred0.tolist(), m0=m0.tolist(),
               gnorm=gnorm.tolist(), finite=finite.tolist(), outside=outside.tolist())
    tm = rec["timings"]
    tm["clean"] = time.perf_counter() - t0

    points: list[dict[str, Any]] = []
    first: dict[int, tuple[str, float, torch.Tensor]] = {}

    def record(attack: str, eps: float, adv: torch.Tensor, linear: bool, linf: bool = True) -> torch.Tensor:
        z = scores(adv)
        pred = z.argmax(1)
        m = margin(z, y)
        flipped = pred != pred0
        d = adv - u0
        dz = _flat(z - z0).norm(dim=1)
        dn = _flat(d).norm(dim=1)
        ratios = torch.where(dn > 0, dz / dn.clamp_min(1e-30), torch.zeros_like(dz))
        pt = {"attack": attack, "eps": float(eps), "correct": (pred == y).tolist(), "flipped": flipped.tolist(),
              "drop": (m0 - m).tolist(), "ratio": ratios.tolist(), "linf": linf}
        if linear:
            pt["pc"] = _flat(gm * d).sum(1).tolist()
            pt["ac"] = (m - m0).tolist()
        points.append(pt)
        if linf:
            for i in torch.nonzero(flipped).flatten().tolist():
                if i not in first or eps < first[i][1]:
                    first[i] = (attack, float(eps), adv[i])
        return flipped

    t1 = time.perf_counter()
    fgsm_flip: list[float | None] = [None] * n
    for eps in o.eps:
        fl = record("fgsm", eps, fgsm(u0, g0_safe, eps, box), True)
        for i in torch.nonzero(fl).flatten().tolist():
            if fgsm_flip[i] is None:
                fgsm_flip[i] = float(eps)
    tm["fgsm"] = time.perf_counter() - t1

    def run_pgd(eps: torch.Tensor | float, norm: str, stream: str, idx: torch.Tensor | None = None,
                steps: int | None = None) -> torch.Tensor:
        uu = u0 if idx is None else u0[idx]
        yy = y if idx is None else y[idx]
        sel = ids if idx is None else [ids[i] for i in idx.tolist()]
        noise = input_noise(sel, o.seed, stream, tuple(uu.shape[1:]), dtype, norm) if o.random_start else None
        st = o.pgd_steps if steps is None else steps
        alpha = eps * (plan.alpha_frac if steps is None else 2.5 / st)
        return pgd(obj, uu, yy, eps, box, steps=st, alpha=alpha, norm=norm, random_start=o.random_start,
                   extra=_sub(extra, idx), noise=noise)

    t2 = time.perf_counter()
    pgd_first: list[int | None] = [None] * n
    for norm in o.pgd_norms:
        radii = o.eps if norm == "linf" else plan.eps_l2
        for k, eps in enumerate(radii):
            adv = run_pgd(float(eps), norm, f"pgd-{norm}/{k}")
            if norm != "linf":
                record("pgd-l2", eps, adv, False, linf=False)
                continue
            fl = record("pgd-linf", eps, adv, False)
            for i in torch.nonzero(fl).flatten().tolist():
                if pgd_first[i] is None:
                    pgd_first[i] = k
    rec["points"] = points
    rec["fgsm_flip"] = fgsm_flip
    tm["pgd"] = time.perf_counter() - t2

    # minimal flipping epsilon (PGD L-inf): bisection between sweep points, bounds in float64
    pgd_min: list[float | None] = [None] * n
    if "linf" in o.pgd_norms:
        t3 = time.perf_counter()
        correct0 = (pred0 == y).tolist()
        lo = torch.zeros(n, dtype=torch.float64, device=dev)
        hi = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
        for i in range(n):
            if not correct0[i]:
                pgd_min[i] = 0.0
            elif pgd_first[i] is not None:
                k = pgd_first[i]
                hi[i] = o.eps[k]
                lo[i] = o.eps[k - 1] if k > 0 else 0.0
        todo = torch.nonzero(torch.isfinite(hi)).flatten()
        if todo.numel() and o.bisect_steps > 0:
            for b in range(int(o.bisect_steps)):
                mid = (lo[todo] + hi[todo]) / 2
                adv = run_pgd(mid.to(dtype), "linf", f"bisect/{b}", todo)
                fl = scores(adv, todo).argmax(1) != pred0[todo]
                hi[todo] = torch.where(fl, mid, hi[todo])
                lo[todo] = torch.where(fl, lo[todo], mid)
        for i in todo.tolist():
            pgd_min[i] = float(hi[i])
        tm["bisection"] = time.perf_counter() - t3
    rec["pgd_min"] = pgd_min

    # Jacobian norms and sensitivity directions (the first --norm-limit inputs of the run)
    t4 = time.perf_counter()
    K = plan.n_classes
    d_in = int(u0[0].numel())
    limit = plan.n_entries if o.norm_limit is None else int(o.norm_limit)
    norms: list[dict[str, Any] | None] = [None] * n
    rights: dict[int, torch.Tensor] = {}
    for i in range(n):
        if slot[i] >= limit:
            continue
        ex_i = {k: v[i:i + 1] for k, v in extra.items()}
        t = Target(lambda v, ex_i=ex_i: obj(v, ex_i), u0[i:i + 1], name=spec.name,
                   output_name=bctx.scorer.score_tensor)
        fe = frobenius_norm(t, probes=o.probes, seed=stream_seed(o.seed, "frobenius", ids[i]) % (1 << 31))
        k = max(1, min(o.directions, K, d_in))
        se = top_singular(t, k=k, seed=stream_seed(o.seed, "singular", ids[i]) % (1 << 31), max_iter=o.max_iter)
        v1 = se.right[0].reshape(-1).to(torch.float64)
        gi = g0_safe[i].reshape(-1).to(torch.float64)
        sg = gi.sign()
        cf = cg = None
        if float(sg.norm()) > 0 and float(v1.norm()) > 0:
            cf = abs(float(sg @ v1)) / (float(sg.norm()) * float(v1.norm()))
            cg = abs(float(gi @ v1)) / (float(gi.norm()) * float(v1.norm()))
        norms[i] = {"frobenius": _f(fe.value), "stderr": _f(fe.stderr), "method": fe.method, "probes": fe.probes,
                    "spectral": _f(se.spectral_norm), "values": [float(v) for v in se.values],
                    "converged": bool(se.converged), "matvecs": int(se.matvecs), "cos_fgsm": cf, "cos_grad": cg}
        rights[i] = se.right.detach()
    rec["norms"] = norms
    tm["norms"] = time.perf_counter() - t4

    # gradient masking evidence: finite differences along the FGSM direction (the first --fd inputs of the run)
    t5 = time.perf_counter()
    h = float(o.eps[0])
    fd_idx = [i for i in range(n) if slot[i] < int(o.fd_inputs)]
    fd: list[Any] = [None] * n
    if fd_idx:
        idx = torch.tensor(fd_idx, device=dev)
        dirs = g0_safe[idx].sign()
        rad = []
        for i in fd_idx:
            g = torch.Generator(device="cpu").manual_seed(stream_seed(o.seed, "fd", ids[i]))
            rad.append(torch.randint(0, 2, tuple(u0.shape[1:]), generator=g))
        rad_t = torch.stack(rad).to(dev, dtype) * 2 - 1
        dirs = torch.where(_flat(dirs).abs().sum(1).reshape((-1,) + (1,) * (dirs.dim() - 1)) > 0, dirs, rad_t)
        gm_safe = torch.where(torch.isfinite(gm[idx]), gm[idx], torch.zeros_like(gm[idx]))
        rows = []
        for step in (h, h / 10):
            mu = margin(scores(u0[idx] + step * dirs, idx), y[idx])
            md = margin(scores(u0[idx] - step * dirs, idx), y[idx])
            central = ((mu - md) / 2).tolist()
            predicted = _flat(gm_safe * step * dirs).sum(1).tolist()
            row = []
            for j, i in enumerate(fd_idx):
                c, p = central[j], predicted[j]
                floor = 1e-4 * step * (1 + abs(float(m0[i])))
                row.append(None if max(abs(c), abs(p)) <= floor else [c, p])
            rows.append(row)
        for j, i in enumerate(fd_idx):
            fd[i] = [rows[0][j], rows[1][j]]
    rec["fd"] = fd

    # a huge epsilon must break the model (the first 64 inputs of the run)
    big_idx = [i for i in range(n) if slot[i] < BIG_EPS_INPUTS]
    big: list[bool | None] = [None] * n
    if "linf" in o.pgd_norms and big_idx:
        idx = torch.tensor(big_idx, device=dev)
        big_eps = 0.5 * (box.hi - box.lo)
        big_steps = max(20, int(o.pgd_steps))  # a fixed, patient recipe: the probe must not depend on --pgd-steps
        adv = run_pgd(big_eps, "linf", "huge-eps", idx, steps=big_steps)
        ok = (scores(adv, idx).argmax(1) == y[idx]).tolist()
        for j, i in enumerate(big_idx):
            big[i] = bool(ok[j])
    rec["big"] = big
    tm["masking"] = time.perf_counter() - t5

    # candidates for the report's pictures: this batch's most fragile inputs and its largest spectral norms
    cls = list(o.classes) if o.classes and len(o.classes) == K else None

    def cname(k: int) -> str:
        return cls[k] if cls else str(k)

    names = rec["names"]
    worst = []
    order = sorted(first, key=lambda i: (first[i][1], float(m0[i]), slot[i]))[: o.worst]
    for i in order:
        attack, eps, adv_i = first[i]
        zi = scores(adv_i[None], torch.tensor([i], device=dev))
        key = f"adv{i}"
        rec["arrays"][key] = adv_i.detach().cpu().numpy()
        pics = [None, None, None]
        if plan.image and plan.preprocess is not None:
            pics = [_picture(u0[i], plan.preprocess, f"{names[i]}: original"),
                    _picture(_amplify(adv_i - u0[i]), plan.preprocess, f"{names[i]}: perturbation, amplified"),
                    _picture(adv_i, plan.preprocess, f"{names[i]}: adversarial ({attack}, eps {_fmt(eps)})")]
        worst.append({"i": i, "slot": slot[i], "attack": attack, "eps": eps, "m0": float(m0[i]), "array": key,
                      "label": cname(int(y[i])), "clean": cname(int(pred0[i])),
                      "adversarial": cname(int(zi.argmax(1)[0])),
                      "pictures": [None if p is None else asdict(p) for p in pics]})
    rec["worst"] = worst
    dirs_out = []
    for i in sorted(rights, key=lambda i: (-(norms[i]["spectral"] or 0), slot[i]))[: o.worst]:
        R = rights[i]
        vs = []
        for r in range(R.shape[0]):
            v = R[r][0] if R[r].dim() == u0.dim() else R[r]
            key = f"dir{i}_{r + 1}"
            rec["arrays"][key] = v.detach().cpu().numpy()
            img = _picture(_amplify(v), plan.preprocess, f"{names[i]}: direction {r + 1}") if plan.image and \
                plan.preprocess is not None else None
            vs.append({"rank": r + 1, "value": norms[i]["values"][r], "array": key,
                       "image": None if img is None else asdict(img)})
        dirs_out.append({"i": i, "slot": slot[i], "spectral": norms[i]["spectral"], "vectors": vs})
    rec["directions"] = dirs_out
    tm["batch"] = time.perf_counter() - t0
    return rec


#: the huge-epsilon masking probe runs on this many inputs (the first of the run)
BIG_EPS_INPUTS = 64


def run_batches(bctx: BatchContext, index: Any, progress: Callable[[int, int], None] | None = None
                ) -> list[dict[str, Any]]:
    """Every batch of ``index`` in this process, in order."""
    B = max(1, int(bctx.plan.options.batch_size))
    out = []
    for s in range(0, len(index.entries), B):
        out.append(compute_batch(bctx, index.entries[s:s + B], s))
        if progress:
            progress(min(s + B, len(index.entries)), len(index.entries))
    return out


def robustness(model: Any, index: Any, box: Box, options: RobustnessOptions, *, preprocess: Any = None,
               image: bool = False, fixed: dict[str, torch.Tensor] | None = None, range_source: str = "",
               progress: Callable[[int, int], None] | None = None,
               timings: dict[str, float] | None = None,
               executor: Callable[[Plan], list[dict[str, Any]]] | None = None) -> AnalysisOutput:
    """Probe the dataset ``index`` (:class:`jacaudit.data.dataset.DatasetIndex`) with FGSM and PGD; see the
    module docstring. ``box`` maps the attack space to the model input; ``image`` says the samples are images
    laid out by ``preprocess`` (pictures in the report); ``fixed`` holds other model inputs (batch 1,
    broadcast). ``executor(plan)`` computes the batches elsewhere (e.g. sharded on Ray, resumed from shards)
    and returns their records in order; default: here, in order."""
    import time

    from ..data.dataset import DatasetIndex

    t0 = time.perf_counter()
    timings = timings if timings is not None else {}
    index = DatasetIndex.of(index)
    plan = make_plan(model, index, box, options, preprocess=preprocess, image=image, fixed=fixed)
    if executor is None:
        records = run_batches(BatchContext(model, plan), index, progress)
    else:
        records = executor(plan)
    timings["batches"] = round(time.perf_counter() - t0, 4)
    return aggregate(plan, index, records, range_source=range_source, timings=timings)


def aggregate(plan: Plan, index: Any, records: Sequence[dict[str, Any]], *, range_source: str = "",
              timings: dict[str, float] | None = None) -> AnalysisOutput:
    """The batch records (in run order) -> the result, metrics, warnings and artifacts. Plain arithmetic over
    per-input values in run order (float64), so it does not matter where the batches ran."""
    o = plan.options
    box = plan.box
    timings = timings if timings is not None else {}
    records = sorted(records, key=lambda r: r["slot0"])
    warnings: list[str] = list(index.warnings)
    failures = [tuple(f) for f in index.failures]
    for r in records:
        for p, msg in r["failures"]:
            failures.append((p, msg))
            warnings.append(msg)
        for k, v in r.get("timings", {}).items():
            timings[k] = round(timings.get(k, 0.0) + v, 4)
    recs = [r for r in records if r["n"]]
    n = sum(r["n"] for r in recs)
    if not n:
        raise InputError("no sample of the data could be read" + (f" ({failures[0][1]})" if failures else ""))

    def cat(key: str) -> list:
        return [v for r in recs for v in r[key]]

    names, sources = cat("names"), cat("sources")
    y, pred0 = cat("y"), cat("pred0")
    m0 = np.asarray(cat("m0"), dtype=np.float64)
    gnorm = cat("gnorm")
    finite = cat("finite")
    outside = float(np.mean(cat("outside")))
    if outside > 0.01:
        warnings.append(f"{100 * outside:.1f}% of the input values lie outside the valid range "
                        f"[{box.lo:g}, {box.hi:g}] and were clipped to it before attacking")
    K = plan.n_classes
    classes = list(o.classes) if o.classes and len(o.classes) == K else None
    if o.classes and len(o.classes) != K:
        warnings.append(f"{len(o.classes)} labels for {K} classes: labels not used")
    if not plan.labelled:
        warnings.append("the data has no labels: the model's own predictions are the labels (clean accuracy 1 "
                        "by construction); robust accuracy is then the share of predictions that survive")
    findings: list[MaskingFinding] = []
    if plan.log_probs:
        findings.append(MaskingFinding("probability_outputs", True,
                                       f"output {plan.score_tensor!r} looks like probabilities (rows are "
                                       "non-negative and sum to 1) and no Softmax input is reachable: the log of "
                                       "the probabilities was attacked; saturated probabilities can hide "
                                       "gradients, attack a logits output if the model has one"))
        warnings.append(findings[-1].evidence)
    score_kind = plan_score_kind(plan)
    if score_kind == "logit":
        findings.append(MaskingFinding("probability_outputs", False,
                                       f"the model ends in a Softmax: its input {plan.score_tensor!r} (the "
                                       "logits) was attacked, not the probabilities"))
    elif score_kind == "output":
        findings.append(MaskingFinding("probability_outputs", False,
                                       f"output {plan.score_tensor!r} does not look like probabilities: "
                                       "attacked as logits"))
    correct0 = [a == b for a, b in zip(pred0, y)]
    clean_acc = sum(correct0) / n

    # the sweep: per-input values of every batch, in run order
    sweep: list[SweepPoint] = []
    ratio_max = 0.0
    n_points = len(recs[0]["points"])
    for k in range(n_points):
        p0 = recs[0]["points"][k]
        pts = [r["points"][k] for r in recs]
        corr = sum(sum(p["correct"]) for p in pts)
        flips = sum(sum(p["flipped"]) for p in pts)
        drop = np.asarray([v for p in pts for v in p["drop"]], dtype=np.float64)
        ratios = [v for p in pts for v in p["ratio"]]
        rmax = max(ratios) if ratios else 0.0
        pc = ac = lin = None
        if "pc" in p0:
            pcs = np.asarray([v for p in pts for v in p["pc"]], dtype=np.float64)
            acs = np.asarray([v for p in pts for v in p["ac"]], dtype=np.float64)
            pc, ac = float(pcs.mean()), float(acs.mean())
            den = float(np.abs(pcs).mean())
            lin = float(np.abs(acs - pcs).mean()) / den if den > 0 else None
        if p0["linf"]:
            ratio_max = max(ratio_max, rmax)
        sweep.append(SweepPoint(p0["attack"], p0["eps"], corr / n, flips / n, float(drop.mean()),
                                float(drop.max()), pc, ac, lin, rmax))

    fgsm_flip_eps = cat("fgsm_flip")
    pgd_min = cat("pgd_min")
    flip_eps_res = None
    if "linf" in o.pgd_norms:
        vals = [v for v in pgd_min if v is not None]
        edges, counts = _hist(vals)
        flipped_vals = [v for v in vals if v > 0]
        flip_eps_res = FlipEpsilons(pgd_min, float(np.median(flipped_vals)) if flipped_vals else None,
                                    sum(v is None for v in pgd_min), sum(v == 0.0 for v in vals),
                                    int(o.bisect_steps), edges, counts)

    # norms
    nrm = cat("norms")
    measured = [v for v in nrm if v is not None]
    norms = None
    if measured:
        frob = [v["frobenius"] for v in measured]
        spec_n = [v["spectral"] for v in measured]
        fq, sq_ = _q(frob), _q(spec_n)
        sq_mean = float(np.mean([f * f for f in frob if f is not None]))
        ses = [v["stderr"] for v in measured if v["stderr"] is not None]
        se_mean = float(np.mean(ses)) if ses else float("nan")
        he, hc = _hist(spec_n)
        converged = sum(v["converged"] for v in measured)
        norms = NormSummary(len(measured), measured[-1]["method"], measured[-1]["probes"], fq, se_mean, sq_mean,
                            sq_, converged, ratio_max, sum(v["matvecs"] for v in measured), he, hc)
        if converged < len(measured):
            warnings.append(f"the singular-value iteration did not converge on {len(measured) - converged} of "
                            f"{len(measured)} inputs (their spectral norms are lower bounds)")

    # finite differences
    h = float(o.eps[0])
    fd_checked, fd_bad, fd_examples = 0, 0, []
    for name, v in zip(names, cat("fd")):
        if v is None:
            continue
        a, b = v
        if a is None and b is None:
            continue
        fd_checked += 1
        bad = [w is not None and abs(w[0] - w[1]) > 0.5 * max(abs(w[0]), abs(w[1])) for w in (a, b)]
        if all(bad):
            fd_bad += 1
            if len(fd_examples) < 3:
                fd_examples.append(f"{name}: margin change {a[0]:.3g} vs the gradient's "
                                   f"{a[1]:.3g} at eps {_fmt(h)}, {b[0]:.3g} vs {b[1]:.3g} at {_fmt(h / 10)}")
    fd_frac = fd_bad / fd_checked if fd_checked else None
    findings.append(MaskingFinding(
        "fd_disagreement", bool(fd_frac is not None and fd_frac > 0.25),
        (f"on {fd_checked} input(s), the margin's change along the FGSM direction (central differences at eps "
         f"{_fmt(h)} and {_fmt(h / 10)}) disagrees with the gradient's first-order prediction by more than 50% at "
         f"both steps on {fd_bad}" + (": " + "; ".join(fd_examples) if fd_examples else "")) if fd_checked else
        "no input changed its margin measurably at the smallest epsilon: no finite-difference evidence"))

    big_eps = 0.5 * (box.hi - box.lo)
    big_steps = max(20, int(o.pgd_steps))
    bigs = [v for v in cat("big") if v is not None]
    big_acc = (sum(bigs) / len(bigs)) if bigs else None

    # pictures: the most fragile inputs and the largest spectral norms over all batches
    artifacts: list[Artifact] = []
    examples: list[AdversarialExample] = []
    cands = [(w, r) for r in recs for w in r["worst"]]
    cands.sort(key=lambda t: (t[0]["eps"], t[0]["m0"], t[0]["slot"]))
    run_index, seen = {}, 0  # a batch's first input among the inputs that were read
    for r in recs:
        run_index[r["slot0"]], seen = seen, seen + r["n"]
    for w, r in cands[: o.worst]:
        gi = run_index[r["slot0"]] + w["i"]
        npy = f"adversarial/{gi:04d}_{w['attack']}_eps{_fmt(w['eps'])}.npy"
        artifacts.append(Artifact(npy, r["arrays"][w["array"]]))
        pics = [None if p is None else Image(**p) for p in w["pictures"]]
        examples.append(AdversarialExample(names[gi], w["attack"], float(w["eps"]), w["label"], w["clean"],
                                           w["adversarial"], pics[0], pics[1], pics[2], npy))
    directions: list[Direction] = []
    dc = [(d, r) for r in recs for d in r["directions"]]
    dc.sort(key=lambda t: (-(t[0]["spectral"] or 0), t[0]["slot"]))
    for d, r in dc[: o.worst]:
        gi = run_index[r["slot0"]] + d["i"]
        for v in d["vectors"]:
            npy = f"directions/{gi:04d}_v{v['rank']}.npy"
            artifacts.append(Artifact(npy, r["arrays"][v["array"]]))
            directions.append(Direction(names[gi], v["rank"], v["value"],
                                        None if v["image"] is None else Image(**v["image"]), npy))

    per_input = []
    for i in range(n):
        v = nrm[i] or {}
        gn = float(gnorm[i])
        per_input.append(InputRobustness(names[i], sources[i], int(y[i]), classes[int(y[i])] if classes else None,
                                         int(pred0[i]), float(m0[i]), fgsm_flip_eps[i], pgd_min[i],
                                         gn if math.isfinite(gn) else float("nan"), v.get("frobenius"),
                                         v.get("stderr"), v.get("spectral"), list(v.get("values", [])),
                                         v.get("cos_fgsm"), v.get("cos_grad")))

    # masking findings from the sweep
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
                                       f"PGD at eps {_fmt(big_eps)} (half the valid range, {big_steps} steps) "
                                       f"leaves robust accuracy {big_acc:.3f}" + (
                                           ": the gradients do not lead to an adversarial input (masked or "
                                           "obfuscated)" if big_acc > 0.1 else "")))
    zero = [bool(f) and g == 0 for f, g in zip(finite, gnorm)]
    nz, nnf = sum(zero), sum(not f for f in finite)
    findings.append(MaskingFinding("zero_gradients", nz > 0,
                                   f"{nz} of {n} input(s) have an all-zero loss gradient" + (
                                       " (" + ", ".join([names[i] for i in range(n) if zero[i]][:3]) + ")"
                                       if nz else "")))
    findings.append(MaskingFinding("nonfinite_gradients", nnf > 0,
                                   f"{nnf} of {n} input(s) have NaN/inf in the loss gradient"))
    for f in findings:
        if f.flagged and f.evidence not in warnings:
            warnings.append(f"gradient masking? {f.name}: {f.evidence}")

    result = RobustnessResult(
        input_name=plan.input_name, score_tensor=plan.score_tensor, score=score_kind,
        labels_source=index.source, classes=classes, n_inputs=n, n_total=index.total, clean_accuracy=clean_acc,
        units=box.units, range=[float(box.lo), float(box.hi)], range_source=range_source,
        eps=[float(e) for e in o.eps],
        eps_l2=[float(e) for e in plan.eps_l2] if "l2" in o.pgd_norms else None,
        pgd={"steps": int(o.pgd_steps), "alpha": f"{plan.alpha_frac:g} x eps", "random_start": bool(o.random_start),
             "norms": list(o.pgd_norms), "bisection_steps": int(o.bisect_steps), "seed": int(o.seed)},
        sweep=sweep, flip_eps=flip_eps_res, norms=norms, inputs=per_input, examples=examples,
        directions=directions, masking=findings, failures=[FailedInput(p, m) for p, m in failures],
        input_kind="image" if plan.image else ("features" if plan.sample_rank == 1 else "tensor"))
    metrics = _metrics(result, o, nz, nnf, n, fd_frac, fd_checked, big_acc, big_eps, gaps, rise)
    if n and nz + nnf == n:  # no attack had a gradient to follow: the sweep is no evidence of robustness
        note = "no input has a usable loss gradient (all zero or non-finite): the attacks could not move"
        metrics = [m if not any(m.name.startswith(p) for p in _SWEEP_METRICS) else
                   Metric(m.name, m.subject, m.value, m.op, m.warn, m.fail, "skipped", note, m.description,
                          m.properties) for m in metrics]
    return AnalysisOutput(result=result, metrics=metrics, warnings=warnings, artifacts=artifacts,
                          partial=bool(failures))


def plan_score_kind(plan: Plan) -> str:
    if plan.log_probs:
        return "log-probability"
    return "logit" if plan.score == "logit" else "output"


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
