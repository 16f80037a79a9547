"""Focused tests of the fixes the corpus asked for: structural ONNX checks (exit 2 before compiling), --out
checked before the computation, no empty --out after a failed run, one-line usage errors from the console
script, non-finite inputs refused, float64 data for a float32 graph, the all-zero Jacobian warned, and the hint
to --model-arg."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from jacaudit.cli.main import app
from jacaudit.errors import EXIT_INPUT, DataError, InputError, ModelLoadError, UnsupportedError
from jacaudit.models import load

from . import builders as B

torch.set_num_threads(1)
TAB = str(B.TABULAR)


def _cli(args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.mark.parametrize("build, err, text", [
    (B.cycle, ModelLoadError, "cycle"),
    (B.undefined_tensor, ModelLoadError, "'ghost'"),
    (B.undefined_output, ModelLoadError, "computed by no node"),
    (B.no_outputs, ModelLoadError, "no outputs"),
    (B.huge_initializer, ModelLoadError, "1,099,511,627,776 values"),
    (B.wrong_size_initializer, ModelLoadError, "holds 5 value"),
    (B.zero_dim, ModelLoadError, "size 0 on axis 1"),
    (B.future_opset, UnsupportedError, "opset 99"),
], ids=["cycle", "undefined", "output", "no-outputs", "huge", "short", "zero-dim", "opset"])
def test_structural_checks_are_input_errors(build, err, text, tmp_path):
    with pytest.raises(err, match=text) as e:
        load(str(build(tmp_path)))
    assert e.value.exit_code == EXIT_INPUT and "\n" not in str(e.value)


def test_the_supported_opset_still_loads(tmp_path):
    from jacaudit.models.validate import MAX_OPSET

    assert load(str(B.linear(tmp_path, opset=MAX_OPSET))).run({"x": torch.ones(1, 4)})[0].shape == (1, 2)


def test_out_is_checked_before_computing(tmp_path, monkeypatch):
    """The writability check runs before the runtime set-up and the body: a file named as --out costs nothing."""
    import jacaudit.cli.runner as runner

    def never(*a, **k):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(runner, "setup_runtime", never)
    f = tmp_path / "f"
    f.write_text("x")
    r = _cli(["jacobian", TAB, "--out", f])
    assert r.exit_code == 2 and r.stderr.strip() == f"error: --out {f}: {f} is a file, not a folder", r.output


def test_a_failed_write_leaves_no_empty_out(tmp_path, monkeypatch):
    import jacaudit.report as report

    def boom(report_, out_dir, formats, stem="report"):
        os.makedirs(os.path.join(out_dir, "sub"), exist_ok=True)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_reports", boom)
    out = tmp_path / "out"
    r = _cli(["jacobian", TAB, "--out", out])
    assert r.exit_code == 3 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_an_existing_out_is_kept_after_a_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = _cli(["jacobian", str(B.cycle(tmp_path)), "--out", out])
    assert r.exit_code == 2 and out.is_dir()


def test_usage_errors_are_one_line_from_the_console_script(tmp_path):
    """As a user runs it (python -m, the entry point's main()): one line, exit 2, no Usage/Try lines."""
    for argv in (["jacobian", TAB, "--frobnicate"], ["--threads", "0", "jacobian", TAB], ["jacobian"]):
        p = subprocess.run(["timeout", "120", sys.executable, "-m", "jacaudit.cli.main", *argv],
                           capture_output=True, text=True, env={**os.environ, "JACAUDIT_OUT": str(tmp_path / "o")})
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
        assert "--help" in lines[0]
    p = subprocess.run(["timeout", "120", sys.executable, "-m", "jacaudit.cli.main", "--help"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "Usage" in p.stdout


def test_an_error_is_the_only_line_even_after_notes():
    """The synthetic-input note comes before the failure in the computation; only the error is printed."""
    r = _cli(["jacobian", TAB, "--output-name", "nope"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli(["jacobian", TAB, "--format", "json"])
    assert r.exit_code == 0 and "no data for input 'features'" in r.stderr  # printed once the run completed


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused(bad, tmp_path):
    from jacaudit.data.feeds import load_feeds

    a = np.full((1, 12), 0.5, np.float32)
    a[0, 4] = bad
    np.save(tmp_path / "a.npy", a)
    with pytest.raises(DataError, match=r"first at index \(0, 4\)"):
        load_feeds(load(TAB), str(tmp_path / "a.npy"))


def test_float64_data_feeds_a_float32_graph(tmp_path):
    np.save(tmp_path / "a.npy", np.full((1, 12), 0.5))
    r = _cli(["jacobian", TAB, "-i", tmp_path / "a.npy", "--out", tmp_path / "out", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["status"] == "pass"


def test_an_all_zero_jacobian_is_warned(tmp_path):
    r = _cli(["jacobian", str(B.floor_output(tmp_path)), "--out", tmp_path / "out", "--json"])
    assert r.exit_code == 0, r.output
    assert any("zero everywhere" in w for w in json.loads(r.stdout)["warnings"])


def test_a_missing_forward_argument_points_to_model_arg(tmp_path):
    m = load(str(B.extra_arg_ts(tmp_path)))
    with pytest.raises(InputError, match=r"'k'.*k: int.*--model-arg"):
        m.run({"x": torch.ones(1, 3)})
    m2 = load(str(B.extra_arg_ts(tmp_path)), extra_args=(2,))
    assert torch.equal(m2.run({"x": torch.ones(1, 3)})[0], torch.full((1, 3), 2.0))


def test_a_name_that_is_not_utf8_is_a_load_error(tmp_path):
    """protobuf hands back bytes for an invalid UTF-8 string field (found by the fuzz test)."""
    from jacaudit.models import describe_file

    p = B.linear(tmp_path)
    data = p.read_bytes()
    assert data.count(b"MatMul") == 1
    p.write_bytes(data.replace(b"MatMul", b"MatM\xe1l"))
    for loader in (load, describe_file):
        with pytest.raises(ModelLoadError, match="not valid UTF-8"):
            loader(str(p))


def test_an_initializer_of_undefined_type_is_a_load_error(tmp_path):
    import onnx

    m = onnx.load(str(B.linear(tmp_path)))
    m.graph.initializer[0].data_type = onnx.TensorProto.UNDEFINED
    B.save(m, tmp_path / "undef.onnx")
    with pytest.raises(ModelLoadError, match="element type"):
        load(str(tmp_path / "undef.onnx"))


def test_python_warnings_of_a_model_are_one_line_each(tmp_path):
    """warnings.warn inside a TorchScript forward: one 'warning:' line however often it is called; nothing of
    it when the run fails (the error stands alone)."""
    p = B.warning_ts(tmp_path)
    r = _cli(["jacobian", p, "--shape", "1,3", "--out", tmp_path / "a"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if "deprecated" in ln]
    assert lines == ["warning: this model is deprecated (UserWarning)"], r.stderr
    r = _cli(["jacobian", p, "--shape", "1,3", "--out", tmp_path / "b", "--output-name", "nope"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
