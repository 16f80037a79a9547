"""Fusion of relu6(x + 3) / 6 (Clip(x + 3, 0, 6) / 6 or * (1/6)) into one HardSigmoid (fuse.py): values
against onnxruntime, gradients against the unfused interpreter and central differences, the Clip kink
convention at -3 and 3, torch.func transforms, and HardSwish (x times the same) still fused as HardSwish."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from jacaudit.models.onnx.model import OnnxModel

ort = pytest.importorskip("onnxruntime")
N = helper.make_node


def _c(name, v):
    return numpy_helper.from_array(np.asarray(v, dtype=np.float32).reshape(()), name)


def _model(nodes, inits, shape=(2, 3, 8), inputs=("x",)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, list(shape))
                                       for i in inputs],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(proto)
    return proto


INITS = [_c("three", 3), _c("zero", 0), _c("six", 6), _c("sixth", 1 / 6)]
FORMS = {
    "div": [N("Add", ["x", "three"], ["a"]), N("Clip", ["a", "zero", "six"], ["c"]), N("Div", ["c", "six"], ["y"])],
    "mul": [N("Add", ["three", "x"], ["a"]), N("Clip", ["a", "zero", "six"], ["c"]), N("Mul", ["sixth", "c"], ["y"])],
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_relu6_hardsigmoid_fuses_with_the_same_values_and_derivatives(form):
    proto = _model(FORMS[form], INITS)
    m, plain = OnnxModel(proto), OnnxModel(proto, optimize=False)
    assert m.metadata["optimizations"].get("fuse_hardsigmoid") == 1
    assert [n.ctx.op_type for n in m.graph.nodes] == ["FusedHardSigmoid"]
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0)) * 4
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    torch.testing.assert_close(m.run({"x": x})[0], torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]),
                               rtol=1e-6, atol=1e-7)
    w = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    grads = []
    for mod in (m, plain):
        xg = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad((mod.run({"x": xg})[0] * w).sum(), xg)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    m64 = OnnxModel(proto, dtype=torch.float64)
    f64 = lambda t: m64.run({"x": t})[0]  # noqa: E731
    x64, w64 = x.double(), w.double()
    v = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    xg = x64.clone().requires_grad_(True)
    (g64,) = torch.autograd.grad((f64(xg) * w64).sum(), xg)
    h = 1e-6
    fd = ((f64(x64 + h * v) - f64(x64 - h * v)) * w64).sum() / (2 * h)
    torch.testing.assert_close((g64 * v).sum(), fd, rtol=1e-6, atol=1e-8)
    fp64 = lambda t: OnnxModel(proto, dtype=torch.float64, optimize=False).run({"x": t})[0]  # noqa: E731
    xs = x64[:1]
    jp = torch.func.jacrev(fp64)(xs)
    # (to the float32 rounding of the constant 1/6 in the "mul" form: the fused op uses the exact one)
    torch.testing.assert_close(torch.func.jacrev(f64)(xs), jp, rtol=1e-7, atol=1e-14)
    torch.testing.assert_close(torch.func.jacfwd(f64)(xs), jp, rtol=1e-7, atol=1e-14)
    vb = torch.func.vmap(f64)(x64)
    torch.testing.assert_close(vb, torch.stack([f64(t) for t in x64]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kinks_follow_the_clip_convention(dtype):
    proto = _model(FORMS["div"], INITS, shape=(6,))
    m = OnnxModel(proto, dtype=dtype)
    plain = OnnxModel(proto, dtype=dtype, optimize=False)
    pts = torch.tensor([-3.0, 3.0, -3.5, 3.5, 0.25, -1.0], dtype=dtype)
    want = torch.tensor([1 / 6, 1 / 6, 0.0, 0.0, 1 / 6, 1 / 6], dtype=dtype)
    for mod in (m, plain):
        xg = pts.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(mod.run({"x": xg})[0].sum(), xg)
        torch.testing.assert_close(g, want, rtol=1e-7, atol=0)
        _, t = torch.func.jvp(lambda a: mod.run({"x": a})[0], (pts,), (torch.ones_like(pts),))
        torch.testing.assert_close(t, want, rtol=1e-7, atol=0)
        torch.testing.assert_close(torch.func.jacrev(lambda a: mod.run({"x": a})[0])(pts), torch.diag(want),
                                   rtol=1e-7, atol=0)


def test_se_gate_and_hardswish():
    """An SE-style gate x * hsig(s) fuses the gate only; x * (Clip(x + 3, 0, 6) / 6) stays one HardSwish."""
    se = _model([N("Add", ["s", "three"], ["a"]), N("Clip", ["a", "zero", "six"], ["c"]),
                 N("Div", ["c", "six"], ["gate"]), N("Mul", ["x", "gate"], ["y"])], INITS, inputs=("x", "s"))
    m = OnnxModel(se)
    assert sorted(n.ctx.op_type for n in m.graph.nodes) == ["FusedHardSigmoid", "Mul"]
    hs = _model([N("Add", ["x", "three"], ["a"]), N("Clip", ["a", "zero", "six"], ["c"]),
                 N("Div", ["c", "six"], ["q"]), N("Mul", ["x", "q"], ["y"])], INITS)
    m = OnnxModel(hs)
    assert [n.ctx.op_type for n in m.graph.nodes] == ["FusedHardSwish"]
    # an internal tensor of the pattern asked for: the graph keeps it
    x = torch.randn(2, 3, 8)
    c = OnnxModel(_model(FORMS["div"], INITS)).run({"x": x}, outputs=["c"])[0]
    torch.testing.assert_close(c, torch.clamp(x + 3, 0, 6))
