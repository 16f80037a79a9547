"""--runtime auto|onnxruntime|torch (env JACAUDIT_RUNTIME): the option reaches the model (inspect's gradient path,
the reports' environment), a bad value is one line and exit 2, saliency/robustness under auto and torch measure
the same numbers within float32 tolerance, verify's onnxruntime-backward check, and the Ray workers' model spec
and the shard fingerprint carry the runtime. Truth for the numbers: the torch interpreter's own run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jacaudit.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
ROBUST = SAMPLES / "robust" / "robust_cnn.onnx"
SHAPES = SAMPLES / "shapes" / "shapes_cnn.onnx"


def _run(args, code=0, env=None):
    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


def _inspect(args, env=None) -> dict:
    return json.loads(_run([*args, "--json"], env=env).stdout)


def test_inspect_default_is_auto_and_says_onnxruntime_computes_the_gradients():
    rep = _inspect(["inspect", ROBUST], env={"JACAUDIT_RUNTIME": ""})
    assert rep["result"]["runtime"] == "auto" and rep["environment"]["runtime"] == "auto"
    assert rep["result"]["input_gradients"].startswith("onnxruntime (backward graph of "), rep["result"]
    n = int(rep["result"]["input_gradients"].split("of ")[1].split()[0])
    assert n > 0
    text = _run(["inspect", ROBUST]).stdout
    assert "input gradients: onnxruntime (backward graph of" in text


def test_runtime_torch_option_and_env_show_the_interpreter():
    rep = _inspect(["--runtime", "torch", "inspect", ROBUST])
    assert rep["result"]["input_gradients"] == "torch interpreter (runtime torch)"
    assert rep["environment"]["runtime"] == "torch"
    rep = _inspect(["inspect", ROBUST], env={"JACAUDIT_RUNTIME": "torch"})
    assert rep["result"]["input_gradients"].startswith("torch interpreter")
    # the option wins over the environment
    rep = _inspect(["--runtime", "onnxruntime", "inspect", ROBUST], env={"JACAUDIT_RUNTIME": "torch"})
    assert rep["environment"]["runtime"] == "onnxruntime"
    assert rep["result"]["input_gradients"].startswith("onnxruntime")


def test_inspect_of_a_model_without_a_float_input_gives_the_reason():
    rep = _inspect(["inspect", SAMPLES / "sequence" / "sequence.onnx"])
    assert rep["result"]["input_gradients"].startswith("torch interpreter ("), rep["result"]["input_gradients"]


def test_runtime_from_the_config_file_under_the_environment_and_option(tmp_path):
    """runtime = "torch" at the top of the config file: the commands run the interpreter; JACAUDIT_RUNTIME and
    --runtime win over it; a bad value there is one line, exit 2."""
    cfg = tmp_path / "jacaudit.toml"
    cfg.write_text('runtime = "torch"\n')
    rep = _inspect(["--config", cfg, "inspect", ROBUST], env={"JACAUDIT_RUNTIME": ""})
    assert rep["environment"]["runtime"] == "torch"
    assert rep["result"]["input_gradients"] == "torch interpreter (runtime torch)"
    rep = _inspect(["--config", cfg, "inspect", ROBUST], env={"JACAUDIT_RUNTIME": "onnxruntime"})
    assert rep["environment"]["runtime"] == "onnxruntime"
    rep = _inspect(["--config", cfg, "--runtime", "auto", "inspect", ROBUST], env={"JACAUDIT_RUNTIME": ""})
    assert rep["environment"]["runtime"] == "auto"
    cfg.write_text('runtime = "gpu"\n')
    r = _run(["--config", cfg, "inspect", ROBUST], code=2, env={"JACAUDIT_RUNTIME": ""})
    assert "runtime = 'gpu'" in r.output and "auto, onnxruntime, torch" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_inspect_probes_a_model_with_dynamic_axes_at_the_shape_given(tmp_path):
    """Dynamic spatial axes: without an example input inspect says it did not probe and how to; with --shape
    (or --input) it names the gradient path at that shape."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["y"])], "dyn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "dyn.onnx"
    onnx.save(m, str(path))
    got = _inspect(["inspect", path])["result"]["input_gradients"]
    assert got.startswith("not probed (") and "--shape" in got, got
    rep = _inspect(["inspect", path, "--shape", "1,3,16,12"])
    assert rep["result"]["input_gradients"].startswith("onnxruntime (backward graph of "), rep["result"]
    assert rep["settings"]["shape"] == ["1,3,16,12"]
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    got = _inspect(["inspect", path, "--input", tmp_path / "x.npy"])["result"]["input_gradients"]
    assert got.startswith("onnxruntime (backward graph of "), got


@pytest.mark.parametrize("args,env", [(["--runtime", "bogus"], None), ([], {"JACAUDIT_RUNTIME": "bogus"})])
def test_a_bad_runtime_is_one_line_exit_2(args, env):
    r = CliRunner().invoke(app, [*args, "inspect", str(ROBUST)], env=env)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "bogus" in lines[0], r.output
    assert "auto" in lines[0] and "onnxruntime" in lines[0] and "torch" in lines[0]


def test_load_model_passes_the_runtime(monkeypatch):
    from jacaudit.cli import common

    monkeypatch.setattr(common.state, "runtime", "onnxruntime")
    m = common.load_model(str(ROBUST))
    assert m.runtime == "onnxruntime" and m._ort is not None
    monkeypatch.setattr(common.state, "runtime", "torch")
    m = common.load_model(str(ROBUST))
    assert m.runtime == "torch" and m._ort is None
    assert common.gradient_path(m) == "torch interpreter (runtime torch)"


def _metrics(rep: dict) -> dict[str, float | None]:
    return {m["id"]: m["value"] for m in rep["metrics"]}


def _close(a: dict, b: dict, rtol: float, atol: float) -> list[str]:
    assert a.keys() == b.keys()
    bad = []
    for k in a:
        x, y = a[k], b[k]
        if x is None or y is None:
            if x is not y:
                bad.append(f"{k}: {x} vs {y}")
            continue
        # Integrated Gradients' completeness gap is itself a float32 residual (|sum(attr) - (f(x) - f(x0))| over
        # 64 steps, ~1e-3 relative): the two runtimes' roundings move it by ~1e-5, so it is compared to 1e-4
        tol = max(atol, 1e-4) if "completeness_gap" in k else atol
        if not math.isclose(x, y, rel_tol=rtol, abs_tol=tol):
            bad.append(f"{k}: {x} vs {y}")
    return bad


def test_saliency_metrics_agree_under_auto_and_torch(tmp_path):
    reps = {}
    for rt in ("auto", "torch"):
        out = tmp_path / rt
        _run(["--runtime", rt, "saliency", SHAPES, SAMPLES / "shapes" / "examples", "--method", "grad,ig",
              "--out", out, "--format", "json"])
        reps[rt] = json.loads((out / "report.json").read_text())
    assert reps["auto"]["environment"]["runtime"] == "auto"
    # the gradients in onnxruntime (Integrated Gradients' batched steps too: no grouped convolutions here)
    assert reps["auto"]["environment"]["gradients"].startswith("onnxruntime"), reps["auto"]["environment"]
    assert reps["torch"]["environment"]["gradients"] == "torch interpreter (runtime torch)"
    bad = _close(_metrics(reps["auto"]), _metrics(reps["torch"]), rtol=1e-4, atol=1e-5)
    assert not bad, bad


def test_robustness_metrics_agree_under_auto_and_torch(tmp_path):
    """--batch-size 4: under auto the gradients of the attacks run in onnxruntime (batches up to 8)."""
    reps = {}
    for rt in ("auto", "torch"):
        out = tmp_path / rt
        r = CliRunner().invoke(app, [str(a) for a in [
            "--runtime", rt, "robustness", ROBUST, SAMPLES / "robust" / "data", "--limit", "8", "--batch-size", "4",
            "--eps", "0.01,0.03", "--out", out, "--format", "json"]])
        assert r.exit_code in (0, 1, 4), r.output  # the gate's verdict may fail; the numbers are compared
        reps[rt] = json.loads((out / "report.json").read_text())
    assert reps["auto"]["exit_code"] == reps["torch"]["exit_code"]
    assert reps["auto"]["environment"]["gradients"].startswith("onnxruntime"), reps["auto"]["environment"]
    bad = _close(_metrics(reps["auto"]), _metrics(reps["torch"]), rtol=1e-3, atol=1e-5)
    assert not bad, bad


def test_verify_checks_onnxruntime_backward_against_the_interpreter():
    rep = json.loads(_run(["verify", ROBUST, "--json"]).stdout)
    ob = rep["result"]["ort_backward"]
    assert ob is not None and ob["status"] == "pass" and ob["max_rel_error"] <= ob["tol"] == 1e-4, ob
    checks = {c["id"]: c for c in rep["checks"]}
    assert any("ort_backward_rel_error" in k for k in checks), list(checks)
    # the existing checks are still there, and none under --runtime torch
    rep_t = json.loads(_run(["--runtime", "torch", "verify", ROBUST, "--json"]).stdout)
    assert rep_t["result"]["ort_backward"] is None
    ids_t = {m["id"] for m in rep_t["metrics"]}
    ids = {m["id"] for m in rep["metrics"]}
    assert ids - ids_t == {m for m in ids if "ort_backward_rel_error" in m}, (ids, ids_t)


def test_verify_ort_backward_fails_when_the_two_disagree(monkeypatch):
    """A backward that is off by 1% is caught (the check is not vacuous)."""
    import torch

    from jacaudit.analyses.verify import ort_backward_check
    from jacaudit.data.feeds import load_feeds
    from jacaudit.models import load

    m = load(str(ROBUST), runtime="onnxruntime")
    f = load_feeds(m, None, seed=0)
    ok = ort_backward_check(m, f.feeds, f.input_name)
    assert ok.status == "pass" and ok.max_rel_error < 1e-4
    inner = m._ort.grad.run

    def skewed(feeds, out_names):
        outs = inner(feeds, out_names)
        return [o * 1.01 for o in outs]  # values and gradients 1% off

    monkeypatch.setattr(m._ort.grad, "run", skewed)
    bad = ort_backward_check(m, f.feeds, f.input_name)
    assert bad.status == "fail" and bad.max_rel_error == pytest.approx(0.01, rel=1e-3), bad
    del torch


def test_ray_model_spec_and_fingerprint_carry_the_runtime(monkeypatch, tmp_path):
    from jacaudit import distributed
    from jacaudit.cli import common
    from jacaudit.models import load

    monkeypatch.setattr(common.state, "runtime", "onnxruntime")
    spec = common.model_spec("cpu", None)
    assert spec["runtime"] == "onnxruntime"
    assert load(str(ROBUST), **spec).runtime == "onnxruntime"  # what a Ray worker does with job.load

    # the Job a dataset command builds (the one sent to the workers) carries it
    seen = []
    real = distributed.run_batches

    def spy(job, model, **kw):
        seen.append(job)
        return real(job, model, **kw)

    monkeypatch.setattr(distributed, "run_batches", spy)
    _run(["--runtime", "onnxruntime", "saliency", SHAPES, SAMPLES / "shapes" / "examples", "--method", "grad",
          "--out", tmp_path / "o", "--format", "json"])
    assert seen and seen[0].load["runtime"] == "onnxruntime", [j.load for j in seen]
    assert load(seen[0].model_path, **seen[0].load).runtime == "onnxruntime"

    # a resume under another runtime does not reuse the shards
    from jacaudit.data.dataset import load_dataset  # noqa: F401  (the index type comes from the command)

    class _Index:
        entries = []

    fps = {rt: common.shard_fingerprint(str(ROBUST), _Index(), "plan", 4, {**spec, "runtime": rt})
           for rt in ("auto", "onnxruntime", "torch")}
    assert len({json.dumps(v, sort_keys=True) for v in fps.values()}) == 3
    assert fps["auto"]["runtime"] != fps["torch"]["runtime"]


def test_verify_ort_backward_is_inconclusive_where_onnxruntime_forward_differs(tmp_path):
    """onnxruntime's Sigmoid is accurate to ~1e-7 absolute: on outputs that saturate near 0 (sigmoid(-17) = 4e-8)
    its forward and so its backward differ from the interpreter's by far more than 1e-4 relative. The check then
    says it cannot judge (inconclusive, with the forward's figure), not that the backward graph is wrong; the same
    graph at inputs near 0 passes."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper

    from jacaudit.analyses.verify import ort_backward_check
    from jacaudit.models import load

    g = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "sig",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    p = tmp_path / "sig.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(p))
    m = load(str(p), runtime="onnxruntime")
    x = torch.from_numpy(np.linspace(-17.5, -16.5, 64, dtype=np.float32)[None])
    with torch.no_grad():
        y_ort = m.run({"x": x})[0].double()
    exact = torch.sigmoid(x.double())
    fwd = float((y_ort - exact).abs().max() / exact.abs().max())
    assert fwd > 1e-3  # the premise: onnxruntime's forward is off there (relative to max|y|)
    r = ort_backward_check(m, {"x": x}, "x")
    assert r.status == "inconclusive" and r.max_rel_error > 1e-4, r
    assert "forward differs" in r.note
    near0 = ort_backward_check(m, {"x": torch.linspace(-2, 2, 64)[None]}, "x")
    assert near0.status == "pass", near0


def test_verify_ort_backward_disagreement_only_at_the_given_point_is_a_kink(monkeypatch):
    """A disagreement that does not reproduce at two nearby points (as a unit at a kink that the two float32
    forwards round to different sides) is not a backward bug: the check passes on the nearby points' figure and
    says so; one that reproduces there fails (the test above)."""
    import torch

    from jacaudit.analyses.verify import ort_backward_check
    from jacaudit.data.feeds import load_feeds
    from jacaudit.models import load

    m = load(str(ROBUST), runtime="onnxruntime")
    f = load_feeds(m, None, seed=0)
    x0 = f.feeds[f.input_name].detach().clone()
    inner = m._ort.grad.run

    def skewed_at_x0(feeds, out_names):
        outs = inner(feeds, out_names)
        if torch.equal(feeds[f.input_name].detach(), x0):
            return [o * 1.01 for o in outs]
        return outs

    monkeypatch.setattr(m._ort.grad, "run", skewed_at_x0)
    r = ort_backward_check(m, f.feeds, f.input_name)
    assert r.status == "pass" and r.max_rel_error < 1e-4, r
    assert "nearby points" in r.note and "kink" in r.note


def _lstm_classifier(tmp_path) -> Path:
    """A conv + LSTM classifier as torch's exporter writes it, with an Einsum after the LSTM: the LSTM has an
    ONNX rule, the Einsum none (it runs as a torch island between onnxruntime's pieces of the backward)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(3, 8, 3, padding=1)
            self.rnn = torch.nn.LSTM(8, 6, bidirectional=True)
            self.fc = torch.nn.Linear(12, 4)
            self.mix = torch.nn.Parameter(torch.randn(12, 12) / 4)

        def forward(self, x):                                  # (1, 3, T)
            h = torch.relu(self.conv(x)).permute(2, 0, 1)      # (T, 1, 8)
            y, _ = self.rnn(h)
            return self.fc(torch.einsum("bi,ij->bj", y[-1], self.mix))

    torch.manual_seed(0)
    path = tmp_path / "lstm.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 10),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"])
    return path


def test_inspect_and_verify_name_the_torch_islands(tmp_path):
    path = _lstm_classifier(tmp_path)
    rep = _inspect(["inspect", path])
    got = rep["result"]["input_gradients"]
    assert got.startswith("onnxruntime") and "torch islands: Einsum" in got and "LSTM" not in got, got
    rep = json.loads(_run(["verify", path, "--json"]).stdout)
    ob = rep["result"]["ort_backward"]
    assert ob is not None and ob["status"] == "pass" and ob["max_rel_error"] <= ob["tol"], ob


def test_gradient_paths_with_islands_are_onnxruntime_paths():
    from jacaudit.engine.gradpaths import describe_paths

    class M:
        format, runtime, _ort = "onnx", "auto", object()

    d = describe_paths(M(), ["onnxruntime with torch islands (LSTM x2)", "batches over 8 with grouped convolutions"])
    assert d == "onnxruntime with torch islands (LSTM x2); torch interpreter (batches over 8 with grouped convolutions)"
    assert describe_paths(M(), ["onnxruntime", "onnxruntime with torch islands (GRU)"]) == \
        "onnxruntime; onnxruntime with torch islands (GRU)"
