"""``verify``: passes on correct models, fails on a deliberately broken op, reports kinks and quantised graphs as
non-differentiable. Light graphs (onnx's backend data, random weights substituted): tests/test_verify_light.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import jacaudit.models as M
from jacaudit.cli.main import app
from jacaudit.engine.verify import verify
from tests.test_jacobian import _conv_tanh_onnx

torch.set_num_threads(1)


def test_verify_onnx_passes_against_onnxruntime(tmp_path):
    p = tmp_path / "ct.onnx"
    _conv_tanh_onnx(p)
    r = verify(M.load(str(p)), None, directions=2)
    assert r.verdict == "pass", r
    assert r.forward.reference == "onnxruntime" and r.forward.max_rel < 1e-5
    assert all(d.status == "pass" for d in r.directions)
    assert r.adjoint.passed


def test_verify_torchscript_uses_the_model_itself(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    p = tmp_path / "m.pt"
    torch.jit.script(net).save(str(p))
    r = verify(M.load(str(p)), torch.randn(1, 6), directions=2)
    assert r.verdict == "pass"
    assert r.forward.reference == "none"
    assert all(d.reference == "model-float64" and d.rel_error < 1e-8 for d in r.directions)


@pytest.mark.parametrize("kind", ["gradient", "forward"])
def test_verify_fails_on_a_broken_op(tmp_path, monkeypatch, kind):
    """A monkeypatched Tanh: a wrong derivative with an exact forward, or a wrong forward."""
    from jacaudit.models.onnx import registry

    if kind == "gradient":
        def broken(ctx, x):
            return x + (torch.tanh(x) - x).detach()  # forward exact, derivative 1 instead of 1 - tanh^2
    else:
        def broken(ctx, x):
            return torch.tanh(x) * 1.01
    # register every op family first (the interpreter's import does), or their import, when this test runs
    # first, registers the real Tanh after the patch
    import jacaudit.models.onnx.interpreter  # noqa: F401
    assert registry.lookup("Tanh", "", 13) is not None
    monkeypatch.setitem(registry._REGISTRY, ("", "Tanh"), [(1, broken)])
    p = tmp_path / "ct.onnx"
    _conv_tanh_onnx(p)
    r = verify(M.load(str(p)), None, directions=2)
    assert r.verdict == "fail"
    if kind == "gradient":
        assert r.forward.passed and all(d.status == "fail" for d in r.directions)
    else:
        assert not r.forward.passed
    res = CliRunner().invoke(app, ["verify", str(p), "--json", "-k", "1"])
    assert res.exit_code == 1, res.output
    assert json.loads(res.stdout)["result"]["verdict"] == "fail"


def test_cli_verify_passes(tmp_path):
    p = tmp_path / "ct.onnx"
    _conv_tanh_onnx(p)
    res = CliRunner().invoke(app, ["verify", str(p), "-k", "1"])
    assert res.exit_code == 0, res.output
    assert "verdict: PASS" in res.stdout


def test_relu_kink_is_reported_not_failed():
    x = torch.tensor([[0.0, 1.0, -1.0, 0.0, 2.0]], dtype=torch.float64)  # two units sit on the kink
    r = verify(lambda z: torch.relu(z) * 3, x, directions=3, retries=0)
    assert r.verdict == "inconclusive"  # no direction gave evidence: never a pass
    assert all(d.status == "non-differentiable" for d in r.directions)
    assert "kink" in r.directions[0].note
    # with the retry budget, a nearby point (off the kink) gives the evidence, and the report says so
    r = verify(lambda z: torch.relu(z) * 3, x, directions=3)
    at_x = [d for d in r.directions if d.point == "x"]
    assert all(d.status == "non-differentiable" and "kink" in d.note for d in at_x)
    near = [d for d in r.directions if d.point == "nearby"]
    assert near and near[0].status == "pass" and near[0].retry_of == 0
    assert r.verdict == "pass" and any("nearby point" in w for w in r.warnings)


def test_quantised_graph_is_reported_not_failed():
    x = torch.linspace(-1, 1, 50, dtype=torch.float64)[None] + 1e-3
    r = verify(lambda z: torch.round(z * 2000) / 2000, x, directions=2)
    assert r.verdict == "inconclusive"
    assert all(d.status == "non-differentiable" for d in r.directions)


def test_zero_derivative_is_no_evidence():
    """J v = 0 and the differences = 0 along every direction (e.g. a float token id feeding a lookup):
    agreement, but no evidence that a nonzero derivative would be right -> inconclusive, never pass."""
    x = torch.randn(1, 5, dtype=torch.float64)
    r = verify(lambda z: torch.ones(1, 3, dtype=z.dtype) * 2 + 0 * z.sum(), x, directions=2)  # constant in z
    assert r.verdict == "inconclusive"
    assert all(d.status == "inconclusive" and "exactly 0" in d.note for d in r.directions)
    from jacaudit.analyses.verify import verify_metrics
    from jacaudit.gate import evaluate, report_status

    checks = evaluate("verify", verify_metrics(r))
    assert {c.status for c in checks if c.check == "derivative_rel_error"} == {"skipped"}
    assert report_status(checks) == "pass"  # nothing failed; the runner reports it as inconclusive


def test_rounding_floor_tolerance_never_grants_a_pass():
    """A tiny derivative on a huge output: the differences' rounding floor would allow any error (tolerance ~3).
    Such a direction is judged at the 0.05 cap or called inconclusive -- a wrong derivative cannot pass there."""
    x = torch.randn(1, 4, dtype=torch.float64)
    r = verify(lambda z: 1e9 + 1e-7 * z * 2, x, directions=2)
    assert r.verdict in ("inconclusive", "pass")
    assert all(d.tol <= 0.05 or d.status == "inconclusive" for d in r.directions)
    assert all(d.status != "pass" or d.rel_error <= 0.05 for d in r.directions)
    # the same derivative, wrong by a factor 2 (detached half): never a pass
    r = verify(lambda z: 1e9 + 1e-7 * (z + z.detach()), x, directions=2)
    assert r.verdict != "pass" and all(d.status != "pass" for d in r.directions)


def test_forward_floor_follows_the_graphs_measured_float32_rounding(tmp_path):
    """y = (x W + 1e4) - 1e4: small outputs out of large intermediates. onnxruntime's float32 forward carries the
    rounding of the 1e4 terms (~1e-3 absolute), far above 64 ulps of |y| ~ 1: a correct graph must not fail the
    forward check; the floor is this graph's own float32-vs-float64 rounding, measured (x16), and said."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    W = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "big"], ["a"]),
         helper.make_node("Sub", ["a", "big"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.full(3, 1e4, np.float32), "big")])
    p = tmp_path / "cancel.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    x = torch.tensor(np.random.default_rng(1).uniform(-0.3, 0.3, (1, 6)), dtype=torch.float32)
    r = verify(M.load(str(p)), x, directions=1)
    f = r.forward
    assert f.max_rel > 1e-4  # the reference's own rounding: the old relative check failed here
    assert f.passed and "float32 rounding" in f.note, f
