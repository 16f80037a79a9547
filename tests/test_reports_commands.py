"""Reports of ``jacobian``, ``verify`` and ``inspect``: written into --out (html/json/md), valid against the schema,
HTML rebuilt byte for byte by ``jacaudit render``, strings from the model escaped, verdicts and exit codes kept."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from jacaudit.cli.main import app
from jacaudit.results import from_json, validate

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
X = 'x<script>alert(1)</script>'
Y = 'y<script>alert("y")</script>'
W = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32).astype(np.float64)


def _evil_onnx(path: Path) -> None:
    """Y = tanh(X @ W): tensor, node, graph and producer names carry <script> tags."""
    import onnx

    g = helper.make_graph([helper.make_node("MatMul", [X, "W"], ["h"], name="mm<script>alert(4)</script>"),
                           helper.make_node("Tanh", ["h"], [Y], name="t<b>")], "g<script>alert(5)</script>",
                          [helper.make_tensor_value_info(X, TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info(Y, TensorProto.FLOAT, [1, 3])],
                          [numpy_helper.from_array(W.astype(np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)],
                                producer_name="evil<script>alert(2)</script>"), str(path))


def _unsupported_onnx(path: Path) -> None:
    import onnx

    g = helper.make_graph([helper.make_node("Evil<script>Op", [X], [Y], name="n<script>alert(3)</script>")], "g",
                          [helper.make_tensor_value_info(X, TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info(Y, TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run(*args: str, code: int = 0):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


def _check_reports(out: Path, kind: str, status: str, tmp_path: Path) -> dict:
    """JSON validates; render rebuilds the same HTML (and Markdown); no raw <script> anywhere in the HTML."""
    for ext in ("html", "json", "md"):
        assert (out / f"report.{ext}").is_file(), ext
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    d = json.loads((out / "report.json").read_text(encoding="utf-8"))
    validate(d)
    assert d["kind"] == kind and d["status"] == status
    assert from_json((out / "report.json").read_text(encoding="utf-8")).result.__class__.__name__.endswith("Result")
    html = (out / "report.html").read_text(encoding="utf-8")
    again = tmp_path / f"{kind}-again.html"
    _run("render", out / "report.json", "-o", again)
    assert again.read_text(encoding="utf-8") == html
    md_again = tmp_path / f"{kind}-again.md"
    _run("render", out / "report.json", "-o", md_again)
    assert md_again.read_text(encoding="utf-8") == (out / "report.md").read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert "<script" not in (out / "report.md").read_text(encoding="utf-8").lower()
    return d


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("models") / "evil<script>alert(0)<script>.onnx"
    _evil_onnx(p)
    return p


def test_jacobian_report(evil, tmp_path):
    x = np.array([[0.3, -0.2, 0.1, 0.5]], dtype=np.float32)
    xp = tmp_path / "x.npy"
    np.save(xp, x[0])
    out = tmp_path / "rep"
    r = _run("jacobian", evil, "--input", xp, "--dtype", "float64", "--linearity", "--seed", "3", "--top", "4",
             "--save", "--max-memory", "64MB", "--out", out, "--json")
    d = _check_reports(out, "jacobian", "pass", tmp_path)
    assert json.loads(r.stdout) == d  # --json prints exactly report.json
    res = d["result"]
    # closed form: J = diag(1 - tanh^2(xW)) W^T
    h = x.astype(np.float64) @ W
    J = (1 - np.tanh(h) ** 2).reshape(3, 1) * W.T
    assert res["jacobian_shape"] == [1, 3, 1, 4]
    assert res["frobenius"]["value"] == pytest.approx(np.linalg.norm(J), rel=1e-6)
    assert res["frobenius"]["method"] == "exact"
    assert res["spectral"]["value"] == pytest.approx(np.linalg.svd(J, compute_uv=False)[0], rel=1e-6)
    assert res["spectral"]["method"] == "svd" and res["rank"] == 3
    assert len(res["largest"]) == 4
    assert abs(res["largest"][0]["value"]) == pytest.approx(np.abs(J).max(), rel=1e-6)
    assert res["input_name"] == X and res["output"] == Y and res["synthetic_input"] is False
    assert res["linearity"] and len(res["linearity"]["worst_by_step"]) == len(res["linearity"]["steps"])
    assert res["saved"] == "jacobian.npy" and (out / "jacobian.npy").is_file()
    assert [c["check"] for c in d["checks"]] == ["nonfinite_entries"] and d["checks"][0]["status"] == "pass"
    assert {m["name"] for m in d["metrics"]} >= {"frobenius_norm", "spectral_norm", "condition_number"}
    s = d["settings"]
    assert (s["seed"], s["dtype"], s["device"], s["mode"], s["max_memory"]) == (3, "float64", "cpu", "auto", "64MB")
    assert d["model"]["producer"] and "<script>" in d["model"]["producer"]  # kept verbatim in the JSON
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<svg" in html


def test_jacobian_synthetic_flag_and_formats(tmp_path):
    """TorchScript sample (robot arm, closed form); --format json writes only the JSON."""
    out = tmp_path / "arm"
    _run("jacobian", ROOT / "sample_models/arm/arm.pt", "--shape", "1,3", "--dtype", "float64", "--out", out,
         "--format", "json")
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    d = json.loads((out / "report.json").read_text())
    validate(d)
    res = d["result"]
    assert res["synthetic_input"] is True and res["input_source"] == "synthetic"
    assert any("synthetic" in w for w in d["warnings"])
    assert res["jacobian_shape"] == [1, 3, 1, 3] and d["model"]["format"] == "torchscript"
    # an empty --format writes nothing; an unknown one is a usage error
    _run("jacobian", ROOT / "sample_models/arm/arm.pt", "--shape", "1,3", "--out", tmp_path / "none", "--format", "")
    assert not (tmp_path / "none").exists()
    _run("jacobian", ROOT / "sample_models/arm/arm.pt", "--out", tmp_path / "bad", "--format", "pdf", code=2)


def test_jacobian_softmax_warning(tmp_path):
    """The shortcut sample ends in a Softmax: the report carries the warning (and --logits removes it)."""
    out = tmp_path / "sc"
    _run("jacobian", ROOT / "sample_models/shortcut/shortcut_cnn.onnx", "--out", out, "--format", "json,html")
    d = json.loads((out / "report.json").read_text())
    validate(d)
    assert "Softmax" in d["result"]["softmax_warning"] and d["result"]["softmax_warning"] in d["warnings"]
    assert d["result"]["computation"]["mode"] == "reverse" and d["result"]["jacobian_shape"] == [1, 4, 1, 3, 64, 64]
    assert "Softmax" in (out / "report.html").read_text(encoding="utf-8")


def test_jacobian_spectral_estimate_records_convergence(tmp_path):
    """Above 4096 rows and columns the spectral norm is estimated by power iteration: its convergence is kept."""
    import onnx

    g = helper.make_graph([helper.make_node("Tanh", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4100])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4100])])
    p = tmp_path / "big.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    out = tmp_path / "big"
    _run("jacobian", p, "--out", out, "--format", "json,html", "--top", "3")
    d = json.loads((out / "report.json").read_text())
    validate(d)
    sp = d["result"]["spectral"]
    assert sp["method"] == "power-iteration" and isinstance(sp["converged"], bool) and sp["iterations"] >= 1
    assert 0.5 < sp["value"] <= 1.0 + 1e-6  # max(1 - tanh^2) over a standard-normal input
    assert d["result"]["rank"] is None
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "power-iteration" in html and ("converged" in html)


def test_verify_report_pass(evil, tmp_path):
    out = tmp_path / "v"
    r = _run("verify", evil, "-k", "2", "--seed", "1", "--forward-tol", "1e-3", "--out", out)
    assert "verdict: PASS" in r.stdout
    d = _check_reports(out, "verify", "pass", tmp_path)
    res = d["result"]
    assert res["verdict"] == "pass" and len(res["directions"]) == 2
    assert res["forward"]["reference"] == "onnxruntime" and res["forward"]["max_rel"] < 1e-5
    assert all(x["status"] == "pass" and x["fd_norm"] > 0 and len(x["steps"]) == 4 for x in res["directions"])
    assert res["adjoint"]["passed"] and res["tolerances"]["forward"] == 1e-3
    s = d["settings"]
    assert (s["seed"], s["dtype"], s["directions"], s["forward_tol"]) == (1, "float64", 2, 1e-3)
    assert d["exit_code"] == 0


@pytest.mark.parametrize("kind", ["gradient", "forward"])
def test_verify_failing_run_writes_a_fail_report(evil, tmp_path, monkeypatch, kind):
    from jacaudit.models.onnx import registry

    if kind == "gradient":
        def broken(ctx, x):
            return x + (torch.tanh(x) - x).detach()  # exact forward, derivative 1
    else:
        def broken(ctx, x):
            return torch.tanh(x) * 1.01
    registry.lookup("Tanh", "", 13)  # op families loaded first (their import would re-register Tanh)
    monkeypatch.setitem(registry._REGISTRY, ("", "Tanh"), [(1, broken)])
    out = tmp_path / "v"
    _run("verify", evil, "-k", "1", "--out", out, code=1)
    d = _check_reports(out, "verify", "fail", tmp_path)
    assert d["exit_code"] == 1 and d["result"]["verdict"] == "fail"
    checks = {c["id"]: c["status"] for c in d["checks"]}
    if kind == "gradient":
        assert d["result"]["forward"]["passed"] and d["result"]["directions"][0]["status"] == "fail"
        assert checks["verify.derivative_rel_error[dir 0]"] == "fail"
        assert checks["verify.forward_rel_error[model]"] == "pass"
        assert "fail" in (out / "report.md").read_text()
    else:
        assert not d["result"]["forward"]["passed"]
        assert checks["verify.forward_rel_error[model]"] == "fail"
    # --exit-zero reports without failing the build
    _run("verify", evil, "-k", "1", "--out", tmp_path / "v0", "--exit-zero", code=0)
    assert json.loads((tmp_path / "v0" / "report.json").read_text())["status"] == "fail"


def test_inspect_reports(tmp_path):
    out = tmp_path / "i"
    _run("inspect", ROOT / "sample_models/sequence/sequence.onnx", "--out", out)
    d = _check_reports(out, "inspect", "pass", tmp_path)
    res = d["result"]
    assert res["supported"] and res["opset"] == {"ai.onnx": 17} and res["parameters"] > 0
    assert res["inputs"][0]["dtype"] == "int64" and not res["inputs"][0]["differentiable"]
    assert res["nodes"] == sum(o["count"] for o in res["op_histogram"])
    assert any("wrt" in n for n in res["notes"])
    assert [(c["id"], c["status"]) for c in d["checks"]] == [("inspect.unsupported_ops[model]", "pass")]


def test_inspect_unsupported_op_writes_a_fail_report(tmp_path):
    p = tmp_path / "unsup.onnx"
    _unsupported_onnx(p)
    out = tmp_path / "i"
    _run("inspect", p, "--out", out, code=1)  # a failing check
    d = _check_reports(out, "inspect", "fail", tmp_path)
    assert d["exit_code"] == 1 and not d["result"]["supported"]
    assert d["checks"][0]["status"] == "fail" and "Evil<script>Op" in d["checks"][0]["message"]
    u = d["result"]["unsupported_ops"][0]
    assert u["op_type"] == "Evil<script>Op" and u["nodes"] == ["n<script>alert(3)</script>"]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Evil&lt;script&gt;Op" in html
