"""Loss ops: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss (opset 12 on)."""
from __future__ import annotations

import torch

from ..registry import op

_HALF = (torch.float16, torch.bfloat16)


def _nll(ctx, logp: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """logp: (N, C, d...) log-probabilities in the working dtype; returns the reduced loss (working dtype)."""
    reduction = ctx.attr("reduction", "mean")
    ignore_index = ctx.attr("ignore_index", None)
    c = logp.shape[1]
    tgt = target.to(torch.int64)
    safe = tgt.clamp(0, c - 1)
    picked = -torch.gather(logp, 1, safe.unsqueeze(1)).squeeze(1)  # target shape
    keep = None
    if ignore_index is not None:
        keep = tgt != int(ignore_index)
    if weight is not None:
        w = weight.to(logp.dtype)[safe]
    else:
        w = None
    if keep is not None:
        kf = keep.to(logp.dtype)
        w = kf if w is None else torch.where(keep, w, torch.zeros((), dtype=logp.dtype, device=logp.device))
    loss = picked if w is None else picked * w
    if keep is not None:
        # an ignored entry contributes exactly 0 (even if its picked value is inf/nan)
        loss = torch.where(keep, loss, torch.zeros((), dtype=logp.dtype, device=logp.device))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        if w is None:
            return loss.mean()
        return loss.sum() / w.sum()
    raise ValueError(f"unknown reduction {reduction!r}")


@op("NegativeLogLikelihoodLoss", since=12)
def negative_log_likelihood_loss(ctx, x, target, weight=None):
    wd = torch.float32 if x.dtype in _HALF else x.dtype
    return _nll(ctx, x.to(wd), target, weight).to(x.dtype)


@op("SoftmaxCrossEntropyLoss", since=12)
def softmax_cross_entropy_loss(ctx, scores, labels, weights=None):
    wd = torch.float32 if scores.dtype in _HALF else scores.dtype
    logp = torch.log_softmax(scores.to(wd), dim=1)
    loss = _nll(ctx, logp, labels, weights)
    return loss.to(scores.dtype), logp.to(scores.dtype)
