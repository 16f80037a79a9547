"""``verify``'s verdicts are evidence (issue 9, findings 1, 2 and verify's progress from 8), against float64 truths
computed here without the engine: closed-form derivatives of small functions, ONNX graphs built with onnx.helper
whose derivative is known, and onnx's light_squeezenet (constant weights: J is exactly 0 behind a uniform softmax)."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import jacaudit.models as M
from jacaudit.cli.main import app
from jacaudit.engine.verify import verify

torch.set_num_threads(1)
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def _save(tmp_path, name, nodes, inits, in_shape, out_shape):
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("X", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(a if a.dtype == np.int64 else a.astype(np.float32), n)
                           for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    p = tmp_path / f"{name}.onnx"
    onnx.save(m, str(p))
    return p


# -- 1. zero directions: retried, said so, never a pass -------------------------------------------------------
def test_zero_direction_is_retried_then_inconclusive():
    x = torch.randn(1, 5, dtype=torch.float64)
    const = lambda z: torch.ones(1, 3, dtype=z.dtype) + 0 * z.sum()  # noqa: E731  (dJ = 0: the truth)
    r = verify(const, x, directions=2, retries=3)
    assert r.verdict == "inconclusive"
    assert r.retries == 3 and len(r.directions) == 5
    assert [d.retry_of for d in r.directions[2:]] == [0, 0, 1]
    assert all(d.status == "inconclusive" and "exactly 0" in d.note for d in r.directions)
    assert "retried: dir 2 (a new seeded direction): inconclusive" in r.directions[0].note
    assert any("retried" in w for w in r.warnings)
    r0 = verify(const, x, directions=2, retries=0)
    assert r0.retries == 0 and len(r0.directions) == 2 and r0.verdict == "inconclusive"


def test_kink_at_x_is_retried_at_a_nearby_point_against_the_closed_form():
    """relu(z) * 3 with units exactly at 0: non-smooth at x; at the nearby point the engine's J v must match the
    closed form 3 * 1[x' > 0] * v, and the verdict says the evidence is from there."""
    x = torch.tensor([[0.0, 1.0, -1.0, 0.0, 2.0]], dtype=torch.float64)
    r = verify(lambda z: torch.relu(z) * 3, x, directions=2)
    assert all(d.status == "non-differentiable" for d in r.directions if d.point == "x")
    near = [d for d in r.directions if d.point == "nearby"]
    assert near and near[0].status == "pass" and near[0].rel_error < 1e-8
    assert r.verdict == "pass" and any("nearby point" in w for w in r.warnings)


# -- 2. kinks crossed by the step: a smaller step agrees, no FAIL ------------------------------------------------
def test_relu_maxpool_kinks_crossed_by_the_float32_step_are_not_a_failure(tmp_path):
    """Y = MaxPool(Relu(X)) . W with many |X| < 2e-3: onnxruntime's float32 steps (2e-2..2.5e-3) cross ReLU kinks
    and MaxPool ties; the engine's J v must agree with the closed form (mask . W) and the verdict must not fail."""
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((1, 1, 8, 8)) * 1e-3).astype(np.float32)
    X[0, 0, ::2, ::2] += rng.standard_normal((4, 4)).astype(np.float32)
    W = rng.standard_normal((16, 3)).astype(np.float32).astype(np.float64)
    nodes = [helper.make_node("Relu", ["X"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], ["Y"])]
    p = _save(tmp_path, "kinks", nodes, {"W": W, "shape": np.array([1, 16], dtype=np.int64)}, [1, 1, 8, 8], [1, 3])
    m = M.load(str(p))
    for seed in range(3):
        r = verify(m, torch.from_numpy(X), directions=2, seed=seed)
        assert r.verdict != "fail", r.directions
        assert all(d.status != "fail" for d in r.directions)
        for d in r.directions:
            if d.status == "pass" and d.reference == "model-float64":
                assert d.steps[0] <= 1e-4  # the evidence is at a step far below the kinks' distance
    # float64 truth: d/dX of MaxPool(Relu(X)).W at X is the argmax mask (X > 0) times W
    x64 = X.astype(np.float64)[0, 0]
    Jt = np.zeros((3, 64))
    for i in range(4):
        for j in range(4):
            blk = x64[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            a, b = np.unravel_index(np.argmax(blk), blk.shape)
            if blk[a, b] > 0:
                Jt[:, (2 * i + a) * 8 + 2 * j + b] = W[4 * i + j]
    from jacaudit.engine.core import prepare

    t = prepare(m, torch.from_numpy(X), dtype="float64")
    v = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 1, 8, 8)))
    np.testing.assert_allclose(t.jvp(v).numpy().ravel(), Jt @ v.numpy().ravel(), rtol=1e-10, atol=1e-12)


# -- 3. the forward check's absolute floor ------------------------------------------------------------------------
def test_forward_floor_on_near_zero_outputs(tmp_path):
    """Y = (X + 1) - 1 on X ~ 1e-8: float32 onnxruntime quantises it to multiples of 6e-8 (relative error ~0.5),
    the float64 interpreter keeps X: a detector-like near-zero output is no forward failure."""
    X = (np.random.default_rng(0).standard_normal((1, 6)) * 1e-8).astype(np.float32)
    nodes = [helper.make_node("Add", ["X", "one"], ["a"]), helper.make_node("Sub", ["a", "one"], ["Y"])]
    p = _save(tmp_path, "tiny", nodes, {"one": np.ones(1)}, [1, 6], [1, 6])
    r = verify(M.load(str(p)), torch.from_numpy(X), directions=1)
    f = r.forward
    assert f.max_rel > 1e-2  # the old relative-only check failed here
    assert f.passed and f.atol == pytest.approx(64 * 2.0 ** -23) and "absolute floor" in f.note
    assert f.judged_error <= f.tol
    from jacaudit.analyses.verify import verify_metrics

    fm = next(mm for mm in verify_metrics(r) if mm.name == "forward_rel_error")
    assert fm.value == f.judged_error and fm.fail == f.tol


def test_forward_floor_does_not_hide_a_real_forward_bug(tmp_path, monkeypatch):
    """A 1% wrong Tanh on O(1) outputs is 1e-2 absolute, far above the 7.6e-6 floor: still a forward FAIL."""
    from jacaudit.models.onnx import registry
    from tests.test_jacobian import _conv_tanh_onnx

    registry.lookup("Tanh", "", 13)
    monkeypatch.setitem(registry._REGISTRY, ("", "Tanh"), [(1, lambda ctx, x: torch.tanh(x) * 1.01)])
    p = tmp_path / "ct.onnx"
    _conv_tanh_onnx(p)
    r = verify(M.load(str(p)), None, directions=1)
    assert not r.forward.passed and r.forward.max_abs > 100 * r.forward.atol and r.verdict == "fail"


# -- 4. the adjoint at rounding level --------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists(os.path.join(LIGHT, "light_squeezenet.onnx")), reason="no onnx light data")
def test_rounding_level_adjoint_is_skipped_not_failed():
    """light_squeezenet's constant weights make every logit equal: the softmax is exactly uniform and J = 0; jvp
    and vjp return rounding noise (|Jv| ~ 1e-10) that disagreed at 2e-3 vs a 1e-9 tolerance (a FAIL)."""
    m = M.load(os.path.join(LIGHT, "light_squeezenet.onnx"))
    r = verify(m, None, directions=2, retries=0)
    assert r.verdict == "inconclusive", (r.adjoint, r.directions)
    assert r.adjoint.status == "skipped" and "rounding level" in r.adjoint.note
    assert all(d.status == "inconclusive" for d in r.directions)
    assert all(d.jvp_norm < 1e-8 for d in r.directions)


def test_planted_wrong_vjp_still_fails_the_adjoint(monkeypatch):
    """f(z) = A z (closed form: u^T A v both ways); a vjp returning 2 A^T u is linear, so not rounding: FAIL."""
    from jacaudit.engine import core

    A = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 6, dtype=torch.float64)
    f = lambda z: z @ A.T  # noqa: E731
    r = verify(f, x, directions=2)
    assert r.verdict == "pass" and r.adjoint.status == "pass" and r.adjoint.max_rel_error < 1e-12
    real = core.Target.vjp
    monkeypatch.setattr(core.Target, "vjp", lambda self, u: 2 * real(self, u))
    r = verify(f, x, directions=2)
    assert r.adjoint.status == "fail" and not r.adjoint.passed and r.adjoint.tol == 1e-9
    assert r.verdict == "fail"


# -- 5. a planted wrong derivative fails at two step sizes -------------------------------------------------
def test_planted_wrong_derivative_fails_at_two_step_sizes():
    """f(z) = sin(z) with the derivative of z (1 instead of cos z): J v = v, the truth is cos(x) v."""
    x = torch.linspace(0.3, 2.0, 7, dtype=torch.float64)[None]
    r = verify(lambda z: z + (torch.sin(z) - z).detach(), x, directions=2)
    assert r.verdict == "fail"
    for d in r.directions:
        assert d.status == "fail" and d.confirm_steps
        assert d.confirm_steps[0] == pytest.approx(d.steps[0] / 100)
        assert "again at steps" in d.note
    # the truth the differences converge to: ||cos(x) v - v|| / ||v|| is far above any tolerance
    assert all(d.rel_error > 0.1 for d in r.directions)


def test_planted_wrong_onnx_derivative_fails_at_two_step_sizes(tmp_path, monkeypatch):
    from jacaudit.models.onnx import registry
    from tests.test_jacobian import _conv_tanh_onnx

    registry.lookup("Tanh", "", 13)
    monkeypatch.setitem(registry._REGISTRY, ("", "Tanh"), [(1, lambda ctx, x: x + (torch.tanh(x) - x).detach())])
    p = tmp_path / "ct.onnx"
    _conv_tanh_onnx(p)
    r = verify(M.load(str(p)), None, directions=2)
    assert r.verdict == "fail" and r.forward.passed
    for d in r.directions:
        assert d.status == "fail" and d.confirm_steps and "again at steps" in d.note
        assert d.confirm_steps[0] < d.steps[-1]  # the second series is smaller than the first


# -- 6. progress and 7. the tolerances printed are the ones used ------------------------------------------
def test_progress_callback_counts_every_evaluation():
    calls = []
    x = torch.randn(1, 5, dtype=torch.float64)
    r = verify(lambda z: torch.tanh(z) * 2, x, directions=3, progress=lambda d, t: calls.append((d, t)))
    assert r.verdict == "pass"
    done = [d for d, _ in calls]
    assert done == sorted(done) and all(d <= t for d, t in calls)
    assert calls[-1][0] == calls[-1][1] >= 1 + 3 * (2 + 9)  # forward + per direction jvp, vjp, 9 evaluations


def test_cli_thresholds_are_the_tolerances_used(tmp_path):
    from tests.test_jacobian import _conv_tanh_onnx

    p = tmp_path / "ct.onnx"
    _conv_tanh_onnx(p)
    res = CliRunner().invoke(app, ["verify", str(p), "--json", "-k", "2"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    r, checks = d["result"], {c["id"]: c for c in d["checks"]}
    for x in r["directions"]:
        assert checks[f"verify.derivative_rel_error[dir {x['index']}]"]["fail"] == x["tol"]
    assert checks["verify.adjoint_rel_error[model]"]["fail"] == r["adjoint"]["tol"] == r["tolerances"]["adjoint"]
    assert checks["verify.forward_rel_error[model]"]["fail"] == r["forward"]["tol"]
