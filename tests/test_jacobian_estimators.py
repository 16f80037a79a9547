"""jacobian's estimators from the CLI (issue 9, finding 10) against closed forms of a linear map y = x W
(||W||_F, svdvals(W)); the memory budget holds J and a chunk's working memory, and a J over it is refused
with exit 2, the size needed and the estimator options (finding 8)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh
from typer.testing import CliRunner

from jacaudit.cli.main import app

M_OUT, N_IN = 40, 50


def _linear(path, seed=0):
    W = np.random.default_rng(seed).normal(0, 1, (N_IN, M_OUT)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"])], "lin",
                     [h.make_tensor_value_info("x", TP.FLOAT, [1, N_IN])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [1, M_OUT])], [nh.from_array(W, "W")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path, W.astype(np.float64)


def _run(args, code=0):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


def _metric(rep, name):
    (m,) = [m for m in rep["metrics"] if m["name"] == name]
    return m


def test_frobenius_hutchinson_and_top_k_match_closed_forms(tmp_path):
    path, W = _linear(tmp_path / "lin.onnx")
    fro = np.linalg.norm(W)
    sv = np.linalg.svd(W, compute_uv=False)
    rep = json.loads(_run(["jacobian", path, "--frobenius", "--probes", "16", "--top-k", "3", "--json"]).stdout)
    r = rep["result"]
    assert r["estimated"] and r["largest"] == [] and r["computation"]["bytes"] == 0
    f = r["frobenius"]
    assert f["method"] == "hutchinson" and f["probes"] == 16 and 0 < f["stderr"] < 0.5 * fro
    assert abs(f["value"] - fro) <= 4 * f["stderr"]
    m = _metric(rep, "frobenius_norm")
    assert m["value"] == pytest.approx(f["value"])
    top = [t["value"] for t in r["top_singular"]]
    np.testing.assert_allclose(top, sv[:3], rtol=1e-4)
    assert all(t["residual"] < 1e-3 for t in r["top_singular"])
    assert r["spectral"]["method"] == "power-iteration" and r["spectral"]["value"] == pytest.approx(sv[0], rel=1e-4)
    assert _metric(rep, "spectral_norm")["value"] == pytest.approx(sv[0], rel=1e-4)
    # enough probes for the small side: the exact value at the same cost
    rep = json.loads(_run(["jacobian", path, "--frobenius", "--probes", "64", "--json"]).stdout)
    assert rep["result"]["frobenius"]["method"] == "exact"
    assert rep["result"]["frobenius"]["value"] == pytest.approx(fro, rel=1e-5)
    assert rep["result"]["spectral"]["method"] == "none"


def test_too_big_for_the_budget_names_the_estimators(tmp_path):
    path, _ = _linear(tmp_path / "lin.onnx")
    r = _run(["jacobian", path, "--max-memory", "4KiB"], code=2)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "--frobenius" in err[0] and "--top-k" in err[0] and "KiB" in err[0], r.stderr
    assert "Traceback" not in r.output
    # the estimators run under the same budget: J is never built
    _run(["jacobian", path, "--max-memory", "4KiB", "--top-k", "1"])


def test_chunks_fit_the_budget_with_the_activations():
    """A conv model whose activations dwarf its input: the chunk is sized by them (the old heuristic, 4 input
    sizes per row, took every row at once and used 5.8 GB for a 1 GiB budget on a 295k-input model)."""
    from jacaudit.engine.core import activation_bytes, full_jacobian, prepare

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 64))
    x = torch.rand(1, 3, 32, 32)
    t = prepare(conv, x)
    acts = activation_bytes(t)
    assert acts >= 2 * 32 * 32 * 32 * 4  # at least two saved 32-channel maps (ReLU outputs, shared with conv2)
    budget = 8 << 20
    J, info = full_jacobian(t, max_memory=budget)
    assert info.bytes + info.chunk_size * 2 * acts <= budget
    assert 1 <= info.chunk_size < 64
    # correct all the same: row k is the gradient of output k (autograd, one backward per row)
    for k in (0, 63):
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(conv(xx)[0, k], xx)
        torch.testing.assert_close(J[0, k], g, rtol=1e-4, atol=1e-6)
