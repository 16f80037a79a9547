"""The reference forward of an ONNX model: onnxruntime on a copy of the graph.

The copy has the requested (internal) tensors added as graph outputs, and an internal tensor one varies
(``wrt``) cut into a graph input (its producer's output renamed), so onnxruntime can evaluate the model at a
perturbed value of that tensor. A CPU session with one thread: a reference, not a race.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ...errors import InputError

_ORT_NP = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
           "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
           "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64}


def elem_type_of(proto, name: str) -> int:
    """The ONNX element type of tensor ``name`` (declared, else inferred; FLOAT when unknown)."""
    from onnx import TensorProto

    g = proto.graph
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        if vi.name == name and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    try:
        import onnx
        inferred = onnx.shape_inference.infer_shapes(proto)
        for vi in inferred.graph.value_info:
            if vi.name == name and vi.type.tensor_type.elem_type:
                return vi.type.tensor_type.elem_type
    except Exception:
        pass
    return TensorProto.FLOAT


def reference_proto(proto, outputs: Sequence[str] = (), cut_inputs: Sequence[str] = ()):
    """A copy of ``proto`` with ``outputs`` added as graph outputs and each internal tensor in ``cut_inputs``
    turned into a graph input (its producer's output renamed), so onnxruntime can vary it."""
    import onnx
    from onnx import helper

    p = onnx.ModelProto()
    p.CopyFrom(proto)
    g = p.graph
    have_out = {o.name for o in g.output}
    for name in outputs:
        if name not in have_out:
            g.output.append(helper.make_tensor_value_info(name, elem_type_of(proto, name), None))
    have_in = {i.name for i in g.input}
    for name in cut_inputs:
        if name in have_in:
            continue
        et = elem_type_of(proto, name)
        for node in g.node:
            for i, o in enumerate(node.output):
                if o == name:
                    node.output[i] = name + "__jacaudit_cut"
        g.input.append(helper.make_tensor_value_info(name, et, None))
    return p


def ort_session(proto):
    """An onnxruntime CPU session (one thread: a reference, not a race)."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        raise InputError("onnxruntime is not installed; it is the reference forward for ONNX models") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(proto.SerializeToString(), sess_options=so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"onnxruntime cannot load the model (the reference forward): {first}") from None


def onnxruntime_reference(proto, outputs: Sequence[str], wrt: str | None, graph_inputs: Sequence[str]):
    """A :class:`jacaudit.models.base.ReferenceForward` running ``outputs`` through onnxruntime."""
    from ..base import ReferenceForward

    cut = [wrt] if wrt and wrt not in set(graph_inputs) else []
    sess = ort_session(reference_proto(proto, outputs=outputs, cut_inputs=cut))
    in_dtypes = {i.name: np.dtype(_ORT_NP.get(i.type, np.float32)) for i in sess.get_inputs()}
    names = list(outputs)

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        fed = {k: np.asarray(v).astype(in_dtypes[k], copy=False) for k, v in feeds.items() if k in in_dtypes}
        return [np.asarray(r) for r in sess.run(names, fed)]

    if wrt is not None and wrt in in_dtypes:
        dt = in_dtypes[wrt]
    else:
        dt = next((d for d in in_dtypes.values() if np.issubdtype(d, np.floating)), np.dtype(np.float32))
    return ReferenceForward(name="onnxruntime", dtype=np.dtype(dt).name, outputs=tuple(names),
                            input_dtypes={k: v.name for k, v in in_dtypes.items()}, fn=run)
