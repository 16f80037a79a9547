"""inspect (issue 9, finding 7): parameter counts include Constant-node weights; --tensors lists internal float
tensors with their shapes (checked against onnxruntime); unknown tensor names get the closest matches; opsets and
symbolic dims are shown tidily. Truths: the numpy arrays the graphs are built from, onnxruntime's outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh
from typer.testing import CliRunner

from jacaudit.cli.main import app


def constant_cnn(path: Path, *, const: bool = True, batch: int | str = 1, seed: int = 0,
                 nan_in: str | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """A small CNN (Conv-Relu-MaxPool-Flatten-Gemm-Softmax) whose weights are Constant nodes behind Identity
    nodes (as tf2onnx/paddle2onnx write them), or initializers (``const=False``). ``nan_in`` plants a NaN in
    that weight. Returns the file and the weights."""
    rng = np.random.default_rng(seed)
    ws = {"W1": rng.normal(0, .3, (4, 3, 3, 3)).astype(np.float32), "b1": rng.normal(0, .1, 4).astype(np.float32),
          "W2": rng.normal(0, .3, (4 * 6 * 6, 5)).astype(np.float32), "b2": rng.normal(0, .1, 5).astype(np.float32)}
    if nan_in:
        ws[nan_in].flat[0] = np.nan
    nodes, inits = [], []
    for k, v in ws.items():
        if const:
            nodes.append(h.make_node("Constant", [], [k + "_c"], value=nh.from_array(v, k + "_t")))
            nodes.append(h.make_node("Identity", [k + "_c"], [k]))
        else:
            inits.append(nh.from_array(v, k))
    nodes += [h.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
              h.make_node("Relu", ["c1"], ["r1"]),
              h.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
              h.make_node("Flatten", ["p1"], ["f"]),
              h.make_node("Gemm", ["f", "W2", "b2"], ["logits"], name="fc"),
              h.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    g = h.make_graph(nodes, "cnn", [h.make_tensor_value_info("x", TP.FLOAT, [batch, 3, 12, 12])],
                     [h.make_tensor_value_info("prob", TP.FLOAT, [batch, 5])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path, ws


def _run(args, code=0):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


@pytest.mark.parametrize("const", [True, False])
def test_parameters_count_constant_node_weights(tmp_path, const):
    path, ws = constant_cnn(tmp_path / "cnn.onnx", const=const)
    truth = sum(v.size for v in ws.values())  # 837
    r = _run(["inspect", path, "--json"])
    rep = json.loads(r.stdout)
    assert rep["result"]["parameters"] == truth
    assert rep["model"]["parameters"] == truth


def test_parameters_counted_when_an_op_is_unsupported(tmp_path):
    """The fallback description (an op the interpreter lacks) counts Constant weights too."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    g = h.make_graph([h.make_node("Constant", [], ["w"], value=nh.from_array(w, "w")),
                      h.make_node("MatMul", ["x", "w"], ["y"]),
                      h.make_node("NoSuchOp", ["y"], ["z"], domain="example.custom")], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, [1, 3])],
                     [h.make_tensor_value_info("z", TP.FLOAT, [1, 4])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("example.custom", 1)])
    onnx.save(m, str(tmp_path / "u.onnx"))
    rep = json.loads(_run(["inspect", tmp_path / "u.onnx", "--json"], code=1).stdout)
    assert rep["result"]["parameters"] == w.size
    assert not rep["result"]["supported"]


def test_tensors_lists_internal_float_tensors_with_ort_shapes(tmp_path):
    import onnxruntime as ort

    path, _ = constant_cnn(tmp_path / "cnn.onnx")
    r = _run(["inspect", path, "--tensors", "--json"])
    listed = {t["name"]: t for t in json.loads(r.stdout)["result"]["tensors"]}
    # the activations, not the weights behind Identity nodes, nor the graph output
    assert set(listed) == {"c1", "r1", "p1", "f", "logits"}
    # truth: onnxruntime computes every one of them with exactly those shapes
    m = onnx.load(str(path))
    for name in listed:
        m.graph.output.append(h.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(list(listed), {"x": np.zeros((1, 3, 12, 12), np.float32)})
    for name, arr in zip(listed, outs):
        assert listed[name]["shape"] == list(arr.shape), name
        assert listed[name]["dtype"] == "float32"
    # on stdout (no --json): a table with the names and shapes
    r = _run(["inspect", path, "--tensors"])
    assert "5 internal float tensor(s)" in r.stdout
    assert "p1" in r.stdout and "1x4x6x6" in r.stdout
    # and in the HTML report
    out = tmp_path / "rep"
    _run(["inspect", path, "--tensors", "--out", out])
    html = (out / "report.html").read_text()
    assert "Internal tensors" in html and "[1, 4, 6, 6]" in html
    # without --tensors nothing is listed
    assert json.loads(_run(["inspect", path, "--json"]).stdout)["result"]["tensors"] is None


def test_unknown_tensor_names_get_the_closest_matches(tmp_path):
    path, _ = constant_cnn(tmp_path / "cnn.onnx")
    for opt, wrong, right in (("--wrt", "logit", "logits"), ("--output-name", "logit", "logits"),
                              ("--input-name", "X", "x"), ("--wrt", "p", "p1")):
        r = _run(["jacobian", path, opt, wrong], code=2)
        errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errs) == 1, r.stderr
        assert f"did you mean {right!r}" in errs[0], errs[0]
        assert "Traceback" not in r.output


def test_opset_and_symbolic_dims_are_tidy(tmp_path):
    expr = "floor(\n   (height - 3) / 2\n) + 1 + some_very_long_symbol_name_that_goes_on_and_on"
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, ["batch", 4])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["batch", expr])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("ai.onnx.ml", 3)])
    onnx.save(m, str(tmp_path / "t.onnx"))
    r = _run(["inspect", tmp_path / "t.onnx"])
    assert "opset=ai.onnx 17, ai.onnx.ml 3" in r.stdout
    assert "{" not in r.stdout.splitlines()[0]
    rep = json.loads(_run(["inspect", tmp_path / "t.onnx", "--json"]).stdout)
    dim = rep["result"]["outputs"][0]["shape"][1]
    assert "\n" not in dim and dim.startswith("floor( (height - 3) / 2 ) + 1") and len(dim) <= 40
    assert rep["result"]["inputs"][0]["shape"] == ["batch", 4]
    # the table row of the output is one line
    row = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("output")]
    assert len(row) == 1 and "floor(" in row[0]
