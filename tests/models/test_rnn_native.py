"""float32 LSTM nodes on torch's whole-sequence kernel (ops/rnn_fast.py ``_LSTMNative``: oneDNN's LSTM forward
and backward) against independent truths: onnxruntime's forward, the stepped fast path and the plain recurrence
(the paths the float64 conformance gradient checks verify), central finite differences, second derivatives
(create_graph runs the stepped recurrence), and torch.func transforms (which step aside to the plain path)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")

from jacaudit.models.onnx.ops import rnn, rnn_fast  # noqa: E402
from tests.models.test_rnn_fast import _feeds, _load, _model, _outs_and_grads  # noqa: E402

pytestmark = pytest.mark.skipif(not torch._C._get_mkldnn_enabled(), reason="torch built without oneDNN")


@pytest.fixture
def count(monkeypatch):
    calls = []
    real = rnn_fast._native_run
    monkeypatch.setattr(rnn_fast, "_native_run", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.fixture
def stepped():
    class _S:
        def __enter__(self):
            rnn_fast._NATIVE_LSTM[0] = False

        def __exit__(self, *a):
            rnn_fast._NATIVE_LSTM[0] = True
    return _S()


CASES = [(d, lay, bias, init) for d in ("bidirectional", "forward", "reverse") for lay in (0, 1)
         for bias in (True, False) for init in (True, False)]


@pytest.mark.parametrize("direction,layout,bias,init", CASES)
def test_values_match_onnxruntime_and_gradients_the_stepped_path(tmp_path, count, stepped, direction, layout,
                                                                 bias, init):
    ort = pytest.importorskip("onnxruntime")
    proto, D, H = _model("LSTM", direction, layout, bias, init, H=8, I=6)
    m, path = _load(tmp_path, proto)
    feeds = _feeds("LSTM", D, H, T=9, B=3, I=6, layout=layout, init=init)
    if layout == 0:
        ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
            None, {k: v.numpy() for k, v in feeds.items()})
    else:  # onnxruntime has no batch-major LSTM: the plain recurrence of ops/rnn.py
        rnn._FAST_RNN[0] = False
        try:
            with torch.no_grad():
                ref = [o.numpy() for o in m.run(feeds)]
        finally:
            rnn._FAST_RNN[0] = True
    with torch.no_grad():
        got = m.run(feeds)
    assert len(count) == 1
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b.numpy(), a, rtol=1e-5, atol=1e-5)
    no, ng = _outs_and_grads(m, feeds)
    assert len(count) == 2
    for a, b in zip(ref, no):
        np.testing.assert_allclose(b.numpy(), a, rtol=1e-5, atol=1e-5)
    with stepped:
        so, sg = _outs_and_grads(m, feeds)
    assert len(count) == 2
    assert len(ng) == len(sg) == len(feeds)
    for a, b in zip(ng, sg):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", [1, 2])
def test_only_a_final_state_read(tmp_path, count, stepped, which):
    """The gradient through Y_h alone or Y_c alone (Y's incoming gradient is None)."""
    proto, D, H = _model("LSTM")
    m, _ = _load(tmp_path, proto)
    feeds = _feeds("LSTM", D, H)
    res = []
    for ctx in (None, stepped):
        f = {k: v.clone().requires_grad_(True) for k, v in feeds.items()}
        if ctx is None:
            out = m.run(f)[which]
        else:
            with ctx:
                out = m.run(f)[which]
        res.append(torch.autograd.grad(out.sum(), list(f.values())))
    assert len(count) == 1
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_central_finite_differences(tmp_path, count):
    """<grad, v> against (f(x + e v) - f(x - e v)) / 2e in float32, for X and both initial states."""
    proto, D, H = _model("LSTM", H=5, I=4)
    m, _ = _load(tmp_path, proto)
    feeds = _feeds("LSTM", D, H, T=7, B=2, I=4)
    ws = [torch.randn(s, generator=torch.Generator().manual_seed(7 + i))
          for i, s in enumerate([(7, D, 2, H), (D, 2, H), (D, 2, H)])]

    def f(fd):
        return sum((o * w).sum() for o, w in zip(m.run(fd), ws))

    fr = {k: v.clone().requires_grad_(True) for k, v in feeds.items()}
    grads = dict(zip(fr, torch.autograd.grad(f(fr), list(fr.values()))))
    g = torch.Generator().manual_seed(3)
    eps = 1e-2
    for name in feeds:
        for _ in range(3):
            v = torch.randn(feeds[name].shape, generator=g)
            with torch.no_grad():
                fd = (f({**feeds, name: feeds[name] + eps * v}) - f({**feeds, name: feeds[name] - eps * v})) / (2 * eps)
            an = (grads[name] * v).sum()
            assert abs(fd.item() - an.item()) <= 2e-3 * max(1.0, abs(an.item())), (name, fd.item(), an.item())
    assert len(count) >= 1 + 18


def test_second_derivative_matches_the_stepped_path(tmp_path, count, stepped):
    """create_graph=True (the robustness samples' double backprop): the second derivative is the stepped
    recurrence's."""
    proto, D, H = _model("LSTM", H=4, I=3)
    m, _ = _load(tmp_path, proto)
    feeds = _feeds("LSTM", D, H, T=5, B=2, I=3)
    res = []
    for ctx in (None, stepped):
        x = feeds["x"].clone().requires_grad_(True)
        if ctx is None:
            y = m.run({**feeds, "x": x})[0]
        else:
            with ctx:
                y = m.run({**feeds, "x": x})[0]
        (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), x)
        res.append((g.detach(), gg))
    assert len(count) == 1
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-4, atol=1e-4)


def test_float64_and_transforms_step_aside(tmp_path, count):
    """float64 keeps the stepped path; vmap/jacrev/jacfwd run the plain path and agree with the native
    path's autograd rows."""
    proto, D, H = _model("LSTM", H=3, I=2, init=False)
    m64, _ = _load(tmp_path, proto, torch.float64)
    m64.run(_feeds("LSTM", D, H, T=5, B=1, I=2, dtype=torch.float64, init=False))
    assert count == []
    m, _ = _load(tmp_path, proto)
    x = _feeds("LSTM", D, H, T=5, B=1, I=2, init=False)["x"]

    def f(v):
        return m.run({"x": v})[0]

    jr = torch.func.jacrev(f)(x)
    jf = torch.func.jacfwd(f)(x)
    vb = torch.func.vmap(f)(torch.stack([x, 2 * x]))
    assert count == []
    xr = x.clone().requires_grad_(True)
    y = f(xr)
    assert len(count) == 1
    rows = [torch.autograd.grad(y.reshape(-1)[k], xr, retain_graph=True)[0] for k in range(y.numel())]
    ja = torch.stack(rows).reshape(y.shape + x.shape)
    torch.testing.assert_close(jr, ja, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(jf, ja, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(vb[1], f(2 * x), rtol=1e-5, atol=1e-6)


def test_weights_reordered_once_per_constant(tmp_path, monkeypatch):
    proto, D, H = _model("LSTM")
    m, _ = _load(tmp_path, proto)
    feeds = _feeds("LSTM", D, H)
    n = []
    real = rnn_fast._reorder
    monkeypatch.setattr(rnn_fast, "_reorder", lambda *a: n.append(1) or real(*a))
    with torch.no_grad():
        a = m.run(feeds)
        k = len(n)
        b = m.run(feeds)
    assert k == 2 * 4 and len(n) == k
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert rnn._FAST_RNN[0]


def test_mismatched_state_batch_takes_the_stepped_path(tmp_path, count, stepped):
    """An initial state whose batch is not the input's (an export that fixed the batch, fed another): oneDNN's
    kernel does not check it (it read past the state); the stepped path runs and does what it did before."""
    proto, D, H = _model("LSTM")
    m, _ = _load(tmp_path, proto)
    feeds = _feeds("LSTM", D, H, B=3)
    feeds = {**feeds, "h0": feeds["h0"][:, :1].contiguous(), "c0": feeds["c0"][:, :1].contiguous()}

    def outcome():
        try:
            with torch.no_grad():
                return m.run(feeds)
        except Exception as e:  # noqa: BLE001
            return type(e)

    a = outcome()
    with stepped:
        b = outcome()
    assert count == []
    if isinstance(a, type):
        assert a is b
    else:
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v)
