"""Model-parameter randomisation test -- Adebayo et al. (2018), "Sanity Checks for Saliency Maps".

Cascading randomisation: starting from the layer nearest the output, each layer's parameters (weights and
biases) are replaced by Gaussian values with the original tensor's standard deviation (seeded), one more layer
per step, and the saliency maps are recomputed for the same inputs and target classes. We report the Spearman
rank correlation between the original and the randomised ``|map|`` (channel-reduced, as in the paper's
"absolute value" variant), averaged over the inputs. A method whose map still correlates strongly after the
whole cascade (``|rho| >= threshold``) is flagged: its maps do not depend on what the model learned.

Parameters are restored afterwards (also on error).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..results.saliency import SanityCheck, SanityStep
from . import maps as M
from .attribution import attribute


def sanity_check(model: Any, scorer: Any, kept: list, options: Any, preprocess: Any, layout: str) -> list:
    """Recompute every method's maps under cascading randomisation; one :class:`SanityCheck` per method.

    A step that fails (an exception, or maps that are not finite -- e.g. a NaN produced by a randomised
    weight) is recorded in that step (status ``failed``, its message, Spearman NaN) and the cascade goes on.
    Nothing to randomise -> status ``skipped`` with the reason (no evidence; never "changes")."""
    from ..errors import JacauditError

    layers = model.parameter_layers()
    if options.sanity_layers:
        layers = layers[: options.sanity_layers]
    x = torch.cat([k[1] for k in kept])
    targets = torch.cat([k[2] for k in kept])
    steps: dict[str, list[SanityStep]] = {m: [] for m in options.methods}
    for depth in range(1, len(layers) + 1):
        randomized = [n for n, _ in layers[:depth]]
        failed: str | None = None
        results: dict[str, float | str] = {}
        try:
            with model.randomised(layers[:depth], options.seed + 7919):
                for m in options.methods:
                    try:
                        a = attribute(scorer, x, m, targets=targets, steps=options.steps, baseline=options.baseline,
                                      samples=options.samples, sigma=options.sigma, preprocess=preprocess,
                                      seed=options.seed, chunk_rows=options.chunk_rows)
                        attr = a.attr.detach().cpu()
                        if not bool(torch.isfinite(attr).all()):
                            results[m] = (f"the {m} maps hold NaN/inf with {len(randomized)} layer(s) randomised "
                                          f"(last: {randomized[-1]})")
                            continue
                        rhos = []
                        for i, k in enumerate(kept):
                            red = M.reduce_channels(attr[i].numpy(), layout, options.reduction)
                            rhos.append(M.spearman(k[3][m], red))
                        rho = float(np.mean(rhos))
                        results[m] = rho if np.isfinite(rho) else (
                            f"Spearman is not a number with {len(randomized)} layer(s) randomised (a constant map)")
                    except (JacauditError, RuntimeError, ValueError, FloatingPointError, ArithmeticError) as e:
                        results[m] = _one_line(e)
        except (JacauditError, RuntimeError, ValueError) as e:  # randomising itself failed
            failed = _one_line(e)
        for m in options.methods:
            r = results.get(m, failed or "not computed")
            if isinstance(r, str):
                steps[m].append(SanityStep(randomized=randomized, spearman=float("nan"), status="failed",
                                           message=r))
            else:
                steps[m].append(SanityStep(randomized=randomized, spearman=r))
    out = []
    for m in options.methods:
        st = steps[m]
        bad = [s_ for s_ in st if s_.status != "ok"]
        final = st[-1].spearman if st else float("nan")
        if not st:
            status, reason = "skipped", "no layer of the model has parameters that could be randomised: no evidence"
        elif st[-1].status != "ok":
            status, reason = "error", (f"the last step ({len(st)} layer(s) randomised) failed: {st[-1].message}"
                                       + (f"; {len(bad) - 1} earlier step(s) failed too" if len(bad) > 1 else ""))
        elif bad:
            status, reason = "partial", f"{len(bad)} of {len(st)} step(s) failed; first: {bad[0].message}"
        else:
            status, reason = "checked", None
        flagged = status in ("checked", "partial") and bool(np.isfinite(final)) \
            and abs(final) >= options.sanity_threshold
        out.append(SanityCheck(method=m, steps=st, final_spearman=final, threshold=options.sanity_threshold,
                               flagged=flagged, status=status, reason=reason))
    return out


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
