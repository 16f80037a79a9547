"""Config precedence: command line > environment > config file > defaults."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from jacaudit.cli.main import app

RELU = None


@pytest.fixture()
def relu_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    p = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]), str(p))
    return str(p)


def _run(args, env=None, cwd=None, monkeypatch=None):
    if cwd is not None:
        monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args, env=env or {})


def _is_json(text):
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_precedence(tmp_path, relu_model, monkeypatch):
    (tmp_path / "jacaudit.toml").write_text("[inspect]\njson = true\n")
    r = _run(["inspect", relu_model], cwd=tmp_path, monkeypatch=monkeypatch)
    assert r.exit_code == 0 and _is_json(r.stdout)                       # file > default
    r = _run(["inspect", relu_model], env={"JACAUDIT_INSPECT_JSON": "0"}, cwd=tmp_path, monkeypatch=monkeypatch)
    assert r.exit_code == 0 and not _is_json(r.stdout)                   # env > file
    r = _run(["inspect", relu_model, "--json"], env={"JACAUDIT_INSPECT_JSON": "0"}, cwd=tmp_path,
             monkeypatch=monkeypatch)
    assert r.exit_code == 0 and _is_json(r.stdout)                       # CLI > env


def test_pyproject_table_and_unknown_keys(tmp_path, relu_model, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n[tool.jacaudit]\njson = true\n")
    r = _run(["inspect", relu_model], cwd=tmp_path, monkeypatch=monkeypatch)
    assert r.exit_code == 0 and _is_json(r.stdout)
    (tmp_path / "jacaudit.toml").write_text("jsno = true\n")
    r = _run(["inspect", relu_model], cwd=tmp_path, monkeypatch=monkeypatch)
    assert r.exit_code == 2 and "unknown option(s) jsno" in r.stderr
