"""`jacaudit robustness` against closed forms on linear models (FGSM perturbation, margin change, flip rates,
minimal flipping epsilon, Jacobian norms), the gate end to end (exit codes, JUnit, a planted regression against a
baseline, identical JSON on reruns), gradient-masking symptoms on models built to show them, and the data rules.

Truths: a linear classifier z = W x + b has J = W everywhere, so ||J||_F = ||W||_F and ||J||_2 = sigma_max(W);
for two classes the cross-entropy gradient is p_other * (w_other - w_label), so FGSM's step is
eps * sign(w_other - w_label), the margin changes by exactly -eps * ||w_label - w_other||_1 (no clipping inside the
box), an input flips iff its margin is below that, and the minimal flipping L-inf epsilon is
margin / ||w_label - w_other||_1 (PGD cannot do better than the corner of the box).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from jacaudit.cli.main import app
from jacaudit.results import validate

ROOT = Path(__file__).resolve().parents[1]


def _run(args, code=0):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


def _linear_onnx(path: Path, W: np.ndarray, b: np.ndarray, *, softmax: bool = False, round_to: float | None = None,
                 out_shape: list | None = None) -> Path:
    """z = x W^T + b (x: (N, d)); optionally x rounded to a grid first (a piecewise-constant model), a final
    Softmax, or a reshape of the output (a non-classifier output)."""
    K, d = W.shape
    nodes, inits = [], [numpy_helper.from_array(W.T.astype(np.float32), "Wt"),
                        numpy_helper.from_array(b.astype(np.float32), "b")]
    src = "x"
    if round_to is not None:
        inits += [numpy_helper.from_array(np.array(1.0 / round_to, np.float32), "inv"),
                  numpy_helper.from_array(np.array(round_to, np.float32), "step")]
        nodes += [helper.make_node("Mul", ["x", "inv"], ["xs"]), helper.make_node("Round", ["xs"], ["xr"]),
                  helper.make_node("Mul", ["xr", "step"], ["xq"])]
        src = "xq"
    nodes += [helper.make_node("MatMul", [src, "Wt"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logits"])]
    out = "logits"
    oshape: list = ["N", K]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
        out = "probs"
    if out_shape is not None:
        inits.append(numpy_helper.from_array(np.array([-1, *out_shape], np.int64), "shp"))
        nodes.append(helper.make_node("Reshape", [out, "shp"], ["boxes"]))
        out, oshape = "boxes", ["N", *out_shape]
    g = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, oshape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def _data(path: Path, n: int = 48, d: int = 6, seed: int = 0, labels=None) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.3, 0.7, size=(n, d)).astype(np.float32)
    arrays = {"x": x}
    if labels is not None:
        arrays["y"] = np.asarray(labels(x), dtype=np.int64)
    np.savez(path, **arrays)
    return path, x


W2 = np.array([[1.0, -2.0, 0.5, 3.0, -1.0, 0.25], [-0.5, 1.0, 2.0, -1.0, 1.5, -0.75]])
B2 = np.array([0.1, -0.1])


def _report(tmp_path: Path, model: Path, data: Path, *extra, code=0, name="r") -> dict:
    out = tmp_path / name
    r = _run(["robustness", model, data, "--out", out, "--json", "--format", "json", *extra], code=code)
    d = json.loads(r.stdout)
    validate(d)
    return d


def test_linear_fgsm_pgd_and_norms_match_closed_forms(tmp_path):
    model = _linear_onnx(tmp_path / "lin.onnx", W2, B2)
    x_all = np.random.default_rng(0).uniform(0.3, 0.7, size=(48, 6))
    z = x_all @ W2.T + B2
    data, x = _data(tmp_path / "d.npz", labels=lambda x: (x @ W2.T + B2).argmax(1))  # labels = the truth
    eps = [0.01, 0.03, 0.1]
    d = _report(tmp_path, model, data, "--eps", ",".join(map(str, eps)), "--bisect", "8", "--pgd-norm", "linf,l2")
    r = d["result"]
    z = x.astype(np.float64) @ W2.T + B2
    y = z.argmax(1)
    m0 = np.abs(z[:, 0] - z[:, 1])
    dw1 = np.abs(W2[0] - W2[1]).sum()
    dw2 = np.linalg.norm(W2[0] - W2[1])
    assert r["range"] == [0.0, 1.0] and r["clean_accuracy"] == 1.0 and r["labels_source"] == "the npz array y"
    by = {(p["attack"], p["eps"]): p for p in r["sweep"]}
    for e in eps:
        truth = float(np.mean(m0 < e * dw1))
        f = by[("fgsm", e)]
        assert f["flip_rate"] == pytest.approx(truth) and f["robust_accuracy"] == pytest.approx(1 - truth)
        # the margin changes by exactly -eps ||dw||_1, and the first-order prediction is exact for a linear model
        assert f["actual_margin_change"] == pytest.approx(-e * dw1, rel=1e-4)
        assert f["predicted_margin_change"] == pytest.approx(-e * dw1, rel=1e-4)
        assert f["linearization_error"] < 1e-3
        assert by[("pgd-linf", e)]["flip_rate"] == pytest.approx(truth)
        assert by[("pgd-linf", e)]["mean_margin_drop"] == pytest.approx(e * dw1, rel=1e-4)
    for e2 in r["eps_l2"]:  # PGD-L2: optimum -eps ||dw||_2; count only inputs clear of the boundary
        p = by[("pgd-l2", e2)]
        clear = np.abs(m0 - e2 * dw2) > 0.1 * e2 * dw2
        assert e2 == pytest.approx(eps[r["eps_l2"].index(e2)] * np.sqrt(6))
        lo = np.mean((m0 < e2 * dw2) & clear)
        hi = np.mean((m0 < e2 * dw2) | ~clear)
        assert lo - 1e-9 <= p["flip_rate"] <= hi + 1e-9
    # minimal flipping epsilon: margin / ||dw||_1, bracketed by the bisection
    exact = m0 / dw1
    for i, inp in enumerate(r["inputs"]):
        v = inp["pgd_flip_eps"]
        if exact[i] > max(eps):
            assert v is None
            continue
        k = int(np.searchsorted(eps, exact[i]))
        width = (eps[k] - (eps[k - 1] if k else 0.0)) / 2 ** 8
        assert exact[i] - 1e-6 <= v <= exact[i] + width + 1e-6, (i, v, exact[i])
        assert inp["label"] == y[i]
    # J = W: Frobenius and spectral norms, and every observed ratio below sigma_max
    s = np.linalg.svd(W2, compute_uv=False)
    nm = r["norms"]
    assert nm["frobenius"]["mean"] == pytest.approx(np.linalg.norm(W2), rel=1e-5)
    assert nm["frobenius"]["max"] == pytest.approx(np.linalg.norm(W2), rel=1e-5)
    assert nm["spectral"]["max"] == pytest.approx(s[0], rel=1e-4)
    assert nm["frobenius_sq_mean"] == pytest.approx(np.linalg.norm(W2) ** 2, rel=1e-5)
    assert nm["observed_ratio_max"] <= s[0] * (1 + 1e-4)
    assert all(inp["singular_values"] == pytest.approx(list(s), rel=1e-4) for inp in r["inputs"])
    # the top right singular vector, saved as an artifact, is W's
    v1 = np.load(tmp_path / "r" / r["directions"][0]["npy"]).reshape(-1)
    vt = np.linalg.svd(W2)[2][0]
    assert abs(float(v1 @ vt)) == pytest.approx(1.0, abs=1e-4)
    metrics = {m["id"]: m["value"] for m in d["metrics"]}
    assert metrics[f"robustness.robust_accuracy@eps=0.03[dataset]"] == pytest.approx(1 - np.mean(m0 < 0.03 * dw1))
    assert metrics["robustness.lipschitz_max[dataset]"] == pytest.approx(s[0], rel=1e-4)
    assert d["status"] == "pass", [c for c in d["checks"] if c["status"] != "pass"]


def test_gate_exit_codes_junit_baseline_and_determinism(tmp_path):
    import junitparser

    data, _ = _data(tmp_path / "d.npz")  # no labels: each model's own predictions
    # a linear model flips an input iff margin < eps ||dw||_1: the brittle one has the data near its boundary,
    # the robust one far from it (every input at distance ~4.7 in L-inf, eps at most 0.03)
    robust = _linear_onnx(tmp_path / "robust.onnx", W2 * 0.1, np.array([5.0, 0.0]))
    brittle = _linear_onnx(tmp_path / "brittle.onnx", W2, B2)
    gate = ["--fail-on", "robust_accuracy@eps=0.03<0.8", "--eps", "0.003,0.01,0.03"]
    ok = _report(tmp_path, robust, data, *gate, "--junit", tmp_path / "ok.xml", name="ok")
    bad = _report(tmp_path, brittle, data, *gate, "--junit", tmp_path / "bad.xml", name="bad", code=1)
    assert ok["status"] in ("pass", "warn") and bad["status"] == "fail"
    failing = [c for c in bad["checks"] if c["status"] == "fail"]
    assert [c["id"] for c in failing] == ["robustness.robust_accuracy@eps=0.03[dataset]"]
    suite = junitparser.JUnitXml.fromfile(str(tmp_path / "bad.xml"))
    assert sum(s.failures for s in suite) == 1
    assert sum(s.failures for s in junitparser.JUnitXml.fromfile(str(tmp_path / "ok.xml"))) == 0
    # a planted regression: the brittle model against the robust one's report
    reg = _report(tmp_path, brittle, data, "--eps", "0.003,0.01,0.03", "--baseline-report",
                  tmp_path / "ok" / "report.json", "--max-regression", "0.1", name="reg", code=1)
    ids = {c["id"] for c in reg["baseline"]["regressions"]}
    assert "robustness.robust_accuracy@eps=0.03[dataset]" in ids and "robustness.lipschitz_p95[dataset]" in ids
    # --exit-zero reports the failure and exits 0
    z = _report(tmp_path, brittle, data, *gate, "--exit-zero", name="z")
    assert z["status"] == "fail" and z["exit_code"] == 0
    # deterministic: a rerun gives the same JSON apart from timings, time stamps and the output folder
    again = _report(tmp_path, brittle, data, *gate, "--junit", tmp_path / "bad2.xml", name="bad", code=1)

    def strip(d):
        d = json.loads(json.dumps(d))
        for k in ("timings", "created", "command_line"):
            d.pop(k, None)
        return d
    assert strip(again) == strip(bad)


def test_images_folder_softmax_model_and_masking_free_cnn(tmp_path):
    """The sample CNN on a labelled image folder: labels from sub-folders, pictures in the report."""
    import shutil

    data = tmp_path / "imgs"
    classes = (ROOT / "sample_models/shapes/labels.txt").read_text().split()
    for f in sorted((ROOT / "sample_models/shapes/examples").glob("*.png")):
        if f.stem.endswith("_mask"):
            continue
        cls = f.stem.split("_", 1)[1]
        (data / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / cls / f.name)
    d = _report(tmp_path, ROOT / "sample_models/shapes/shapes_cnn.onnx", data, "--eps", "0.003,0.03",
                "--norm-limit", "2", "--pgd-steps", "5", "--format", "json,html")
    r = d["result"]
    assert r["labels_source"] == "sub-folder names" and r["classes"] == classes
    assert r["units"].startswith("pixel value") and r["input_kind"] == "image"
    assert r["examples"] and r["examples"][0]["original"]["data"] and r["directions"][0]["image"]
    assert r["norms"]["inputs_measured"] == 2
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Robust accuracy vs epsilon" in html and "<svg" in html
    masking = {f["name"]: f["flagged"] for f in r["masking"]}
    assert not any(masking.values()), masking


def test_probability_outputs_attack_the_logits_or_their_log(tmp_path):
    data, _ = _data(tmp_path / "d.npz")
    soft = _linear_onnx(tmp_path / "soft.onnx", W2, B2, softmax=True)
    d = _report(tmp_path, soft, data, "--eps", "0.01,0.03")
    assert d["result"]["score"] == "logit" and d["result"]["score_tensor"] == "logits"
    # refusing the logits: the probabilities are attacked through their log, and that is a warning
    d2 = _report(tmp_path, soft, data, "--eps", "0.01,0.03", "--score", "output", name="p")
    assert d2["result"]["score"] == "log-probability"
    chk = {c["check"]: c["status"] for c in d2["checks"]}
    assert chk["masking_probability_outputs"] == "warn" and d2["status"] == "warn"
    # log-softmax of W x + b has the same FGSM step as the logits: the same flips
    f1 = [p["flip_rate"] for p in d["result"]["sweep"]]
    f2 = [p["flip_rate"] for p in d2["result"]["sweep"]]
    assert f1 == f2


def test_piecewise_constant_model_is_flagged_never_robust(tmp_path):
    """Rounding the input to a grid: autodiff sees zero gradients, the attacks go nowhere; the report must say
    masking (and exit 4: no input has a usable gradient), not 'robust'."""
    data, _ = _data(tmp_path / "d.npz")
    q = _linear_onnx(tmp_path / "q.onnx", W2, B2, round_to=0.25)
    d = _report(tmp_path, q, data, "--eps", "0.01,0.03", code=4)
    assert d["status"] == "inconclusive"
    chk = {c["check"]: c["status"] for c in d["checks"]}
    assert chk["masking_zero_gradients"] == "warn"
    assert chk["masking_huge_eps_accuracy"] == "warn"  # PGD at half the range leaves the accuracy up
    flagged = {f["name"] for f in d["result"]["masking"] if f["flagged"]}
    assert {"zero_gradients", "huge_eps_survives"} <= flagged


def test_refusals_are_one_line(tmp_path):
    data, _ = _data(tmp_path / "d.npz")
    det = _linear_onnx(tmp_path / "det.onnx", np.random.default_rng(1).normal(size=(8, 6)), np.zeros(8),
                       out_shape=[2, 4])
    r = _run(["robustness", det, data, "--out", tmp_path / "o"], code=2)
    assert "attacks a classifier" in r.output and "Traceback" not in r.output
    lin = _linear_onnx(tmp_path / "lin.onnx", W2, B2)
    r = _run(["robustness", lin, data, "--eps", "0.01,abc"], code=2)
    assert "epsilon 'abc'" in r.output
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 6), np.float32), y=np.array([0, 1, 2, 0]))
    r = _run(["robustness", lin, bad], code=2)
    assert "out of range" in r.output
    r = _run(["robustness", lin, tmp_path / "missing.npz"], code=2)
    assert "no such file" in r.output
    # a rank-0 output (a graph summing everything): one score for the whole batch, no classes to attack
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("ReduceSum", ["m"], ["y"], keepdims=0)]
    g = helper.make_graph(nodes, "r0", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                          [numpy_helper.from_array(np.ones((6, 1), np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "r0.onnx"))
    r = _run(["robustness", tmp_path / "r0.onnx", data], code=2)
    assert "at least two class scores" in r.output and "Traceback" not in r.output


def test_labels_csv_unknown_class_and_limit(tmp_path):
    from PIL import Image

    data = tmp_path / "flat"
    data.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{k}.png")
        names.append(f"{k}.png")
    (data / "labels.csv").write_text("file,label\n" + "".join(f"{n},{['circle', 'square'][i % 2]}\n"
                                                              for i, n in enumerate(names)))
    cnn = ROOT / "sample_models/shapes/shapes_cnn.onnx"
    d = _report(tmp_path, cnn, data, "--eps", "0.01", "--pgd-norm", "", "--norm-limit", "0", "--limit", "4")
    r = d["result"]
    assert r["labels_source"].startswith("labels.csv") and r["n_inputs"] == 4 and r["n_total"] == 6
    assert [i["label"] for i in r["inputs"]] == [[0, 1][int(i["name"][0]) % 2] for i in r["inputs"]]
    d2 = _report(tmp_path, cnn, data, "--eps", "0.01", "--pgd-norm", "", "--norm-limit", "0", "--limit", "4",
                 name="again")
    assert [i["name"] for i in d2["result"]["inputs"]] == [i["name"] for i in r["inputs"]]  # seeded subset
    (data / "labels.csv").write_text("file,label\n" + "".join(f"{n},hexagon\n" for n in names))
    r = _run(["robustness", cnn, data], code=2)
    assert "'hexagon' is neither a class index nor a class name" in r.output


def test_csv_table_with_label_column(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.uniform(0.3, 0.7, size=(20, 6))
    y = (x @ W2.T + B2).argmax(1)
    p = tmp_path / "t.csv"
    p.write_text("a,b,c,d,e,f,label\n" + "".join(",".join(f"{v:.6f}" for v in row) + f",{c}\n"
                                                  for row, c in zip(x, y)))
    lin = _linear_onnx(tmp_path / "lin.onnx", W2, B2)
    d = _report(tmp_path, lin, p, "--eps", "0.01", "--range", "0,1")
    r = d["result"]
    assert r["labels_source"] == "the CSV column 'label'" and r["clean_accuracy"] == 1.0
    assert r["range_source"] == "given" and r["input_kind"] == "features"


def test_multi_input_model_takes_fixed_feeds(tmp_path):
    """z = (x * s) W^T + b with s fed unchanged: with s = 2 it is the linear model 2W (closed form again)."""
    K, d = W2.shape
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("MatMul", ["xs", "Wt"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["logits"])]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d]),
                                         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", d])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])],
                          [numpy_helper.from_array(W2.T.astype(np.float32), "Wt"),
                           numpy_helper.from_array(B2.astype(np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "two.onnx"))
    data, x = _data(tmp_path / "d.npz")
    np.save(tmp_path / "s.npy", np.full((1, d), 2.0, np.float32))
    r = _run(["robustness", tmp_path / "two.onnx", data], code=2)
    assert "other inputs without data: s" in r.output
    d_ = _report(tmp_path, tmp_path / "two.onnx", data, "--input", f"s={tmp_path / 's.npy'}", "--eps", "0.01,0.03")
    z = 2 * x.astype(np.float64) @ W2.T + B2
    m0 = np.abs(z[:, 0] - z[:, 1])
    dw1 = 2 * np.abs(W2[0] - W2[1]).sum()
    flips = [p["flip_rate"] for p in d_["result"]["sweep"] if p["attack"] == "fgsm"]
    assert flips == pytest.approx([np.mean(m0 < e * dw1) for e in (0.01, 0.03)])
    assert d_["settings"]["fixed_inputs"] == ["s"]
