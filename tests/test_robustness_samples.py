"""The CI-style test on the sample pair (issue 11): one gate config (sample_models/robust/gate.toml) passes the
Jacobian-regularised twin and fails the shapes CNN on the same labelled folder; JUnit counts the failures; a
baseline comparison catches the planted regression (the brittle model against the robust one's report); two runs
give identical JSON apart from timings. The figures are checked against the sample card, measured there by plain
torch code that shares nothing with jacaudit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jacaudit.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
SM = ROOT / "sample_models"
GATE = SM / "robust/gate.toml"
DATA = SM / "robust/data"
ROBUST, BRITTLE = SM / "robust/robust_cnn.onnx", SM / "shapes/shapes_cnn.onnx"
FAST = ["--eps", "0.003,0.01", "--norm-limit", "16", "--directions", "1", "--worst", "2"]


def _run(tmp_path, model, name, *extra, code):
    out = tmp_path / name
    r = CliRunner().invoke(app, ["--config", str(GATE), "robustness", str(model), str(DATA), "--out", str(out),
                                 "--json", "--format", "json", *FAST, *map(str, extra)])
    assert r.exit_code == code, (r.exit_code, r.output[-2000:])
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def card():
    return json.loads((SM / "robust/robust.json").read_text())


def test_one_gate_passes_the_robust_twin_and_fails_the_brittle_model(tmp_path, card):
    import junitparser

    ok = _run(tmp_path, ROBUST, "ok", "--junit", tmp_path / "ok.xml", code=0)
    bad = _run(tmp_path, BRITTLE, "bad", "--junit", tmp_path / "bad.xml", code=1)
    failing = sorted(c["check"] for c in bad["checks"] if c["status"] == "fail")
    assert failing == ["jacobian_frobenius_mean", "robust_accuracy@eps=0.01"]
    assert all(c["threshold_source"] == "config" for c in bad["checks"] if c["status"] == "fail")
    assert not [c for c in ok["checks"] if c["status"] == "fail"]
    assert sum(s.failures for s in junitparser.JUnitXml.fromfile(str(tmp_path / "bad.xml"))) == 2
    assert sum(s.failures for s in junitparser.JUnitXml.fromfile(str(tmp_path / "ok.xml"))) == 0
    # the figures agree with the card's (plain torch FGSM, exact Jacobians): FGSM is deterministic, so to the
    # image; the Jacobian norms on the first 16 inputs are near the card's 64-input means
    for rep, key in ((ok, "robust"), (bad, "brittle")):
        fig = card["robustness"][key]
        fgsm = {p["eps"]: p["robust_accuracy"] for p in rep["result"]["sweep"] if p["attack"] == "fgsm"}
        for e in (0.003, 0.01):
            assert fgsm[e] == pytest.approx(fig["fgsm_accuracy"][f"{e:g}"], abs=1e-4), (key, e)
        assert rep["result"]["clean_accuracy"] == pytest.approx(fig["clean_accuracy"], abs=1e-4)
    # a planted regression: the brittle model against the robust one's report
    reg = _run(tmp_path, BRITTLE, "reg", "--baseline-report", tmp_path / "ok" / "report.json",
               "--max-regression", "0.1", code=1)
    regressed = {c["id"] for c in reg["baseline"]["regressions"]}
    assert {"robustness.robust_accuracy@eps=0.01[dataset]", "robustness.jacobian_frobenius_mean[dataset]",
            "robustness.pgd_robust_accuracy@eps=0.01[dataset]"} <= regressed
    # identical JSON apart from timings (and the time stamp / command line of the run)
    again = _run(tmp_path, ROBUST, "ok", "--junit", tmp_path / "ok.xml", code=0)
    strip = lambda d: {k: v for k, v in d.items() if k not in ("timings", "created", "command_line")}  # noqa: E731
    assert json.dumps(strip(again), sort_keys=True) == json.dumps(strip(ok), sort_keys=True)
