"""The fast GRU/LSTM path (ops/rnn_fast.py) against independent truths: onnxruntime's forward, the plain
recurrence of ops/rnn.py (the path the conformance suite verifies), central finite differences (gradcheck),
second derivatives, and torch.func transforms (which run the plain path)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as TP, helper, numpy_helper  # noqa: E402

import jacaudit  # noqa: E402
from jacaudit.models.onnx.ops import rnn, rnn_fast  # noqa: E402


def _model(op, direction="bidirectional", layout=0, bias=True, init=True, lbr=1, T=None, extra=None,
           I=5, H=4, seed=0):
    D = 2 if direction == "bidirectional" else 1
    G = 3 if op == "GRU" else 4
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((D, G * H, I)) * 0.4).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((D, G * H, H)) * 0.4).astype(np.float32), "R")]
    ins = ["x", "W", "R", "B" if bias else "", ""]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal((D, 2 * G * H)) * 0.4).astype(np.float32), "B"))
    gin = [helper.make_tensor_value_info("x", TP.FLOAT, None)]
    if init:
        ins.append("h0")
        gin.append(helper.make_tensor_value_info("h0", TP.FLOAT, None))
        if op == "LSTM":
            ins.append("c0")
            gin.append(helper.make_tensor_value_info("c0", TP.FLOAT, None))
    attrs = dict(hidden_size=H, direction=direction)
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    if layout:
        attrs["layout"] = 1
    attrs.update(extra or {})
    outs = ["y", "yh"] + (["yc"] if op == "LSTM" else [])
    g = helper.make_graph([helper.make_node(op, ins, outs, **attrs)], "g", gin,
                          [helper.make_tensor_value_info(o, TP.FLOAT, None) for o in outs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]), D, H


def _feeds(op, D, H, T=6, B=3, I=5, layout=0, dtype=torch.float32, init=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((B, T, I) if layout else (T, B, I), generator=g, dtype=dtype)
    f = {"x": x}
    if init:
        s = (B, D, H) if layout else (D, B, H)
        f["h0"] = torch.randn(s, generator=g, dtype=dtype)
        if op == "LSTM":
            f["c0"] = torch.randn(s, generator=g, dtype=dtype)
    return f


@pytest.fixture
def plain():
    """Run a block on the plain recurrence."""
    class _P:
        def __enter__(self):
            rnn._FAST_RNN[0] = False

        def __exit__(self, *a):
            rnn._FAST_RNN[0] = True
    return _P()


def _load(tmp_path, proto, dtype=None):
    p = tmp_path / "m.onnx"
    onnx.save(proto, str(p))
    return jacaudit.load(str(p)) if dtype is None else jacaudit.load(str(p)).to(dtype=dtype), str(p)


def _outs_and_grads(m, feeds):
    f = {k: v.clone().requires_grad_(True) for k, v in feeds.items()}
    outs = m.run(f)
    ws = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype) for i, o in enumerate(outs)]
    s = sum((o * w).sum() for o, w in zip(outs, ws))
    return [o.detach() for o in outs], torch.autograd.grad(s, list(f.values()))


def test_eligible_nodes_take_the_fast_path(tmp_path, monkeypatch):
    monkeypatch.setattr(rnn_fast, "_NATIVE_LSTM", [False])  # float32 LSTM: torch's kernel (test_rnn_native.py)
    calls = []
    real_gru, real_lstm = rnn_fast._GRUFunction.apply, rnn_fast._LSTMFunction.apply
    monkeypatch.setattr(rnn_fast._GRUFunction, "apply", lambda *a: calls.append("gru") or real_gru(*a))
    monkeypatch.setattr(rnn_fast._LSTMFunction, "apply", lambda *a: calls.append("lstm") or real_lstm(*a))
    for op in ("GRU", "LSTM"):
        proto, D, H = _model(op)
        m, _ = _load(tmp_path, proto)
        _outs_and_grads(m, _feeds(op, D, H))
    assert calls == ["gru", "lstm"]
    calls.clear()
    proto, D, H = _model("GRU", lbr=0)  # linear_before_reset=0: not torch's GRU; the plain path
    m, _ = _load(tmp_path, proto)
    _outs_and_grads(m, _feeds("GRU", D, H))
    proto, D, H = _model("LSTM", extra={"clip": 2.0})
    m, _ = _load(tmp_path, proto)
    _outs_and_grads(m, _feeds("LSTM", D, H))
    assert calls == []


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["bidirectional", "forward", "reverse"])
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("init", [True, False])
def test_fast_matches_plain_path_float64(tmp_path, plain, op, direction, layout, bias, init):
    proto, D, H = _model(op, direction, layout, bias, init)
    m, _ = _load(tmp_path, proto, torch.float64)
    feeds = _feeds(op, D, H, layout=layout, dtype=torch.float64, init=init)
    fo, fg = _outs_and_grads(m, feeds)
    with plain:
        po, pg = _outs_and_grads(m, feeds)
    for a, b in zip(fo, po):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(fg, pg):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["bidirectional", "reverse"])
def test_forward_matches_onnxruntime(tmp_path, op, direction):
    ort = pytest.importorskip("onnxruntime")
    proto, D, H = _model(op, direction, H=16, I=12)
    m, path = _load(tmp_path, proto)
    feeds = _feeds(op, D, H, T=20, B=2, I=12)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        got = m.run(feeds)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b.numpy(), a, rtol=1e-5, atol=1e-5)
    # and with autograd on (the autograd.Function's forward)
    f = {k: v.clone().requires_grad_(True) for k, v in feeds.items()}
    for a, b in zip(ref, m.run(f)):
        np.testing.assert_allclose(b.detach().numpy(), a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_gradcheck_central_differences(tmp_path, op):
    """The hand-written backward against finite differences, w.r.t. X and the initial states."""
    proto, D, H = _model(op, H=3, I=2)
    m, _ = _load(tmp_path, proto, torch.float64)
    feeds = _feeds(op, D, H, T=4, B=2, I=2, dtype=torch.float64)
    names = list(feeds)

    def f(*xs):
        return tuple(m.run(dict(zip(names, xs))))

    ins = tuple(v.clone().requires_grad_(True) for v in feeds.values())
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7, rtol=1e-5)
    # second derivatives (create_graph differentiates the plain recurrence on the saved inputs)
    assert torch.autograd.gradgradcheck(f, ins, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_torch_func_transforms_agree(tmp_path, op):
    """vmap/jacrev/jacfwd run the plain path (the fast path steps aside under transforms) and agree with the
    fast path's autograd gradients."""
    proto, D, H = _model(op, H=3, I=2, init=False)
    m, _ = _load(tmp_path, proto, torch.float64)
    x = _feeds(op, D, H, T=5, B=1, I=2, dtype=torch.float64, init=False)["x"]

    def f(v):
        return m.run({"x": v})[0]

    jr = torch.func.jacrev(f)(x)
    jf = torch.func.jacfwd(f)(x)
    xr = x.clone().requires_grad_(True)
    y = f(xr)
    rows = []
    for k in range(y.numel()):
        (g,) = torch.autograd.grad(y.reshape(-1)[k], xr, retain_graph=True)
        rows.append(g)
    ja = torch.stack(rows).reshape(y.shape + x.shape)
    torch.testing.assert_close(jr, ja, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jf, ja, rtol=1e-10, atol=1e-12)
    xb = torch.randn((3,) + tuple(x.shape), dtype=torch.float64)
    vb = torch.func.vmap(f)(xb)
    with torch.no_grad():
        for i in range(3):
            torch.testing.assert_close(vb[i], f(xb[i]), rtol=1e-12, atol=1e-12)


def test_only_the_output_state_read(tmp_path, plain):
    """A graph reading only Y_h (the gradient of Y is zero) and a weight that asks for a gradient (plain)."""
    for op in ("GRU", "LSTM"):
        proto, D, H = _model(op)
        m, _ = _load(tmp_path, proto, torch.float64)
        feeds = _feeds(op, D, H, dtype=torch.float64)
        grads = []
        for mode in ("fast", "plain"):
            x = feeds["x"].clone().requires_grad_(True)
            if mode == "plain":
                with plain:
                    yh = m.run({**feeds, "x": x})[1]
            else:
                yh = m.run({**feeds, "x": x})[1]
            grads.append(torch.autograd.grad((yh * yh).sum(), x)[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-11, atol=1e-12)
