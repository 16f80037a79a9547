"""Sample models with known truths, built from scratch by a seeded script: ``python -m jacaudit.samples``.

Each builder trains (or, for the arm, just writes) one model into ``<out>/<name>/`` with a JSON card beside it:

=========  ==========================================  ==========================================================
name       model                                        truth it lets you check
=========  ==========================================  ==========================================================
shapes     CNN on synthetic shape images (ONNX + .pt)   saliency concentrates in the object mask
shortcut   "Clever Hans" CNN (corner marker in training) saliency on the marker; accuracy drops without it
robust     the shapes CNN's twin, Jacobian-regularised  smaller ||J||, higher FGSM/PGD accuracy than shapes
transfer   source / target images for shapes (no model)  a blue cast shifts the first conv's channels 3 and 7
tabular    MLP on a 12-feature table (ONNX, 2 exporters) per-feature sensitivity ranks the 3 relevant features first
arm        planar 3-link arm kinematics (TorchScript f64) Jacobian = closed form; singular when stretched/folded
flow       RealNVP on two-moons (ONNX)                    log|det J| from J = the flow's own output; density sums to 1
sequence   tiny attention classifier on token ids (ONNX) position map highlights the positions of A and B
policy     image -> action soft-argmax (ONNX, no training)  steers to the bright dot; J = closed form, rank 2
=========  ==========================================  ==========================================================

The generators (:func:`shapes.make_images`, :func:`tabular.make_table`, :func:`flow.make_moons`,
:func:`sequence.make_sequences`) are deterministic in their seed, so tests regenerate the held-out data.
Building needs the ``onnxscript`` package (torch's dynamo ONNX exporter).
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable

BUILDERS: dict[str, str] = {
    "arm": "jacaudit.samples.arm:build_arm",
    "tabular": "jacaudit.samples.tabular:build_tabular",
    "flow": "jacaudit.samples.flow:build_flow",
    "sequence": "jacaudit.samples.sequence:build_sequence",
    "shapes": "jacaudit.samples.shapes:build_shapes",
    "shortcut": "jacaudit.samples.shapes:build_shortcut",
    "robust": "jacaudit.samples.robust:build_robust",
    "transfer": "jacaudit.samples.transfer:build_transfer",
    "policy": "jacaudit.samples.policy:build_policy",
}
NAMES = list(BUILDERS)
DEFAULT_SEED = 0


def default_out_dir() -> str:
    """``sample_models/`` at the repository root (next to the package)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "sample_models")


def _builder(name: str) -> Callable[..., dict[str, Any]]:
    import importlib

    mod, fn = BUILDERS[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def build(names: list[str] | None = None, out_dir: str | None = None, seed: int = DEFAULT_SEED,
          log: Callable[[str], None] = print, clean: bool = True) -> dict[str, dict[str, Any]]:
    """Build the named sample models (all by default) into ``out_dir``; returns {name: card}."""
    out_dir = out_dir or default_out_dir()
    names = names or NAMES
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown sample model(s) {unknown}; choose from {NAMES}")
    os.makedirs(out_dir, exist_ok=True)
    import torch

    cards = {}
    t0 = time.time()
    # the builders pin torch to one thread and deterministic algorithms; give the caller its settings back
    threads, determ = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    determ_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for n in names:
            d = os.path.join(out_dir, n)
            if clean and os.path.isdir(d):
                shutil.rmtree(d)
            log(f"building {n} ...")
            cards[n] = _builder(n)(out_dir, seed=seed, log=log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(determ, warn_only=determ_warn)
    from .readme import write_readme

    write_readme(out_dir)
    log(f"built {', '.join(names)} in {time.time() - t0:.1f}s")
    return cards
