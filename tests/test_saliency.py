"""Saliency methods against independent truths, the full analysis, and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jacaudit import results as R
from jacaudit.analyses.saliency import (SaliencyOptions, attribute, baseline_for, make_scorer, parse_methods,
                                        resolve_target, saliency)
from jacaudit.data import Preprocess, Sample
from jacaudit.errors import InputError
from jacaudit.models import load

C, H, W, K = 3, 6, 5, 4


class Linear(torch.nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w = torch.nn.Parameter(w)
        self.b = torch.nn.Parameter(b)

    def forward(self, x):
        return x.flatten(1) @ self.w.t() + self.b


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, K)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        return self.fc(h.mean((2, 3)))


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(K, C * H * W, generator=g)
    b = torch.randn(K, generator=g)
    p = tmp_path_factory.mktemp("lin") / "linear.pt"
    torch.jit.script(Linear(w, b)).save(str(p))
    return load(str(p)), w, b


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    p = tmp_path_factory.mktemp("cnn") / "cnn.pt"
    torch.jit.script(SmallCNN().eval()).save(str(p))
    return str(p)


def _x(n=2, seed=0):
    return torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(seed))


def test_gradient_is_weight_row(linear):
    model, w, b = linear
    sc = make_scorer(model)
    x = _x()
    a = attribute(sc, x, "grad")
    top = (x.flatten(1) @ w.t() + b).argmax(1)
    assert torch.equal(a.targets, top)
    for i in range(2):
        assert torch.allclose(a.attr[i].flatten(), w[top[i]], atol=1e-6)
    a2 = attribute(sc, x, "gradxinput", targets=torch.tensor([1, 2]))
    assert torch.allclose(a2.attr[1].flatten(), x[1].flatten() * w[2], atol=1e-6)
    # SmoothGrad of a linear map is its gradient, whatever the noise
    a3 = attribute(sc, x, "smoothgrad", samples=5, sigma=0.3, targets=torch.tensor([0, 3]), chunk_rows=4)
    assert torch.allclose(a3.attr[0].flatten(), w[0], atol=1e-5)


@pytest.mark.parametrize("baseline", ["zero", "black", "noise", "blur"])
def test_ig_linear_exact(linear, baseline):
    model, w, b = linear
    sc = make_scorer(model)
    pp = Preprocess.build("imagenet")
    x = _x()
    base = baseline_for(x, baseline, pp, seed=3)
    a = attribute(sc, x, "ig", steps=7, baseline=baseline, preprocess=pp, seed=3, chunk_rows=5)
    t = a.targets
    for i in range(2):
        want = (x[i] - base[i]).flatten() * w[t[i]]
        assert torch.allclose(a.attr[i].flatten(), want, atol=1e-5)
    assert float(a.completeness_gap.max()) < 1e-4


def test_black_baseline_is_pixel_zero():
    pp = Preprocess.build("imagenet")
    b = baseline_for(torch.zeros(1, 3, 2, 2), "black", pp)
    assert np.allclose(pp.from_tensor(b.numpy()), 0, atol=1e-4)


def test_completeness_gap_small_on_cnn(cnn):
    model = load(cnn)
    a = attribute(make_scorer(model), _x(3) * 0.5 + 0.5, "ig", steps=64, baseline="zero")
    assert float(a.completeness_gap.max()) < 0.05


def test_target_inside_same_forward_and_chunks_agree(cnn):
    model = load(cnn)
    sc = make_scorer(model)
    x = _x(3)
    a = attribute(sc, x, "ig", steps=10, baseline="zero", chunk_rows=64)
    b = attribute(sc, x, "ig", steps=10, baseline="zero", chunk_rows=3)
    assert torch.equal(a.targets, b.targets) and torch.allclose(a.attr, b.attr, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(a.targets, model(x).argmax(1))


def test_parse_and_targets():
    assert parse_methods("all") == ["grad", "gradxinput", "smoothgrad", "ig"]
    assert parse_methods("ig,grad,ig") == ["ig", "grad"]
    with pytest.raises(InputError):
        parse_methods("lrp")
    assert resolve_target("top1", None) is None
    assert resolve_target("2", None) == 2
    assert resolve_target("Cat", ["dog", "cat"]) == 1
    with pytest.raises(InputError):
        resolve_target("cat", None)


def test_out_of_range_target(linear):
    model, *_ = linear
    with pytest.raises(InputError, match="out of range"):
        attribute(make_scorer(model), _x(), "grad", targets=torch.tensor([9, 9]))


def _samples(n=3):
    pp = Preprocess.infer((1, 3, H, W), preset="unit")
    g = np.random.default_rng(0)
    out = []
    for i in range(n):
        px = g.uniform(0, 255, size=(H, W, 3))
        out.append(Sample(f"img{i}<b>.png", "mem", pp.to_tensor(px), pixels=px.astype(np.uint8)))
    return pp, out


def test_full_analysis_returns_maps_as_artifacts_and_a_valid_report(cnn, tmp_path, monkeypatch):
    from jacaudit.analyses.base import AnalysisOutput, Artifact
    from jacaudit.gate import evaluate, metric_values

    monkeypatch.chdir(tmp_path)
    model = load(cnn)
    pp, smp = _samples()
    mask = np.zeros((H, W), bool)
    mask[:3] = True
    opts = SaliencyOptions(methods=parse_methods("all"), steps=8, samples=4, batch_size=2, sanity=True,
                           labels=["a", "b", "c", "<script>"], thumb=32)
    w_before = {k: v.clone() for k, v in model.module.state_dict().items()}
    out = saliency(model, smp, opts, preprocess=pp, masks={smp[0].name: mask})
    assert isinstance(out, AnalysisOutput) and not out.partial
    assert os.listdir(tmp_path) == []  # the analysis writes no files and creates no folders
    res, warns = out.result, out.warnings
    for k, v in model.module.state_dict().items():  # the sanity check restored the weights
        assert torch.equal(v, w_before[k])
    assert len(res.inputs) == 3 and [m.method for m in res.inputs[0].maps] == ["grad", "gradxinput",
                                                                               "smoothgrad", "ig"]
    arts = {a.path: a.data for a in out.artifacts}
    assert all(isinstance(a, Artifact) and a.path.startswith("maps/") for a in out.artifacts)
    assert len(arts) == len(out.artifacts) == 3 * 4 * 3  # npy + heatmap + overlay per input and method
    m0 = res.inputs[0].maps[0]
    assert arts[m0.npy].shape == (1, 3, H, W) and arts[m0.npy].dtype == np.float32
    assert arts[m0.heatmap.path][:8] == b"\x89PNG\r\n\x1a\n" and arts[m0.overlay.path][:8] == b"\x89PNG\r\n\x1a\n"
    assert m0.heatmap.path == m0.npy[:-len(".npy")] + ".heatmap.png"
    assert 0 <= m0.mask_fraction <= 1 and m0.mask_outlined and not res.inputs[1].maps[0].mask_outlined
    red = np.abs(arts[m0.npy][0]).max(0)
    assert m0.heat_max == pytest.approx(np.percentile(red, 99.5))
    assert res.inputs[0].maps[3].completeness_gap is not None
    assert {s.method for s in res.sanity} == set(opts.methods)
    assert all(len(s.steps) == 3 for s in res.sanity)  # three parameter layers, cascading
    by_id = {c.id: c for c in evaluate("saliency", out.metrics)}
    for i in res.inputs:
        c = by_id[f"saliency.ig_completeness_gap[{i.name}]"]
        assert c.warn == 0.1 and c.fail == 0.5 and c.value == pytest.approx(i.maps[3].completeness_gap)
    for m in opts.methods:
        c = by_id[f"saliency.sanity_spearman@method={m}[model]"]
        assert c.op == ">=" and c.warn == 0.5 and c.status in ("pass", "warn")
        c = by_id[f"saliency.mask_outside@method={m}[{smp[0].name}]"]
        mf = next(mm.mask_fraction for mm in res.inputs[0].maps if mm.method == m)
        assert c.value == pytest.approx(1 - mf) and c.op == ">" and c.fail == pytest.approx(1 - mask.mean())
        assert c.description and "density" in c.description
    assert not [k for k in by_id if "mask_outside" in k and smp[0].name not in k]  # only the masked input
    rep = R.make_report("saliency", res, model=model, settings={"seed": 0}, warnings=warns,
                        checks=list(by_id.values()), metrics=metric_values("saliency", out.metrics))
    R.validate(json.loads(R.to_json(rep)))
    from jacaudit.report import render
    html = render(rep, "html").decode()
    assert "<script>" not in html and "&lt;script&gt;" in html and "img0&lt;b&gt;.png" in html


def test_unbatchable_model_falls_back(tmp_path):
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.reshape(1, -1)[:, :4] * 2.0

    p = tmp_path / "fixed.pt"
    torch.jit.script(Fixed()).save(str(p))
    model = load(str(p))
    sc = make_scorer(model)
    a = attribute(sc, _x(3), "grad")
    assert not sc.batched and sc.warnings
    assert float(a.attr[0].flatten()[a.targets[0]]) == 2.0


def _run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "JACAUDIT_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "jacaudit", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


def test_cli_folder_with_broken_image(cnn, tmp_path):
    from PIL import Image
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    out = tmp_path / "out"
    p = _run_cli("saliency", cnn, str(d), "--method", "grad,ig", "--ig-steps", "64", "--size", f"{H}x{W}",
                 "--out", str(out), "--json")
    assert p.returncode == 2, p.stderr
    rep = json.loads(p.stdout)  # --json prints the report
    inputs = rep["result"]["inputs"]
    assert len(inputs) == 2 and inputs[0]["maps"][1]["completeness_gap"] is not None
    assert "broken.png" in p.stderr
    assert json.loads((out / "report.json").read_text())["result"] == rep["result"]
    R.validate(rep)
    m0 = inputs[0]["maps"][0]  # the CLI writes the analysis' artifacts beside the report
    assert (out / m0["npy"]).is_file() and (out / m0["heatmap"]["path"]).is_file()
    assert {c["id"] for c in rep["checks"]} == {f"saliency.ig_completeness_gap[{i['name']}]" for i in inputs}
    assert rep["status"] == "partial" and rep["exit_code"] == 2 and len(rep["result"]["failures"]) == 1
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_cli_synthetic_and_bad_option(cnn, tmp_path):
    p = _run_cli("saliency", cnn, "--size", "8", "--out", str(tmp_path / "o"), "--format", "json")
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["result"]["inputs"][0]["synthetic"] is True
    p = _run_cli("saliency", cnn, "--method", "lrp", "--out", str(tmp_path / "o2"))
    assert p.returncode == 2 and "unknown saliency method" in p.stderr and "Traceback" not in p.stderr


def _onnx_linear_softmax(path, w, b):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    g = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, H, W])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", K])],
                          [numpy_helper.from_array(w.numpy(), "W"), numpy_helper.from_array(b.numpy(), "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))


def test_onnx_softmax_model_uses_logits(linear, tmp_path):
    from jacaudit.errors import UnsupportedOpError
    _, w, b = linear
    p = tmp_path / "lin.onnx"
    _onnx_linear_softmax(p, w, b)
    try:
        model = load(str(p))
    except UnsupportedOpError as e:
        pytest.skip(f"interpreter lacks an op yet: {e}")
    sc = make_scorer(model)
    assert sc.score == "logit" and sc.score_tensor == "logits"
    x = _x()
    a = attribute(sc, x, "grad")
    for i in range(2):
        assert torch.allclose(a.attr[i].flatten(), w[a.targets[i]], atol=1e-5)
    assert torch.allclose(a.ref_probs.sum(1), torch.ones(2), atol=1e-5)
    a = attribute(sc, x, "ig", steps=5, baseline="zero")
    assert torch.allclose(a.attr[0].flatten(), x[0].flatten() * w[a.targets[0]], atol=1e-5)
    out = saliency(model, [Sample("s", "mem", x[0].numpy())], SaliencyOptions(methods=["grad"], sanity=True),
                   failures=[("bad.png", "cannot read")])
    res = out.result
    assert out.partial and res.failures[0].path == "bad.png"
    assert not out.artifacts[-1].path.endswith(".overlay.png")  # no pixels: no overlay
    assert res.score == "logit" and res.inputs[0].target.probability is not None
    assert len(res.sanity[0].steps) == 1  # one Gemm layer randomised
    # sanity restored the weights
    assert torch.allclose(model.graph.initializers["W"], w)


def test_errors_name_no_flags(linear):
    model, *_ = linear
    pp, smp = _samples(1)
    with pytest.raises(InputError, match=r"^IG steps must be at least 1 \(got 0\)$"):
        saliency(model, smp, SaliencyOptions(methods=["ig"], steps=0), preprocess=pp)
    with pytest.raises(InputError, match=r"SmoothGrad samples must be at least 1 \(got 0\)"):
        attribute(make_scorer(model), _x(), "smoothgrad", samples=0)
    for bad in (SaliencyOptions(reduction="mean"), SaliencyOptions(baseline="grey"), SaliencyOptions(methods=["lrp"]),
                SaliencyOptions(target="cat")):
        with pytest.raises(InputError) as e:
            saliency(model, smp, bad, preprocess=pp)
        assert "--" not in str(e.value), str(e.value)


def test_sanity_without_parameters_is_skipped_not_passed(tmp_path):
    from jacaudit.gate import evaluate

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :4] * 2.0

    p = tmp_path / "noparams.pt"
    torch.jit.script(Fixed()).save(str(p))
    pp, smp = _samples(1)
    out = saliency(load(str(p)), smp, SaliencyOptions(methods=["grad"], sanity=True), preprocess=pp)
    (check,) = [c for c in evaluate("saliency", out.metrics) if c.check.startswith("sanity_spearman")]
    assert check.status == "skipped" and "randomised" in check.message
    assert any("no layer" in w for w in out.warnings)
