"""Load-time pattern fusion (jacaudit/models/onnx/fuse.py): each pattern fires (metadata count), its forward
matches onnxruntime, its input gradient matches the unfused interpreter and central differences (float64), it
runs under vmap/jacrev/jacfwd, the kink convention holds, and internal tensors stay reachable by name."""
from __future__ import annotations

import io
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from jacaudit.models.onnx.model import OnnxModel

ort = pytest.importorskip("onnxruntime")


def _c(name, v):
    return numpy_helper.from_array(np.asarray(v, dtype=np.float32).reshape(()), name)


def _model(nodes, inits, shape=(2, 3, 8), opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(proto)
    return proto


N = helper.make_node
SQRT2 = math.sqrt(2.0)

PATTERNS = {
    "hardswish_native": ("hardswish", [N("HardSwish", ["x"], ["y"])], []),
    "hardswish_hsig": ("hardswish", [N("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5),
                                     N("Mul", ["x", "h"], ["y"])], []),
    "hardswish_clip_div": ("hardswish", [N("Add", ["x", "three"], ["a"]), N("Clip", ["a", "zero", "six"], ["c"]),
                                         N("Mul", ["x", "c"], ["p"]), N("Div", ["p", "six"], ["y"])],
                           [_c("three", 3), _c("zero", 0), _c("six", 6)]),
    "hardswish_clip_mul": ("hardswish", [N("Add", ["three", "x"], ["a"]), N("Clip", ["a", "zero", "six"], ["c"]),
                                         N("Mul", ["c", "sixth"], ["q"]), N("Mul", ["x", "q"], ["y"])],
                           [_c("three", 3), _c("zero", 0), _c("six", 6), _c("sixth", 1 / 6)]),
    "hardsigmoid": ("hardsigmoid", [N("HardSigmoid", ["x"], ["y"], alpha=0.25, beta=0.5)], []),
    "silu": ("silu", [N("Sigmoid", ["x"], ["s"]), N("Mul", ["s", "x"], ["y"])], []),
    "mish": ("mish", [N("Softplus", ["x"], ["sp"]), N("Tanh", ["sp"], ["t"]), N("Mul", ["x", "t"], ["y"])], []),
    "gelu_erf_div": ("gelu", [N("Div", ["x", "sq2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["a"]),
                              N("Mul", ["x", "a"], ["p"]), N("Mul", ["p", "half"], ["y"])],
                     [_c("sq2", SQRT2), _c("one", 1), _c("half", 0.5)]),
    "gelu_erf_mul": ("gelu", [N("Mul", ["x", "isq2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["one", "e"], ["a"]),
                              N("Mul", ["half", "x"], ["p"]), N("Mul", ["p", "a"], ["y"])],
                     [_c("isq2", 1 / SQRT2), _c("one", 1), _c("half", 0.5)]),
    "gelu_tanh": ("gelu", [N("Pow", ["x", "three"], ["c3"]), N("Mul", ["k", "c3"], ["kc"]),
                           N("Add", ["x", "kc"], ["i"]), N("Mul", ["i", "s2pi"], ["si"]), N("Tanh", ["si"], ["t"]),
                           N("Add", ["t", "one"], ["a"]), N("Mul", ["x", "half"], ["p"]), N("Mul", ["p", "a"], ["y"])],
                  [_c("three", 3), _c("k", 0.044715), _c("s2pi", math.sqrt(2 / math.pi)), _c("one", 1),
                   _c("half", 0.5)]),
    "layernorm": ("layernorm", [N("ReduceMean", ["x"], ["mu"], axes=[-1]), N("Sub", ["x", "mu"], ["d"]),
                                N("Pow", ["d", "two"], ["d2"]), N("ReduceMean", ["d2"], ["v"], axes=[-1]),
                                N("Add", ["v", "eps"], ["ve"]), N("Sqrt", ["ve"], ["s"]), N("Div", ["d", "s"], ["n"]),
                                N("Mul", ["n", "gamma"], ["nw"]), N("Add", ["nw", "beta"], ["y"])],
                  [_c("two", 2), _c("eps", 1e-5),
                   numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "gamma"),
                   numpy_helper.from_array(np.linspace(-0.2, 0.3, 8).astype(np.float32), "beta")]),
}
# an internal tensor of each pattern (for outputs=/wrt=); None where the pattern is one node
INTERNAL = {"hardswish_hsig": "h", "hardswish_clip_div": "c", "hardswish_clip_mul": "q", "silu": "s", "mish": "t",
            "gelu_erf_div": "e", "gelu_erf_mul": "a", "gelu_tanh": "t", "layernorm": "n"}


def _x(seed=0, shape=(2, 3, 8), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _ort(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_fuses_and_keeps_values_and_gradients(name):
    kind, nodes, inits = PATTERNS[name]
    proto = _model(nodes, inits)
    m = OnnxModel(proto)
    plain = OnnxModel(proto, optimize=False)
    assert m.metadata["optimizations"].get(f"fuse_{kind}") == 1, m.metadata["optimizations"]
    assert len(m.graph.nodes) == 1
    x = _x()
    f = lambda t: m.run({"x": t})[0]  # noqa: E731
    torch.testing.assert_close(f(x), _ort(proto, x), rtol=1e-5, atol=1e-5)
    # gradient (float32) against the unfused interpreter
    w = _x(1)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((f(xg) * w).sum(), xg)
    xp = x.clone().requires_grad_(True)
    (gp,) = torch.autograd.grad((plain.run({"x": xp})[0] * w).sum(), xp)
    torch.testing.assert_close(g, gp, rtol=1e-5, atol=1e-5)
    # float64: central differences of the fused model
    m64 = OnnxModel(proto, dtype=torch.float64)
    assert m64.metadata["optimizations"].get(f"fuse_{kind}") == 1
    f64 = lambda t: m64.run({"x": t})[0]  # noqa: E731
    x64, w64, v64 = x.double(), w.double(), _x(2).double()
    x64g = x64.clone().requires_grad_(True)
    (g64,) = torch.autograd.grad((f64(x64g) * w64).sum(), x64g)
    h = 1e-6
    fd = ((f64(x64 + h * v64) - f64(x64 - h * v64)) * w64).sum() / (2 * h)
    torch.testing.assert_close((g64 * v64).sum(), fd, rtol=1e-6, atol=1e-6)
    # torch.func: vmap / jacrev / jacfwd agree with the unfused graph (to the float32 rounding of the pattern's
    # constants: the fused op uses the exact ones)
    fp64 = lambda t: OnnxModel(proto, dtype=torch.float64, optimize=False).run({"x": t})[0]  # noqa: E731
    xs = x64[:1]
    Jr = torch.func.jacrev(f64)(xs)
    Jf = torch.func.jacfwd(f64)(xs)
    Jp = torch.func.jacrev(fp64)(xs)
    torch.testing.assert_close(Jr, Jp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(Jf, Jp, rtol=1e-6, atol=1e-6)
    vg = torch.func.vmap(torch.func.grad(lambda t: (f64(t[None]) * w64[:1]).sum()))(x64)
    torch.testing.assert_close(vg, torch.func.vmap(torch.func.grad(lambda t: (fp64(t[None]) * w64[:1]).sum()))(x64),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(INTERNAL))
def test_internal_tensor_of_a_fused_pattern_is_reachable(name):
    kind, nodes, inits = PATTERNS[name]
    proto = _model(nodes, inits)
    m = OnnxModel(proto)
    plain = OnnxModel(proto, optimize=False)
    x = _x()
    t = INTERNAL[name]
    y, inner = m.run({"x": x}, outputs=["y", t])
    yp, innerp = plain.run({"x": x}, outputs=["y", t])
    torch.testing.assert_close(inner, innerp)
    torch.testing.assert_close(y, yp)
    # wrt= an internal tensor: override it and differentiate through the rest (plain graph)
    v = innerp.clone().requires_grad_(True)
    (out,) = m.run({"x": x}, overrides={t: v})
    (gv,) = torch.autograd.grad(out.sum(), v)
    (outp,) = plain.run({"x": x}, overrides={t: v})
    (gvp,) = torch.autograd.grad(outp.sum(), v)
    torch.testing.assert_close(gv, gvp)
    # the default graph is still fused
    assert len(m.graph.nodes) == 1


def test_intermediate_read_elsewhere_is_not_fused():
    nodes = [N("Sigmoid", ["x"], ["s"]), N("Mul", ["x", "s"], ["p"]), N("Add", ["p", "s"], ["y"])]
    m = OnnxModel(_model(nodes, []))
    assert "fuse_silu" not in m.metadata["optimizations"]
    # constants that are not the pattern's: HardSigmoid alpha 0.2 times x is not HardSwish
    nodes = [N("HardSigmoid", ["x"], ["h"], alpha=0.2, beta=0.5), N("Mul", ["x", "h"], ["y"])]
    m = OnnxModel(_model(nodes, []))
    assert "fuse_hardswish" not in m.metadata["optimizations"]
    nodes = [N("Div", ["x", "c"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["a"]),
             N("Mul", ["x", "a"], ["p"]), N("Mul", ["p", "half"], ["y"])]
    m = OnnxModel(_model(nodes, [_c("c", 1.5), _c("one", 1), _c("half", 0.5)]))
    assert "fuse_gelu" not in m.metadata["optimizations"]
    # LayerNorm over a non-trailing axis stays as written
    kind, nodes, inits = PATTERNS["layernorm"]
    nodes = [N("ReduceMean", ["x"], ["mu"], axes=[1])] + nodes[1:3] + [N("ReduceMean", ["d2"], ["v"], axes=[1])] \
        + nodes[4:7] + [N("Identity", ["n"], ["y"])]
    proto = _model(nodes, inits[:2])
    m = OnnxModel(proto)
    x = _x()
    torch.testing.assert_close(m.run({"x": x})[0], _ort(proto, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["hardswish_native", "hardswish_hsig", "hardswish_clip_div", "hardswish_clip_mul"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hardswish_kinks_keep_the_convention(name, dtype):
    """-0.5 at -3 and 1.5 at 3 (the derivative from inside the interval), 0 below, 1 above; torch's own
    hardswish backward gives 0 and 1 at the kinks, so the fused op must not use it."""
    kind, nodes, inits = PATTERNS[name]
    proto = _model(nodes, inits, shape=(7,))
    m = OnnxModel(proto, dtype=dtype)
    assert m.metadata["optimizations"].get("fuse_hardswish") == 1
    pts = torch.tensor([-3.0, 3.0, -3.5, 3.5, 1.0, -1.0, 0.0], dtype=dtype)
    want = torch.where(pts < -3, 0.0, torch.where(pts <= 3, pts / 3 + 0.5, 1.0)).to(dtype)
    f = lambda t: m.run({"x": t})[0]  # noqa: E731
    xg = pts.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xg).sum(), xg)
    tol = 1e-6 if dtype == torch.float32 else 1e-15
    torch.testing.assert_close(g, want, rtol=tol, atol=tol)
    _, t = torch.func.jvp(f, (pts,), (torch.ones_like(pts),))
    torch.testing.assert_close(t, want, rtol=tol, atol=tol)
    torch.testing.assert_close(torch.func.jacrev(f)(pts), torch.diag(want), rtol=tol, atol=tol)
    torch.testing.assert_close(torch.func.jacfwd(f)(pts), torch.diag(want), rtol=tol, atol=tol)


def test_hardsigmoid_kinks_pass_the_gradient_on_the_closed_interval():
    proto = _model([N("HardSigmoid", ["x"], ["y"], alpha=0.25, beta=0.5)], [], shape=(5,))
    m = OnnxModel(proto, dtype=torch.float64)
    pts = torch.tensor([-2.0, 2.0, -2.5, 2.5, 0.3], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m.run({"x": pts})[0].sum(), pts)
    assert g.tolist() == [0.25, 0.25, 0.0, 0.0, 0.25]


def _export(module, shape, dynamo: bool, opset: int):
    buf = io.BytesIO()
    kw = {"dynamo": dynamo}
    torch.onnx.export(module.eval(), (torch.randn(*shape),), buf, input_names=["x"], output_names=["y"],
                      opset_version=opset, **kw)
    return onnx.load_from_string(buf.getvalue())


class _GeluTanh(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.gelu(x, approximate="tanh")


class _ManualGelu(torch.nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


class _ManualLN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.b = torch.nn.Parameter(torch.linspace(-0.2, 0.3, 8))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        d = x - mu
        v = d.pow(2).mean(-1, keepdim=True)
        return d / torch.sqrt(v + 1e-5) * self.w + self.b


TORCH_MODULES = {
    "hardswish": (torch.nn.Hardswish, 13, "hardswish"),
    "hardswish14": (torch.nn.Hardswish, 14, "hardswish"),
    "hardsigmoid": (torch.nn.Hardsigmoid, 17, "hardsigmoid"),
    "silu": (torch.nn.SiLU, 17, "silu"),
    "mish": (torch.nn.Mish, 17, "mish"),
    "gelu": (torch.nn.GELU, 17, "gelu"),
    "gelu_tanh": (_GeluTanh, 17, "gelu"),
    "manual_gelu": (_ManualGelu, 17, "gelu"),
    "manual_layernorm": (_ManualLN, 17, "layernorm"),
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", sorted(TORCH_MODULES))
def test_torch_exports(name, dynamo):
    cls, opset, kind = TORCH_MODULES[name]
    shape = (2, 3, 8)
    try:
        proto = _export(cls(), shape, dynamo, opset if not dynamo else max(opset, 18))
    except Exception as e:  # an exporter that cannot write this module here
        pytest.skip(f"export failed: {type(e).__name__}")
    m = OnnxModel(proto)
    plain = OnnxModel(proto, optimize=False)
    ops = m.metadata["op_histogram"]
    fused = m.metadata["optimizations"].get(f"fuse_{kind}", 0)
    native = {"gelu": "Gelu", "layernorm": "LayerNormalization", "mish": "Mish"}.get(kind)
    if native and native in ops:
        pytest.skip(f"exported as the native {native} op")
    assert fused >= 1, (ops, m.metadata["optimizations"])
    x = _x()
    torch.testing.assert_close(m.run({"x": x})[0], _ort(proto, x), rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.run({"x": xg})[0].sum(), xg)
    xp = x.clone().requires_grad_(True)
    (gp,) = torch.autograd.grad(plain.run({"x": xp})[0].sum(), xp)
    torch.testing.assert_close(g, gp, rtol=1e-5, atol=1e-5)
