"""One registry for every ONNX operator the interpreter implements.

An op is a plain function ``fn(ctx, *inputs) -> Tensor | tuple[Tensor, ...]`` registered with::

    @op("Relu")                 # all opsets
    @op("Split", since=13)      # this implementation applies from opset 13 on
    @op("Split", since=1)       # ... and this one before

``inputs`` are torch tensors in the node's input order, ``None`` for an omitted optional input. The
function must be pure torch (no numpy on float data, no in-place ops on inputs) so that torch.func
transforms (vmap, jacrev, jacfwd) run through it. Integer "shape" inputs may be read with ``.tolist()``.

Lookup picks the implementation with the largest ``since`` <= the model's opset for that domain,
as onnx's reference evaluator does with its version suffixes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

OpFn = Callable[..., Any]

_REGISTRY: dict[tuple[str, str], list[tuple[int, OpFn]]] = {}

# Domains that mean the default ONNX domain.
DEFAULT_DOMAINS = ("", "ai.onnx")


def _norm_domain(domain: str) -> str:
    return "" if domain in DEFAULT_DOMAINS else domain


def op(op_type: str, since: int = 1, domain: str = "") -> Callable[[OpFn], OpFn]:
    """Register ``fn`` as the implementation of ``op_type`` from opset ``since`` on."""

    def deco(fn: OpFn) -> OpFn:
        key = (_norm_domain(domain), op_type)
        versions = _REGISTRY.setdefault(key, [])
        versions[:] = [v for v in versions if v[0] != since]
        versions.append((since, fn))
        versions.sort(key=lambda v: v[0])
        return fn

    return deco


def lookup(op_type: str, domain: str, opset: int) -> OpFn | None:
    versions = _REGISTRY.get((_norm_domain(domain), op_type))
    if not versions:
        return None
    chosen = None
    for since, fn in versions:
        if since <= opset:
            chosen = fn
    # An opset older than our oldest registered version: the oldest is the closest semantics.
    return chosen if chosen is not None else versions[0][1]


# Why an op is refused even though the ONNX standard defines it (reported, never silently wrong).
OUT_OF_SCOPE: dict[str, str] = {}
for _n in ("StringNormalizer", "StringConcat", "StringSplit", "RegexFullMatch", "TfIdfVectorizer",
           "LabelEncoder"):
    OUT_OF_SCOPE[_n] = "string op"
for _n in ("SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
           "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence", "Optional",
           "OptionalGetElement", "OptionalHasElement"):
    OUT_OF_SCOPE[_n] = "sequence/optional type"
for _n in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
           "ConvInteger", "MatMulInteger"):
    OUT_OF_SCOPE[_n] = "quantization op"
for _n in ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
           "Bernoulli"):
    OUT_OF_SCOPE[_n] = "random op"
OUT_OF_SCOPE["ImageDecoder"] = "image decoding op"


# ---------------------------------------------------------------------------------------------
# dtype mapping shared by ops and the interpreter
# ---------------------------------------------------------------------------------------------
def onnx_to_torch_dtype(elem_type: int) -> torch.dtype | None:
    from onnx import TensorProto as T

    table = {
        T.FLOAT: torch.float32, T.DOUBLE: torch.float64, T.FLOAT16: torch.float16,
        T.BFLOAT16: torch.bfloat16, T.INT8: torch.int8, T.UINT8: torch.uint8, T.INT16: torch.int16,
        T.INT32: torch.int32, T.INT64: torch.int64, T.BOOL: torch.bool,
        T.UINT16: torch.uint16, T.UINT32: torch.uint32, T.UINT64: torch.uint64,
        T.COMPLEX64: torch.complex64, T.COMPLEX128: torch.complex128,
    }
    for code, name in ((17, "float8_e4m3fn"), (18, "float8_e4m3fnuz"), (19, "float8_e5m2"), (20, "float8_e5m2fnuz")):
        if hasattr(torch, name):
            table[code] = getattr(torch, name)
    return table.get(elem_type)
