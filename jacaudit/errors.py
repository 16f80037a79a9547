"""Typed exceptions, one family per layer, each carrying its exit code.

The CLI maps these to exit codes in one place (``jacaudit.cli.common.handle_errors``, used by the runner);
library code never exits.

Exit codes (documented in README):
    0  pass
    1  a check failed (decided by :mod:`jacaudit.gate` from the report's checks, not by an exception)
    2  usage or input error: bad file, wrong shape, unsupported op (:class:`InputError` and subclasses)
    3  runtime failure: NaN/inf derivatives, out of memory after retries (:class:`RuntimeFailure`)
    4  inconclusive: nothing failed, but the evidence was too thin for a verdict (e.g. ``verify`` where no
       direction was conclusive); ``--exit-zero`` gives 0
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_GATE = 1
EXIT_INPUT = 2
EXIT_RUNTIME = 3
EXIT_INCONCLUSIVE = 4


class JacauditError(Exception):
    """Base class: a failure with a one-line message meant for the user."""

    exit_code = EXIT_RUNTIME


class InputError(JacauditError):
    """The user gave us something we cannot use (bad path, bad shape, bad option)."""

    exit_code = EXIT_INPUT


class ModelLoadError(InputError):
    """A model file that cannot be loaded (not ONNX/TorchScript, truncated, unsafe path...)."""


class UnsupportedError(ModelLoadError):
    """The model uses something jacaudit deliberately does not support (sequence/optional types, an op
    variant torch cannot represent, training-mode randomness). Reported as unsupported, never answered wrongly."""


class UnsupportedOpError(UnsupportedError):
    """The graph uses operators the interpreter does not implement (found before anything runs)."""

    def __init__(self, missing: list[tuple[str, str, int, list[str]]]):
        # missing: (op_type, domain, opset, node names)
        self.missing = missing
        parts = []
        for op_type, domain, opset, names in missing:
            shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{domain or 'ai.onnx'}::{op_type} (opset {opset}; nodes {shown})")
        super().__init__("unsupported ONNX operator(s): " + "; ".join(parts))


class DataError(InputError):
    """An input data file (image, array, CSV) that cannot be read or does not fit the model."""


class RuntimeFailure(JacauditError):
    """The computation itself failed: NaN/inf derivatives, out of memory after retries."""

    exit_code = EXIT_RUNTIME
