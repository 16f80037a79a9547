"""Describe a model file without running it (``jacaudit inspect``).

:func:`describe_file` returns a plain dict: ``format``, ``path``, ``inputs`` / ``outputs`` (name, shape, dtype
name such as "float32" or "int64", differentiable), ``opset``, ``ir_version``, ``producer``, ``op_histogram``,
``parameters`` (float parameter elements), ``sha256``, ``unsupported_ops`` (listed, not raised: op_type, domain,
opset, node names) and ``optimizations`` (load-time graph work, when the interpreter compiled the graph).

With ``tensors=True`` also ``tensors``: the graph's internal float tensors (node outputs other than the graph's
outputs and Constant values) with their shapes and dtypes from onnx shape inference -- the candidates for
``wrt`` / ``output``; ``tensors_note`` says what could not be listed. TorchScript: ``tensors`` is None.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

__all__ = ["describe_file"]


def describe_file(path: str, tensors: bool = False) -> dict[str, Any]:
    """Describe an ONNX or TorchScript model without running it; unsupported ONNX ops are listed, not raised."""
    from . import detect_format

    fmt = detect_format(path)
    if fmt == "torchscript":
        from .torchscript import load_torchscript

        d = load_torchscript(path).describe()
        d.setdefault("ir_version", None)
        d["unsupported_ops"] = []
        if tensors:
            d["tensors"] = None
            d["tensors_note"] = "internal tensors are listed for ONNX graphs only"
        return d
    return _describe_onnx(path, tensors)


def _internal_tensors(proto) -> tuple[list[dict[str, Any]], str | None]:
    """Internal float tensors of the top-level graph, in graph order, with inferred shapes/dtypes."""
    import onnx

    from .onnx.model import _FLOAT_TYPES, elem_type_name

    g = proto.graph
    skip = {o.name for o in g.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    # tensors computed from constants alone (weights through Identity/Transpose/..., folded shapes) are no
    # candidates: they do not depend on the inputs
    const = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    fed = {i.name for i in g.input} - const
    names = []
    for n in g.node:
        ins = [i for i in n.input if i]
        if n.op_type == "Constant" or (not any(a.type == a.GRAPH or a.type == a.GRAPHS for a in n.attribute)
                                       and all(i in const and i not in fed for i in ins)):
            const.update(o for o in n.output if o)
            continue
        names.extend(o for o in n.output if o and o not in skip)
    names = list(dict.fromkeys(names))
    infos: dict[str, Any] = {}
    note = None
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
        infos = {vi.name: vi for vi in inferred.graph.value_info}
    except Exception as e:  # e.g. a model over 2 GB, or a custom op inference cannot pass
        note = f"onnx shape inference failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    infos.update({vi.name: vi for vi in g.value_info if vi.name not in infos})
    out: list[dict[str, Any]] = []
    unknown: list[str] = []
    for name in names:
        vi = infos.get(name)
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.elem_type:
            unknown.append(name)
            continue
        tt = vi.type.tensor_type
        if tt.elem_type not in _FLOAT_TYPES:
            continue
        shape = None
        if tt.HasField("shape"):
            shape = [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out.append({"name": name, "shape": shape, "dtype": elem_type_name(tt.elem_type), "differentiable": True})
    if unknown:
        few = ", ".join(repr(u) for u in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        note = (note + "; " if note else "") + (f"{len(unknown)} tensor(s) of unknown type not listed ({few}); "
                                                "they can still be named with wrt/output if they are float")
    return out, note


def _op_histogram(proto) -> dict[str, int]:
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in proto.graph.node)
    return dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))


def _describe_onnx(path: str, tensors: bool = False) -> dict[str, Any]:
    from ..errors import UnsupportedOpError
    from .onnx.model import OnnxModel, _value_info_spec, float_parameter_count, read_onnx

    from .validate import check_model

    proto, data = read_onnx(path)
    check_model(proto, path)
    sha = hashlib.sha256(data).hexdigest()
    extra: dict[str, Any] = {}
    if tensors:
        extra["tensors"], extra["tensors_note"] = _internal_tensors(proto)
    try:
        d = OnnxModel(proto, path=path, sha256=sha).describe()
        d["unsupported_ops"] = []
        return {**d, **extra}
    except UnsupportedOpError as e:
        missing = e.missing
    g = proto.graph
    init = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    n_params = float_parameter_count(proto)
    return {**extra,
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
