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

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from . import maps as M

_WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "LSTM", "GRU", "RNN",
               "InstanceNormalization", "LayerNormalization", "Einsum"}


def parameter_layers(model: Any) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(layer name, {tensor name: tensor}) from the output backwards."""
    layers: list[tuple[str, dict[str, torch.Tensor]]] = []
    if getattr(model, "format", None) == "onnx":
        inits = model.graph.initializers
        seen: set[str] = set()
        for node in model.graph.nodes:
            names = [n for n in node.inputs if n and n in inits and n not in seen and inits[n].is_floating_point()
                     and inits[n].numel() > 1]
            if not names or node.ctx.op_type not in _WEIGHT_OPS:
                continue
            if not any(inits[n].dim() >= 2 for n in names) and node.ctx.op_type not in (
                    "BatchNormalization", "LayerNormalization", "InstanceNormalization"):
                continue
            seen.update(names)
            layers.append((node.ctx.name, {n: inits[n] for n in names}))
    elif hasattr(model, "module"):
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in model.module.named_parameters():
            if p.is_floating_point() and p.numel() > 1:
                groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, {})[name] = p
        layers = list(groups.items())
    return layers[::-1]


@contextmanager
def randomised(model: Any, layers: list[tuple[str, dict[str, torch.Tensor]]], seed: int) -> Iterator[None]:
    """Temporarily replace the given layers' parameters with seeded Gaussian values."""
    g = torch.Generator().manual_seed(seed)
    saved: list[tuple[str, torch.Tensor]] = []
    is_onnx = getattr(model, "format", None) == "onnx"
    try:
        with torch.no_grad():
            for _, tensors in layers:
                for name, t in tensors.items():
                    std = float(t.double().std()) if t.numel() > 1 else 1.0
                    std = std if np.isfinite(std) and std > 0 else 0.05
                    new = (torch.randn(t.shape, generator=g, dtype=torch.float64) * std).to(t.dtype).to(t.device)
                    if is_onnx:
                        saved.append((name, model.graph.initializers[name]))
                        model.graph.initializers[name] = new
                    else:
                        saved.append((name, t.detach().clone()))
                        t.copy_(new)
        yield
    finally:
        with torch.no_grad():
            for name, old in reversed(saved):
                if is_onnx:
                    model.graph.initializers[name] = old
                else:
                    dict(model.module.named_parameters())[name].copy_(old)


def sanity_check(model: Any, scorer: Any, kept: list, options: Any, preprocess: Any, layout: str) -> list:
    """Recompute every method's maps under cascading randomisation; one :class:`SanityCheck` per method."""
    from ..results.saliency import SanityCheck, SanityStep
    from .saliency import attribute, make_scorer

    if getattr(model, "format", None) == "onnx" and getattr(model, "_optimize", False):
        # Randomise the graph as written: an optimized model runs folded copies of its weights (and, for an
        # internal output such as the logits, another compiled graph), which its initializers do not reach.
        from ..models.onnx.model import OnnxModel

        model = OnnxModel(model.proto, path=model.path, device=model.device, dtype=model.dtype, optimize=False)
        scorer = make_scorer(model, options.input_name, options.output, options.use_logits)
    layers = parameter_layers(model)
    if options.sanity_layers:
        layers = layers[: options.sanity_layers]
    x = torch.cat([k[1] for k in kept])
    targets = torch.cat([k[2] for k in kept])
    steps: dict[str, list[SanityStep]] = {m: [] for m in options.methods}
    for depth in range(1, len(layers) + 1):
        with randomised(model, layers[:depth], options.seed + 7919):
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
