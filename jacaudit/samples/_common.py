"""Helpers shared by the sample-model builders: seeding, export, cards, accuracy."""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Sequence

import numpy as np
import torch

#: opset used by each exporter (the interpreter is exercised on both styles of graph)
OPSET_DYNAMO = 18
OPSET_TORCHSCRIPT = 17


def seed_everything(seed: int) -> None:
    """Seed torch and numpy's legacy global state and pin torch to one thread (shared CPUs)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)


def sub_seed(seed: int, name: str) -> int:
    """A stable, distinct seed for one purpose (train data, held-out data, init ...) derived from ``seed``."""
    h = 0
    for ch in name:
        h = (h * 131 + ord(ch)) % 1_000_003
    return (seed * 1_000_003 + h) % (2**31 - 1)


def rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(sub_seed(seed, name))


def export_onnx(model: torch.nn.Module, args: tuple, path: str, *, dynamo: bool, input_names: Sequence[str],
                output_names: Sequence[str], dynamic_batch: bool = True) -> dict[str, Any]:
    """Export with either torch.onnx exporter; returns {exporter, opset}. The batch dim (dim 0) of every
    input and output is dynamic (named ``batch``) when ``dynamic_batch``."""
    model.eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            kwargs: dict[str, Any] = {}
            if dynamic_batch:
                batch = torch.export.Dim("batch", min=1, max=4096)
                kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
            prog = torch.onnx.export(model, args, dynamo=True, opset_version=OPSET_DYNAMO,
                                     input_names=list(input_names), output_names=list(output_names),
                                     external_data=False, verbose=False, optimize=True, **kwargs)
            prog.save(path)
            opset = OPSET_DYNAMO
        else:
            dyn = None
            if dynamic_batch:
                dyn = {n: {0: "batch"} for n in list(input_names) + list(output_names)}
            torch.onnx.export(model, args, path, dynamo=False, opset_version=OPSET_TORCHSCRIPT,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dyn, do_constant_folding=True)
            opset = OPSET_TORCHSCRIPT
    import onnx
    proto = onnx.load(path)
    _tidy(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return {"exporter": "torch.onnx.export(dynamo=True)" if dynamo else "torch.onnx.export(dynamo=False)",
            "opset": opset}


def _tidy(proto) -> None:
    """Drop doc strings / metadata that embed local paths, so rebuilds on other machines compare equal."""
    proto.doc_string = ""
    proto.graph.doc_string = ""
    for n in proto.graph.node:
        n.doc_string = ""
        for i in reversed(range(len(n.metadata_props))):
            del n.metadata_props[i]
    for i in reversed(range(len(proto.metadata_props))):
        del proto.metadata_props[i]


def rename_tensor(proto, old: str, new: str) -> None:
    """Rename one tensor everywhere in the main graph (node inputs/outputs, value_info, graph outputs)."""
    g = proto.graph
    for n in g.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
        for i, x in enumerate(n.output):
            if x == old:
                n.output[i] = new
    for coll in (g.value_info, g.output, g.input):
        for vi in coll:
            if vi.name == old:
                vi.name = new


def onnx_io(path: str) -> dict[str, list[dict[str, Any]]]:
    """Inputs/outputs of an ONNX file as card entries (name, shape with 'batch' for dynamic dims, dtype)."""
    import onnx
    from onnx import helper

    proto = onnx.load(path)
    inits = {t.name for t in proto.graph.initializer}

    def spec(vi):
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return {"name": vi.name, "shape": shape, "dtype": helper.tensor_dtype_to_np_dtype(tt.elem_type).name}

    return {"inputs": [spec(v) for v in proto.graph.input if v.name not in inits],
            "outputs": [spec(v) for v in proto.graph.output]}


def ort_session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_run(path_or_sess, feeds: dict[str, np.ndarray], batch: int = 512) -> list[np.ndarray]:
    """Run an ONNX model with onnxruntime in batches (all feeds share dim 0)."""
    sess = ort_session(path_or_sess) if isinstance(path_or_sess, str) else path_or_sess
    n = len(next(iter(feeds.values())))
    outs: list[list[np.ndarray]] = []
    for i in range(0, n, batch):
        r = sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})
        outs.append(r)
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def accuracy(pred_scores: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(pred_scores).argmax(-1) == np.asarray(labels)).mean())


def param_count(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def write_card(path: str, card: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(card, f, indent=2, sort_keys=False)
        f.write("\n")


def read_card(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def write_labels(path: str, labels: Sequence[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(labels) + "\n")


def r4(x: float) -> float:
    return float(round(float(x), 4))
