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


def gradient_probe(path: str, runtime: str, fmt: str, input: Any = None, shape: Any = None) -> str:
    """Which path computes the model's input gradients at batch 1 under ``runtime``: "onnxruntime (backward
    graph of N nodes)" or "torch interpreter (<reason>)", on the example input ``input``/``shape`` give (as the
    commands' --input/--shape; else a synthetic one). Never raises: a failed probe is the reason."""
    if fmt != "onnx":
        return "torch (TorchScript models run in torch)"
    if runtime == "torch":
        return "torch interpreter (runtime torch)"
    try:
        import torch

        from ..data.feeds import default_wrt, load_feeds
        from ..models import load

        model = load(path, runtime=runtime)
        if model._ort is None:
            return "torch interpreter (no onnxruntime runtime for this model)"
        wrt = default_wrt(model)
        spec = model.input_spec(wrt) if wrt is not None else None
        if spec is None or not spec.is_float:
            return "torch interpreter (no float input to differentiate)"
        torch.manual_seed(0)
        feeds = load_feeds(model, input, seed=0, shape=shape).feeds
        x = feeds[wrt]
        if x.dim() and x.shape[0] != 1:  # batch 1: the first dimension of the differentiated input
            feeds = {k: (v[:1] if v.dim() and v.shape[0] == x.shape[0] else v) for k, v in feeds.items()}
        feeds = {k: v.detach() for k, v in feeds.items()}
        plan = model._ort.grad.plan(feeds, [wrt], [s.name for s in model.outputs])
        if plan is None:
            return f"torch interpreter ({model._ort.grad.refused or 'no plan'})"
        if plan.islands:
            from ..models.onnx.ortgrad import island_summary
            return (f"onnxruntime (backward graph of {plan.n_nodes} nodes; "
                    f"torch islands: {island_summary(plan.islands)})")
        return f"onnxruntime (backward graph of {plan.n_nodes} nodes)"
    except Exception as e:  # the probe never fails inspect
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        # e.g. dynamic spatial axes without --shape: no example input, so no plan to look at; the commands'
        # reports say which path ran (environment.gradients)
        return f"not probed ({type(e).__name__}{': ' + msg if msg else ''}; give --shape/--input, or read " \
            "environment.gradients in a command's report)"


def inspect_analysis(path: str, tensors: bool = False, runtime: str | None = None, input: Any = None,
                     shape: Any = None) -> tuple[AnalysisOutput, Any]:
    """-> (output, model identity). ``tensors``: also list the internal float tensors (ONNX). ``runtime``
    (auto|onnxruntime|torch): also say which path computes the input gradients at batch 1, on the example input
    ``input``/``shape`` give (the --input/--shape of the commands)."""
    import dataclasses

    from ..models import describe_file

    d = describe_file(path, tensors=tensors)
    result = inspect_result(d)
    if runtime is not None:
        probe = "torch interpreter (unsupported operators)" if result.unsupported_ops else \
            gradient_probe(path, runtime, result.format, input, shape)
        result = dataclasses.replace(result, runtime=runtime, input_gradients=probe)
    unsupported = result.unsupported_ops
    listed = "; ".join(f"{u.domain}::{u.op_type} (opset {u.opset}) in {len(u.nodes)} node(s): "
                       + ", ".join(u.nodes[:3]) + (" ..." if len(u.nodes) > 3 else "") for u in unsupported)
    metric = Metric("unsupported_ops", "model", float(len(unsupported)), ">", fail=0.0,
                    note=f"unsupported: {listed}" if unsupported else "every operator is implemented",
                    description="operator types the interpreter does not implement (found before anything runs)")
    warnings = [f"unsupported op {u.domain}::{u.op_type} (opset {u.opset}) in {len(u.nodes)} node(s)"
                for u in unsupported]
    return AnalysisOutput(result=result, metrics=[metric], warnings=warnings), model_identity_of(d)
