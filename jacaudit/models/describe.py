"""Describe a model file without running it (``jacaudit inspect``).

:func:`describe_file` returns a plain dict: ``format``, ``path``, ``inputs`` / ``outputs`` (name, shape, dtype
name such as "float32" or "int64", differentiable), ``opset``, ``ir_version``, ``producer``, ``op_histogram``,
``parameters`` (float parameter elements), ``sha256``, ``unsupported_ops`` (listed, not raised: op_type, domain,
opset, node names) and ``optimizations`` (load-time graph work, when the interpreter compiled the graph).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

__all__ = ["describe_file"]


def describe_file(path: str) -> dict[str, Any]:
    """Describe an ONNX or TorchScript model without running it; unsupported ONNX ops are listed, not raised."""
    from . import detect_format

    fmt = detect_format(path)
    if fmt == "torchscript":
        from .torchscript import load_torchscript

        d = load_torchscript(path).describe()
        d.setdefault("ir_version", None)
        d["unsupported_ops"] = []
        return d
    return _describe_onnx(path)


def _op_histogram(proto) -> dict[str, int]:
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in proto.graph.node)
    return dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))


def _describe_onnx(path: str) -> dict[str, Any]:
    from ..errors import UnsupportedOpError
    from .onnx.model import OnnxModel, _value_info_spec, read_onnx

    proto, data = read_onnx(path)
    sha = hashlib.sha256(data).hexdigest()
    try:
        d = OnnxModel(proto, path=path, sha256=sha).describe()
        d["unsupported_ops"] = []
        return d
    except UnsupportedOpError as e:
        missing = e.missing
    from onnx import TensorProto

    float_types = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    g = proto.graph
    init = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    n_params = 0
    for t in g.initializer:
        if t.data_type in float_types:
            n = 1
            for dim in t.dims:
                n *= int(dim)
            n_params += n
    return {
        "format": "onnx", "path": path,
        "inputs": [_value_info_spec(v).describe() for v in g.input if v.name not in init],
        "outputs": [_value_info_spec(v).describe() for v in g.output],
        "opset": {(i.domain or "ai.onnx"): i.version for i in proto.opset_import},
        "ir_version": proto.ir_version,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "op_histogram": _op_histogram(proto),
        "parameters": int(n_params),
        "sha256": sha,
        "unsupported_ops": [{"op_type": op, "domain": dom or "ai.onnx", "opset": ver, "nodes": list(names)}
                            for op, dom, ver, names in missing],
    }
