"""saliency on outputs that are not a class-score vector, and on non-image inputs (issue 9, findings 5, 8, 10).

Truths: linear ONNX graphs built with onnx.helper (the gradient of an output element is a column of the weight
matrix, a sum over a slice the sum of its columns), numpy argmax on onnxruntime's outputs, the tabular and
sequence sample cards, and a closed-form IG trapezoid error.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jacaudit import load
from jacaudit.analyses.saliency import SaliencyOptions, saliency
from jacaudit.data import Sample
from jacaudit.errors import InputError
from jacaudit.gate import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F, A, B = 6, 3, 4


def _linear_onnx(path, w, shape, relu_shift=None):
    """y = reshape(x @ w, (N, *shape)) (optionally relu(x @ w - shift)); x: (N, F) float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"])]
    last = "mm"
    inits = [numpy_helper.from_array(w.astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1, *shape], dtype=np.int64), "shape")]
    if relu_shift is not None:
        inits.append(numpy_helper.from_array(np.array(relu_shift, dtype=np.float32), "shift"))
        nodes += [helper.make_node("Sub", ["mm", "shift"], ["sh"]), helper.make_node("Relu", ["sh"], ["r"])]
        last = "r"
    nodes.append(helper.make_node("Reshape", [last, "shape"], ["y"]))
    g = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *shape])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return str(path)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    w = np.random.default_rng(0).standard_normal((F, A * B))
    return _linear_onnx(tmp_path_factory.mktemp("det") / "det.onnx", w, (A, B)), w


def _samples(n=2, seed=1):
    x = np.random.default_rng(seed).standard_normal((n, F)).astype(np.float32)
    return x, [Sample(name=f"row{i}", source="t", array=x[i]) for i in range(n)]


def _grads(path, x, target, methods=("grad",)):
    out = saliency(load(path), _samples(len(x))[1] if x is None else
                   [Sample(name=f"row{i}", source="t", array=x[i]) for i in range(len(x))],
                   SaliencyOptions(methods=list(methods), target=target))
    arts = {a.path: a.data for a in out.artifacts}
    return out, [arts[m.npy][0] for i in out.result.inputs for m in i.maps]


def test_multi_axis_output_is_refused_without_a_target(detector):
    path, _ = detector
    x, smp = _samples()
    with pytest.raises(InputError) as e:
        saliency(load(path), smp, SaliencyOptions())
    msg = str(e.value)
    assert "(batch, 3, 4)" in msg and "index=" in msg and "argmax=" in msg and "sum=" in msg
    assert "--" not in msg  # the analysis names no CLI flags
    with pytest.raises(InputError):  # a bare class index is no way round it either
        saliency(load(path), smp, SaliencyOptions(target="5"))


def test_index_target_is_the_weight_column(detector):
    path, w = detector
    x, _ = _samples()
    for spec, (i, j) in (("index=1,2", (1, 2)), ("index=-1,0", (2, 0))):
        out, g = _grads(path, x, spec)
        r = out.result
        assert r.target_spec == spec and r.output_shape == [A, B]
        for inp, gi in zip(r.inputs, g):
            assert inp.target_coords == [i, j]
            np.testing.assert_allclose(gi, w[:, i * B + j], rtol=1e-5, atol=1e-6)


def test_argmax_over_a_slice_and_sum_over_a_slice(detector):
    import onnxruntime as ort

    path, w = detector
    x, _ = _samples(3)
    y = ort.InferenceSession(path).run(None, {"x": x})[0]  # (3, A, B), the reference forward
    out, g = _grads(path, x, "argmax=1,:")
    for k, (inp, gi) in enumerate(zip(out.result.inputs, g)):
        j = int(np.argmax(y[k, 1]))
        assert inp.target_coords == [1, j] and inp.target.score == pytest.approx(float(y[k, 1, j]), rel=1e-5)
        np.testing.assert_allclose(gi, w[:, B + j], rtol=1e-5, atol=1e-6)
    out, g = _grads(path, x, "sum=0,1:3", methods=("grad", "ig"))
    want = w[:, 1] + w[:, 2]
    for k, inp in enumerate(out.result.inputs):
        assert inp.target_coords is None and inp.target_region == "[0, 1:3]"
        assert inp.target.score == pytest.approx(float(y[k, 0, 1:3].sum()), rel=1e-5)
        np.testing.assert_allclose(g[2 * k], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g[2 * k + 1], x[k] * want, rtol=1e-4, atol=1e-5)  # IG of a linear map, zero base


@pytest.mark.parametrize("spec", ["index=1", "index=0,9", "argmax=0,5:5", "index=a,b", "sum=", "index=0:2,1"])
def test_bad_target_specs_are_input_errors(detector, spec):
    path, _ = detector
    with pytest.raises(InputError):
        saliency(load(path), _samples()[1], SaliencyOptions(target=spec))


def test_recogniser_output_time_step(tmp_path):
    T, C = 5, 7
    w = np.random.default_rng(3).standard_normal((F, T * C))
    path = _linear_onnx(tmp_path / "rec.onnx", w, (T, C))
    x, _ = _samples(2)
    y = x.astype(np.float64) @ w
    out, g = _grads(path, x, "argmax=3,:")
    for k, (inp, gi) in enumerate(zip(out.result.inputs, g)):
        c = int(np.argmax(y[k].reshape(T, C)[3]))
        assert inp.target_coords == [3, c]
        np.testing.assert_allclose(gi, w[:, 3 * C + c], rtol=1e-5, atol=1e-6)


def _run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "JACAUDIT_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "jacaudit", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_cli_refuses_a_detector_output_with_one_line_and_exit_2(detector, tmp_path):
    path, _ = detector
    x, _ = _samples()
    np.save(tmp_path / "x.npy", x)
    p = _run_cli("saliency", path, str(tmp_path / "x.npy"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--output-name" in lines[0] and "--target" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    p = _run_cli("saliency", path, str(tmp_path / "x.npy"), "--target", "index=2,3", "--out", str(tmp_path / "o"),
                 "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["result"]["target_spec"] == "index=2,3" and rep["result"]["inputs"][0]["target_coords"] == [2, 3]


def test_all_zero_map_is_said_and_inconclusive(tmp_path):
    """A probability-map-like output (N, 1, 2, 2) = relu(x @ w - 100): zero, with zero gradient, at these inputs."""
    w = np.random.default_rng(5).standard_normal((F, 4))
    path = _linear_onnx(tmp_path / "pm.onnx", w, (1, 2, 2), relu_shift=100.0)
    x, smp = _samples()
    out = saliency(load(path), smp, SaliencyOptions(target="index=0,1,1"))
    assert all(m.zero_fraction == 1.0 for i in out.result.inputs for m in i.maps)
    assert sum("zero everywhere" in w_ for w_ in out.warnings) == 2
    checks = [c for c in evaluate("saliency", out.metrics) if c.check.startswith("map_zero_fraction")]
    assert len(checks) == 2 and all(c.status == "skipped" for c in checks)
    np.save(tmp_path / "x.npy", x)
    p = _run_cli("saliency", path, str(tmp_path / "x.npy"), "--target", "index=0,1,1", "--out", str(tmp_path / "o"))
    assert p.returncode == 4, p.stderr  # no evidence: inconclusive, never a silent 0
    assert "zero everywhere" in p.stderr


def test_nonzero_maps_have_a_zero_fraction_metric_but_no_check(detector):
    path, _ = detector
    out = saliency(load(path), _samples()[1], SaliencyOptions(target="index=0,0"))
    ms = [m for m in out.metrics if m.name.startswith("map_zero_fraction")]
    assert len(ms) == 2 and all(m.value < 1 and m.status is None for m in ms)
    assert not [c for c in evaluate("saliency", out.metrics) if c.check.startswith("map_zero")]


# -------------------------------------------------------------------------------------------------------
# IG completeness gap (finding 8)
# -------------------------------------------------------------------------------------------------------
class Quartic(torch.nn.Module):
    def forward(self, x):
        return (x ** 4).sum(1, keepdim=True)


def test_ig_gap_fails_by_default_and_reaches_stderr(tmp_path):
    """F = sum x^4 from a zero baseline with one trapezoid step: attr = x * (0 + 4 x^3) / 2 = 2 x^4, so the
    gap |2F - F| / F is exactly 1 (closed form)."""
    p = tmp_path / "q.pt"
    torch.jit.script(Quartic()).save(str(p))
    x = np.full((1, 3), 0.7, dtype=np.float32)
    out = saliency(load(str(p)), [Sample(name="r", source="t", array=x[0])],
                   SaliencyOptions(methods=["ig"], steps=1, baseline="zero"))
    (c,) = [c for c in evaluate("saliency", out.metrics) if c.check == "ig_completeness_gap"]
    assert c.value == pytest.approx(1.0, rel=1e-5) and c.fail == 0.5 and c.status == "fail"
    np.save(tmp_path / "x.npy", x)
    r = _run_cli("saliency", str(p), str(tmp_path / "x.npy"), "--method", "ig", "--ig-steps", "1",
                 "--ig-baseline", "zero", "--out", str(tmp_path / "o"))
    assert r.returncode == 1, r.stderr
    assert "IG completeness gap on x.npy is 100.0%" in r.stderr and "means nothing" in r.stderr
    r = _run_cli("saliency", str(p), str(tmp_path / "x.npy"), "--method", "ig", "--ig-steps", "64",
                 "--ig-baseline", "zero", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr  # enough steps: the trapezoid error is small (4/(6*64^2)-ish)


# -------------------------------------------------------------------------------------------------------
# Non-image inputs (finding 10)
# -------------------------------------------------------------------------------------------------------
TAB = os.path.join(ROOT, "sample_models", "tabular")


@pytest.mark.skipif(not os.path.isfile(os.path.join(TAB, "tabular_mlp.onnx")), reason="sample model missing")
def test_tabular_ranking_from_csv_matches_the_card(tmp_path):
    card = json.load(open(os.path.join(TAB, "tabular.json")))
    out = tmp_path / "o"
    p = _run_cli("saliency", os.path.join(TAB, "tabular_mlp.onnx"), os.path.join(TAB, "tabular_heldout.csv"),
                 "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    assert "column 'label' is not fed" in p.stderr
    from jacaudit import results as R
    R.validate(json.loads(p.stdout))  # the report (new fields included) matches the JSON Schema
    r = json.loads(p.stdout)["result"]
    assert r["input_kind"] == "features" and len(r["inputs"]) == card["data"]["heldout"]["n"]
    names = card["features"]
    share: dict[str, float] = {}
    for inp in r["inputs"]:
        m = inp["maps"][0]
        assert m["concentration"] is None and len(m["ranking"]) == 12
        assert sorted(a["name"] for a in m["ranking"]) == sorted(names)
        for a in m["ranking"]:
            share[a["name"]] = share.get(a["name"], 0.0) + a["share"]
    ranked = sorted(share, key=lambda k: -share[k])
    assert ranked[:3] == card["sensitivity"]["ranking"][:3] == ["income", "debt_ratio", "late_payments"]
    assert min(share[k] for k in ranked[:3]) > 4 * max(share[k] for k in ranked[3:])
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "features by mean share" in md and "| 1 | income |" in md
    for word in ("middle-", "upper-", "lower-", "centre", "its box", "concentrates at"):
        assert word not in md and word not in html.replace("vertical-align:middle", ""), word
    assert html.count('aria-label="grad: share of |attribution| per feature') == len(r["inputs"])


@pytest.mark.skipif(not os.path.isfile(os.path.join(TAB, "tabular_mlp.onnx")), reason="sample model missing")
def test_tabular_feature_names_option_and_mismatch(tmp_path):
    x = np.loadtxt(os.path.join(TAB, "tabular_heldout.csv"), delimiter=",", skiprows=1, max_rows=3)[:, :12]
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    names = ",".join(f"f{i}" for i in range(12))
    p = _run_cli("saliency", os.path.join(TAB, "tabular_mlp.onnx"), str(tmp_path / "x.npy"), "--feature-names",
                 names, "--out", str(tmp_path / "o"), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)["result"]
    assert r["inputs"][0]["maps"][0]["ranking"][0]["name"] == "f1"  # income is column 1
    p = _run_cli("saliency", os.path.join(TAB, "tabular_mlp.onnx"), str(tmp_path / "x.npy"), "--feature-names",
                 "a,b", "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "2 feature names for 12 features" in p.stderr


SEQ = os.path.join(ROOT, "sample_models", "sequence", "sequence.onnx")


@pytest.mark.skipif(not os.path.isfile(SEQ), reason="sample model missing")
def test_sequence_positions_through_the_embedding_tensor(tmp_path):
    from jacaudit.samples.sequence import make_sequences

    card = json.load(open(os.path.join(ROOT, "sample_models", "sequence", "sequence.json")))
    ho = make_sequences(200, card.get("seed", 0), "heldout")
    np.save(tmp_path / "tokens.npy", ho["tokens"])
    p = _run_cli("saliency", SEQ, str(tmp_path / "tokens.npy"), "--wrt", "embeddings", "--reduce", "l2",
                 "--out", str(tmp_path / "o"), "--json")
    assert p.returncode == 0, p.stderr
    from jacaudit import results as R
    R.validate(json.loads(p.stdout))
    r = json.loads(p.stdout)["result"]
    assert r["input_kind"] == "sequence" and r["wrt"] == "embeddings"
    hits = 0
    for k, inp in enumerate(r["inputs"]):
        rk = inp["maps"][0]["ranking"]
        assert len(rk) == 12 and rk[0]["name"].startswith("position ")
        hits += {rk[0]["index"], rk[1]["index"]} == {int(ho["pos_a"][k]), int(ho["pos_b"][k])}
    frac = hits / len(r["inputs"])
    print(f"sequence: top-2 positions are A and B in {frac:.3f} (card: "
          f"{card['position_map_check']['top2_positions_are_A_and_B']})")
    assert frac > 0.6  # the card measures 0.785 on the map summed over both classes; here: the top-1 logit
    assert "(token 1)" in json.dumps(r) and "(token 2)" in json.dumps(r)
    md = (tmp_path / "o" / "report.md").read_text()
    assert "positions by mean share" in md
