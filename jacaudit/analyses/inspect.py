"""``inspect`` as an analysis: a model described without running it, and one check: are all ops supported?

Metric ``unsupported_ops[model]``: the number of operator types the interpreter does not implement; fails above 0
(the ops and their nodes are in the message and the result).
"""
from __future__ import annotations

from typing import Any

from ..gate import Metric
from .base import AnalysisOutput

__all__ = ["inspect_analysis", "inspect_result", "model_identity_of", "tidy_dim"]


_DIM_MAX = 40  # characters of a symbolic dim shown (an exporter's shape expression can run to lines)


def tidy_dim(d: Any) -> int | str:
    """A dim for display: ints as they are; a symbolic dim as its name, a multi-line expression collapsed to
    one line and trimmed; an unnamed dynamic dim as "?"."""
    if isinstance(d, int):
        return d
    s = " ".join(str(d).split()) if d is not None else ""
    if not s:
        return "?"
    return s if len(s) <= _DIM_MAX else s[:_DIM_MAX - 1] + "…"


def _tensor(d: dict):
    from ..results.inspect import InspectTensor

    shape = d.get("shape")
    return InspectTensor(name=str(d.get("name")),
                         shape=None if shape is None else [tidy_dim(x) for x in shape],
                         dtype=None if d.get("dtype") is None else str(d.get("dtype")),
                         differentiable=None if d.get("differentiable") is None else bool(d["differentiable"]))


def _notes(d: dict) -> list[str]:
    return [f"input {s['name']!r} is {s['dtype']} (not differentiable); differentiate with respect to an internal "
            "float tensor (wrt), e.g. an embedding output"
            for s in d.get("inputs", []) if s.get("dtype") is not None and s.get("differentiable") is False]


def inspect_result(d: dict):
    """A description dict (:func:`jacaudit.models.describe_file`) -> :class:`jacaudit.results.inspect.InspectResult`."""
    from ..results.inspect import InspectOpCount, InspectResult, InspectUnsupportedOp

    hist = d.get("op_histogram") or {}
    opset = d.get("opset")
    opt = d.get("optimizations")
    ir = d.get("ir_version")
    return InspectResult(
        format=str(d.get("format")), path=str(d.get("path")), sha256=d.get("sha256"),
        opset={str(k): int(v) for k, v in opset.items()} if isinstance(opset, dict) else None,
        ir_version=int(ir) if isinstance(ir, int) else None, producer=d.get("producer") or None,
        inputs=[_tensor(x) for x in d.get("inputs", [])], outputs=[_tensor(x) for x in d.get("outputs", [])],
        op_histogram=[InspectOpCount(str(k), int(v)) for k, v in hist.items()],
        nodes=int(sum(int(v) for v in hist.values())),
        parameters=None if d.get("parameters") is None else int(d["parameters"]),
        optimizations={str(k): int(v) for k, v in opt.items()} if isinstance(opt, dict) else None,
        unsupported_ops=[InspectUnsupportedOp(str(u["op_type"]), str(u["domain"]),
                                              None if u.get("opset") is None else int(u["opset"]),
                                              [str(n) for n in u.get("nodes", [])])
                         for u in d.get("unsupported_ops", [])],
        supported=not d.get("unsupported_ops"), notes=_notes(d),
        tensors=None if d.get("tensors") is None else [_tensor(x) for x in d["tensors"]],
        tensors_note=d.get("tensors_note"))


def model_identity_of(d: dict):
    """The report envelope's model identity from the description (no loaded model is needed)."""
    import os

    from ..results import ModelIdentity, TensorInfo

    opset = d.get("opset")
    return ModelIdentity(path=str(d.get("path")), name=os.path.basename(str(d.get("path"))),
                         format=str(d.get("format")), sha256=d.get("sha256"),
                         opset={str(k): int(v) for k, v in opset.items()} if isinstance(opset, dict) else None,
                         producer=d.get("producer") or None, parameters=d.get("parameters"),
                         inputs=[TensorInfo(str(x["name"]), _shape(x.get("shape")), x.get("dtype"))
                                 for x in d["inputs"]],
                         outputs=[TensorInfo(str(x["name"]), _shape(x.get("shape")), x.get("dtype"))
                                  for x in d["outputs"]])


def _shape(shape):
    return None if shape is None else [tidy_dim(x) for x in shape]


def inspect_analysis(path: str, tensors: bool = False) -> tuple[AnalysisOutput, Any]:
    """-> (output, model identity). ``tensors``: also list the internal float tensors (ONNX)."""
    from ..models import describe_file

    d = describe_file(path, tensors=tensors)
    result = inspect_result(d)
    unsupported = result.unsupported_ops
    listed = "; ".join(f"{u.domain}::{u.op_type} (opset {u.opset}) in {len(u.nodes)} node(s): "
                       + ", ".join(u.nodes[:3]) + (" ..." if len(u.nodes) > 3 else "") for u in unsupported)
    metric = Metric("unsupported_ops", "model", float(len(unsupported)), ">", fail=0.0,
                    note=f"unsupported: {listed}" if unsupported else "every operator is implemented",
                    description="operator types the interpreter does not implement (found before anything runs)")
    warnings = [f"unsupported op {u.domain}::{u.op_type} (opset {u.opset}) in {len(u.nodes)} node(s)"
                for u in unsupported]
    return AnalysisOutput(result=result, metrics=[metric], warnings=warnings), model_identity_of(d)
