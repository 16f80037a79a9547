"""TorchScript on a par with ONNX (issue 9, finding 6): unknown shapes/dtypes said as unknown, inputs cast to the
model's parameter dtype (and said), the internal-state check on every path.

Truths: closed forms of tiny scripted modules (a linear map's Jacobian is its weight)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jacaudit
from jacaudit.cli.main import app
from jacaudit.data.feeds import load_feeds


def _run(args, code=0):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    return r


class _Double(torch.nn.Module):
    """A linear map in float64 (parameters) with a float64 buffer added."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(4, 3).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.register_buffer("offset", torch.arange(3, dtype=torch.float64))

    def forward(self, x):
        return self.lin(x) + self.offset


class _Stateful(torch.nn.Module):
    """y = x * n where n counts the calls: three identical calls give three answers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.n += 1.0
        return x * self.n


def _script(mod, path):
    torch.jit.script(mod).save(str(path))
    return str(path)


def test_inspect_says_unknown_not_none_or_not_differentiable(tmp_path):
    p = _script(_Double(), tmp_path / "d.pt")
    r = _run(["inspect", p, "--json", "--format", ""])
    x = json.loads(r.stdout)["result"]["inputs"][0]
    assert x["name"] == "x" and x["dtype"] == "unknown" and x["differentiable"] is None
    assert not json.loads(r.stdout)["result"]["notes"]          # no "not differentiable" note
    r = _run(["inspect", p, "--format", ""])
    row = next(line for line in r.stdout.splitlines() if line.strip().startswith("input"))
    assert "None" not in row and " no" not in row and "unknown" in row
    assert jacaudit.describe_file(p)["inputs"][0]["differentiable"] is None


def test_double_parameters_take_float_inputs_cast_and_said(tmp_path):
    p = _script(_Double(), tmp_path / "d.pt")
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    out = tmp_path / "v"
    _run(["verify", p, "--input", tmp_path / "x.npy", "-k", "2", "--out", out, "--format", "json"])
    rep = json.loads((out / "report.json").read_text())
    assert any("cast to the model's parameter dtype float64" in w for w in rep["warnings"])
    out = tmp_path / "j"
    _run(["jacobian", p, "--shape", "1,4", "--save", "--out", out, "--format", "json"])
    W = _Double().lin.weight.detach().numpy()
    np.testing.assert_allclose(np.load(out / "jacobian.npy").reshape(3, 4), W, rtol=1e-6, atol=1e-6)
    rep = json.loads((out / "report.json").read_text())
    assert any("cast" in w for w in rep["warnings"]) and rep["settings"]["shape"] == {"x": [1, 4]}


@pytest.mark.parametrize("with_input", [True, False])
def test_the_state_check_runs_on_every_path(tmp_path, with_input):
    p = _script(_Stateful(), tmp_path / "s.pt")
    np.save(tmp_path / "x.npy", np.full((1, 3), 0.5, np.float32))
    np.savez(tmp_path / "x.npz", x=np.full((1, 3), 0.5, np.float32))
    for src in (["--input", tmp_path / "x.npy"], ["--input", tmp_path / "x.npz"],
                ["--input", f"x={tmp_path / 'x.npy'}"]) if with_input else (["--shape", "1,3"],):
        out = tmp_path / "o"
        _run(["jacobian", p, *src, "--out", out, "--format", "json"])
        rep = json.loads((out / "report.json").read_text())
        assert any("keeps internal state" in w for w in rep["warnings"]), (src, rep["warnings"])
    f = load_feeds(jacaudit.load(p), str(tmp_path / "x.npy"))
    assert any("keeps internal state" in w for w in f.warnings)


def test_torchscript_input_without_data_or_shape_is_exit_2(tmp_path):
    p = _script(_Double(), tmp_path / "d.pt")
    r = _run(["jacobian", p, "--format", ""], code=2)
    assert "'x'" in r.output and "--shape" in r.output and "Traceback" not in r.output
