"""The Jacobian engine against truths that share no code with it: closed forms (linear maps, a planar arm's
forward kinematics, elementwise functions), torch.autograd.functional (reference only here) and central
differences through onnxruntime."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from jacaudit.engine import (JacobianTooLarge, Target, frobenius_norm, jacobian, jvp, per_sample_jacobian,
                               spectral_norm, top_singular, vjp)
from jacaudit.engine.core import full_jacobian, parse_memory, prepare
from jacaudit.engine.linearity import linearity

torch.set_num_threads(1)
D64 = torch.float64


def linear_map(m=4, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=D64)
    b = torch.randn(m, generator=g, dtype=D64)
    return W, b


# ---- closed forms -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["auto", "reverse", "forward"])
def test_linear_map_is_exactly_W(mode):
    W, b = linear_map()
    x = torch.randn(1, 6, dtype=D64)
    J, info = jacobian(lambda z: z @ W.T + b, x, mode=mode, return_info=True)
    assert J.shape == (1, 4, 1, 6)
    assert torch.equal(J[0, :, 0, :], W)
    assert info.mode == ("reverse" if mode == "auto" else mode)
    assert info.path == "vmap"


def arm_xy(theta: torch.Tensor, L=(1.0, 0.7, 0.4)) -> torch.Tensor:
    c = torch.cumsum(theta, 0)
    return torch.stack([sum(l * torch.cos(c[i]) for i, l in enumerate(L)),
                        sum(l * torch.sin(c[i]) for i, l in enumerate(L))])


def test_planar_arm_forward_kinematics():
    L = (1.0, 0.7, 0.4)
    th = torch.tensor([0.3, -0.8, 1.1], dtype=D64)
    c = np.cumsum(th.numpy())
    # closed form: dx/dth_j = -sum_{i>=j} L_i sin(c_i), dy/dth_j = sum_{i>=j} L_i cos(c_i)
    Jt = np.array([[-sum(L[i] * math.sin(c[i]) for i in range(j, 3)) for j in range(3)],
                   [sum(L[i] * math.cos(c[i]) for i in range(j, 3)) for j in range(3)]])
    for mode in ("reverse", "forward"):
        J = jacobian(lambda t: arm_xy(t, L), th, mode=mode)
        np.testing.assert_allclose(J.numpy(), Jt, rtol=1e-13, atol=1e-14)


def test_elementwise_tanh_is_diagonal():
    x = torch.linspace(-2, 2, 7, dtype=D64)
    J = jacobian(torch.tanh, x)
    np.testing.assert_allclose(J.numpy(), np.diag(1 - np.tanh(x.numpy()) ** 2), rtol=1e-14, atol=1e-15)


def test_vjp_jvp_api():
    W, b = linear_map()
    x = torch.randn(1, 6, dtype=D64)
    u = torch.randn(1, 4, dtype=D64)
    v = torch.randn(1, 6, dtype=D64)
    y, g = vjp(lambda z: z @ W.T + b, x, u)
    torch.testing.assert_close(g, u @ W)
    y, t = jvp(lambda z: z @ W.T + b, x, v)
    torch.testing.assert_close(t, v @ W.T)


def test_float64_casts_module_and_input():
    net = nn.Linear(6, 4)
    x = torch.randn(1, 6)
    J = jacobian(net, x, dtype="float64")
    assert J.dtype == D64
    assert net.weight.dtype == torch.float32  # the user's module is untouched
    np.testing.assert_allclose(J[0, :, 0, :].numpy(), net.weight.detach().double().numpy(), rtol=1e-7)


# ---- paths ------------------------------------------------------------------------------------------------
def test_torchscript_model_full_jacobian(tmp_path):
    import jacaudit.models as M

    W, b = linear_map()
    lin = nn.Linear(6, 4).double()
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    p = tmp_path / "lin.pt"
    torch.jit.script(lin).save(str(p))
    model = M.load(str(p))
    x = torch.randn(1, 6, dtype=D64)
    for mode in ("reverse", "forward"):
        J, info = jacobian(model, x, mode=mode, return_info=True)
        torch.testing.assert_close(J[0, :, 0, :], W)


class _OldStyleTanh2(torch.autograd.Function):  # no functorch support: torch.func.vjp/vmap refuse it
    @staticmethod
    def forward(ctx, z):
        y = torch.tanh(z)
        ctx.save_for_backward(y)
        return 2 * y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * 2 * (1 - y ** 2)


def _branchy(z):  # data-dependent control flow + an old-style autograd.Function: vmap cannot go through
    if float(z.detach().sum()) > -1e9:
        return _OldStyleTanh2.apply(z)
    return z


def test_fallback_batched_when_vmap_fails():
    x = torch.randn(1, 5, dtype=D64)
    J, info = jacobian(_branchy, x, return_info=True, mode="reverse")
    assert info.path == "batched"
    np.testing.assert_allclose(J[0, :, 0, :].numpy(), np.diag(2 * (1 - np.tanh(x[0].numpy()) ** 2)), rtol=1e-12, atol=1e-15)
    J2, info = jacobian(_branchy, x, return_info=True, mode="forward")
    assert info.path == "batched"
    torch.testing.assert_close(J2, J)


def test_fallback_loop_without_batch_axis():
    x = torch.randn(5, dtype=D64) + 3  # leading axis is not a batch of 1
    J, info = jacobian(_branchy, x, return_info=True)
    assert info.path == "loop"
    np.testing.assert_allclose(J.numpy(), np.diag(2 * (1 - np.tanh(x.numpy()) ** 2)), rtol=1e-12, atol=1e-15)


def test_chunking_and_oom_retry(monkeypatch):
    W, b = linear_map(m=20, n=30)
    x = torch.randn(1, 30, dtype=D64)
    t = prepare(lambda z: z @ W.T + b, x)
    J, info = full_jacobian(t, max_memory=6000)  # the budget holds J (4800 B) and a chunk
    assert info.chunks > 1
    torch.testing.assert_close(J[0, :, 0, :], W)

    calls = []
    real = Target.vjp_many

    def flaky(self, U):
        calls.append(U.shape[0])
        if U.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, U)

    monkeypatch.setattr(Target, "vjp_many", flaky)
    t = prepare(lambda z: z @ W.T + b, x)
    J, info = full_jacobian(t, max_memory="1GiB")
    assert info.oom_retries >= 1 and info.chunk_size <= 3
    torch.testing.assert_close(J[0, :, 0, :], W)


def test_too_large_is_refused_with_size_and_estimators():
    x = torch.randn(1, 1000, dtype=D64)
    t = prepare(torch.tanh, x)
    with pytest.raises(JacobianTooLarge, match=r"7\.6 MiB.*estimators"):
        full_jacobian(t, limit_bytes=1000)


def test_parse_memory():
    assert parse_memory("512MB") == 512 * 1000 ** 2
    assert parse_memory("2GiB") == 2 << 30
    assert parse_memory(100) == 100


# ---- per-sample ----------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()


def _reference_per_sample(f, X):
    return torch.stack([torch.autograd.functional.jacobian(lambda z: f(z[None])[0], X[b]) for b in range(len(X))])


def test_per_sample_vmap_and_fallbacks():
    net = _mlp()
    X = torch.randn(6, 12, dtype=D64)
    ref = _reference_per_sample(net, X)
    J, info = per_sample_jacobian(net, X, return_info=True)
    assert info.path == "vmap" and J.shape == (6, 3, 12)
    torch.testing.assert_close(J, ref)

    def branchy_net(z):
        if float(z.detach().sum()) > -1e9:
            return _OldStyleTanh2.apply(net(z))
        return z

    ref = _reference_per_sample(branchy_net, X)

    J, info = per_sample_jacobian(branchy_net, X, return_info=True)
    assert info.path == "batched"
    torch.testing.assert_close(J, ref)

    def coupled(z):  # samples interact: no batching shortcut
        if float(z.detach().sum()) > -1e9:
            return _OldStyleTanh2.apply(net(z)) + z.mean(0, keepdim=True)[:, :3]
        return z

    J, info = per_sample_jacobian(coupled, X, return_info=True)
    assert info.path == "loop"


def test_per_sample_torchscript(tmp_path):
    import jacaudit.models as M

    net = _mlp()
    p = tmp_path / "mlp.pt"
    torch.jit.script(net).save(str(p))
    model = M.load(str(p))
    X = torch.randn(5, 12, dtype=D64)
    J, info = per_sample_jacobian(model, X, return_info=True)
    torch.testing.assert_close(J, _reference_per_sample(net, X))


# ---- estimators ----------------------------------------------------------------------------------------
def test_frobenius_hutchinson_and_exact():
    W, b = linear_map(m=40, n=50, seed=3)
    x = torch.randn(1, 50, dtype=D64)
    f = lambda z: z @ W.T + b  # noqa: E731
    exact = float(W.norm())
    e = frobenius_norm(f, x, probes=30, seed=1)
    assert e.method == "hutchinson" and e.probes == 30 and e.stderr > 0
    assert abs(e.value - exact) <= 4 * e.stderr
    e = frobenius_norm(f, x, probes=64)
    assert e.method == "exact" and e.value == pytest.approx(exact, rel=1e-12)


def test_top_singular_vs_closed_form():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=D64))
    V, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=D64))
    s = torch.tensor([10.0, 7.0, 5.0] + [1.0 / (i + 1) for i in range(27)], dtype=D64)
    W = U[:, :30] @ torch.diag(s) @ V[:, :30].T  # singular values known exactly
    x = torch.randn(40, dtype=D64)
    e = top_singular(lambda z: W @ z, x, k=3, tol=1e-10)
    assert e.converged
    np.testing.assert_allclose(e.values, [10.0, 7.0, 5.0], rtol=1e-9)
    for i in range(3):
        assert abs(float(e.right[i] @ V[:, i])) == pytest.approx(1.0, abs=1e-8)
        assert abs(float(e.left[i] @ U[:, i])) == pytest.approx(1.0, abs=1e-8)
    assert spectral_norm(lambda z: W @ z, x).spectral_norm == pytest.approx(10.0, rel=1e-6)


# ---- linearity -----------------------------------------------------------------------------------------
def test_linearity_linear_and_quadratic():
    W, b = linear_map()
    x = torch.randn(1, 6, dtype=D64)
    r = linearity(lambda z: z @ W.T + b, x, steps=(1e-2, 1e-1))
    assert max(row.error for row in r.rows) < 1e-12
    r = linearity(lambda z: z + 0.5 * z ** 2, x + 2, steps=(1e-3, 1e-2), random=2, singular=1)
    w = r.worst_by_step()
    assert w[1e-2] > 5 * w[1e-3] > 0  # the error of a quadratic grows with the step


# ---- ONNX (interpreter) vs central differences through onnxruntime ---------------------------------------
def _conv_tanh_onnx(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 2, 3, 3)).astype(np.float32) * 0.3
    B = rng.standard_normal(3).astype(np.float32) * 0.1
    S = rng.standard_normal((1, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["c"], ["t"]),
             helper.make_node("Mul", ["t", "S"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5, 5])],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B"),
                           numpy_helper.from_array(S, "S")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return W, B, S


def test_onnx_jacobian_vs_onnxruntime_differences(tmp_path):
    import onnxruntime as ort

    import jacaudit.models as M

    p = tmp_path / "ct.onnx"
    _conv_tanh_onnx(p)
    model = M.load(str(p))
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)
    J = jacobian(model, torch.from_numpy(x), dtype="float64").reshape(75, 50).numpy()
    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    f = lambda z: sess.run(None, {"x": z.astype(np.float32)})[0].astype(np.float64).reshape(-1)  # noqa: E731
    rng = np.random.default_rng(2)
    for _ in range(3):
        v = rng.standard_normal(x.shape)
        h = 1e-2
        d1 = (f(x + h * v) - f(x - h * v)) / (2 * h)
        d2 = (f(x + h / 2 * v) - f(x - h / 2 * v)) / h
        fd = (4 * d2 - d1) / 3
        np.testing.assert_allclose(J @ v.reshape(-1), fd, rtol=0, atol=2e-3 * np.abs(fd).max())


def test_onnx_wrt_internal_tensor_closed_form(tmp_path):
    import jacaudit.models as M

    p = tmp_path / "ct.onnx"
    _, _, S = _conv_tanh_onnx(p)
    model = M.load(str(p))
    x = torch.randn(1, 2, 5, 5)
    J = jacobian(model, x, wrt="t", dtype="float64")  # y = t * S: J = diag(S broadcast)
    assert J.shape == (1, 3, 5, 5, 1, 3, 5, 5)
    expect = np.diag(np.broadcast_to(S, (1, 3, 5, 5)).reshape(-1).astype(np.float64))
    np.testing.assert_allclose(J.reshape(75, 75).numpy(), expect, rtol=1e-6)


# ---- CLI -----------------------------------------------------------------------------------------------
def test_cli_jacobian_json_and_save(tmp_path):
    from typer.testing import CliRunner

    from jacaudit.cli.main import app

    W, b = linear_map()
    lin = nn.Linear(6, 4).double()
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    mp = tmp_path / "lin.pt"
    torch.jit.script(lin).save(str(mp))
    xp = tmp_path / "x.npy"
    np.save(xp, np.random.default_rng(0).standard_normal((1, 6)))
    out = tmp_path / "rep"
    r = CliRunner().invoke(app, ["jacobian", str(mp), "--input", str(xp), "--dtype", "float64", "--json",
                                 "--save", "--linearity", "-o", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d == json.loads((out / "report.json").read_text())  # --json prints exactly the report
    res = d["result"]
    assert res["jacobian_shape"] == [1, 4, 1, 6]
    assert res["frobenius"]["value"] == pytest.approx(float(W.norm()), rel=1e-12)
    assert res["spectral"]["value"] == pytest.approx(float(torch.linalg.svdvals(W)[0]), rel=1e-12)
    assert res["rank"] == 4 and res["computation"]["path"] == "vmap"
    assert max(row["error"] for row in res["linearity"]["rows"]) < 1e-10
    np.testing.assert_allclose(np.load(out / "jacobian.npy")[0, :, 0, :], W.numpy())
    # the small J is in the report, with all its singular values (closed form: the SVD of W)
    np.testing.assert_allclose(np.array(res["matrix"]), W.numpy(), rtol=1e-12)
    np.testing.assert_allclose(res["singular_values"], torch.linalg.svdvals(W).numpy(), rtol=1e-10)


def test_cli_jacobian_synthetic_input_onnx(tmp_path):
    from typer.testing import CliRunner

    from jacaudit.cli.main import app

    p = tmp_path / "ct.onnx"
    _conv_tanh_onnx(p)
    r = CliRunner().invoke(app, ["jacobian", str(p), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["settings"]["synthetic_input"] is True
    assert any("synthetic" in w for w in d["warnings"])
    assert d["result"]["jacobian_shape"] == [1, 3, 5, 5, 1, 2, 5, 5]
