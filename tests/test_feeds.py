"""Shapes and feeds of one evaluation point (issue 9, findings 3 and 4).

Truths: the shapes asked for (closed form: an elementwise graph's Jacobian shape is its input shape twice), and
onnxruntime's outputs on the same arrays for a multi-input graph with a recurrent state (2, 1, H) and an int64
scalar input."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import jacaudit
from jacaudit.cli.main import app
from jacaudit.data.feeds import load_feeds
from jacaudit.errors import InputError

H = 4


def _run(args, code=0):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    return r


def _save(graph, path, opset=17):
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8

    onnx.save(m, str(path))
    return str(path)


# -- finding 3: dynamic dims -----------------------------------------------------------------------------
def _elementwise(path, dims, name="x"):
    """y = 2 * x on an input with the given (partly symbolic) dims."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    g = helper.make_graph([helper.make_node("Mul", [name, "two"], ["y"])], "ew",
                          [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)], [two])
    return _save(g, path)


@pytest.mark.parametrize("placeholder", ["?", "DynamicDimension.0", None])
def test_shape_is_used_exactly_placeholders_do_not_tie(tmp_path, placeholder):
    """--shape 1,3,2,6 on [P,3,P,P] runs 1x3x2x6 (like 1,3,48,192, which ran 1x3x192x192 when P tied the dims)."""
    p = _elementwise(tmp_path / "m.onnx", [placeholder, 3, placeholder, placeholder])
    r = _run(["jacobian", p, "--shape", "1,3,2,6", "--json", "--format", ""])
    rep = json.loads(r.stdout)
    assert list(rep["result"]["input_shape"]) == [1, 3, 2, 6]
    assert rep["settings"]["shape"] == {"x": [1, 3, 2, 6]}
    # the same per input by name
    r = _run(["jacobian", p, "--shape", "x=1,3,3,4", "--json", "--format", ""])
    assert list(json.loads(r.stdout)["result"]["input_shape"]) == [1, 3, 3, 4]


def test_unknown_dims_are_an_exit_2_naming_input_axes_and_option(tmp_path):
    p = _elementwise(tmp_path / "m.onnx", ["?", 3, "?", "?"])
    r = _run(["jacobian", p, "--format", ""], code=2)
    msg = r.output.strip().splitlines()[-1]
    assert "'x'" in msg and "2 (?)" in msg and "3 (?)" in msg and "--shape x=" in msg
    assert "Traceback" not in r.output
    # the API says the same instead of filling 1
    with pytest.raises(InputError, match="dynamic axes 2"):
        load_feeds(jacaudit.load(p), None)
    with pytest.raises(InputError, match="has 3 dims"):
        load_feeds(jacaudit.load(p), None, shape="1,3,4")
    with pytest.raises(InputError, match="declares"):
        load_feeds(jacaudit.load(p), None, shape="1,2,4,4")  # the static 3 is kept


def test_only_the_batch_axis_of_a_synthetic_input_is_1_and_it_is_said(tmp_path):
    p = _elementwise(tmp_path / "m.onnx", ["N", 5])
    f = load_feeds(jacaudit.load(p), None)
    assert f.shapes == {"x": [1, 5]}
    assert any("batch axis" in w and "by design" in w for w in f.warnings)
    # a synthetic sample (saliency's path) never fills a non-batch dim with 1
    from jacaudit.data import synthetic_sample

    spec = jacaudit.load(_elementwise(tmp_path / "m2.onnx", ["?", 3, "?", "?"])).input_spec()
    with pytest.raises(InputError, match="dynamic axes 2"):
        synthetic_sample(spec)


def _two_inputs_tied(path, a_dims, b_dims):
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "tied",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_dims),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, b_dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return _save(g, path)


def test_a_real_shared_name_ties_dims_a_placeholder_does_not(tmp_path):
    p = _two_inputs_tied(tmp_path / "t.onnx", ["batch", "len"], ["batch", "len"])
    f = load_feeds(jacaudit.load(p), None, shape="a=2,7")
    assert f.shapes == {"a": [2, 7], "b": [2, 7]}                # tied by the names batch, len
    p = _two_inputs_tied(tmp_path / "u.onnx", ["?", "?"], ["?", "?"])
    with pytest.raises(InputError, match="'b'.*dynamic axes 1"):
        load_feeds(jacaudit.load(p), None, shape="a=1,7")        # '?' ties nothing: b's length is unknown
    f = load_feeds(jacaudit.load(p), None, shape=["a=1,7", "b=1,7"])
    assert f.shapes == {"a": [1, 7], "b": [1, 7]}
    with pytest.raises(InputError, match="no model input named 'c'"):
        load_feeds(jacaudit.load(p), None, shape=["c=1,7"])


# -- finding 4: multi-input feeds with a recurrent state ---------------------------------------------------
def _rnn(path):
    """y = tanh(x W + flatten(state) U) * sr / 16000; new_state = state * 0.5 + tanh(x W)[None].
    Inputs: sr int64 scalar (first!), x float [?, 8], state float [2, ?, H]."""
    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.standard_normal((8, 2 * H)).astype(np.float32), "W")
    U = numpy_helper.from_array(rng.standard_normal((2 * H, 2 * H)).astype(np.float32), "U")
    shp = numpy_helper.from_array(np.array([1, 2 * H], np.int64), "shp")
    shp3 = numpy_helper.from_array(np.array([2, 1, H], np.int64), "shp3")
    k = numpy_helper.from_array(np.array(16000.0, np.float32), "k")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Reshape", ["state", "shp"], ["s2"]),
        helper.make_node("MatMul", ["s2", "U"], ["su"]),
        helper.make_node("Add", ["xw", "su"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h"]),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "k"], ["srs"]),
        helper.make_node("Mul", ["h", "srs"], ["y"]),
        helper.make_node("Tanh", ["xw"], ["hx"]),
        helper.make_node("Reshape", ["hx", "shp3"], ["hx3"]),
        helper.make_node("Mul", ["state", "half"], ["sh"]),
        helper.make_node("Add", ["sh", "hx3"], ["new_state"]),
    ]
    g = helper.make_graph(nodes, "rnn",
                          [helper.make_tensor_value_info("sr", TensorProto.INT64, []),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 8]),
                           helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "?", H])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("new_state", TensorProto.FLOAT, None)],
                          [W, U, shp, shp3, k, half])
    return _save(g, path)


def _arrays():
    rng = np.random.default_rng(1)
    return {"sr": np.array(8000, np.int64), "x": rng.standard_normal((1, 8)).astype(np.float32),
            "state": rng.standard_normal((2, 1, H)).astype(np.float32)}


def _ort_jacobian(path, arrays, eps=1e-3):
    """d y / d x by central differences through onnxruntime, in float64 on the float32 model."""
    import onnxruntime as ort

    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y0 = s.run(["y"], arrays)[0]
    x = arrays["x"].astype(np.float64)
    J = np.zeros(y0.shape + x.shape)
    for idx in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[idx] = eps
        yp = s.run(["y"], {**arrays, "x": (x + d).astype(np.float32)})[0].astype(np.float64)
        ym = s.run(["y"], {**arrays, "x": (x - d).astype(np.float32)})[0].astype(np.float64)
        J[(...,) + idx] = (yp - ym) / (2 * eps)
    return y0, J


def test_npz_feeds_every_input_with_its_stored_shape_and_matches_onnxruntime(tmp_path):
    p = _rnn(tmp_path / "rnn.onnx")
    arrays = _arrays()
    np.savez(tmp_path / "point.npz", **arrays)
    y0, J_ref = _ort_jacobian(p, arrays)
    # the API
    m = jacaudit.load(p)
    f = load_feeds(m, str(tmp_path / "point.npz"))
    assert f.shapes == {"sr": [], "x": [1, 8], "state": [2, 1, H]}       # as stored: no extra batch axis
    assert f.input_name == "x" and f.fixed == ["sr", "state"]            # the first float input, not 'sr'
    out = m.run(f.feeds, outputs=["y"])[0].numpy()
    np.testing.assert_allclose(out, y0, rtol=1e-5, atol=1e-6)
    J = jacaudit.jacobian(m, f.feeds, input="x", output="y")
    np.testing.assert_allclose(np.asarray(J), J_ref, rtol=2e-3, atol=2e-3)
    # the CLI: jacobian (saved J) and verify
    out_dir = tmp_path / "j"
    r = _run(["jacobian", p, "--input", tmp_path / "point.npz", "--output-name", "y", "--save", "--out", out_dir,
              "--format", "json"])
    rep = json.loads((out_dir / "report.json").read_text())
    assert rep["result"]["wrt"] == "x" and rep["settings"]["shape"]["state"] == [2, 1, H]
    np.testing.assert_allclose(np.load(out_dir / "jacobian.npy"), J_ref, rtol=2e-3, atol=2e-3)
    assert "Traceback" not in r.output
    r = _run(["verify", p, "--input", tmp_path / "point.npz", "--output-name", "y", "-k", "2", "--format", ""])
    assert "verdict: PASS" in r.stdout


def test_named_inputs_wrt_and_missing_inputs(tmp_path):
    p = _rnn(tmp_path / "rnn.onnx")
    arrays = _arrays()
    for k, v in arrays.items():
        np.save(tmp_path / f"{k}.npy", v)
    args = [f"--input=sr={tmp_path / 'sr.npy'}", f"--input=x={tmp_path / 'x.npy'}",
            f"--input=state={tmp_path / 'state.npy'}"]
    _, J_ref = _ort_jacobian(p, arrays)
    out_dir = tmp_path / "n"
    _run(["jacobian", p, *args, "--output-name", "y", "--save", "--out", out_dir, "--format", "json"])
    np.testing.assert_allclose(np.load(out_dir / "jacobian.npy"), J_ref, rtol=2e-3, atol=2e-3)
    # --wrt picks the state; sr and x are held fixed
    out_dir = tmp_path / "w"
    _run(["jacobian", p, *args, "--output-name", "y", "--wrt", "state", "--save", "--out", out_dir,
          "--format", "json"])
    assert np.load(out_dir / "jacobian.npy").shape == (1, 2 * H, 2, 1, H)
    # state has no data and no --shape fixes its '?' dim -> exit 2 naming it
    r = _run(["jacobian", p, f"--input=x={tmp_path / 'x.npy'}", f"--input=sr={tmp_path / 'sr.npy'}",
              "--format", ""], code=2)
    assert "'state'" in r.output and "dynamic axes 1" in r.output
    # with --shape for it, it is synthetic and said so
    f = load_feeds(jacaudit.load(p), [f"x={tmp_path / 'x.npy'}", f"sr={tmp_path / 'sr.npy'}"],
                   shape="state=2,1,4")
    assert f.shapes["state"] == [2, 1, H] and any("'state'" in w and "synthetic" in w for w in f.warnings)
    # a wrong stored shape and an unknown name are one-line exit 2
    np.save(tmp_path / "bad.npy", np.zeros((3, 1, H), np.float32))
    r = _run(["jacobian", p, "--input", tmp_path / "point.npz" if False else f"state={tmp_path / 'bad.npy'}",
              "--format", ""], code=2)
    assert "declares [2, ?, 4]" in r.output
    r = _run(["jacobian", p, "--input", f"stat={tmp_path / 'bad.npy'}", "--format", ""], code=2)
    assert "did you mean 'state'" in r.output


def _rate_branch(path):
    """silero-vad's shape: an If on an int64 "sample rate" input; only the 16000 branch fits a window of 4."""
    w16 = numpy_helper.from_array(np.ones((4, 2), np.float32), "w16")
    w8 = numpy_helper.from_array(np.ones((3, 2), np.float32), "w8")
    then = helper.make_graph([helper.make_node("MatMul", ["x", "w16"], ["a"])], "then", [],
                             [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "w8"], ["b"])], "else", [],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
    k = numpy_helper.from_array(np.array(16000, np.int64), "k")
    g = helper.make_graph([helper.make_node("Equal", ["sr", "k"], ["is16"]),
                           helper.make_node("If", ["is16"], ["y"], then_branch=then, else_branch=other)], "rate",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                           helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w16, w8, k])
    return _save(g, path)


def test_a_model_failing_on_synthetic_integer_inputs_names_them(tmp_path):
    """Synthetic values of an integer input (0 or 1) take the branch real data does not: one line naming the
    input and its value and how to give it (exit 2), not the interpreter's error deep in that branch alone;
    with the input given, the command runs."""
    p = _rate_branch(tmp_path / "rate.onnx")
    r = _run(["jacobian", p, "--json", "--format", ""], code=2)
    assert "synthetic values of its integer input(s) sr=" in r.output and "--input sr=FILE.npy" in r.output
    assert "MatMul" in r.output and "Traceback" not in r.output
    np.save(tmp_path / "sr.npy", np.array(16000, np.int64))
    r = _run(["jacobian", p, "--input", f"sr={tmp_path / 'sr.npy'}", "--json", "--format", ""])
    assert list(json.loads(r.stdout)["result"]["input_shape"]) == [1, 4]
