"""ONNX operator implementations, one module per op family. Importing this package registers them all."""
from importlib import import_module

_MODULES = ("elementwise", "math", "nn", "rnn", "tensor", "indexing", "reduce", "resize", "control",
            "attention", "loss", "vision")

for _m in _MODULES:
    import_module(f"{__name__}.{_m}")
