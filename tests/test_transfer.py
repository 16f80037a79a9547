"""``jacaudit transfer``: input-feature and intermediate-feature sensitivity scores against truths that share no code
with the analysis -- brute-force full Jacobians (torch.func.jacrev) of torch re-implementations of the ONNX graphs
(checked against onnxruntime), closed forms on linear features, and the sample model's card."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from jacaudit.analyses.transfer import TransferOptions, transfer
from jacaudit.cli.main import app
from jacaudit.data import Sample
from jacaudit.data.dataset import LabelledData
from jacaudit.models import load

ROOT = Path(__file__).resolve().parents[1]
TAB = ROOT / "sample_models" / "tabular"


def _data(x: np.ndarray) -> LabelledData:
    x = np.asarray(x, np.float32)
    return LabelledData([Sample(name=f"s{i}", source="mem", array=x[i]) for i in range(len(x))], None, "none",
                        total=len(x))


def _ort(path: Path, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    proto = onnx.load(str(path))
    have = {o.name for o in proto.graph.output}
    for name in outputs or []:
        if name not in have:
            proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {sess.get_inputs()[0].name: x.astype(np.float32)})


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


# ---------------------------------------------------------------------------------------------------------
# Input features: the tabular sample
# ---------------------------------------------------------------------------------------------------------
def _tabular():
    card = json.loads((TAB / "tabular.json").read_text())
    rows = np.loadtxt(TAB / "tabular_heldout.csv", delimiter=",", skiprows=1, dtype=np.float64)
    return card, rows[:, :12]


def _torch_mlp(path: Path):
    """The tabular MLP rebuilt from the ONNX initializers (Gemm chain with ReLUs), float64."""
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer}
    layers = []
    for node in proto.graph.node:
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            W = inits[node.input[1]]
            W = W if attrs.get("transB", 0) else W.T  # -> (out, in)
            layers.append((torch.tensor(W), torch.tensor(inits[node.input[2]])))
    assert len(layers) == 3

    def f(x: torch.Tensor) -> torch.Tensor:
        for i, (W, b) in enumerate(layers):
            x = x @ W.T + b
            if i < 2:
                x = torch.relu(x)
        return x
    return f


def test_tabular_relevant_features_rank_first_and_equal_brute_force():
    card, x = _tabular()
    x = x[:300]
    path = TAB / "tabular_mlp.onnx"
    f = _torch_mlp(path)
    np.testing.assert_allclose(f(torch.tensor(x)).numpy(), _ort(path, x)[0], rtol=1e-4, atol=1e-4)
    out = transfer(load(str(path)), _data(x), TransferOptions(feature_names=tuple(card["features"])))
    ins = out.result.inputs
    top3 = [ft.name for ft in ins.features[:3]]
    assert set(top3) == set(card["relevant_features"])
    assert ins.features[2].scaled > 3 * ins.features[3].scaled  # far above the noise features
    # brute force: full Jacobian per row (2 x 12), float64
    J = torch.func.vmap(torch.func.jacrev(f))(torch.tensor(x)).numpy()       # (N, 2, 12)
    std = x.std(axis=0, ddof=1)
    per_out = np.abs(J).mean(axis=0)                                         # (2, 12)
    agg = np.sqrt((J ** 2).sum(axis=1)).mean(axis=0)                         # (12,)
    by = {ft.index: ft for ft in ins.features}
    assert _rel([by[j].mean_abs_gradient for j in range(12)], agg) < 1e-5
    assert _rel([by[j].scaled for j in range(12)], agg * std) < 1e-5
    assert _rel([by[j].per_output for j in range(12)], per_out.T) < 1e-5
    assert _rel([by[j].per_output_scaled for j in range(12)], (per_out * std).T) < 1e-5
    assert _rel([by[j].std for j in range(12)], std) < 1e-5
    assert [ft.rank for ft in ins.features] == list(range(1, 13))


# ---------------------------------------------------------------------------------------------------------
# A constructed conv model: h1 = tanh(conv(x)), p = mean_hw conv(h1), logits = p A + c
# ---------------------------------------------------------------------------------------------------------
def _conv_model(tmp: Path, seed: int = 0):
    g = np.random.default_rng(seed)
    W1 = g.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    b1 = g.normal(0, 0.1, 4).astype(np.float32)
    W2 = g.normal(0, 0.5, (2, 4, 3, 3)).astype(np.float32)
    b2 = g.normal(0, 0.1, 2).astype(np.float32)
    A = g.normal(0, 1.0, (2, 3)).astype(np.float32)
    c = g.normal(0, 0.1, 3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["c1"], ["h1"]),
             helper.make_node("Conv", ["h1", "W2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["gp"]),
             helper.make_node("Flatten", ["gp"], ["p"]),
             helper.make_node("Gemm", ["p", "A", "c"], ["logits"])]
    inits = [numpy_helper.from_array(v, k) for k, v in dict(W1=W1, b1=b1, W2=W2, b2=b2, A=A, c=c).items()]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp / "conv.onnx"
    onnx.save(model, str(path))
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in dict(W1=W1, b1=b1, W2=W2, b2=b2, A=A, c=c).items()}

    def h1(x):
        return torch.tanh(torch.nn.functional.conv2d(x, t["W1"], t["b1"], padding=1))

    def head(h):  # p and the logits from h1
        p = torch.nn.functional.conv2d(h, t["W2"], t["b2"], padding=1).mean(dim=(-2, -1))
        return p, p @ t["A"] + t["c"]

    return path, h1, head


def _conv_truth(x: np.ndarray, h1, head):
    """Brute force per sample (float64): the scores of h1 (channels) and p (units) by full Jacobians."""
    X = torch.tensor(x, dtype=torch.float64)
    sigma = math.sqrt(float(X.reshape(len(x), -1).var(dim=0, unbiased=True).mean()))
    logits = head(h1(X))[1]
    pred = logits.argmax(1)
    out = {}
    one = lambda xi: h1(xi[None])[0]                                            # noqa: E731
    Jh = torch.func.vmap(torch.func.jacrev(one))(X)                             # (N, 4,6,6, 3,6,6)
    H = h1(X)
    Jy = torch.stack([torch.func.jacrev(lambda h: head(h[None])[1][0, pred[i]])(H[i]) for i in range(len(x))])
    out["h1"] = dict(
        grad_rms=np.sqrt((Jh.reshape(len(x), 4, 36, -1) ** 2).sum(dim=(2, 3)).mean(0).numpy() / 36),
        std=H.transpose(0, 1).reshape(4, -1).std(dim=1, unbiased=True).numpy(),
        mean=H.transpose(0, 1).reshape(4, -1).mean(dim=1).numpy(),
        influence=Jy.abs().reshape(len(x), 4, 36).sum(2).mean(0).numpy())
    P = head(H)[0]
    onep = lambda xi: head(h1(xi[None]))[0][0]                                  # noqa: E731
    Jp = torch.func.vmap(torch.func.jacrev(onep))(X)                            # (N, 2, 3,6,6)
    out["p"] = dict(grad_rms=np.sqrt((Jp.reshape(len(x), 2, -1) ** 2).sum(2).mean(0).numpy()),
                    std=P.std(dim=0, unbiased=True).numpy(), mean=P.mean(0).numpy())
    return sigma, pred.numpy(), out


def test_layer_scores_exact_equal_brute_force(tmp_path):
    path, h1, head = _conv_model(tmp_path)
    x = np.random.default_rng(1).uniform(-1, 1, (6, 3, 6, 6)).astype(np.float32)
    ref_h1, ref_logits = _ort(path, x, ["h1", "logits"])
    np.testing.assert_allclose(h1(torch.tensor(x, dtype=torch.float64)).numpy(), ref_h1, atol=1e-5)
    sigma, pred, truth = _conv_truth(x, h1, head)
    # probes >= the input size (108): the input basis, exact
    out = transfer(load(str(path)), _data(x), TransferOptions(layers=("h1", "p"), probes=108, batch_size=4))
    r = out.result
    assert r.inputs.kind == "channels" and len(r.inputs.features) == 3
    for lr in r.layers:
        assert lr.method == "exact" and lr.probes == 108
        t = truth[lr.tensor]
        fs = lr.source.features
        assert _rel([f.gradient_rms for f in fs], t["grad_rms"]) < 1e-5
        assert _rel([f.std for f in fs], t["std"]) < 1e-5
        assert _rel([f.sensitivity for f in fs], t["grad_rms"] * sigma / t["std"]) < 1e-5
        assert all(f.gradient_rms_stderr == 0 for f in fs)
        assert lr.source.input_scale == pytest.approx(sigma, rel=1e-6)
    h = r.layers[0]
    assert h.shape == [4, 6, 6] and h.elements_per_feature == 36 and h.n_features == 4
    assert _rel([f.influence for f in h.source.features], truth["h1"]["influence"]) < 1e-5
    # the influence of the pooled units p on logits = p A + c is |A[k, pred]| (closed form)
    A = numpy_helper.to_array(next(t for t in onnx.load(str(path)).graph.initializer if t.name == "A"))
    want = np.abs(A[:, pred]).mean(axis=1)
    assert _rel([f.influence for f in r.layers[1].source.features], want) < 1e-5


def test_layer_hutchinson_error_against_brute_force(tmp_path):
    path, h1, head = _conv_model(tmp_path)
    x = np.random.default_rng(2).uniform(-1, 1, (16, 3, 6, 6)).astype(np.float32)
    sigma, _, truth = _conv_truth(x, h1, head)
    errs, zs = [], []
    for seed in range(6):
        out = transfer(load(str(path)), _data(x), TransferOptions(layers=("h1", "p"), probes=16, seed=seed))
        h, p = out.result.layers
        assert h.method == "hutchinson" and h.probes == 16
        for f, g in zip(h.source.features, truth["h1"]["grad_rms"]):
            assert f.gradient_rms_stderr > 0
            errs.append(abs(f.gradient_rms - g) / g)
            zs.append((f.gradient_rms - g) / f.gradient_rms_stderr)
        # the (N, 2) units: one vjp per unit, exact
        assert p.method == "exact per unit" and p.probes == 2
        assert _rel([f.gradient_rms for f in p.source.features], truth["p"]["grad_rms"]) < 1e-5
        assert all(f.gradient_rms_stderr == 0 for f in p.source.features)
    # 16 probes x 16 samples: a few percent, and the standard errors are honest
    assert max(errs) < 0.1, max(errs)
    assert max(abs(z) for z in zs) < 4.5
    assert 0.2 < float(np.mean(np.square(zs))) < 3.0


# ---------------------------------------------------------------------------------------------------------
# The verdict rule on a constructed model with known sensitivities
# ---------------------------------------------------------------------------------------------------------
def _units_model(tmp: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """x (N, 4) -> h = relu-free linear units except a dead one -> logits = h A.

    unit 0: dead (relu(x0 - 1000): always 0); unit 1: x0 (the data's high-variance direction: stable);
    unit 2: 1000 x0 (the same feature scaled: the same verdict); unit 3: x3 (a direction the data barely varies
    in: over-specialised); unit 4: x1 + x2."""
    W = np.zeros((4, 5), np.float32)
    W[0, 1], W[0, 2], W[3, 3], W[1, 4], W[2, 4] = 1.0, 1000.0, 1.0, 1.0, 1.0
    A = np.random.default_rng(0).normal(0, 1, (5, 2)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["lin"]),
             helper.make_node("Slice", ["lin", "s0", "e0", "ax"], ["rest"]),
             helper.make_node("Slice", ["x", "s1", "e1", "ax"], ["x0"]),
             helper.make_node("Sub", ["x0", "big"], ["x0m"]),
             helper.make_node("Relu", ["x0m"], ["dead"]),
             helper.make_node("Concat", ["dead", "rest"], ["h"], axis=1),
             helper.make_node("MatMul", ["h", "A"], ["logits"])]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(A, "A"),
             numpy_helper.from_array(np.array([1], np.int64), "s0"), numpy_helper.from_array(np.array([5], np.int64), "e0"),
             numpy_helper.from_array(np.array([0], np.int64), "s1"), numpy_helper.from_array(np.array([1], np.int64), "e1"),
             numpy_helper.from_array(np.array([1], np.int64), "ax"),
             numpy_helper.from_array(np.array(1000.0, np.float32), "big")]
    graph = helper.make_graph(nodes, "units", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits)
    path = tmp / "units.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    Wh = np.zeros((4, 5))
    Wh[:, 1:] = W[:, 1:]
    return path, Wh, A


def _source(n: int = 400, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return g.normal(0, 1, (n, 4)) * np.array([2.0, 1.0, 1.0, 0.01])


def test_verdict_rule_on_known_sensitivities(tmp_path):
    path, Wh, A = _units_model(tmp_path)
    x = _source().astype(np.float32)
    np.testing.assert_allclose(_ort(path, x, ["h"])[0][:, 1:], x @ Wh[:, 1:], rtol=1e-5, atol=1e-3)
    out = transfer(load(str(path)), _data(x), TransferOptions(layers=("h",), overspecialised_above=2.0))
    lr = out.result.layers[0]
    assert lr.method == "exact"  # 4 input elements <= 16 probes
    fs = lr.source.features
    assert [f.verdict for f in fs] == ["dead", "reusable", "reusable", "over-specialised", "reusable"]
    assert fs[0].reason == "no variance over the data" and fs[0].sensitivity is None
    # closed form for linear units: sensitivity = ||w_k|| sigma_x / std(x w_k)
    xd = x.astype(np.float64)
    sigma = math.sqrt(xd.var(axis=0, ddof=1).mean())
    for k in range(1, 5):
        w = Wh[:, k]
        want = np.linalg.norm(w) * sigma / (xd @ w).std(ddof=1)
        assert fs[k].sensitivity == pytest.approx(want, rel=1e-5)
        assert fs[k].gradient_rms == pytest.approx(np.linalg.norm(w), rel=1e-6)
    assert fs[1].sensitivity == pytest.approx(fs[2].sensitivity, rel=1e-5)  # scale-free
    assert fs[2].gradient_rms == pytest.approx(1000 * fs[1].gradient_rms, rel=1e-6)
    assert fs[3].sensitivity > 50
    # influence: |dy/dh_k| = |A[k, predicted class]|
    pred = (xd @ Wh @ A).argmax(1)
    for k in range(5):
        assert fs[k].influence == pytest.approx(np.abs(A[k, pred]).mean(), rel=1e-5)
    s = lr.source
    assert (s.reusable_fraction, s.overspecialised_fraction, s.dead_fraction) == (0.6, 0.2, 0.2)
    # 75% of the live features reusable, 20% over-specialised (< 25%): freeze; the thresholds are in the report
    assert lr.suggestion == "freeze", lr.suggestion_reason
    assert out.result.rule.overspecialised_above == 2.0 and "> 2" in out.result.rule.text
    assert lr.summary.startswith("h: 60% reusable, 20% over-specialised, 20% dead")
    # a stricter rule: unit 4 (x1 + x2, sensitivity ~1.1) is over-specialised too -> fine-tune
    out = transfer(load(str(path)), _data(x), TransferOptions(layers=("h",), overspecialised_above=1.0))
    lr = out.result.layers[0]
    assert [f.verdict for f in lr.source.features] == ["dead", "reusable", "reusable", "over-specialised",
                                                       "over-specialised"]
    assert lr.suggestion == "fine-tune"


def test_domain_shift_per_feature_closed_form(tmp_path):
    path, Wh, _ = _units_model(tmp_path)
    xs = _source(400, 0)
    xt = _source(300, 1)
    xt[:, 0] += 2.0      # units 1, 2 (x0): mean shift of one source std
    xt[:, 3] *= 10.0     # unit 3 (x3): ten times the spread -> std and sensitivity move by ln 10
    out = transfer(load(str(path)), _data(xs), TransferOptions(layers=("h",), overspecialised_above=2.0),
                   target=_data(xt))
    r = out.result
    lr = r.layers[0]
    assert r.n_source == 400 and r.n_target == 300 and lr.target is not None
    xs32, xt32 = xs.astype(np.float32).astype(np.float64), xt.astype(np.float32).astype(np.float64)
    sig_s = math.sqrt(xs32.var(axis=0, ddof=1).mean())
    sig_t = math.sqrt(xt32.var(axis=0, ddof=1).mean())
    by = {f.index: f for f in lr.shift.features}
    for k in range(1, 5):
        w = Wh[:, k]
        hs, ht = xs32 @ w, xt32 @ w
        assert by[k].mean_shift == pytest.approx((ht.mean() - hs.mean()) / hs.std(ddof=1), rel=1e-4, abs=1e-5)
        assert by[k].std_log_ratio == pytest.approx(math.log(ht.std(ddof=1) / hs.std(ddof=1)), abs=1e-5)
        s_s = np.linalg.norm(w) * sig_s / hs.std(ddof=1)
        s_t = np.linalg.norm(w) * sig_t / ht.std(ddof=1)
        assert by[k].sensitivity_log_ratio == pytest.approx(math.log(s_t / s_s), abs=1e-5)
    assert by[0].shift == 0 and by[0].verdict_source == by[0].verdict_target == "dead"
    assert [f.index for f in lr.shift.features[:3]] == [3, 1, 2] or [f.index for f in lr.shift.features[:3]] == [3, 2, 1]
    assert lr.shift.features[0].shift == pytest.approx(math.log(10), rel=0.05)
    assert lr.shift.shifted_fraction == pytest.approx(3 / 5)  # units 1, 2, 3 shift by more than 0.5
    assert lr.suggestion == "fine-tune" and "shifted" in lr.suggestion_reason
    names = {(m.name, m.subject): m for m in out.metrics}
    assert names[("shift_fraction", "h")].value == pytest.approx(0.6)
    assert names[("target_overspecialised_fraction", "h")].value == lr.target.overspecialised_fraction


# ---------------------------------------------------------------------------------------------------------
# The command: gate, formats, exit codes
# ---------------------------------------------------------------------------------------------------------
def _cli(args, code=0):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


def test_cli_gate_formats_and_exit_codes(tmp_path):
    from jacaudit import results as R

    csv = TAB / "tabular_heldout.csv"
    rows = csv.read_text().splitlines()
    tgt = tmp_path / "target.csv"
    # the target: income doubled in spread
    head, body = rows[0], [r.split(",") for r in rows[1:201]]
    for r in body:
        r[1] = f"{2 * float(r[1]):.5f}"
    tgt.write_text("\n".join([head] + [",".join(r) for r in body]) + "\n")
    model = TAB / "tabular_mlp.onnx"
    out = tmp_path / "a"
    base = ["transfer", model, csv, "--limit", "200", "--layer", "relu", "--layer", "relu_1", "--out", out]
    _cli(base + ["--format", "json,html,md", "--junit", tmp_path / "j.xml"])
    d = json.loads((out / "report.json").read_text())
    R.validate(d)
    assert d["kind"] == "transfer" and d["exit_code"] == 0
    res = d["result"]
    assert [f["name"] for f in res["inputs"]["features"][:3]] in (
        ["income", "debt_ratio", "late_payments"], ["income", "late_payments", "debt_ratio"])
    assert [lr["tensor"] for lr in res["layers"]] == ["relu", "relu_1"]
    html = (out / "report.html").read_text()
    assert "relu_1" in html and "income" in html and "<svg" in html
    assert "transfer" in (out / "report.md").read_text()
    junit = (tmp_path / "j.xml").read_text()
    assert "overspecialised_fraction" in junit
    # a check that fails -> exit 1; --exit-zero -> 0
    _cli(base + ["--fail-on", "reusable_fraction[relu]<1.01", "--format", "json"], code=1)
    _cli(base + ["--fail-on", "reusable_fraction[relu]<1.01", "--format", "json", "--exit-zero"], code=0)
    # target data: the shift metrics exist and gate; income's sensitivity x std grows on the target
    r = _cli(base + ["--target-data", tgt, "--json", "--fail-on", "shift_median>1000"])
    rep = json.loads(r.stdout)
    R.validate(rep)
    names = {(m["name"], m["subject"]) for m in rep["metrics"]}
    assert ("shift_fraction", "relu") in names and ("target_input_sensitivity", "income") in names
    src = {f["name"]: f for f in rep["result"]["inputs"]["features"]}
    tg = {f["name"]: f for f in rep["result"]["inputs_target"]["features"]}
    assert tg["income"]["std"] == pytest.approx(2 * src["income"]["std"], rel=0.15)
    # usage errors -> exit 2
    _cli(["transfer", model, csv, "--layer", "no_such_tensor", "--out", out], code=2)
    _cli(["transfer", model, csv, "--fail-on", "no_such_metric>1", "--out", out], code=2)


def test_layer_all_finds_the_main_path_stage_outputs(tmp_path):
    """A residual block: a = relu(conv0 x); r = a + conv2(relu(conv1 a)); p = GAP(conv3 r) -> logits. The branch
    tensors (b1, b2, c2) are not on the main path; a and r are; conv3's output changes the width (a new stage)."""
    g = np.random.default_rng(0)
    w = {k: g.normal(0, 0.4, s).astype(np.float32) for k, s in
         dict(W0=(4, 3, 3, 3), W1=(4, 4, 3, 3), W2=(4, 4, 3, 3), W3=(6, 4, 1, 1), A=(6, 2)).items()}
    nodes = [helper.make_node("Conv", ["x", "W0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["a"]),
             helper.make_node("Conv", ["a", "W1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["b1"]),
             helper.make_node("Conv", ["b1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "c2"], ["r"]),
             helper.make_node("Conv", ["r", "W3"], ["c3"]),
             helper.make_node("Tanh", ["c3"], ["t3"]),
             helper.make_node("GlobalAveragePool", ["t3"], ["gp"]),
             helper.make_node("Flatten", ["gp"], ["p"]),
             helper.make_node("MatMul", ["p", "A"], ["logits"])]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    path = tmp_path / "res.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(1).uniform(0, 1, (8, 3, 5, 5)).astype(np.float32)
    out = transfer(load(str(path)), _data(x), TransferOptions(layers=("all",), probes=8))
    got = [lr.tensor for lr in out.result.layers]
    # main path: c0, a, r (4x5x5) | c3, t3 (6x5x5) | gp (6x1x1) | p (6): the last of each same-shaped run
    assert got == ["r", "t3", "gp", "p"], got
    assert "main-path" in out.result.layer_selection


# ---------------------------------------------------------------------------------------------------------
# Jacobian attention maps
# ---------------------------------------------------------------------------------------------------------
def _mixer_model(tmp: Path, T: int = 5, D: int = 3, D2: int = 4):
    """e = tanh(x) (B, T, D); h = tanh(M e W) mixes positions (B, T, D2); logits = mean_t(h) A."""
    g = np.random.default_rng(3)
    M = g.normal(0, 0.6, (T, T)).astype(np.float32)
    W = g.normal(0, 0.6, (D, D2)).astype(np.float32)
    A = g.normal(0, 1.0, (D2, 2)).astype(np.float32)
    nodes = [helper.make_node("Tanh", ["x"], ["e"]),
             helper.make_node("MatMul", ["M", "e"], ["me"]),
             helper.make_node("MatMul", ["me", "W"], ["mw"]),
             helper.make_node("Tanh", ["mw"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["hm"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["hm", "A"], ["logits"])]
    graph = helper.make_graph(nodes, "mix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(v, k) for k, v in dict(M=M, W=W, A=A).items()])
    path = tmp / "mix.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in dict(M=M, W=W, A=A).items()}

    def h_of_e(e):
        return torch.tanh(t["M"] @ e @ t["W"])

    def logits_of_e(e):
        return h_of_e(e).mean(dim=-2) @ t["A"]
    return path, h_of_e, logits_of_e


@pytest.mark.parametrize("probes", [2, 64])
def test_attention_maps_against_brute_force(tmp_path, probes):
    path, h_of_e, logits_of_e = _mixer_model(tmp_path)
    x = np.random.default_rng(4).normal(0, 1, (10, 5, 3)).astype(np.float32)
    out = transfer(load(str(path)), _data(x), TransferOptions(attention_wrt="e", attention_out="h", probes=probes,
                                                              attention_rows=10, seed=1))
    a = out.result.attention
    E = torch.tanh(torch.tensor(x, dtype=torch.float64))
    pred = logits_of_e(E).argmax(1)
    infl = np.stack([torch.func.jacrev(lambda e: logits_of_e(e)[pred[i]])(E[i]).norm(dim=1).numpy()
                     for i in range(len(x))])                                  # (N, T)
    Jh = torch.func.vmap(torch.func.jacrev(h_of_e))(E)                          # (N, T, D2, T, D)
    A = Jh.pow(2).sum(dim=(2, 4)).sqrt().numpy()                                # (N, T_out, T_in)
    assert _rel([r.influence for r in a.rows], infl) < 1e-5
    assert _rel(a.influence_mean, infl.mean(0)) < 1e-5
    assert [set(r.top_positions) for r in a.rows] == [set(np.argsort(-v)[:2]) for v in infl]
    if probes == 64:                       # D2 = 4 <= 64: the basis, exact
        assert a.method == "exact"
        assert _rel(a.matrix_mean, A.mean(0)) < 1e-5 and _rel(a.matrix_first, A[0]) < 1e-5
    else:                                  # 2 probes of 4 features: Rademacher, unbiased for the square
        assert a.method == "hutchinson" and a.probes == 2
        est, ref = np.square(a.matrix_mean), np.square(A).mean(0)
        assert np.abs(est - ref).sum() / ref.sum() < 0.25, np.abs(est - ref).sum() / ref.sum()


def test_attention_on_the_sequence_sample_finds_the_deciding_positions():
    """The card's truth: A and B are the only positions that decide; with respect to the embedding output the two
    largest positions of the map are A and B in most held-out sequences (the card measured 0.785 summing over the
    classes; here the predicted class's score)."""
    from jacaudit.samples.sequence import make_sequences

    d = make_sequences(120, 0, "heldout")
    path = ROOT / "sample_models" / "sequence" / "sequence.onnx"
    data = LabelledData([Sample(name=f"s{i}", source="mem", array=d["tokens"][i]) for i in range(120)], None, "none",
                        total=120)
    out = transfer(load(str(path)), data, TransferOptions(attention_wrt="embeddings", attention_rows=120))
    a = out.result.attention
    assert out.result.inputs is None and a.positions_in == 12
    hits = [set(r.top_positions) == {int(pa), int(pb)} for r, pa, pb in zip(a.rows, d["pos_a"], d["pos_b"])]
    assert np.mean(hits) > 0.6, np.mean(hits)
    share = [(np.asarray(r.influence)[[pa, pb]].sum() / np.sum(r.influence)) for r, pa, pb in
             zip(a.rows, d["pos_a"], d["pos_b"])]
    assert np.median(share) > 2 * 2 / 12   # two of twelve positions hold well over twice their share
    assert a.rows[0].tokens == [int(t) for t in d["tokens"][0]]


# ---------------------------------------------------------------------------------------------------------
# The source / target sample pair (sample_models/transfer): the planted shift where its card says
# ---------------------------------------------------------------------------------------------------------
PAIR = ROOT / "sample_models" / "transfer"


def test_sample_pair_shows_the_planted_shift_where_the_card_says(tmp_path):
    from jacaudit.samples.transfer import _read_pngs, blue_cast, first_conv_truth

    card = json.loads((PAIR / "transfer.json").read_text())
    model = ROOT / "sample_models" / "shapes" / "shapes_cnn.onnx"
    src, tgt = _read_pngs(str(PAIR / "source")), _read_pngs(str(PAIR / "target"))
    assert np.array_equal(blue_cast(src), tgt)              # the target is the documented transform of the source
    truth = first_conv_truth(str(model), src, tgt)           # float64 conv2d from the weights, no jacaudit code
    assert truth["shifted_channels"] == card["first_conv"]["shifted_channels"] and truth["shifted_channels"]
    out = CliRunner().invoke(app, ["transfer", str(model), str(PAIR / "source"), "--target-data", str(PAIR / "target"),
                                   "--layer", "conv2d", "--json", "--format", "json", "--out", str(tmp_path)])
    assert out.exit_code in (0, 1), out.output
    rep = json.loads(out.stdout)
    lr = rep["result"]["layers"][0]
    by = {f["index"]: f for f in lr["shift"]["features"]}
    for row in truth["channels"]:
        f = by[row["channel"]]
        assert f["mean_shift"] == pytest.approx(row["mean_shift"], abs=1e-4)
        assert f["std_log_ratio"] == pytest.approx(row["std_log_ratio"], abs=1e-4)
        # J is the same on both datasets and so are the probes: the estimator's noise cancels in the ratio
        assert f["sensitivity_log_ratio"] == pytest.approx(row["sensitivity_log_ratio"], abs=1e-4)
    shifted = sorted(f["index"] for f in lr["shift"]["features"] if f["shift"] > 0.5)
    assert shifted == truth["shifted_channels"]
    assert lr["shift"]["shifted_fraction"] == pytest.approx(len(shifted) / 8)


def test_fixed_batch_graph_runs_one_sample_per_pass(tmp_path):
    """A graph that only takes batch 1 (a Reshape to [1, 4]): the scores are the same as in batches."""
    W = np.random.default_rng(5).normal(0, 1, (4, 3)).astype(np.float32)
    V = np.random.default_rng(6).normal(0, 1, (3, 2)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["xr"]),
             helper.make_node("MatMul", ["xr", "W"], ["h0"]),
             helper.make_node("Tanh", ["h0"], ["h"]),
             helper.make_node("MatMul", ["h", "V"], ["logits"])]
    graph = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(W, "W"), numpy_helper.from_array(V, "V"),
                               numpy_helper.from_array(np.array([1, 4], np.int64), "shape")])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(7).normal(0, 1, (6, 4)).astype(np.float32)
    out = transfer(load(str(path)), _data(x), TransferOptions(layers=("h",)))
    X = torch.tensor(x, dtype=torch.float64)
    Wt, Vt = torch.tensor(W, dtype=torch.float64), torch.tensor(V, dtype=torch.float64)
    H = torch.tanh(X @ Wt)
    grad_rms = ((1 - H ** 2) ** 2 * (Wt ** 2).sum(0)).mean(0).sqrt().numpy()   # ||dh_k/dx|| = |1-h_k^2| ||W[:,k]||
    assert _rel([f.gradient_rms for f in out.result.layers[0].source.features], grad_rms) < 1e-5
    assert any("one at a time" in w for w in out.warnings)
