"""`jacaudit gradflow` against truths that share no code with it: chains of layers built here with onnx.helper whose
per-block spectral norms are known by construction (W = Q1 diag(s) Q2^T), brute-force Jacobians of a torch
re-implementation (torch.autograd.functional.jacobian, float64), a saturated-sigmoid chain flagged as vanishing and
its residual twin not."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as H
from onnx import numpy_helper as NH
from typer.testing import CliRunner

from jacaudit.cli.main import app
from jacaudit.results import validate

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _cli(args, code=0):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


def _save(path, nodes, inits, n_in, n_out):
    g = H.make_graph(nodes, "chain", [H.make_tensor_value_info("x", TP.FLOAT, [1, n_in])],
                     [H.make_tensor_value_info("y", TP.FLOAT, [1, n_out])], inits)
    onnx.save(H.make_model(g, opset_imports=[H.make_opsetid("", 17)]), str(path))
    return path


def _with_singular_values(rng, m, n, s):
    Q1, _ = np.linalg.qr(rng.standard_normal((m, m)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    S = np.zeros((m, n))
    S[np.arange(len(s)), np.arange(len(s))] = s
    return Q1 @ S @ Q2.T


def test_linear_chain_known_block_norms(tmp_path):
    """x (1x5) -> h1 = x W1 -> h2 = h1 W2 -> y = h2 W3; the block Jacobians are W_l^T, spectral norms by
    construction 3, 0.5, 2; ||dy/dh_l||_F is the Frobenius norm of the product of the later W's."""
    rng = np.random.default_rng(0)
    dims = [5, 6, 4, 3]
    tops = [3.0, 0.5, 2.0]
    Ws = [_with_singular_values(rng, dims[i], dims[i + 1], [tops[i], *np.linspace(0.9, 0.2, min(dims[i:i + 2]) - 1)
                                                            * tops[i]]) for i in range(3)]
    names = ["x", "h1", "h2", "y"]
    nodes = [H.make_node("MatMul", [names[i], f"W{i}"], [names[i + 1]]) for i in range(3)]
    inits = [NH.from_array(W.astype(np.float64).astype(np.float32), f"W{i}") for i, W in enumerate(Ws)]
    p = _save(tmp_path / "lin.onnx", nodes, inits, 5, 3)
    r = _cli(["gradflow", p, "--dtype", "float64", "--power-iters", "300", "--json", "--out", tmp_path / "r",
              "--format", "json,html,junit"])
    d = json.loads(r.stdout)
    validate(d)
    res = d["result"]
    assert [x["tensor"] for x in res["depths"]] == ["x", "h1", "h2"]  # the main path, found automatically
    Wf = [W.astype(np.float32).astype(np.float64) for W in Ws]
    for b, W in zip(res["blocks"], Wf):
        assert b["spectral_norm"] == pytest.approx(np.linalg.norm(W, 2), rel=1e-8) and b["converged"]
    np.testing.assert_allclose([b["running_product"] for b in res["blocks"]],
                               np.cumprod([np.linalg.norm(W, 2) for W in Wf]), rtol=1e-8)
    # d y / d h_l = (W_l ... W_3)^T: Frobenius norms in closed form
    expect = [np.linalg.norm(Wf[0] @ Wf[1] @ Wf[2]), np.linalg.norm(Wf[1] @ Wf[2]), np.linalg.norm(Wf[2])]
    np.testing.assert_allclose([x["grad_norm"] for x in res["depths"]], expect, rtol=1e-10)
    assert [x["grad_method"] for x in res["depths"]] == ["exact"] * 3
    assert res["vanishing_ratio"] == pytest.approx(min(e / expect[-1] for e in expect), rel=1e-10)
    assert d["status"] == "pass"
    assert "gradflow" in (tmp_path / "r" / "report.html").read_text()


def _sigmoid_chain(path, residual: bool, L=5, n=6, bias=6.0, seed=0):
    rng = np.random.default_rng(seed)
    nodes, inits, params = [], [], []
    h = "x"
    for l in range(1, L + 1):
        W = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
        b = np.full(n, bias, np.float32)
        params.append((W.astype(np.float64), b.astype(np.float64)))
        inits += [NH.from_array(W, f"W{l}"), NH.from_array(b, f"b{l}")]
        nodes += [H.make_node("MatMul", [h, f"W{l}"], [f"m{l}"]), H.make_node("Add", [f"m{l}", f"b{l}"], [f"a{l}"]),
                  H.make_node("Sigmoid", [f"a{l}"], [f"s{l}"])]
        if residual:
            nodes.append(H.make_node("Add", [h, f"s{l}"], [f"r{l}"]))
            h = f"r{l}"
        else:
            h = f"s{l}"
    Wo = rng.standard_normal((n, 2)).astype(np.float32)
    inits.append(NH.from_array(Wo, "Wo"))
    nodes.append(H.make_node("MatMul", [h, "Wo"], ["y"]))
    return _save(path, nodes, inits, n, 2), params, Wo.astype(np.float64)


def _torch_chain(params, Wo, residual):
    """The same chain in torch float64: blocks[l](h) maps h_l to h_{l+1}; head maps h_L to y."""
    def block(W, b):
        Wt, bt = torch.tensor(W), torch.tensor(b)
        return (lambda h: h + torch.sigmoid(h @ Wt + bt)) if residual else (lambda h: torch.sigmoid(h @ Wt + bt))
    return [block(W, b) for W, b in params], (lambda h: h @ torch.tensor(Wo))


def test_saturated_sigmoid_chain_vanishes_and_is_flagged(tmp_path):
    p, params, Wo = _sigmoid_chain(tmp_path / "sig.onnx", residual=False)
    x = np.random.default_rng(5).standard_normal((1, 6))
    xp = tmp_path / "x.npy"
    np.save(xp, x)
    names = ",".join(f"s{l}" for l in range(1, 5))
    r = _cli(["gradflow", p, "--input", xp, "--layers", names, "--dtype", "float64", "--power-iters", "300",
              "--json", "--out", tmp_path / "r", "--format", "json,junit"], code=1)
    d = json.loads(r.stdout)
    res = d["result"]
    blocks, head = _torch_chain(params, Wo, residual=False)
    seq = blocks[:4] + [lambda h: head(blocks[4](h))]          # x->s1, s1->s2, ..., s3->s4, s4->y
    hs = [torch.tensor(x)]
    for f in seq[:-1]:
        hs.append(f(hs[-1]))
    for lvl, (dp, bk) in enumerate(zip(res["depths"], res["blocks"])):
        def tail(h, k=lvl):
            for f in seq[k:]:
                h = f(h)
            return h
        J = torch.autograd.functional.jacobian(tail, hs[lvl]).reshape(2, -1).numpy()
        assert dp["grad_norm"] == pytest.approx(np.linalg.norm(J), rel=1e-8)
        Jb = torch.autograd.functional.jacobian(seq[lvl], hs[lvl]).reshape(-1, 6).numpy()
        assert bk["spectral_norm"] == pytest.approx(np.linalg.norm(Jb, 2), rel=1e-6)
    assert res["vanishing_ratio"] < 1e-8
    checks = {c["check"]: c for c in d["checks"]}
    assert checks["vanishing_ratio"]["status"] == "fail" and checks["exploding_ratio"]["status"] == "pass"
    assert (tmp_path / "r" / "report.junit.xml").exists()


def test_main_path_through_a_saturated_chain_and_residual_twin_passes(tmp_path):
    """Found automatically in float32 even where the output moves less than its rounding (tangents are used):
    the plain chain's path is every tensor, the residual chain's the block outputs only."""
    p, _, _ = _sigmoid_chain(tmp_path / "sig.onnx", residual=False, L=4)
    r = _cli(["gradflow", p, "--json", "--out", tmp_path / "a", "--format", "json"], code=1)
    res = json.loads(r.stdout)["result"]
    assert [x["tensor"] for x in res["depths"]] == ["x"] + [f"{k}{l}" for l in range(1, 5) for k in "mas"]
    p, _, _ = _sigmoid_chain(tmp_path / "res.onnx", residual=True, L=4)
    r = _cli(["gradflow", p, "--json", "--out", tmp_path / "b", "--format", "json,md"])
    d = json.loads(r.stdout)
    assert "| 4 | r4 |" in (tmp_path / "b" / "report.md").read_text()
    assert [x["tensor"] for x in d["result"]["depths"]] == ["x", "r1", "r2", "r3", "r4"]
    checks = {c["check"]: c for c in d["checks"]}
    assert checks["vanishing_ratio"]["status"] == "pass" and checks["exploding_ratio"]["status"] == "pass"
    assert 0.5 < d["result"]["vanishing_ratio"] <= 1.0 <= d["result"]["exploding_ratio"] < 2.0


def test_torchscript_is_refused_with_one_line(tmp_path):
    r = _cli(["gradflow", ROOT / "sample_models/arm/arm.pt", "--shape", "1,3", "--out", tmp_path / "r"], code=2)
    assert "internal tensors" in r.output
