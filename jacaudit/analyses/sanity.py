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
    """Recompute every method's maps under cascading randomisation; one :class:`SanityCheck` per method."""
    layers = model.parameter_layers()
    if options.sanity_layers:
        layers = layers[: options.sanity_layers]
    x = torch.cat([k[1] for k in kept])
    targets = torch.cat([k[2] for k in kept])
    steps: dict[str, list[SanityStep]] = {m: [] for m in options.methods}
    for depth in range(1, len(layers) + 1):
        with model.randomised(layers[:depth], options.seed + 7919):
            for m in options.methods:
                a = attribute(scorer, x, m, targets=targets, steps=options.steps, baseline=options.baseline,
                              samples=options.samples, sigma=options.sigma, preprocess=preprocess,
                              seed=options.seed, chunk_rows=options.chunk_rows)
                rhos = []
                for i, k in enumerate(kept):
                    red = M.reduce_channels(a.attr[i].detach().cpu().numpy(), layout, options.reduction)
                    rhos.append(M.spearman(k[3][m], red))
                steps[m].append(SanityStep(randomized=[n for n, _ in layers[:depth]],
                                           spearman=float(np.mean(rhos))))
    out = []
    for m in options.methods:
        final = steps[m][-1].spearman if steps[m] else float("nan")
        flagged = bool(steps[m]) and abs(final) >= options.sanity_threshold
        out.append(SanityCheck(method=m, steps=steps[m], final_spearman=final, threshold=options.sanity_threshold,
                               flagged=flagged))
    return out
