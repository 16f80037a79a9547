"""Adversarial probes in the input's original units: FGSM, PGD (L-inf and L2) and the minimal flipping epsilon.

Everything happens in the *attack space* ``u``: the data in its original units (image pixels as a fraction of
the pixel range, [0, 1]; raw array / table values otherwise). :class:`Box` maps ``u`` to the model input
(``x = scale * u + shift``, the per-channel affine part of the preprocessing) and holds the valid range
``[lo, hi]`` every perturbed input is clipped to. So an epsilon means the same whether the normalisation lives
inside the model or in the preprocessing.

The recipes (documented, so that a hand-written reference reproduces them bit for bit):

* loss: cross-entropy of the scored logits against the label, summed over the batch (per-sample gradients do
  not depend on how inputs are batched);
* FGSM (Goodfellow et al. 2015): ``u' = clip(u + eps * sign(grad), lo, hi)``;
* PGD L-inf (Madry et al. 2018): random start ``u + (2 * rand - 1) * eps`` clipped, then ``steps`` times
  ``a = u' + alpha * sign(grad)``, ``delta = clamp(a - u, -eps, eps)``, ``u' = clip(u + delta, lo, hi)``;
* PGD L2: random start ``delta = n * (r / ||n||) * eps``, grouped in that order (``n`` normal, ``r`` uniform in
  [0, 1]), then steps of ``alpha * grad / (||grad|| + 1e-10)``, ``delta`` projected onto the L2 ball of radius eps,
  clipped;
* random numbers: :func:`pgd` draws from one ``torch.Generator`` batch after batch (``rand`` for L-inf, ``randn``
  then ``rand`` per batch for L2), or takes them per input (``noise``). The robustness analysis gives them per
  input: each input's own CPU generator, seeded with :func:`~.base.stream_seed` (BLAKE2b of the run seed, the
  use -- e.g. ``pgd-linf/2``, the third L-inf sweep point -- and the input's stable id), draws ``rand`` of the
  sample's shape (L-inf) or ``randn`` of the sample's shape then one ``rand`` (L2), in the input's dtype; so the
  numbers do not depend on batching, sharding or worker order.

These are the recipes of torchattacks' FGSM / PGD / PGDL2 (which the tests compare with), with the loss summed
instead of averaged (the sign, and the L2-normalised step, are the same).
"""
from __future__ import annotations

from .base import Box, Objective, input_noise, l2_norms, loss_and_grad, margin, per_sample, stream_seed
from .fgsm import fgsm
from .pgd import L2_DIVISION_EPS, pgd

__all__ = ["Box", "Objective", "loss_and_grad", "margin", "fgsm", "pgd", "L2_DIVISION_EPS", "per_sample", "l2_norms",
           "stream_seed", "input_noise"]
