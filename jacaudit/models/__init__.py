"""Model loading: ONNX (through our interpreter) and TorchScript, behind one :class:`Model` interface."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from ..errors import InputError, ModelLoadError
from .base import Model, ParameterLayer, ReferenceForward, TensorSpec
from .describe import describe_file

__all__ = ["load", "Model", "TensorSpec", "ParameterLayer", "ReferenceForward", "describe_file", "detect_format",
           "resolve_device", "resolve_dtype"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available to torch")
    return d


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
             "double": torch.float64, "float": torch.float32}
    if dtype not in table:
        raise InputError(f"unknown dtype {dtype!r}; use float32 or float64")
    return table[dtype]


def detect_format(path: str) -> str:
    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path} is a folder, not a model file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        return "onnx"
    if ext in (".pt", ".pth", ".ts", ".torchscript", ".jit", ".bin", ".ckpt"):
        return "torchscript"
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torchscript"
    return "onnx"


def load(path: str, device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None,
         extra_args: Sequence[Any] = (), runtime: str = "torch") -> Model:
    """Load an ONNX or TorchScript model as a differentiable :class:`Model`.

    ``dtype=float64`` casts parameters and float inputs (tight derivative checks). ``extra_args`` are
    passed after the tensor inputs to a TorchScript ``forward`` that takes non-tensor arguments.
    ``runtime`` (ONNX models): ``"torch"`` runs everything in the torch interpreter; ``"onnxruntime"`` runs
    values-only calls in onnxruntime and input gradients through onnxruntime's forward and a backward graph
    jacaudit writes (``models/onnx/ortgrad.py``), where the graph has one (else the interpreter); ``"auto"``
    does so for gradients up to ``ortgrad.AUTO_GRAD_MAX_BATCH`` inputs a batch. torch.func transforms,
    forward-mode AD, float64 and non-CPU devices always run the interpreter.
    """
    fmt = detect_format(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    if fmt == "onnx":
        if extra_args:
            raise InputError("extra forward arguments (--model-arg) apply to TorchScript models only; an ONNX "
                             "graph takes tensors by input name")
        import hashlib

        from .onnx.model import OnnxModel, read_onnx
        from .validate import check_model

        # load_onnx's two steps, with the structural checks between them (cycles, undefined tensors, initializers
        # that do not fill their declared shape, future opsets: bad input, exit 2, before anything is allocated)
        proto, data = read_onnx(path)
        check_model(proto, path)
        return OnnxModel(proto, path=path, device=dev, dtype=dt, sha256=hashlib.sha256(data).hexdigest(),
                         runtime=runtime)
    from .torchscript import load_torchscript
    return load_torchscript(path, device=dev, dtype=dt, extra_args=extra_args)
