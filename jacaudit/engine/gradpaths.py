"""Which path computed an ONNX model's input gradients (``--runtime``): onnxruntime's backward graph or the torch
interpreter (with the reason the onnxruntime runtime gave). Counted per call of the model's onnxruntime runtime
(``model._ort``), recorded per batch by dataset commands (so shards reused by ``--resume`` or computed on Ray
workers say it too), and described in one deterministic line for the report's ``environment.gradients``."""
from __future__ import annotations

import re
from typing import Any, Iterable

__all__ = ["paths_of", "describe_paths"]


def _tidy(reason: str) -> str:
    # auto's batch limit: one reason for every batch size
    return re.sub(r"^batch \d+ > (\d+)", r"batches over \1", reason)


def paths_of(model: Any) -> dict | None:
    """The model's path counter (a copy), or None where none is kept."""
    rt = getattr(model, "_ort", None)
    paths = getattr(rt, "grad_paths", None) if rt is not None else None
    return None if paths is None else {_tidy(k): v for k, v in paths.items()}


def describe_paths(model: Any, paths: Iterable[str] | None = None) -> str | None:
    """"onnxruntime", "onnxruntime with torch islands (LSTM x2)" (nodes without an ONNX rule differentiated by torch
    between onnxruntime's pieces), "torch interpreter (<reasons>)", or those joined by "; ", for the
    paths taken (``paths``, default: the model's own counter); None where unknown (TorchScript, no gradient)."""
    if getattr(model, "format", None) != "onnx" or not hasattr(model, "runtime"):  # TorchScript, an identity
        return None
    if getattr(model, "_ort", None) is None:
        return "torch interpreter (runtime torch)" if model.runtime == "torch" else \
            "torch interpreter (float64 or a non-CPU device)"
    if paths is None:
        paths = paths_of(model) or ()
    paths = set(paths)
    if not paths:
        return None
    ort = sorted(p for p in paths if p.startswith("onnxruntime"))  # "onnxruntime[ with torch islands (...)]"
    reasons = sorted(p for p in paths if not p.startswith("onnxruntime"))
    interp = f"torch interpreter ({'; '.join(reasons)})" if reasons else ""
    if not ort:
        return interp
    return "; ".join(ort) + (f"; {interp}" if interp else "")
