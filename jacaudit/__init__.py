"""jacaudit: audit neural networks (ONNX, TorchScript) through their Jacobians.

The public API is imported lazily so that ``import jacaudit`` (and ``jacaudit --help``) stays free of torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load": ("jacaudit.models", "load"),
    "Model": ("jacaudit.models.base", "Model"),
    "TensorSpec": ("jacaudit.models.base", "TensorSpec"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module
        mod, attr = _LAZY[name]
        value = getattr(import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jacaudit' has no attribute {name!r}")
