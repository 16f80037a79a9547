"""The command skeleton end to end: checks in every report, --json = report.json, thresholds and exit codes,
--exit-zero, JUnit/SARIF files, the job summary, a baseline that catches a planted regression, config keys."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from jacaudit.cli.main import app
from jacaudit.results import validate

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ARM = ROOT / "sample_models/arm/arm.pt"


def _run(args, code=0, env=None):
    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


def _linear(path: Path, scale: float) -> Path:
    """y = (scale * W) x: the spectral norm is scale * sigma_max(W) (closed form)."""
    lin = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]) * scale)
    torch.jit.script(lin).save(str(path))
    return path


@pytest.mark.parametrize("cmd", [["inspect", ROOT / "sample_models/tabular/tabular_mlp.onnx"],
                                 ["jacobian", ARM, "--shape", "1,3"],
                                 ["verify", ROOT / "sample_models/tabular/tabular_mlp.onnx", "-k", "1"],
                                 ["saliency", ROOT / "sample_models/shapes/shapes_cnn.onnx",
                                  ROOT / "sample_models/shapes/examples/02_circle.png"]])
def test_every_command_writes_checks_and_json_is_the_report(cmd, tmp_path):
    out = tmp_path / "r"
    r = _run([*cmd, "--out", out, "--json", "--format", "json,junit,sarif"])
    d = json.loads(r.stdout)
    assert d == json.loads((out / "report.json").read_text())
    validate(d)
    assert d["schema_version"] == "1.2" and d["checks"], d["checks"]  # 1.2: environment.runtime/gradients
    assert all(c["id"].startswith(f"{cmd[0]}.") for c in d["checks"])
    suite = ET.parse(out / "report.junit.xml").getroot()
    assert len(suite.findall(".//testcase")) == len(d["checks"])
    sarif = json.loads((out / "report.sarif").read_text())
    assert sarif["version"] == "2.1.0" and sarif["runs"][0]["tool"]["driver"]["name"] == "jacaudit"


def test_fail_threshold_exit_codes_junit_and_summary(tmp_path):
    import junitparser

    p = _linear(tmp_path / "lin.pt", 1.0)
    sigma = float(np.linalg.svd(np.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]), compute_uv=False)[0])
    summary = tmp_path / "summary.md"
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    junit = tmp_path / "j.xml"
    r = _run(["jacobian", p, "--shape", "1,3", "--fail-on", f"spectral_norm>{sigma * 0.9}", "--out", tmp_path / "a",
              "--junit", junit, "--sarif", tmp_path / "s.sarif"], code=1, env=env)
    assert "FAIL" in r.stdout and "spectral_norm" in r.stdout
    d = json.loads((tmp_path / "a/report.json").read_text())
    assert d["status"] == "fail" and d["exit_code"] == 1
    c = next(c for c in d["checks"] if c["check"] == "spectral_norm")
    assert c["status"] == "fail" and c["value"] == pytest.approx(sigma, rel=1e-6) and c["threshold_source"] == "cli"
    assert repr(c["value"]) in c["message"]  # the unrounded value next to the threshold
    xml = junitparser.JUnitXml.fromfile(str(junit))
    cases = [case for s in (xml if hasattr(xml, "__iter__") else [xml]) for case in s]
    assert len(cases) == len(d["checks"])
    assert sum(1 for case in cases if case.result and type(case.result[0]).__name__ == "Failure") == 1
    sarif = json.loads((tmp_path / "s.sarif").read_text())
    assert [res["level"] for res in sarif["runs"][0]["results"]] == ["error"]
    assert "spectral" in summary.read_text()
    # the same with --exit-zero: reported, not failed; the summary is appended, not replaced
    _run(["jacobian", p, "--shape", "1,3", "--fail-on", f"spectral_norm>{sigma * 0.9}", "--out", tmp_path / "b",
          "--exit-zero"], code=0, env=env)
    assert json.loads((tmp_path / "b/report.json").read_text())["status"] == "fail"
    assert summary.read_text().count("jacobian") >= 2
    # a warn threshold does not fail the build
    _run(["jacobian", p, "--shape", "1,3", "--warn-on", f"spectral_norm>{sigma * 0.9}", "--out", tmp_path / "c"])
    assert json.loads((tmp_path / "c/report.json").read_text())["status"] == "warn"


def test_bad_thresholds_are_usage_errors(tmp_path):
    r = _run(["jacobian", ARM, "--shape", "1,3", "--fail-on", "spectral_nrm>1", "--out", tmp_path / "x"], code=2)
    assert "matches no metric" in r.output and "spectral_norm" in r.output and "Traceback" not in r.output
    r = _run(["jacobian", ARM, "--shape", "1,3", "--fail-on", "spectral_norm", "--format", ""], code=2)
    assert "cannot read threshold" in r.output
    r = _run(["jacobian", ARM, "--max-regression", "0.1", "--format", ""], code=2)
    assert "--baseline-report" in r.output


def test_baseline_catches_a_planted_regression(tmp_path):
    """The new model is twice as sensitive (closed form: spectral norm x2): with --max-regression it fails."""
    old = _linear(tmp_path / "old.pt", 1.0)
    new = _linear(tmp_path / "new.pt", 2.0)
    _run(["jacobian", old, "--shape", "1,3", "--out", tmp_path / "old", "--format", "json"])
    base = tmp_path / "old/report.json"
    # same model against its own baseline: nothing regressed
    r = _run(["jacobian", old, "--shape", "1,3", "--out", tmp_path / "same", "--baseline-report", base,
              "--max-regression", "0.05", "--format", "json"])
    d = json.loads((tmp_path / "same/report.json").read_text())
    assert d["baseline"]["regressions"] == [] and d["status"] == "pass"
    # listed only without --max-regression
    _run(["jacobian", new, "--shape", "1,3", "--out", tmp_path / "list", "--baseline-report", base, "--format",
          "json"])
    d = json.loads((tmp_path / "list/report.json").read_text())
    regs = {x["id"]: x for x in d["baseline"]["regressions"]}
    sid = "jacobian.spectral_norm[d output / d input]"
    assert sid in regs and regs[sid]["change"] == pytest.approx(1.0, rel=1e-6) and d["status"] == "pass"
    # gated
    r = _run(["jacobian", new, "--shape", "1,3", "--out", tmp_path / "gate", "--baseline-report", base,
              "--max-regression", "0.1", "--format", "json,md"], code=1)
    d = json.loads((tmp_path / "gate/report.json").read_text())
    st = {c["id"]: c["status"] for c in d["checks"]}
    assert st[sid] == "fail" and st["jacobian.frobenius_norm[d output / d input]"] == "fail"
    assert st["jacobian.nonfinite_entries[d output / d input]"] == "pass"
    assert "regress" in r.stdout
    # a baseline from another command is refused
    _run(["inspect", ROOT / "sample_models/tabular/tabular_mlp.onnx", "--out", tmp_path / "i", "--format", "json"])
    _run(["jacobian", new, "--shape", "1,3", "--baseline-report", tmp_path / "i/report.json", "--format", ""],
         code=2)


def test_config_keys_cannot_mean_two_things(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".git").mkdir()  # the config search stops here
    (tmp_path / "jacaudit.toml").write_text('method = "ig"\n')
    r = _run(["inspect", ROOT / "sample_models/tabular/tabular_mlp.onnx", "--format", ""], code=2)
    assert "saliency" in r.output and "table" in r.output
    p = _linear(tmp_path / "lin.pt", 1.0)
    (tmp_path / "jacaudit.toml").write_text('seed = 1\n[jacobian]\nfail_on = ["spectral_norm>0.5"]\n')
    _run(["jacobian", p, "--shape", "1,3", "--out", tmp_path / "cfg", "--format", "json"], code=1)
    d = json.loads((tmp_path / "cfg/report.json").read_text())
    c = next(c for c in d["checks"] if c["check"] == "spectral_norm")
    assert c["status"] == "fail" and c["threshold_source"] == "config" and d["settings"]["seed"] == 1
    # the environment overrides the file
    env = {"JACAUDIT_JACOBIAN_FAIL_ON": "spectral_norm>100; frobenius_norm>100"}
    _run(["jacobian", p, "--shape", "1,3", "--out", tmp_path / "env", "--format", "json"], env=env)
    d = json.loads((tmp_path / "env/report.json").read_text())
    assert {c["check"]: c["threshold_source"] for c in d["checks"]}["frobenius_norm"] == "env"


def test_inconclusive_verify_exits_4(tmp_path):
    """A model whose output does not depend on the input: J v = 0 = FD everywhere -> no evidence: exit 4."""
    class Const(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 0.0 + 1.0

    p = tmp_path / "const.pt"
    torch.jit.script(Const()).save(str(p))
    r = _run(["verify", p, "--shape", "1,4", "-k", "2", "--out", tmp_path / "v", "--format", "json"], code=4)
    d = json.loads((tmp_path / "v/report.json").read_text())
    assert d["status"] == "inconclusive" and d["exit_code"] == 4 and d["result"]["verdict"] == "inconclusive"
    assert {c["status"] for c in d["checks"] if c["check"] == "derivative_rel_error"} == {"skipped"}
    assert "INCONCLUSIVE" in r.stdout
    _run(["verify", p, "--shape", "1,4", "-k", "1", "--format", "", "--exit-zero"], code=0)


def test_saliency_checks_internal_state(tmp_path):
    """A model whose repeated calls disagree is called out by saliency too (jacobian/verify already do)."""
    class Stateful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count += 1
            return x.flatten(1)[:, :3] * self.count

    p = tmp_path / "stateful.pt"
    torch.jit.script(Stateful()).save(str(p))
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((1, 6)).astype(np.float32))
    r = _run(["saliency", p, x, "--out", tmp_path / "s", "--format", "json"])
    d = json.loads((tmp_path / "s/report.json").read_text())
    assert any("disagree" in w for w in d["warnings"]), d["warnings"]
    assert "disagree" in r.stderr
