"""jacaudit: audit neural networks (ONNX, TorchScript) through their Jacobians.

The public API is imported lazily so that ``import jacaudit`` (and ``jacaudit --help``) stays free of torch.
The package's layout, and how to add a command or a report format: ``jacaudit/README.md``.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load": ("jacaudit.models", "load"),
    "Model": ("jacaudit.models.base", "Model"),
    "TensorSpec": ("jacaudit.models.base", "TensorSpec"),
    # Jacobian engine
    "jacobian": ("jacaudit.engine.core", "jacobian"),
    "vjp": ("jacaudit.engine.core", "vjp"),
    "jvp": ("jacaudit.engine.core", "jvp"),
    "per_sample_jacobian": ("jacaudit.engine.core", "per_sample_jacobian"),
    "JacobianTooLarge": ("jacaudit.engine.core", "JacobianTooLarge"),
    "frobenius_norm": ("jacaudit.engine.estimators", "frobenius_norm"),
    "spectral_norm": ("jacaudit.engine.estimators", "spectral_norm"),
    "top_singular": ("jacaudit.engine.estimators", "top_singular"),
    "verify": ("jacaudit.engine.verify", "verify"),
    "VerifyResult": ("jacaudit.results.verify", "VerifyResult"),
    "linearity": ("jacaudit.engine.linearity", "linearity"),
    # analyses, data, reports
    "saliency": ("jacaudit.analyses.saliency", "saliency"),
    "SaliencyOptions": ("jacaudit.analyses.saliency", "SaliencyOptions"),
    "attribute": ("jacaudit.analyses.attribution", "attribute"),
    "grouped_gradients": ("jacaudit.engine.gradients", "grouped_gradients"),
    "make_scorer": ("jacaudit.engine.gradients", "make_scorer"),
    "describe_file": ("jacaudit.models", "describe_file"),
    "Preprocess": ("jacaudit.data", "Preprocess"),
    "load_inputs": ("jacaudit.data", "load_inputs"),
    "make_report": ("jacaudit.results", "make_report"),
    "render": ("jacaudit.report", "render"),
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
