"""The oneDNN products of the interpreter (issue 10; ``jacaudit/models/onnx/onednn.py``), checked against
truths that share no code with them: onnxruntime for values, the graph as written (``optimize=False``: torch's
matmul/conv2d differentiated by torch) for gradients, and central finite differences.

* ``fuse_linear``: MatMul(x, W) [+ b] and Gemm(x, B[, C]) with constant weights -> oneDNN linear, forward and
  input gradient; the plain ops under torch.func transforms, forward-mode AD and create_graph;
* the Conv route "onednn_small": the groups-1 convolutions torch would run in its native kernel, and the
  input gradient of strided 1x1 and patch (kernel == stride) convolutions.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from jacaudit.models.onnx import onednn
from jacaudit.models.onnx.model import OnnxModel

pytestmark = pytest.mark.skipif(not onednn.ENABLED, reason="no oneDNN kernels in this torch build")


def _proto(nodes, inits, x_shape, y_shape, opset=17, extra_inputs=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
                          + list(extra_inputs),
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    p = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(p)
    return p


def _ort(proto, x):
    import onnxruntime as ort
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x.numpy()})[0]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _grad(model, x, cot):
    xr = x.clone().requires_grad_(True)
    y = model.run({"x": xr})[0]
    (g,) = torch.autograd.grad(y, xr, cot)
    return y.detach(), g


def _fd(model, x, v, eps=1e-2):
    """Central finite difference of <cot, f(x)> along v (float64 accumulation of float32 outputs)."""
    with torch.no_grad():
        yp = model.run({"x": x + eps * v})[0].double()
        ym = model.run({"x": x - eps * v})[0].double()
    return (yp - ym) / (2 * eps)


@pytest.fixture
def one_thread():
    """torch's backend selection depends on the thread count (1x1 convolutions go native on one thread only)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spy(monkeypatch):
    """Counts the oneDNN kernels called (so a test knows the fast path ran)."""
    calls = {"lp": 0, "conv": 0}
    lp, mk = onednn._lp, onednn._mk

    def lp_spy(*a):
        calls["lp"] += 1
        return lp(*a)

    def mk_spy(*a):
        calls["conv"] += 1
        return mk(*a)

    monkeypatch.setattr(onednn, "_lp", lp_spy)
    monkeypatch.setattr(onednn, "_mk", mk_spy)
    return calls


# ------------------------------------------------------------------------------------------------------------
# linear
# ------------------------------------------------------------------------------------------------------------
K, N = 64, 160


def _linear_models():
    r = _rng()
    W, b, B = r.standard_normal((K, N)) / 5, r.standard_normal(N), r.standard_normal((N, K)) / 5
    W2 = r.standard_normal((N, 7)) / 5
    out = {}
    # MatMul + Add(bias), 3-D input (transformers), then Tanh and a second MatMul without bias
    out["matmul_add"] = _proto(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
         helper.make_node("Tanh", ["a"], ["t"]), helper.make_node("MatMul", ["t", "W2"], ["y"])],
        {"W": W, "b": b, "W2": W2}, [None, 20, K], [None, 20, 7])
    # bias first: Add(b, MatMul)
    out["add_bias_first"] = _proto(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["b", "m"], ["y"])],
        {"W": W, "b": b}, [None, 20, K], [None, 20, N])
    # Gemm transB with C (classifier heads, ts exports of Linear on 2-D input)
    out["gemm_transB"] = _proto(
        [helper.make_node("Gemm", ["x", "B", "c"], ["g"], transB=1), helper.make_node("Relu", ["g"], ["y"])],
        {"B": B, "c": b}, [None, K], [None, N])
    out["gemm_noC"] = _proto([helper.make_node("Gemm", ["x", "W"], ["y"])], {"W": W}, [None, K], [None, N])
    return out


def _x_for(name, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, K) if name.startswith("gemm") else (batch, 20, K)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("name", sorted(_linear_models()))
def test_linear_fuses_and_matches_ort_plain_graph_and_fd(name, spy):
    proto = _linear_models()[name]
    fused, plain = OnnxModel(proto), OnnxModel(proto, optimize=False)
    assert fused.metadata["optimizations"].get("fuse_linear", 0) >= 1
    x = _x_for(name, 32)
    cot = torch.randn(plain.run({"x": x})[0].shape, generator=torch.Generator().manual_seed(3))
    y, g = _grad(fused, x, cot)
    assert spy["lp"] >= 2  # forward and input gradient through oneDNN
    np.testing.assert_allclose(y.numpy(), _ort(proto, x), rtol=1e-4, atol=1e-5)
    y0, g0 = _grad(plain, x, cot)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-5)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    fd = float((_fd(fused, x, v, eps=1e-3) * cot.double()).sum())
    scale = float((g.double() * v.double()).abs().sum())  # the sum's terms: its rounding scale
    assert abs(float((g.double() * v.double()).sum()) - fd) <= 1e-3 * scale


def test_linear_small_products_stay_plain(spy):
    proto = _linear_models()["gemm_transB"]
    fused = OnnxModel(proto)
    x = _x_for("gemm_transB", 2)  # 2 rows: below LINEAR_MIN_ROWS
    y, g = _grad(fused, x, torch.ones(2, N))
    assert spy["lp"] == 0
    y0, g0 = _grad(OnnxModel(proto, optimize=False), x, torch.ones(2, N))
    torch.testing.assert_close(g, g0)


@pytest.mark.parametrize("name", ["matmul_add", "gemm_transB"])
def test_linear_under_torch_func_and_forward_ad(name, spy):
    proto = _linear_models()[name]
    fused, plain = OnnxModel(proto), OnnxModel(proto, optimize=False)
    x = _x_for(name, 16)
    f = lambda m: (lambda t: m.run({"x": t})[0])  # noqa: E731
    j = torch.func.jacrev(f(fused))(x[:1])
    torch.testing.assert_close(j, torch.func.jacrev(f(plain))(x[:1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.func.jacfwd(f(fused))(x[:1]), j, rtol=1e-5, atol=1e-6)
    vm = torch.func.vmap(f(fused))(x.unsqueeze(1))
    torch.testing.assert_close(vm, torch.func.vmap(f(plain))(x.unsqueeze(1)), rtol=1e-5, atol=1e-6)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    _, jv = torch.func.jvp(f(fused), (x,), (v,))
    _, jv0 = torch.func.jvp(f(plain), (x,), (v,))
    torch.testing.assert_close(jv, jv0, rtol=1e-5, atol=1e-5)
    with torch.autograd.forward_ad.dual_level():
        d = torch.autograd.forward_ad.make_dual(x, v)
        t = torch.autograd.forward_ad.unpack_dual(fused.run({"x": d})[0]).tangent
    torch.testing.assert_close(t, jv0, rtol=1e-5, atol=1e-5)


def test_linear_second_order_uses_differentiable_backward():
    proto = _linear_models()["matmul_add"]
    fused, plain = OnnxModel(proto), OnnxModel(proto, optimize=False)
    x = _x_for("matmul_add", 16)

    def hvp(m):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((m.run({"x": xr})[0] ** 2).sum(), xr, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), xr)
        return h

    torch.testing.assert_close(hvp(fused), hvp(plain), rtol=1e-4, atol=1e-4)


def test_linear_fed_weight_is_not_the_constant():
    """An initializer listed as a graph input may be fed: the fused node then runs the plain ops with it."""
    r = _rng(2)
    W, b = r.standard_normal((K, N)), r.standard_normal(N)
    proto = _proto([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                   {"W": W, "b": b}, [None, 20, K], [None, 20, N],
                   extra_inputs=[helper.make_tensor_value_info("W", TensorProto.FLOAT, [K, N])])
    m = OnnxModel(proto)
    x = _x_for("matmul_add", 32)
    W2 = torch.randn(K, N)
    with torch.no_grad():
        y = m.run({"x": x, "W": W2})[0]
    torch.testing.assert_close(y, x @ W2 + torch.from_numpy(b.astype(np.float32)), rtol=1e-5, atol=1e-5)


def test_linear_float64_model_stays_plain(spy):
    proto = _linear_models()["matmul_add"]
    m = OnnxModel(proto, dtype=torch.float64)
    x = _x_for("matmul_add", 32).double()
    y, g = _grad(m, x, torch.ones(32, 20, 7, dtype=torch.float64))
    assert spy["lp"] == 0 and y.dtype == torch.float64


# ------------------------------------------------------------------------------------------------------------
# convolutions
# ------------------------------------------------------------------------------------------------------------
CONVS = {
    # name: (x shape, w shape, attrs): each is a case where torch would run its native kernel, or a grad mode
    "1x1": ((1, 64, 32, 32), (128, 64, 1, 1), {}),
    "3x3_small": ((1, 48, 16, 16), (48, 48, 3, 3), {"pads": [1, 1, 1, 1]}),
    "3x3_asym_pads": ((1, 32, 20, 20), (32, 32, 3, 3), {"pads": [0, 1, 1, 2]}),
    "1x1_stride2": ((1, 64, 24, 24), (128, 64, 1, 1), {"strides": [2, 2]}),
    "patch": ((1, 3, 32, 32), (48, 3, 8, 8), {"strides": [8, 8]}),
    "dilated": ((1, 32, 24, 24), (32, 32, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "conv1d": ((1, 64, 200), (96, 64, 3), {"pads": [1, 1]}),
}


def _conv_proto(name):
    xs, ws, attrs = CONVS[name]
    r = _rng(7)
    w, b = r.standard_normal(ws) / np.sqrt(np.prod(ws[1:])), r.standard_normal(ws[0])
    nd = len(ws) - 2
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=list(ws[2:]), **attrs),
             helper.make_node("Tanh", ["c"], ["y"])]
    return _proto(nodes, {"w": w, "b": b}, [None, *xs[1:]], [None, ws[0]] + [None] * nd)


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_route_matches_ort_plain_graph_and_fd(name, spy, one_thread):
    proto = _conv_proto(name)
    fused, plain = OnnxModel(proto), OnnxModel(proto, optimize=False)
    x = torch.randn(CONVS[name][0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = plain.run({"x": x})[0]
    cot = torch.randn(y0.shape, generator=torch.Generator().manual_seed(2))
    y, g = _grad(fused, x, cot)
    assert spy["conv"] >= 1  # the routed path ran
    np.testing.assert_allclose(y.numpy(), _ort(proto, x), rtol=1e-4, atol=1e-5)
    _, g0 = _grad(plain, x, cot)
    torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-5)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    fd = float((_fd(fused, x, v, eps=1e-3) * cot.double()).sum())
    scale = float((g.double() * v.double()).abs().sum())  # the sum's terms: its rounding scale
    assert abs(float((g.double() * v.double()).sum()) - fd) <= 1e-3 * scale


@pytest.mark.parametrize("name", ["1x1", "1x1_stride2", "patch", "conv1d"])
def test_conv_route_under_torch_func_and_second_order(name, one_thread):
    proto = _conv_proto(name)
    fused, plain = OnnxModel(proto), OnnxModel(proto, optimize=False)
    x = torch.randn(CONVS[name][0], generator=torch.Generator().manual_seed(1))
    f = lambda m: (lambda t: m.run({"x": t})[0].sum(dim=1))  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(f(fused))(x.unsqueeze(1)), torch.func.vmap(f(plain))(x.unsqueeze(1)),
                               rtol=1e-4, atol=1e-5)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    _, jv = torch.func.jvp(f(fused), (x,), (v,))
    _, jv0 = torch.func.jvp(f(plain), (x,), (v,))
    torch.testing.assert_close(jv, jv0, rtol=1e-4, atol=1e-5)
    g = lambda m: (lambda t: m.run({"x": t})[0].sum())  # noqa: E731
    torch.testing.assert_close(torch.func.grad(g(fused))(x), torch.func.grad(g(plain))(x), rtol=1e-4, atol=1e-5)

    def hvp(m):
        xr = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad((m.run({"x": xr})[0] ** 2).sum(), xr, create_graph=True)
        (h,) = torch.autograd.grad((gx * v).sum(), xr)
        return h

    torch.testing.assert_close(hvp(fused), hvp(plain), rtol=1e-3, atol=1e-4)


def test_conv_grad_modes():
    assert onednn.grad_mode((1, 8, 9, 9), (4, 8, 3, 3), [1, 1], [1, 1], [1, 1]) == "flip"
    assert onednn.grad_mode((1, 8, 9, 9), (4, 8, 1, 1), [0, 0], [2, 2], [1, 1]) == "s1x1"
    assert onednn.grad_mode((1, 8, 16, 16), (4, 8, 4, 4), [0, 0], [4, 4], [1, 1]) == "patch"
    assert onednn.grad_mode((1, 8, 17, 16), (4, 8, 4, 4), [0, 0], [4, 4], [1, 1]) == "torch"  # a remainder
    assert onednn.grad_mode((1, 8, 9, 9), (4, 8, 3, 3), [1, 1], [2, 2], [1, 1]) == "torch"
    # stride 1 with more padding than the kernel covers: not the flipped form
    assert onednn.grad_mode((1, 8, 9, 9), (4, 8, 1, 1), [1, 1], [1, 1], [1, 1]) == "torch"


@pytest.mark.parametrize("xs,ws,stride,pad", [((1, 8, 9, 9), (4, 8, 1, 1), 1, 1), ((2, 5, 11, 11), (6, 5, 3, 3), 2, 1),
                                              ((1, 6, 13, 13), (4, 6, 1, 1), 3, 0)])
def test_conv2d_function_every_mode_against_torch(xs, ws, stride, pad):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(xs, generator=g), torch.randn(ws, generator=g), torch.randn(ws[0], generator=g)
    xr = x.clone().requires_grad_(True)
    y = onednn.conv2d({}, xr, w, b, pad, [stride, stride], [1, 1])
    cot = torch.randn(y.shape, generator=g)
    (gx,) = torch.autograd.grad(y, xr, cot)
    x0 = x.clone().requires_grad_(True)
    y0 = F.conv2d(x0, w, b, stride, pad)
    (g0,) = torch.autograd.grad(y0, x0, cot)
    torch.testing.assert_close(y, y0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, g0, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Conv -> activation (values only: one oneDNN kernel with a post-op)
# ------------------------------------------------------------------------------------------------------------
def _conv_act_proto(act: str, group: int = 1, bn: bool = False):
    r = _rng(11)
    cin = cout = 16
    w = r.standard_normal((cout, cin // group, 3, 3)) / 4
    inits = {"w": w, "b": r.standard_normal(cout) / 4}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=group)]
    src = "c"
    if bn:
        inits.update({"s": r.uniform(0.5, 1.5, cout), "bb": r.standard_normal(cout), "mu": r.standard_normal(cout),
                      "var": r.uniform(0.5, 1.5, cout)})
        nodes.append(helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["n"]))
        src = "n"
    if act == "relu":
        nodes.append(helper.make_node("Relu", [src], ["y"]))
    elif act == "silu":
        nodes += [helper.make_node("Sigmoid", [src], ["sg"]), helper.make_node("Mul", [src, "sg"], ["y"])]
    elif act == "hardswish":
        nodes.append(helper.make_node("HardSwish", [src], ["y"]))
    return _proto(nodes, inits, [None, cin, 24, 24], [None, cout, 24, 24])


@pytest.mark.parametrize("act,group,bn", [("relu", 1, False), ("relu", 1, True), ("silu", 1, True),
                                          ("hardswish", 1, False), ("relu", 16, True), ("hardswish", 16, True)])
def test_conv_activation_fuses_values_match_ort_gradients_plain(act, group, bn, monkeypatch):
    proto = _conv_act_proto(act, group, bn)
    fused, plain = OnnxModel(proto), OnnxModel(proto, optimize=False)
    assert fused.metadata["optimizations"]["fuse_conv_act"] == 1
    assert any(n.ctx.op_type == "FusedConvAct" for n in fused.graph.nodes) and fused.has_convolutions()
    calls = []
    pw = torch.ops.mkldnn._convolution_pointwise

    class Spy:  # counts the post-op kernel
        def __getattr__(self, k):
            if k == "_convolution_pointwise":
                return lambda *a: (calls.append(a[7]), pw(*a))[1]
            return getattr(torch.ops.mkldnn, k)

    import jacaudit.models.onnx.ops.nn as nn_ops
    monkeypatch.setattr(nn_ops.torch.ops, "mkldnn", Spy(), raising=False)
    x = torch.randn(32, 16, 24, 24, generator=torch.Generator().manual_seed(1))  # batch 32: torch runs oneDNN
    with torch.no_grad():
        y = fused.run({"x": x})[0]
    monkeypatch.undo()
    assert calls == [{"silu": "swish"}.get(act, act)]
    np.testing.assert_allclose(y.numpy(), _ort(proto, x), rtol=1e-4, atol=1e-5)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y1, g = _grad(fused, x, cot)  # under grad: the two plain nodes
    _, g0 = _grad(plain, x, cot)
    torch.testing.assert_close(y1, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-5)
    f = lambda m: (lambda t: m.run({"x": t})[0].sum(dim=(1, 2, 3)))  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(f(fused))(x[:4].unsqueeze(1)),
                               torch.func.vmap(f(plain))(x[:4].unsqueeze(1)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.func.jacrev(f(fused))(x[:1]), torch.func.jacrev(f(plain))(x[:1]),
                               rtol=1e-4, atol=1e-5)


def test_conv_activation_keeps_a_requested_conv_output():
    proto = _conv_act_proto("relu")
    m = OnnxModel(proto)
    x = torch.randn(32, 16, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        c, y = m.run({"x": x}, outputs=["c", "y"])
    torch.testing.assert_close(y, torch.relu(c))
    np.testing.assert_allclose(y.numpy(), _ort(proto, x), rtol=1e-4, atol=1e-5)


# ---- MaxPool through channels_last (ops/nn.py _pool_channels_last, _MaxPoolCL) -----------------------------
POOLS = [dict(kernel_shape=[2, 2], strides=[2, 2]), dict(kernel_shape=[2, 1], strides=[2, 1]),
         dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
         dict(kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2]),
         dict(kernel_shape=[3, 2], strides=[1, 2], dilations=[2, 1], pads=[0, 1, 2, 0]),
         dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)]


def _pool_model(attrs, shape):
    return OnnxModel(_proto([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MaxPool", ["r"], ["y"], **attrs)],
                            {}, list(shape), [None] * 4))


@pytest.mark.parametrize("attrs", POOLS)
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_channels_last_values_match_ort_gradients_plain(attrs, ties, monkeypatch):
    """Values against onnxruntime; the input gradient (through a ReLU before, whose zeros are ties too)
    bit-equal to torch's NCHW kernel's (both take the first maximum of a window), and in NCHW layout."""
    from jacaudit.models.onnx.ops import nn as _nn
    calls = []
    real = _nn._MaxPoolCL.apply
    monkeypatch.setattr(_nn._MaxPoolCL, "apply", lambda *a: calls.append(1) or real(*a))
    shape = (2, 5, 11, 13)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    if ties:
        x = torch.round(x * 2)  # many equal values in a window
    m = _pool_model(attrs, shape)
    with torch.no_grad():
        y = m.run({"x": x})[0]
    np.testing.assert_array_equal(y.numpy(), _ort(m_proto := _proto(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MaxPool", ["r"], ["y"], **attrs)],
        {}, list(shape), [None] * 4), x))
    assert y.is_contiguous()
    w = torch.randn(y.shape, generator=g)

    def grad():
        xr = x.clone().requires_grad_(True)
        out = m.run({"x": xr})[0]
        (gx,) = torch.autograd.grad((out * w).sum(), xr)
        return out.detach(), gx

    yf, gf = grad()
    assert calls and gf.is_contiguous()
    monkeypatch.setattr(_nn, "_POOL_CL", [False])
    n = len(calls)
    yp, gp = grad()
    assert len(calls) == n
    assert torch.equal(yf, yp) and torch.equal(gf, gp)
    del m_proto


def test_maxpool_channels_last_finite_differences_and_second_order():
    shape = (1, 3, 8, 8)
    m = _pool_model(dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    w = torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad((m.run({"x": xr})[0] * w).sum(), xr, create_graph=True)
    v = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    eps = 1e-3
    with torch.no_grad():
        fd = ((m.run({"x": x + eps * v})[0] * w).sum() - (m.run({"x": x - eps * v})[0] * w).sum()) / (2 * eps)
    assert abs(fd.item() - (gx * v).sum().item()) <= 1e-3 * max(1.0, abs(fd.item()))
    # create_graph: the gradient is differentiable in the incoming gradient (d/dw of <gx, v>)
    wr = w.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad((m.run({"x": xr})[0] * wr).sum(), xr, create_graph=True)
    (gw,) = torch.autograd.grad((gx * v).sum(), wr)
    y = F.max_pool2d(F.relu(x), 3, 2, 1)
    ref = F.max_pool2d(F.relu(x) + 1e-3 * v * (F.relu(x) > 0), 3, 2, 1)  # the pool's linearisation along v
    torch.testing.assert_close(gw, (ref - y) / 1e-3, rtol=1e-2, atol=1e-3)


def test_maxpool_channels_last_steps_aside_under_transforms(monkeypatch):
    from jacaudit.models.onnx.ops import nn as _nn
    calls = []
    real = _nn._MaxPoolCL.apply
    monkeypatch.setattr(_nn._MaxPoolCL, "apply", lambda *a: calls.append(1) or real(*a))
    shape = (1, 2, 6, 6)
    m = _pool_model(dict(kernel_shape=[2, 2], strides=[2, 2]), shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))

    def f(v):
        return m.run({"x": v})[0]

    jr = torch.func.jacrev(f)(x)
    jf = torch.func.jacfwd(f)(x)
    vb = torch.func.vmap(f)(torch.stack([x, -x]))
    assert calls == []
    xr = x.clone().requires_grad_(True)
    y = f(xr)
    rows = [torch.autograd.grad(y.reshape(-1)[k], xr, retain_graph=True)[0] for k in range(y.numel())]
    ja = torch.stack(rows).reshape(y.shape + x.shape)
    assert calls
    torch.testing.assert_close(jr, ja)
    torch.testing.assert_close(jf, ja)
    with torch.no_grad():
        torch.testing.assert_close(vb[1], f(-x))


# ------------------------------------------------------------------------------------------------------------
# A stem convolution feeding a depthwise one: run with its weight channels_last
# ------------------------------------------------------------------------------------------------------------
def _stem_proto(act: str = "hardswish", dw: bool = True, fork: bool = False):
    r = _rng(13)
    inits = {"w": r.standard_normal((16, 3, 3, 3)) / 3, "b": r.standard_normal(16) / 4,
             "wd": r.standard_normal((16, 1 if dw else 16, 3, 3)) / 3}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])]
    src = "c"
    if act == "hardswish":
        nodes.append(helper.make_node("HardSwish", ["c"], ["a"]))
        src = "a"
    nodes.append(helper.make_node("Conv", [src, "wd"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                  group=16 if dw else 1))
    if fork:  # the stem's output read twice
        nodes.append(helper.make_node("Add", ["d", src], ["y"]))
    else:
        nodes.append(helper.make_node("Relu", ["d"], ["y"]))
    return _proto(nodes, inits, [None, 3, None, None], [None, 16, None, None])


@pytest.mark.parametrize("act", ["hardswish", "none"])
@pytest.mark.parametrize("batch", [1, 32])
def test_stem_channels_last_values_gradients(act, batch):
    from jacaudit.models.onnx import fuse
    from jacaudit.models.onnx.fuse import _StemCL
    proto = _stem_proto(act)
    fused, plain = OnnxModel(proto), OnnxModel(proto, optimize=False)
    assert fused.metadata["optimizations"]["stem_channels_last"] == 1
    assert sum(isinstance(n.fn, _StemCL) for n in fused.graph.nodes) == 1
    x = torch.randn(batch, 3, 96, 96, generator=torch.Generator().manual_seed(1))  # torch runs oneDNN
    with torch.no_grad():
        yv = fused.run({"x": x})[0]
    (stem,) = [n.fn for n in fused.graph.nodes if isinstance(n.fn, _StemCL)]
    assert stem.wcl is not None and stem.wcl.is_contiguous(memory_format=torch.channels_last)  # taken
    np.testing.assert_allclose(yv.numpy(), _ort(proto, x), rtol=1e-4, atol=1e-5)
    cot = torch.randn(yv.shape, generator=torch.Generator().manual_seed(2))
    y, g = _grad(fused, x, cot)
    np.testing.assert_allclose(y.numpy(), _ort(proto, x), rtol=1e-4, atol=1e-5)
    assert g.is_contiguous()  # the input gradient NCHW, as the plain path gives it
    fuse.STEM_CL[0] = False
    try:
        y1, g1 = _grad(fused, x, cot)
    finally:
        fuse.STEM_CL[0] = True
    assert torch.equal(y, y1)
    torch.testing.assert_close(g, g1, rtol=1e-5, atol=1e-6)
    # the graph as written in float64 (the path stands aside there), and central differences
    x64 = x.double().requires_grad_(True)
    y64 = plain.run({"x": x64})[0]
    assert not any(isinstance(n.fn, _StemCL) for n in plain.graph.nodes)
    (g64,) = torch.autograd.grad(y64, x64, cot.double())
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    fd = float((_fd(fused, x, v, eps=1e-3) * cot.double()).sum())
    scale = float((g.double() * v.double()).abs().sum())
    assert abs(float((g.double() * v.double()).sum()) - fd) <= 2e-3 * scale
    _, g64f = _grad(fused, x.double(), cot.double())  # float64 through the fused graph: the plain call
    torch.testing.assert_close(g64f, g64)
    # create_graph: the gradient differentiable in the incoming gradient
    cr, xr = cot.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (gc,) = torch.autograd.grad(fused.run({"x": xr})[0], xr, cr, create_graph=True)
    (h,) = torch.autograd.grad((gc * v).sum(), cr)
    cr0, xr0 = cot.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (gc0,) = torch.autograd.grad(plain.run({"x": xr0})[0], xr0, cr0, create_graph=True)
    (h0,) = torch.autograd.grad((gc0 * v).sum(), cr0)
    torch.testing.assert_close(h, h0, rtol=1e-4, atol=1e-5)
    # transforms and forward-mode AD: the plain call
    f = lambda m: (lambda t: m.run({"x": t})[0].sum(dim=(1, 2, 3)))  # noqa: E731
    torch.testing.assert_close(torch.func.jacrev(f(fused))(x[:1]), torch.func.jacrev(f(plain))(x[:1]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.func.vmap(f(fused))(x[:1].unsqueeze(1)),
                               torch.func.vmap(f(plain))(x[:1].unsqueeze(1)), rtol=1e-4, atol=1e-4)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        t = fwAD.unpack_dual(fused.run({"x": fwAD.make_dual(x, v)})[0]).tangent
    with fwAD.dual_level():
        t0 = fwAD.unpack_dual(plain.run({"x": fwAD.make_dual(x, v)})[0]).tangent
    torch.testing.assert_close(t, t0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dw,fork", [(False, False), (True, True)])
def test_stem_channels_last_only_before_a_sole_depthwise_reader(dw, fork):
    from jacaudit.models.onnx.fuse import _StemCL
    proto = _stem_proto("hardswish", dw=dw, fork=fork)
    m = OnnxModel(proto)
    assert m.metadata["optimizations"]["stem_channels_last"] == 0
    assert not any(isinstance(n.fn, _StemCL) for n in m.graph.nodes)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(m.run({"x": x})[0].numpy(), _ort(proto, x), rtol=1e-4, atol=1e-5)
