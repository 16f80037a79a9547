"""The shared batched-gradient primitive: gradients of one target score per row, many rows per pass.

Saliency (every method), the sanity test and the robustness and transfer analyses differentiate the same thing:
a scalar per sample -- the *target score*, the pre-softmax logit of the target class when the model ends in a
Softmax whose input it exposes (:meth:`jacaudit.models.Model.softmax_input`), else the model's output -- with
respect to the model input only (parameters stay frozen).

* :func:`make_scorer` picks the tensor to differentiate and gives a :class:`Scorer`: ``x (N, ...) -> (scores
  (N, K), probabilities (N, K) or None)``; a model that does not run batched is evaluated one row at a time
  (with a warning).
* :func:`grouped_gradients` takes rows laid out as N groups of ``group`` consecutive rows (a sample and its IG
  path points, or its SmoothGrad noisy copies); row 0 of a group is its reference (the clean input). Where no
  target is given, the group's target is the argmax of its reference row's scores, picked inside the same
  forward pass that the gradient uses (a separate forward to find it costs ~50%). Rows go through in chunks of
  ``chunk_rows``; groups may span chunks (the reference row comes first, so its target is known before the
  rest of its group is differentiated). Results do not depend on the chunking.

Which scalar is explained (:class:`TargetSpec`, parsed by :func:`parse_target_spec`): by default the scored
output must be a class-score vector per sample, ``(batch, classes)`` (or ``(batch,)``; size-1 axes are allowed),
and the target is a class index (top-1 or a given one). Any other output (a detector's ``(1, 84, 2100)``, a
recogniser's ``(1, T, C)``, a probability map ``(1, 1, H, W)``) is refused with :class:`TargetNeeded` unless a
spec says which scalar to take, in the output's own (non-batch) coordinates::

    index=I,J,...     one element (one index per non-batch axis; negative counts from the end)
    argmax=SLICE      the largest element of the slice, chosen per sample at its clean input
    sum=SLICE         the sum of the slice's elements (e.g. a class score summed over all anchors)

``SLICE`` is numpy-like, one item per non-batch axis: ``:`` (all), ``A:B``, ``A:``, ``:B`` or an index ``I``;
missing trailing items mean ``:``. Nothing is flattened silently: an argmax over several axes has to be asked for
(``argmax=:,:``), and the element chosen is reported in the output's coordinates (:meth:`Scorer.coords`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError, RuntimeFailure

__all__ = ["Scorer", "make_scorer", "GroupGrads", "grouped_gradients", "TargetSpec", "parse_target_spec",
           "TargetNeeded"]


class TargetNeeded(InputError):
    """The scored output is not one class-score vector per sample, and no target spec says which scalar to
    explain. ``output`` and ``shape`` (non-batch) name it."""

    def __init__(self, message: str, output: str, shape: tuple[int, ...]):
        super().__init__(message)
        self.output, self.shape = output, tuple(shape)


# ---------------------------------------------------------------------------------------------------------
# Target specs
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetSpec:
    """Which scalar of a multi-axis output is explained (see the module docstring)."""

    kind: str                                     # "index" | "argmax" | "sum"
    items: tuple[Any, ...]                        # ints and slices, one per non-batch axis (trailing : omitted)
    text: str = ""

    def describe(self) -> str:
        def one(it: Any) -> str:
            if isinstance(it, slice):
                return f"{'' if it.start is None else it.start}:{'' if it.stop is None else it.stop}"
            return str(it)
        return f"{self.kind}=" + ",".join(one(i) for i in self.items)


_SLICE_RE = re.compile(r"^(-?\d+)?:(-?\d+)?$")


def parse_target_spec(text: str) -> TargetSpec | None:
    """``index=...`` / ``argmax=...`` / ``sum=...`` -> a :class:`TargetSpec`; None for anything else (a class
    index or a label, handled by the caller). Bad syntax raises :class:`InputError`."""
    t = str(text).strip()
    m = re.match(r"^(index|argmax|sum)\s*[=:]\s*(.*)$", t, flags=re.I)
    if not m:
        return None
    kind, body = m.group(1).lower(), m.group(2).strip()
    if not body:
        raise InputError(f"target {t!r}: give the coordinates after '=', e.g. {kind}=" +
                         ("4,17" if kind == "index" else "0,:"))
    items: list[Any] = []
    for part in body.split(","):
        p = part.strip()
        if re.fullmatch(r"-?\d+", p):
            items.append(int(p))
            continue
        sm = _SLICE_RE.match(p)
        if sm and kind != "index":
            a, b = sm.group(1), sm.group(2)
            items.append(slice(None if a is None else int(a), None if b is None else int(b)))
            continue
        what = "an integer" if kind == "index" else "an integer or a slice A:B"
        raise InputError(f"target {t!r}: {p!r} is not {what} (items are comma-separated, one per output axis "
                         "after the batch axis)")
    return TargetSpec(kind, tuple(items), t)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _class_axis_ok(shape: tuple[int, ...]) -> bool:
    """A class-score vector per sample: at most one non-batch axis with more than one element."""
    return sum(1 for d in shape if d > 1) <= 1


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
    #: which scalar of a multi-axis output is explained (None: a class index of a (batch, classes) output)
    select: TargetSpec | None = None
    #: an internal tensor differentiated instead of the input (its value is overridden; the inputs go in
    #: ``extra``); None: the input ``input_name`` itself
    wrt: str | None = None
    #: the scored tensor's non-batch shape, known after the first call
    out_shape: tuple[int, ...] | None = None

    def _run(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        outs = [self.score_tensor] + ([self.prob_tensor] if self.prob_tensor else [])
        if self.wrt:
            return list(self.model.run(dict(extra), outputs=outs, overrides={self.wrt: x}))
        feeds = {self.input_name: x, **extra}
        return list(self.model.run(feeds, outputs=outs))

    def point(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The value of the differentiated tensor at ``feeds`` (the input itself, or the internal ``wrt``)."""
        if not self.wrt:
            return feeds[self.input_name]
        return self.model.run(dict(feeds), outputs=[self.wrt])[0].detach()

    @property
    def explained(self) -> str:
        """What is explained, in words (the spec, or the class axis)."""
        return "class" if self.select is None else self.select.describe()

    def coords(self, j: int) -> list[int] | None:
        """Output coordinates (non-batch) of candidate ``j`` of the scores (a class index, or an element of the
        spec's slice); None for a sum."""
        shape = self.out_shape or ()
        if self.select is None:
            if not shape:
                return []
            return [int(v) for v in torch.unravel_index(torch.tensor(int(j)), shape)]
        if self.select.kind == "sum":
            return None
        grid = torch.arange(_numel(shape)).reshape(shape)
        flat = int(grid[self.select.items].reshape(-1)[int(j)])
        return [int(v) for v in torch.unravel_index(torch.tensor(flat), shape)]

    def _select(self, t: torch.Tensor, n: int, probs: bool = False) -> torch.Tensor | None:
        spec = self.select
        if spec is None:
            return t.reshape(n, -1)
        shape = tuple(t.shape[1:])
        if len(spec.items) > len(shape):
            raise InputError(f"target {spec.text!r} has {len(spec.items)} coordinate(s); output "
                             f"{self.score_tensor!r} has {len(shape)} axes after the batch axis, shape "
                             f"{tuple(shape)}")
        if spec.kind == "index" and len(spec.items) != len(shape):
            raise InputError(f"target {spec.text!r} needs one index per axis after the batch axis of output "
                             f"{self.score_tensor!r} (shape {tuple(shape)}): {len(shape)} indices")
        for it, d in zip(spec.items, shape):
            if isinstance(it, int) and not -d <= it < d:
                raise InputError(f"target {spec.text!r}: index {it} is out of range for an axis of size {d} "
                                 f"(output {self.score_tensor!r}, shape {tuple(shape)})")
        sel = t[(slice(None),) + tuple(spec.items)].reshape(n, -1)
        if sel.shape[1] == 0:
            raise InputError(f"target {spec.text!r} selects no element of output {self.score_tensor!r} "
                             f"(shape {tuple(shape)})")
        if spec.kind == "sum":
            return None if probs else sel.sum(1, keepdim=True)
        return sel

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
        res = [torch.cat([p[j].reshape(1) if p[j].dim() == 0 else p[j] for p in parts]) for j in range(len(parts[0]))]
        return self._shape(res, n)

    def _shape(self, res: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = res[0]
        if s.dim() == 0:
            s = s.reshape(1, 1)
        if s.shape[0] != n:
            s = s.reshape((1,) + tuple(s.shape)).expand((n,) + tuple(s.shape))
        shape = tuple(int(d) for d in s.shape[1:])
        self.out_shape = shape
        if self.select is None and not _class_axis_ok(shape):
            raise TargetNeeded(
                f"output {self.score_tensor!r} has shape (batch, {', '.join(map(str, shape))}), not one class-score "
                "vector per sample: choose another output, or a target in its coordinates: index=I,J,... (one "
                "element), argmax=SLICE (the largest of a slice, e.g. argmax=3,: ) or sum=SLICE (e.g. sum=4,: )",
                self.score_tensor, shape)
        sc = self._select(s, n)
        p = None
        if len(res) > 1:
            pr = res[1]
            if pr.shape[0] != n:
                pr = pr.reshape((1,) + tuple(pr.shape)).expand((n,) + tuple(pr.shape))
            p = self._select(pr, n, probs=True) if tuple(pr.shape[1:]) == shape else None
        return sc, p


def make_scorer(model: Any, input_name: str | None = None, output: str | None = None, use_logits: bool = True,
                target: TargetSpec | str | None = None, wrt: str | None = None) -> Scorer:
    """Pick the tensor to differentiate: the logits feeding a final Softmax when reachable (ONNX), else the
    output itself. ``target`` (a :class:`TargetSpec` or its text) picks a scalar of a multi-axis output;
    ``wrt`` names an internal tensor to differentiate with respect to (an input name means that input)."""
    spec_in = model.input_spec(input_name)
    out = model.output_spec(output).name
    sel = parse_target_spec(target) if isinstance(target, str) else target
    if wrt == spec_in.name or (wrt and wrt in {s.name for s in model.inputs}):
        spec_in, wrt = model.input_spec(wrt), None
    if wrt and wrt not in set(model.internal_tensors()):
        raise InputError(f"no tensor named {wrt!r} to differentiate with respect to: it is neither an input "
                         f"({', '.join(s.name for s in model.inputs)}) nor an internal tensor of the model")
    logits = None
    if use_logits:
        logits = model.softmax_input(out)
    if logits:
        return Scorer(model, spec_in.name, logits, "logit", out, select=sel, wrt=wrt)
    return Scorer(model, spec_in.name, out, "output", None, select=sel, wrt=wrt)


# ---------------------------------------------------------------------------------------------------------
# The batched gradient primitive
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


