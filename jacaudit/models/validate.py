"""Structural checks of a parsed ONNX model before the interpreter compiles it.

A file that parses as ONNX can still be no usable graph: a cycle, a node reading a tensor nothing defines, a graph
output nothing computes, an initializer whose data does not fill its declared shape (a 2^40-element tensor
declared without data), an input with a zero-size axis, an opset newer than any jacaudit implements. Each is
bad input (:class:`~jacaudit.errors.ModelLoadError` / :class:`~jacaudit.errors.UnsupportedError`, exit 2) named
in one line, found by reading the protobuf only: nothing is allocated from a declared shape.
"""
from __future__ import annotations

from collections import deque

from ..errors import ModelLoadError, UnsupportedError

#: the opsets of the default domain the interpreter implements (README, "ONNX")
MIN_OPSET, MAX_OPSET = 7, 23


def _names(items, n: int = 4) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def check_opset(proto, path: str) -> None:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > MAX_OPSET:
            raise UnsupportedError(f"{path} declares opset {imp.version} of the default ONNX domain; jacaudit "
                                   f"implements opsets {MIN_OPSET}-{MAX_OPSET} (re-export with opset "
                                   f"{MAX_OPSET} or lower)")


def _declared_values(t) -> int | None:
    n = 1
    for d in t.dims:
        if d < 0:
            return None
        n *= int(d)
    return n


def _stored_values(t) -> int | None:
    """How many values an initializer holds (None: cannot tell, e.g. strings or an unknown type)."""
    import numpy as np
    from onnx import TensorProto, helper

    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    if t.data_location == TensorProto.EXTERNAL:
        return None  # not loaded (the loader reads it into raw_data first)
    if t.HasField("raw_data"):
        try:
            dt = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        except Exception:
            return None
        name = helper.tensor_dtype_to_string(t.data_type)
        if any(k in name for k in ("INT4", "FLOAT4", "INT2")):
            return None  # packed sub-byte types
        size = dt.itemsize  # a complex value is one item
        return len(t.raw_data) // size if len(t.raw_data) % size == 0 else -1
    for field, per in (("float_data", 1), ("double_data", 1), ("int32_data", 1), ("int64_data", 1),
                       ("uint64_data", 1)):
        vals = getattr(t, field)
        if len(vals):
            if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
                return len(vals) // 2
            return len(vals)
    return 0


def check_initializers(proto, path: str) -> None:
    from onnx import TensorProto

    known = set(TensorProto.DataType.values()) - {TensorProto.UNDEFINED}
    for t in proto.graph.initializer:
        if t.data_type not in known:
            raise ModelLoadError(f"{path}: initializer {t.name!r} has an undefined or unknown element type "
                                 f"({t.data_type})")
        declared = _declared_values(t)
        if declared is None:
            raise ModelLoadError(f"{path}: initializer {t.name!r} declares a negative dim {tuple(t.dims)}")
        stored = _stored_values(t)
        if stored is None:
            continue
        if stored != declared:
            held = "bytes that are not a whole number of values" if stored < 0 else f"{stored:,} value(s)"
            raise ModelLoadError(f"{path}: initializer {t.name!r} declares shape {tuple(int(d) for d in t.dims)} "
                                 f"({declared:,} values) but holds {held}: truncated or corrupt")


def check_inputs(proto, path: str) -> None:
    inits = {t.name for t in proto.graph.initializer}
    for vi in proto.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value == 0:
                raise ModelLoadError(f"{path}: input {vi.name!r} declares size 0 on axis {axis}: an empty tensor "
                                     "has no values to differentiate")
            # a negative size is how some exporters (paddle2onnx: -1) write a dynamic dim: it stays dynamic


def check_graph_structure(proto, path: str) -> None:
    """Every node input defined (graph input, initializer, or an earlier node's output), no cycle, every graph
    output computed."""
    g = proto.graph
    if not g.output:
        raise ModelLoadError(f"{path}: the graph declares no outputs")
    defined = {i.name for i in g.input} | {t.name for t in g.initializer} | \
        {t.values.name for t in g.sparse_initializer} | {""}
    producer: dict[str, int] = {}
    for k, n in enumerate(g.node):
        for o in n.output:
            if o:
                producer[o] = k
    for n in g.node:
        for i in n.input:
            if i not in defined and i not in producer:
                raise ModelLoadError(f"{path}: node {n.name or n.op_type!r} ({n.op_type}) reads {i!r}, which no "
                                     "node, graph input or initializer defines")
    # Kahn's algorithm over node -> node edges: what is left over lies on a cycle
    deps = [{producer[i] for i in n.input if i not in defined and i in producer} for n in g.node]
    users: dict[int, list[int]] = {}
    for k, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(k)
    left = [len(ds) for ds in deps]
    queue = deque(k for k, c in enumerate(left) if c == 0)
    done = 0
    while queue:
        k = queue.popleft()
        done += 1
        for u in users.get(k, ()):
            left[u] -= 1
            if left[u] == 0:
                queue.append(u)
    if done < len(g.node):
        cyc = [g.node[k].name or g.node[k].op_type for k, c in enumerate(left) if c > 0]
        raise ModelLoadError(f"{path}: the graph has a cycle (through nodes {_names(cyc)}); an ONNX graph must "
                             "be acyclic")
    for o in g.output:
        if o.name not in defined and o.name not in producer:
            raise ModelLoadError(f"{path}: graph output {o.name!r} is computed by no node")


def check_strings(proto, path: str) -> None:
    """Names and op types are text: protobuf hands back bytes for a string field that is not valid UTF-8 (a
    corrupt file)."""
    g = proto.graph

    def bad(x) -> bool:
        return isinstance(x, bytes)

    for k, n in enumerate(g.node):
        if any(bad(x) for x in (n.op_type, n.domain, n.name, *n.input, *n.output)):
            raise ModelLoadError(f"{path}: node #{k} holds a name or op type that is not valid UTF-8 (corrupt file)")
    for field in ("input", "output", "value_info", "initializer"):
        for item in getattr(g, field):
            if bad(item.name):
                raise ModelLoadError(f"{path}: a graph {field} name is not valid UTF-8 (corrupt file)")
    if any(bad(imp.domain) for imp in proto.opset_import):
        raise ModelLoadError(f"{path}: an opset domain is not valid UTF-8 (corrupt file)")


def check_model(proto, path: str) -> None:
    """All checks above, in the order a user would fix them."""
    check_strings(proto, path)
    check_opset(proto, path)
    check_graph_structure(proto, path)
    check_initializers(proto, path)
    check_inputs(proto, path)
