"""Model capabilities (what analyses ask a Model instead of its format): to(), reference(), internal tensors,
the softmax input, parameter randomisation that reaches an optimized graph, describe_file()."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import jacaudit.models as M
from jacaudit.errors import InputError


def _cnn_bn_softmax(path):
    """Conv -> BatchNormalization (folded into the Conv at load) -> Relu -> GAP -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(0)
    f = np.float32
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(f), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(f) * 0.1, "B"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(f), "g"),
             numpy_helper.from_array(rng.standard_normal(4).astype(f) * 0.1, "be"),
             numpy_helper.from_array(rng.standard_normal(4).astype(f) * 0.1, "mu"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(f), "var"),
             numpy_helper.from_array(rng.standard_normal((5, 4)).astype(f), "FW"),
             numpy_helper.from_array(rng.standard_normal(5).astype(f), "FB")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["fl"], name="flat"),
             helper.make_node("Gemm", ["fl", "FW", "FB"], ["logits"], transB=1, name="fc"),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="sm")]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return str(path)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


@pytest.fixture()
def onnx_model(tmp_path):
    return M.load(_cnn_bn_softmax(tmp_path / "cnn.onnx"))


@pytest.fixture()
def ts_model(tmp_path):
    p = tmp_path / "net.pt"
    torch.jit.script(_Net().eval()).save(str(p))
    return M.load(str(p))


def _x(n=2):
    return torch.from_numpy(np.random.default_rng(1).standard_normal((n, 3, 6, 6)).astype(np.float32))


def test_to_returns_self_or_a_retargeted_copy(onnx_model, ts_model):
    for m in (onnx_model, ts_model):
        assert m.to() is m and m.to("cpu", torch.float32) is m
        m64 = m.to(dtype=torch.float64)
        assert m64 is not m and m64.dtype == torch.float64 and m.dtype is None
        y32, y64 = m(_x()), m64(_x().double())
        assert y64.dtype == torch.float64 and y32.dtype == torch.float32
        assert torch.allclose(y32.double(), y64, atol=1e-5)


def test_reference_forward(onnx_model, ts_model, tmp_path):
    assert ts_model.reference() is None
    ref = onnx_model.reference()
    assert ref.name == "onnxruntime" and ref.dtype == "float32" and ref.outputs == ("probs",)
    x = _x().numpy()
    (p,) = ref({"x": x.astype(np.float64), "not_an_input": x})  # cast to the declared dtype; extra names ignored
    assert np.allclose(p, onnx_model(torch.from_numpy(x)).numpy(), atol=1e-6)
    # an internal tensor cut into an input: the logits as a function of the pooled features
    ref2 = onnx_model.reference(["logits"], wrt="fl")
    assert set(ref2.input_dtypes) == {"x", "fl"}
    fl = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    (lg,) = ref2({"x": x, "fl": fl})
    W = numpy_helper.to_array(onnx.load(str(onnx_model.path)).graph.initializer[6])
    B = numpy_helper.to_array(onnx.load(str(onnx_model.path)).graph.initializer[7])
    assert np.allclose(lg, fl @ W.T + B, atol=1e-5)


def test_internal_tensors_and_softmax_input(onnx_model, ts_model):
    assert {"c", "bn", "logits", "probs"} <= set(onnx_model.internal_tensors())
    assert onnx_model.softmax_input() == "logits" and onnx_model.softmax_input("logits") is None
    assert ts_model.internal_tensors() == [] and ts_model.softmax_input() is None
    assert onnx_model.check_stateless({"x": _x()}) is None
    assert onnx_model.has_convolutions() and ts_model.has_convolutions()


def test_randomisation_reaches_an_optimized_graph_and_is_restored(onnx_model):
    """The optimized model folds the BatchNormalization into the Conv and keeps the logits in another compiled
    graph: randomising the initializers as written must still change what every call computes."""
    assert onnx_model.metadata["optimizations"]
    layers = onnx_model.parameter_layers()
    assert [l.name for l in layers] == ["fc", "bn", "conv"]  # from the output backwards
    assert layers[0].parameters == ("FW", "FB")
    x = _x()
    before = onnx_model.run({"x": x}, outputs=["logits"])[0]
    probs_before = onnx_model(x)
    with onnx_model.randomised(layers[:1], seed=3) as m:
        assert m is onnx_model
        during = onnx_model.run({"x": x}, outputs=["logits"])[0]
        assert not torch.allclose(during, before, atol=1e-3)
        assert not torch.allclose(onnx_model(x), probs_before, atol=1e-4)
        with onnx_model.randomised(layers, seed=3):  # deeper: the (folded) conv changes too
            assert not torch.allclose(onnx_model.run({"x": x}, outputs=["logits"])[0], during, atol=1e-3)
    assert torch.equal(onnx_model.run({"x": x}, outputs=["logits"])[0], before)
    assert torch.equal(onnx_model(x), probs_before)
    # restored on error too
    with pytest.raises(RuntimeError):
        with onnx_model.randomised(layers, seed=1):
            raise RuntimeError("boom")
    assert torch.equal(onnx_model(x), probs_before)


def test_torchscript_randomisation_restores(ts_model):
    layers = ts_model.parameter_layers()
    assert [l.name for l in layers] == ["fc", "c"]
    x = _x()
    y0 = ts_model(x)
    with ts_model.randomised(layers, seed=0):
        assert not torch.allclose(ts_model(x), y0, atol=1e-4)
    assert torch.equal(ts_model(x), y0)
    with pytest.raises(InputError):
        with ts_model.randomised([M.ParameterLayer("nope", ("nope.weight",))], seed=0):
            pass


def test_describe_file_lists_unsupported_ops_with_dtype_names(tmp_path, onnx_model):
    d = M.describe_file(onnx_model.path)
    for key in ("format", "path", "inputs", "outputs", "opset", "ir_version", "producer", "op_histogram",
                "parameters", "sha256", "unsupported_ops", "optimizations"):
        assert key in d, key
    assert d["inputs"][0]["dtype"] == "float32" and d["unsupported_ops"] == []
    assert d["parameters"] == 4 * 27 + 4 * 5 + 5 * 4 + 5
    # an op the interpreter does not implement, an int64 input and a string input
    nodes = [helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Custom", ["f", "s"], ["y"], domain="my.domain", name="custom0")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("i", TensorProto.INT64, [2]),
                                       helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                          [numpy_helper.from_array(np.ones((3, 2), np.float32), "unused_w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    m.ir_version = 8
    p = tmp_path / "custom.onnx"
    onnx.save(m, str(p))
    d = M.describe_file(str(p))
    assert d["format"] == "onnx" and d["parameters"] == 6
    assert d["inputs"][0]["dtype"] == "int64" and not d["inputs"][0]["differentiable"]
    assert [i["dtype"] for i in d["inputs"]] == ["int64", "string"] and d["outputs"][0]["dtype"] == "float32"
    assert d["unsupported_ops"] and d["unsupported_ops"][0]["op_type"] == "Custom"
    assert d["unsupported_ops"][0]["domain"] == "my.domain" and d["unsupported_ops"][0]["nodes"] == ["custom0"]
    assert d["op_histogram"]["my.domain::Custom"] == 1


def test_describe_file_torchscript(ts_model):
    d = M.describe_file(ts_model.path)
    assert d["format"] == "torchscript" and d["unsupported_ops"] == [] and d["parameters"] == 4 * 27 + 4 + 20 + 5
