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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError, RuntimeFailure

__all__ = ["Scorer", "make_scorer", "GroupGrads", "grouped_gradients"]


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


