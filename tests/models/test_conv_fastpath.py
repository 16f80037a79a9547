"""The interpreter's fast paths for MobileNet-class graphs, checked against torch's own kernels.

* the Conv fast path in ``ops/nn.py`` (CPU, plain tensors): "depthwise_nhwc" (depthwise convolutions run
  channels_last; the layout carries on through Clip and the 1x1 convolutions after it);
* ``optimize.specialize_ops``: a Clip with constant bounds runs clamp with number bounds and a fused backward.

Truth: ``torch.nn.functional.conv2d`` and ``torch.clamp`` with tensor bounds, differentiated by torch
(reverse and forward mode); they share no code with the fast paths. The inputs never sit exactly on a Clip
bound, where torch.clamp's derivative depends on the torch release; at the bounds (the boundary tests) the
truth is the onnx reference evaluator for values and the documented convention for the derivative. The interpreter runs an ONNX graph
Conv(3x3, stride 2, 3 -> 8) -> Clip(0, 6) -> Conv(1x1) -> depthwise Conv(3x3) -> Clip(0, 6) -> Conv(1x1)
-> Clip(lo, hi) -> Conv(1x1, no bias) with the fast paths on, and with them off.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import jacaudit.models.onnx.ops.nn as nn_ops
from jacaudit.models.onnx.model import OnnxModel
from jacaudit.models.onnx.optimize import _ClipConst

CIN, C0, CMID, COUT, H, W = 3, 8, 5, 4, 6, 5
HO, WO = 3, 3
LO2, HI2 = -0.25, 0.5


def _weights(dtype=np.float64):
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return {"w0": r(C0, CIN, 3, 3), "b0": r(C0), "wp": r(C0, C0, 1, 1) / 2, "bp": r(C0), "wd": r(C0, 1, 3, 3),
            "bd": r(C0), "w1": r(CMID, C0, 1, 1), "b1": r(CMID), "w2": r(COUT, CMID, 1, 1)}


def _model(dtype=np.float64, optimize=True) -> OnnxModel:
    ws = _weights(dtype)
    et = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    inits = [numpy_helper.from_array(v, k) for k, v in ws.items()]
    inits += [numpy_helper.from_array(np.array(v, dtype), k)
              for k, v in (("lo", 0), ("hi", 6), ("lo2", LO2), ("hi2", HI2))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c0", "lo", "hi"], ["r0"]),
             helper.make_node("Conv", ["r0", "wp", "bp"], ["p0"], kernel_shape=[1, 1]),
             helper.make_node("Conv", ["p0", "wd", "bd"], ["d0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              group=C0),
             helper.make_node("Clip", ["d0", "lo", "hi"], ["r1"]),
             helper.make_node("Conv", ["r1", "w1", "b1"], ["c1"], kernel_shape=[1, 1]),
             helper.make_node("Clip", ["c1", "lo2", "hi2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w2"], ["y"], kernel_shape=[1, 1], pads=[0, 0, 0, 0])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", et, [None, CIN, H, W])],
                          [helper.make_tensor_value_info("y", et, [None, COUT, HO, WO])], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return OnnxModel(proto, optimize=optimize)


def _reference(x: torch.Tensor) -> torch.Tensor:
    """The same function with torch's own conv2d and tensor-bound clamp (batch of images)."""
    w = {k: torch.from_numpy(v).to(x.dtype) for k, v in _weights().items()}
    t = lambda v: torch.tensor(v, dtype=x.dtype)  # noqa: E731
    r0 = torch.clamp(F.conv2d(x, w["w0"], w["b0"], 2, 1), t(0.0), t(6.0))
    p0 = F.conv2d(r0, w["wp"], w["bp"])
    r1 = torch.clamp(F.conv2d(p0, w["wd"], w["bd"], 1, 1, 1, C0), t(0.0), t(6.0))
    r2 = torch.clamp(F.conv2d(r1, w["w1"], w["b1"]), t(LO2), t(HI2))
    return F.conv2d(r2, w["w2"])


def _inputs(n=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, CIN, H, W, generator=g, dtype=dtype) * 2


@pytest.fixture(params=[True, False], ids=["fast", "plain"])
def model(request):
    old = nn_ops.FAST_CONV
    nn_ops.FAST_CONV = set(old) if request.param else set()
    yield _model(optimize=request.param)
    nn_ops.FAST_CONV = old


def _f(model):
    return lambda x: model.run({"x": x})[0]


def test_specialised_and_fast_path_taken():
    m = _model()
    assert sum(isinstance(n.fn, _ClipConst) for n in m.graph.nodes) == 3
    x = _inputs()
    with torch.no_grad():
        y = m.run({"x": x})[0]
        d0 = m.run({"x": x}, outputs=["d0"])[0]  # (the plain graph: the same fast path)
    assert y.is_contiguous(memory_format=torch.channels_last)  # NHWC from the depthwise layer on
    assert d0.is_contiguous(memory_format=torch.channels_last)


def test_forward(model):
    x = _inputs(3)
    torch.testing.assert_close(_f(model)(x), _reference(x), rtol=1e-12, atol=1e-12)


def test_input_gradient(model):
    x = _inputs(3).requires_grad_(True)
    gy = torch.randn(3, COUT, HO, WO, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad(_f(model)(x), x, gy)
    (g_ref,) = torch.autograd.grad(_reference(x), x, gy)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_jacrev_jacfwd_vmap(model):
    x = _inputs(3)
    f1 = lambda xi: _f(model)(xi.unsqueeze(0)).squeeze(0)  # noqa: E731
    r1 = lambda xi: _reference(xi.unsqueeze(0)).squeeze(0)  # noqa: E731
    ref = torch.func.vmap(torch.func.jacrev(r1))(x)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(torch.func.vmap(torch.func.jacrev(f1))(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(torch.func.jacfwd(f1))(x), ref, rtol=1e-12, atol=1e-12)
    # whole batch through jacrev / jacfwd (the N > 1 matmul branch)
    fb, rb = _f(model), _reference
    torch.testing.assert_close(torch.func.jacrev(fb)(x), torch.func.jacrev(rb)(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(fb)(x), torch.func.jacrev(rb)(x), rtol=1e-12, atol=1e-12)
    # jvp under no_grad (the forward-only branch of the Clip specialisation)
    v = torch.randn_like(x)
    with torch.no_grad():
        _, t = torch.func.jvp(fb, (x,), (v,))
    _, t_ref = torch.func.jvp(rb, (x,), (v,))
    torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=1e-12)


def test_float32_matches_to_rounding():
    m32 = _model(np.float32)
    x = _inputs(2, torch.float32).requires_grad_(True)
    y = m32.run({"x": x})[0]
    torch.testing.assert_close(y, _reference(x.double()).float(), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(_reference(x.double()).sum(), x)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-5, atol=1e-5)


def _onnx_clip_reference(x: np.ndarray, lo, hi) -> np.ndarray:
    """Clip's values from the onnx package's reference evaluator (numpy.clip), opset 13."""
    from onnx.reference import ReferenceEvaluator

    et = helper.np_dtype_to_tensor_dtype(x.dtype)
    g = helper.make_graph([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], "clip",
                          [helper.make_tensor_value_info(n, et, s) for n, s in (("x", list(x.shape)), ("lo", []),
                                                                                 ("hi", []))],
                          [helper.make_tensor_value_info("y", et, list(x.shape))])
    ref = ReferenceEvaluator(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    return ref.run(None, {"x": x, "lo": np.array(lo, x.dtype), "hi": np.array(hi, x.dtype)})[0]


def _boundary_values(dtype):
    lo, hi = torch.tensor(-0.25, dtype=dtype), torch.tensor(0.5, dtype=dtype)
    inf = torch.tensor(float("inf"), dtype=dtype)
    vals = torch.stack([lo, hi, torch.nextafter(lo, -inf), torch.nextafter(hi, inf), torch.nextafter(lo, inf),
                        torch.nextafter(hi, -inf), torch.tensor(0.1, dtype=dtype), torch.tensor(-3.0, dtype=dtype),
                        torch.tensor(7.0, dtype=dtype)])
    return lo, hi, vals


def _clip_fns(lo, hi):
    from jacaudit.models.onnx.ops.elementwise import clip_11

    c = _ClipConst(None, lo, hi)
    return {"fast": lambda v: c(None, v), "plain": lambda v: clip_11(None, v, lo, hi)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_boundaries_follow_the_convention(dtype):
    """Values: ONNX's (the onnx reference evaluator). Derivative at and one ulp beyond the bounds: the documented
    convention (ops/elementwise.clip_6, _util.clamp_closed) -- 1 on the closed interval [lo, hi], 0 outside -- in
    every mode, for the fast path and the plain op alike. Not torch.clamp: its derivative at a bound changed
    in torch 2.14 (0.5 with tensor bounds, 0 with number bounds)."""
    lo, hi, vals = _boundary_values(dtype)
    y_onnx = torch.from_numpy(_onnx_clip_reference(vals.numpy(), float(lo), float(hi)))
    v = vals.numpy()
    mask = torch.from_numpy(((v >= float(lo)) & (v <= float(hi))).astype(v.dtype))  # the convention
    assert mask.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    ones = torch.ones_like(vals)
    for name, f in _clip_fns(lo, hi).items():
        x = vals.clone().requires_grad_(True)
        y = f(x)
        assert torch.equal(y.detach(), y_onnx), name
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.equal(g, mask), name
        _, t = torch.func.jvp(f, (vals,), (ones,))
        assert torch.equal(t, mask), name
        with torch.no_grad():  # forward mode needs no autograd graph (the fast path's no_grad branch)
            _, t = torch.func.jvp(f, (vals,), (ones,))
            assert torch.equal(t, mask), name
            with torch.autograd.forward_ad.dual_level():
                t = torch.autograd.forward_ad.unpack_dual(f(torch.autograd.forward_ad.make_dual(vals, ones))).tangent
            assert torch.equal(t, mask), name
        for jac in (torch.func.jacrev, torch.func.jacfwd):
            J = torch.func.vmap(jac(f))(vals.reshape(-1, 1))
            assert torch.equal(J.reshape(-1), mask), (name, jac)


def test_clip_plain_op_bounds_gradient_and_inverted_bounds():
    """The plain op with bounds as tensors: d/dmin = 1 where x < min, d/dmax = 1 where x > max (the value is the
    bound there); min > max gives max everywhere (ONNX), values from the onnx reference evaluator."""
    from jacaudit.models.onnx.ops.elementwise import clip_11

    _, _, vals = _boundary_values(torch.float64)
    lo = torch.tensor(-0.25, dtype=torch.float64, requires_grad=True)
    hi = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x = vals.clone().requires_grad_(True)
    gx, glo, ghi = torch.autograd.grad(clip_11(None, x, lo, hi).sum(), (x, lo, hi))
    v = vals.numpy()
    assert gx.tolist() == ((v >= -0.25) & (v <= 0.5)).astype(float).tolist()
    assert float(glo) == float((v < -0.25).sum()) == 2.0 and float(ghi) == float((v > 0.5).sum()) == 2.0
    lo2, hi2 = torch.tensor(1.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    y = clip_11(None, vals, lo2, hi2)
    assert torch.equal(y, torch.from_numpy(_onnx_clip_reference(v, 1.0, -1.0)))
    assert torch.equal(y, torch.full_like(vals, -1.0))
    nan = torch.tensor([float("nan"), 0.0], dtype=torch.float64)
    assert torch.isnan(clip_11(None, nan, lo2.neg(), lo2)[0])  # NaN stays NaN (numpy.clip)


def test_clip_double_backward_runs():
    c = _ClipConst(None, torch.tensor(0.0), torch.tensor(6.0))
    x = torch.randn(5, dtype=torch.float32, requires_grad=True)
    v = torch.randn(5, requires_grad=True)
    (g,) = torch.autograd.grad(c(None, x), x, v, create_graph=True)
    (gv,) = torch.autograd.grad(g.sum(), v)  # d(g)/dv is the 0/1 mask
    assert torch.equal(gv, ((x >= 0) & (x <= 6)).float())


# ---- per-sample Jacobians of convolutional models: the "rows" path (jacaudit/engine/core.py) -------------
def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(6 * 4 * 4, 5)).double().eval()


def _loop_reference(f, X):
    """Truth: one torch.autograd.functional.jacobian per sample (no batching, no vmap)."""
    return torch.stack([torch.autograd.functional.jacobian(lambda z: f(z[None])[0], X[b]) for b in range(len(X))])


def test_per_sample_rows_path_cnn():
    from jacaudit.engine import per_sample_jacobian

    net = _cnn()
    X = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    mkl = torch.backends.mkldnn.enabled
    J, info = per_sample_jacobian(net, X, return_info=True, max_memory=3 * 5 * 64 * 8 * 4 + 1)  # chunks
    assert info.path == "rows" and J.shape == (7, 5, 1, 8, 8)
    torch.testing.assert_close(J, _loop_reference(net, X), rtol=1e-10, atol=1e-12)
    assert torch.backends.mkldnn.enabled == mkl  # the backend trial restores the flag


def test_per_sample_rows_path_onnx_and_coupled_fallback():
    from jacaudit.engine import per_sample_jacobian

    m = _model()
    X = _inputs(3)
    J, info = per_sample_jacobian(m, X, return_info=True, input="x", mode="reverse")
    assert info.path == "rows"
    ref = torch.func.vmap(torch.func.jacrev(lambda xi: _reference(xi[None])[0]))(X)
    torch.testing.assert_close(J, ref, rtol=1e-12, atol=1e-12)

    net = _cnn()

    class Coupled(torch.nn.Module):  # samples interact: the rows shortcut must not be taken
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, z):
            y = self.net(z)
            return y + y.mean(0, keepdim=True)

    Xc = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    Jc, info = per_sample_jacobian(Coupled(), Xc, return_info=True)
    assert info.path != "rows"
    torch.testing.assert_close(Jc, torch.func.vmap(torch.func.jacrev(lambda z: Coupled()(z[None])[0]))(Xc))


def test_clip_fed_bounds_are_honoured():
    """A Clip bound that is an initializer can still be fed (old-IR graphs list initializers as inputs):
    the specialised node then runs the op as written."""
    m = _model()
    clip = next(n for n in m.graph.nodes if isinstance(n.fn, _ClipConst) and n.inputs[1] == "lo2")
    r2 = torch.linspace(-1, 1, 7, dtype=torch.float64)
    lo2, hi2 = m.graph.initializers["lo2"], m.graph.initializers["hi2"]
    torch.testing.assert_close(clip.fn(clip.ctx, r2, lo2, hi2), torch.clamp(r2, LO2, HI2))
    fed = torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(clip.fn(clip.ctx, r2, fed, hi2), torch.clamp(r2, 0.0, HI2))
