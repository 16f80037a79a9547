"""Result of ``jacaudit inspect``: what a model is (format, opset, inputs/outputs, ops, parameters) and whether
jacaudit can differentiate it (unsupported ops)."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import result_type


@dataclass(frozen=True)
class InspectTensor:
    name: str
    shape: list[int | str] | None = field(metadata={"doc": "dims; strings are symbolic (dynamic) dims"})
    dtype: str | None
    differentiable: bool | None = field(metadata={"doc": "a floating-point tensor (derivatives can be taken); "
                                                  "None: unknown until the model runs (TorchScript)"})


@dataclass(frozen=True)
class InspectUnsupportedOp:
    op_type: str
    domain: str
    opset: int | None
    nodes: list[str] = field(metadata={"doc": "names of the nodes using it"})


@dataclass(frozen=True)
class InspectOpCount:
    op_type: str = field(metadata={"doc": "op type, prefixed by its domain when not the default one"})
    count: int


@result_type("inspect")
@dataclass(frozen=True)
class InspectResult:
    """A model described without running it."""

    format: str
    path: str
    sha256: str | None
    opset: dict[str, int] | None = field(metadata={"doc": "domain -> version (ONNX)"})
    ir_version: int | None
    producer: str | None
    inputs: list[InspectTensor]
    outputs: list[InspectTensor]
    op_histogram: list[InspectOpCount] = field(metadata={"doc": "node count per op type, most used first"})
    nodes: int = field(metadata={"doc": "total number of nodes"})
    parameters: int | None
    optimizations: dict[str, int] | None = field(
        metadata={"doc": "load-time rewrites (constants folded, batch norms folded)"})
    unsupported_ops: list[InspectUnsupportedOp]
    supported: bool = field(metadata={"doc": "every op is supported by the interpreter"})
    notes: list[str] = field(default_factory=list)
    tensors: list[InspectTensor] | None = field(default=None, metadata={
        "doc": "internal float tensors with inferred shapes (inspect --tensors; candidates for wrt/output); "
               "None when not asked for or not available"})
    tensors_note: str | None = field(default=None, metadata={"doc": "what --tensors could not list, and why"})
    runtime: str | None = field(default=None, metadata={"doc": "--runtime: auto, onnxruntime or torch (schema 1.2)"})
    input_gradients: str | None = field(default=None, metadata={
        "doc": "the path that computes input gradients at batch 1 under that runtime: 'onnxruntime (backward "
               "graph of N nodes)' or 'torch interpreter (<reason>)' (schema 1.2)"})
