"""Model loading: the quirks real exports have, and bad files giving one line and exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import jacaudit
from jacaudit.errors import InputError, ModelLoadError, UnsupportedOpError


def _save(model, path):
    onnx.save(model, str(path))
    return str(path)


def _mlp_model(batch="N", extra_unused=False, init_as_input=False, wrong_out_shape=False):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal((3,)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])]
    if extra_unused:
        inputs.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [2]))
    if init_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3]))
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]))
    out_shape = [7, 7] if wrong_out_shape else [batch, 3]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["y"], name="add"),
             helper.make_node("Mul", ["y", "y"], ["y2"], name="sq")]
    g = helper.make_graph(nodes, "mlp", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, out_shape)],
                          initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m, W, b


def _ort(path, feeds):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def test_symbolic_dims_multiple_outputs_and_calling_conventions(tmp_path):
    m, W, b = _mlp_model()
    p = _save(m, tmp_path / "m.onnx")
    model = jacaudit.load(p)
    assert [s.name for s in model.inputs] == ["x"]
    assert model.inputs[0].shape == ("N", 4)
    assert [s.name for s in model.outputs] == ["y", "y2"]
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    ref = _ort(p, {"x": x})
    y, y2 = model(torch.from_numpy(x))
    y_kw, _ = model(x=torch.from_numpy(x))
    np.testing.assert_allclose(y.numpy(), ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y2.numpy(), ref[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(y, y_kw)
    with pytest.raises(InputError):
        model(torch.zeros(1, 4), nope=torch.zeros(1))


def test_initializers_listed_as_inputs_unused_inputs_and_wrong_declared_shapes(tmp_path):
    m, W, b = _mlp_model(batch=2, extra_unused=True, init_as_input=True, wrong_out_shape=True)
    m.ir_version = 3  # old IR: initializers are also graph inputs
    m.opset_import[0].version = 9
    p = _save(m, tmp_path / "old.onnx")
    model = jacaudit.load(p)
    assert [s.name for s in model.inputs] == ["x", "unused"]
    x = np.ones((2, 4), np.float32)
    y, _ = model(torch.from_numpy(x), torch.zeros(2))
    assert tuple(y.shape) == (2, 3)  # the declared [7, 7] is wrong; the real shape wins
    np.testing.assert_allclose(y.numpy(), x @ W + b, rtol=1e-5, atol=1e-6)


def test_single_output_returns_tensor_and_float64(tmp_path):
    m, W, b = _mlp_model()
    del m.graph.output[1]
    p = _save(m, tmp_path / "one.onnx")
    model = jacaudit.load(p, dtype="float64")
    y = model(torch.ones(1, 4, dtype=torch.float64))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    J = torch.func.jacrev(lambda x: model(x))(torch.ones(1, 4, dtype=torch.float64))
    # closed form: dy[0,j]/dx[0,i] = W[i,j]
    np.testing.assert_allclose(J[0, :, 0, :].numpy(), W.T.astype(np.float64), rtol=0, atol=1e-7)


def test_external_data_loaded_and_escaping_paths_refused(tmp_path):
    m, W, b = _mlp_model()
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save(m, str(d / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    model = jacaudit.load(str(d / "m.onnx"))
    y, _ = model(torch.ones(1, 4))
    np.testing.assert_allclose(y.numpy()[0], np.ones(4, np.float32) @ W + b, rtol=1e-5)
    # now point the external data outside the model's folder
    m2 = onnx.load(str(d / "m.onnx"), load_external_data=False)
    for t in m2.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes((d / "weights.bin").read_bytes())
    onnx.save(m2, str(d / "evil.onnx"))
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        jacaudit.load(str(d / "evil.onnx"))


def test_unsupported_ops_found_before_running(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="ok"),
             helper.make_node("FancyOp", ["r"], ["y"], name="custom_1", domain="com.example"),
             helper.make_node("QuantizeLinear", ["r", "s"], ["q"], name="quant_1")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                           helper.make_tensor_value_info("q", TensorProto.UINT8, [2])],
                          initializer=[numpy_helper.from_array(np.array(0.1, np.float32), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    p = _save(m, tmp_path / "u.onnx")
    with pytest.raises(UnsupportedOpError) as ei:
        jacaudit.load(p)
    msg = str(ei.value)
    assert "com.example::FancyOp (opset 1; nodes 'custom_1')" in msg
    assert "ai.onnx::QuantizeLinear (opset 17; nodes 'quant_1')" in msg
    assert "Relu" not in msg


def test_internal_tensor_as_point_of_differentiation(tmp_path):
    """Integer token ids are not differentiable: differentiate w.r.t. the embedding output instead."""
    rng = np.random.default_rng(0)
    E = rng.standard_normal((10, 3)).astype(np.float32)
    W = rng.standard_normal((3, 2)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "W"], ["y"], name="head")]
    g = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])],
                          initializer=[numpy_helper.from_array(E, "E"), numpy_helper.from_array(W, "W")])
    p = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "seq.onnx")
    model = jacaudit.load(p)
    assert not model.inputs[0].is_float
    ids = torch.tensor([1, 5, 5, 9])
    f = model.function({"ids": ids}, wrt="emb", output="y")
    emb = torch.from_numpy(E[[1, 5, 5, 9]])
    J = torch.func.jacrev(f)(emb)  # (4,2,4,3)
    expected = np.einsum("ik,jl->ijkl", np.eye(4), W.T)  # dy[i,j]/demb[k,l] = delta_ik W[l,j]
    np.testing.assert_allclose(J.numpy(), expected, atol=1e-6)


@pytest.fixture()
def torch_files(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    files = {}
    files["state_dict"] = tmp_path / "sd.pt"
    torch.save(net.state_dict(), files["state_dict"])
    files["pickled_module"] = tmp_path / "full.pt"
    torch.save(net, files["pickled_module"])
    files["torchscript"] = tmp_path / "ts.pt"
    torch.jit.script(net).save(str(files["torchscript"]))
    files["truncated_ts"] = tmp_path / "trunc.pt"
    files["truncated_ts"].write_bytes(files["torchscript"].read_bytes()[:300])
    files["text"] = tmp_path / "notes.onnx"
    files["text"].write_text("this is not a model\n" * 20)
    onnx_bytes = _mlp_model()[0].SerializeToString()
    files["truncated_onnx"] = tmp_path / "cut.onnx"
    files["truncated_onnx"].write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    return files


def test_torch_files_are_identified_without_unpickling(torch_files):
    for key, needle in (("state_dict", "state_dict"), ("pickled_module", "not TorchScript"),
                        ("truncated_ts", "cannot be read")):
        with pytest.raises(ModelLoadError, match=needle):
            jacaudit.load(str(torch_files[key]))
    m = jacaudit.load(str(torch_files["torchscript"]))
    assert m.format == "torchscript"
    assert m(torch.ones(1, 3)).shape == (1, 2)


@pytest.mark.parametrize("key", ["state_dict", "pickled_module", "truncated_ts", "text", "truncated_onnx"])
def test_cli_bad_model_files_exit_2_with_one_line(torch_files, key):
    r = subprocess.run([sys.executable, "-m", "jacaudit", "inspect", str(torch_files[key])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_file_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jacaudit", "inspect", str(tmp_path / "nope.onnx")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not found" in r.stderr


def test_torchscript_extra_arguments_and_state(tmp_path):
    class Scaled(torch.nn.Module):
        def forward(self, x: torch.Tensor, rate: int) -> torch.Tensor:
            return x * float(rate)

    class Stateful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count += 1
            return x * self.count

    p1 = tmp_path / "scaled.pt"
    torch.jit.script(Scaled()).save(str(p1))
    m = jacaudit.load(str(p1), extra_args=(16000,))
    assert [s.name for s in m.inputs] == ["x"]
    assert torch.equal(m(torch.ones(2)), torch.full((2,), 16000.0))
    assert m.check_stateless({"x": torch.ones(2)}) is None
    p2 = tmp_path / "stateful.pt"
    torch.jit.script(Stateful()).save(str(p2))
    m2 = jacaudit.load(str(p2))
    assert "disagree" in m2.check_stateless({"x": torch.ones(2)})


def test_help_does_not_import_torch():
    code = "import sys; from jacaudit.cli.main import app; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_cli_model_args_and_state_warning(tmp_path):
    """--model-arg reaches a TorchScript forward's non-tensor argument; a stateful model is called out."""
    import json

    class Scaled(torch.nn.Module):
        def forward(self, x: torch.Tensor, rate: int) -> torch.Tensor:
            return x * float(rate)

    class Stateful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count += 1
            return x * self.count

    p1, p2 = tmp_path / "scaled.pt", tmp_path / "stateful.pt"
    torch.jit.script(Scaled()).save(str(p1))
    torch.jit.script(Stateful()).save(str(p2))
    base = [sys.executable, "-m", "jacaudit"]
    r = subprocess.run(base + ["--model-arg", "3", "jacobian", str(p1), "--shape", "1,2", "--json", "--format", ""],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert abs(summary["result"]["frobenius"]["value"] - 3 * np.sqrt(2)) < 1e-5  # J = 3·I (2x2)
    r = subprocess.run(base + ["jacobian", str(p2), "--shape", "1,2", "--format", ""], capture_output=True,
                       text=True, timeout=120)
    assert "disagree" in r.stderr
    onnx_path = _save(_mlp_model()[0], tmp_path / "m.onnx")
    r = subprocess.run(base + ["--model-arg", "3", "inspect", onnx_path, "--format", ""], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0  # inspect ignores it; loading for computation refuses it:
    r = subprocess.run(base + ["--model-arg", "3", "jacobian", onnx_path, "--format", ""], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "TorchScript models only" in r.stderr
