"""The plan specialised to the input signature (interpreter.CompiledGraph._run_specialised): shape arithmetic
computed once per signature, never a value that depends on the feeds' values (the graph as written, which
never caches, is the truth)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as TP, helper, numpy_helper  # noqa: E402

import jacaudit  # noqa: E402
from jacaudit.models.onnx.interpreter import _static_split  # noqa: E402


def _graph(tmp_path):
    c = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.int64), name)  # noqa: E731
    nodes = [
        # fixed by the signature: Reshape(x, [x.shape[0], -1]) * 2
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n0"], axis=0),
        helper.make_node("Unsqueeze", ["n0", "ax0"], ["u"]),
        helper.make_node("Concat", ["u", "minus1"], ["shp"], axis=0),
        helper.make_node("Reshape", ["x", "shp"], ["r"]),
        helper.make_node("Mul", ["r", "two"], ["y1"]),
        # the shape of a data-dependent result: never cached
        helper.make_node("Greater", ["x", "zerof"], ["pos"]),
        helper.make_node("NonZero", ["pos"], ["nz"]),
        helper.make_node("Shape", ["nz"], ["nzs"]),
        helper.make_node("Cast", ["nzs"], ["y2"], to=TP.FLOAT),
        # a shape taken from an int feed's values: never cached
        helper.make_node("Reshape", ["x", "k"], ["r2"]),
        helper.make_node("Shape", ["r2"], ["r2s"]),
        helper.make_node("Cast", ["r2s"], ["y3"], to=TP.FLOAT),
        # a shape through a shape-preserving op of the feed: cached
        helper.make_node("Relu", ["x"], ["xr"]),
        helper.make_node("Shape", ["xr"], ["xrs"]),
        helper.make_node("Cast", ["xrs"], ["y4"], to=TP.FLOAT),
    ]
    inits = [c("zero", 0), c("ax0", [0]), c("minus1", [-1]),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zerof")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 2, 3]),
                                       helper.make_tensor_value_info("k", TP.INT64, [None])],
                          [helper.make_tensor_value_info(o, TP.FLOAT, None) for o in ("y1", "y2", "y3", "y4")],
                          inits)
    p = tmp_path / "shape.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(p))
    return jacaudit.load(str(p))


def test_static_split_picks_only_signature_values(tmp_path):
    m = _graph(tmp_path)
    g = m.graph
    plan = g._plan(tuple(g.output_names), frozenset())
    ids, names = _static_split(plan, {"x": None, "k": None}, g.initializers)
    assert {"s", "n0", "u", "shp", "xrs", "y4"} <= names
    assert not names & {"nzs", "y2", "r2s", "y3", "r", "y1", "xr"}


def test_cached_runs_match_the_graph_as_written(tmp_path):
    m = _graph(tmp_path)
    gen = torch.Generator().manual_seed(0)
    runs = [(torch.randn(4, 2, 3, generator=gen), [4, 6]), (torch.randn(4, 2, 3, generator=gen), [3, 8]),
            (torch.randn(7, 2, 3, generator=gen), [6, 7]), (torch.randn(4, 2, 3, generator=gen), [2, 12])]
    for _ in range(2):
        for x, k in runs:
            feeds = {"x": x, "k": torch.tensor(k)}
            got = m.run(feeds)
            want = m.plain_graph.run(feeds)
            for a, b in zip(got, want):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(k[0] == "static" for k in m.graph._plans)
    # a requested output fixed by the signature is a fresh tensor every call (never the cache's own)
    feeds = {"x": runs[0][0], "k": torch.tensor(runs[0][1])}
    a, b = m.run(feeds)[3], m.run(feeds)[3]
    assert a is not b


def test_gradients_and_transforms_through_the_cached_plan(tmp_path):
    m = _graph(tmp_path)
    x = torch.randn(3, 2, 3, dtype=torch.float32)
    k = torch.tensor([3, 6])
    m.run({"x": x, "k": k})  # fills the cache
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.run({"x": xr, "k": k})[0].sum(), xr)
    torch.testing.assert_close(g, torch.full_like(x, 2.0))
    j = torch.func.jacrev(lambda v: m.run({"x": v, "k": k})[0])(x)
    assert j.shape == (3, 6, 3, 2, 3)
    torch.testing.assert_close(j.reshape(18, 18), 2 * torch.eye(18))
    vb = torch.func.vmap(lambda v: m.run({"x": v, "k": k}, outputs=["y4"])[0])(torch.randn(5, 3, 2, 3))
    torch.testing.assert_close(vb, torch.tensor([[3.0, 2.0, 3.0]] * 5))


def test_corpus_like_export_matches_plain(tmp_path):
    """A TorchScript export with its shape subgraphs (Shape/Gather/Unsqueeze/Concat/Reshape): the cached
    plan gives the plain graph's values at several batch sizes, and skips the shape nodes."""
    import torch.nn as nn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):  # (B, T, 8) -> heads
            b, t, c = x.shape
            y = self.lin(x).reshape(b, t, 2, c // 2).transpose(1, 2)
            a = torch.softmax(y @ y.transpose(-1, -2), -1) @ y
            return a.transpose(1, 2).reshape(b, t, c)

    p = tmp_path / "att.onnx"
    torch.onnx.export(M().eval(), (torch.randn(2, 5, 8),), str(p), input_names=["x"], output_names=["y"],
                      dynamo=False, opset_version=14, do_constant_folding=False,
                      dynamic_axes={"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}})
    m = jacaudit.load(str(p))
    for shape in [(2, 5, 8), (3, 7, 8), (2, 5, 8), (1, 1, 8)]:
        x = torch.randn(shape)
        with torch.no_grad():
            a = m.run({"x": x})[0]
            b = m.plain_graph.run({"x": x})[0]
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    entries = [v for k, v in m.graph._plans.items() if k[0] == "static"]
    assert entries and all(len(dyn) < len(m.graph.nodes) for _, dyn in entries)


def test_inference_mode_runs_are_not_cached(tmp_path):
    """Tensors made under torch.inference_mode cannot enter autograd later: such a first run caches nothing."""
    m = _graph(tmp_path)
    x, k = torch.randn(3, 2, 3), torch.tensor([3, 6])
    with torch.inference_mode():
        m.run({"x": x, "k": k})
    assert not any(key[0] == "static" for key in m.graph._plans)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.run({"x": xr, "k": k})[0].sum(), xr)
    torch.testing.assert_close(g, torch.full_like(x, 2.0))
    assert any(key[0] == "static" for key in m.graph._plans)
