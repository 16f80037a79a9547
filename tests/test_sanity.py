"""The saliency sanity test (issue 9, finding 9): Constant-node weights are randomised (and the randomised graph
is the one that runs, checked against onnxruntime on the same weights); a NaN at one step is recorded in that
step and the rest kept; nothing randomised / NaN Spearman is never a pass."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from jacaudit.analyses.saliency import SaliencyOptions, saliency
from jacaudit.data import Preprocess, Sample
from jacaudit.gate import evaluate
from jacaudit.models import load
from tests.test_inspect import constant_cnn

torch.set_num_threads(1)


def _samples(n=2, seed=0):
    pp = Preprocess.infer((1, 3, 12, 12), preset="unit")
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        px = g.uniform(0, 255, size=(12, 12, 3))
        out.append(Sample(f"img{i}.png", "mem", pp.to_tensor(px), pixels=px.astype(np.uint8)))
    return pp, out


def _ort(proto, x):
    import onnxruntime as ort

    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def test_constant_node_weights_are_randomised_and_restored(tmp_path):
    path, ws = constant_cnn(tmp_path / "cnn.onnx")
    model = load(str(path))
    layers = model.parameter_layers()
    assert [layer.name for layer in layers] == ["fc", "conv1"]
    assert {p for layer in layers for p in layer.parameters} == {"W1_c", "b1_c", "W2_c", "b2_c"}
    x = np.random.default_rng(1).uniform(0, 1, (1, 3, 12, 12)).astype(np.float32)
    y0 = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y0, _ort(onnx.load(str(path)), x), rtol=1e-5, atol=1e-6)
    with model.randomised(layers, seed=5):
        y1 = model(torch.from_numpy(x)).numpy()
        # the values the randomised Constant nodes now hold, read back from the graph as written
        producer = {o: n for n in model.plain_graph.nodes for o in n.outputs}
        rnd = {k: producer[k + "_c"].ctx.attrs["value"].numpy().copy() for k in ws}
    # truth: onnxruntime on a graph whose Constant nodes hold those values
    _, _ = constant_cnn(tmp_path / "rnd.onnx")
    proto = onnx.load(str(tmp_path / "rnd.onnx"))
    for n in proto.graph.node:
        if n.op_type == "Constant":
            k = n.output[0][:-2]
            n.attribute[0].t.CopyFrom(nh.from_array(rnd[k], k + "_t"))
    np.testing.assert_allclose(y1, _ort(proto, x), rtol=1e-4, atol=1e-6)
    assert np.abs(y1 - y0).max() > 1e-3  # randomising changed the function
    for k, v in ws.items():
        assert rnd[k].shape == v.shape and not np.allclose(rnd[k], v)
    # restored, also in the optimized graph the model runs outside the block
    np.testing.assert_array_equal(model(torch.from_numpy(x)).numpy(), y0)


def test_sanity_on_a_constant_weight_cnn_randomises_every_layer(tmp_path):
    path, _ = constant_cnn(tmp_path / "cnn.onnx")
    pp, smp = _samples(2)
    out = saliency(load(str(path)), smp, SaliencyOptions(methods=["grad"], sanity=True), preprocess=pp)
    (s,) = out.result.sanity
    assert s.status == "checked" and len(s.steps) == 2
    assert all(st.status == "ok" and np.isfinite(st.spearman) for st in s.steps)
    (check,) = [c for c in evaluate("saliency", out.metrics) if c.check.startswith("sanity_spearman")]
    assert check.status in ("pass", "warn") and check.value == pytest.approx(abs(s.final_spearman))


def _sqrt_cnn(path):
    """Conv (positive weights on a positive input) -> Sqrt -> Flatten -> Gemm: randomising the Conv makes
    some of its outputs negative, so the Sqrt yields NaN at the second step of the cascade (not the first)."""
    rng = np.random.default_rng(0)
    W1 = rng.uniform(0.1, 0.5, (2, 3, 3, 3)).astype(np.float32)
    b1 = rng.uniform(0.1, 0.2, 2).astype(np.float32)
    W2 = rng.normal(0, .3, (2 * 12 * 12, 4)).astype(np.float32)
    b2 = np.zeros(4, np.float32)
    nodes = [h.make_node("Constant", [], [k], value=nh.from_array(v, k + "_t"))
             for k, v in (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2))]
    nodes += [h.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
              h.make_node("Sqrt", ["c1"], ["s1"]), h.make_node("Flatten", ["s1"], ["f"]),
              h.make_node("Gemm", ["f", "W2", "b2"], ["logits"], name="fc")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 12, 12])],
                     [h.make_tensor_value_info("logits", TP.FLOAT, [1, 4])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_a_nan_at_one_step_is_recorded_and_the_rest_kept(tmp_path):
    path = _sqrt_cnn(tmp_path / "sqrt.onnx")
    pp, smp = _samples(2)
    out = saliency(load(str(path)), smp, SaliencyOptions(methods=["grad", "ig"], sanity=True, steps=4),
                   preprocess=pp)
    assert out.result.inputs and all(m.total == m.total for i in out.result.inputs for m in i.maps)  # maps kept
    for s in out.result.sanity:
        first, second = s.steps
        assert first.status == "ok" and np.isfinite(first.spearman)
        assert second.status == "failed" and np.isnan(second.spearman) and "NaN" in second.message
        assert s.status == "error" and not s.flagged and "failed" in s.reason
    checks = [c for c in evaluate("saliency", out.metrics) if c.check.startswith("sanity_spearman")]
    assert len(checks) == 2 and all(c.status not in ("pass", "warn") for c in checks)


def test_nothing_randomised_is_skipped_with_a_reason(tmp_path):
    """A graph with no weights (Relu of a fixed slice): nothing to randomise -> skipped, never 'changes'."""
    g = h.make_graph([h.make_node("Flatten", ["x"], ["f"]),
                      h.make_node("Constant", [], ["idx"], value=nh.from_array(np.arange(4, dtype=np.int64))),
                      h.make_node("Gather", ["f", "idx"], ["y"], axis=1)], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 12, 12])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [1, 4])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "nw.onnx"))
    pp, smp = _samples(1)
    out = saliency(load(str(tmp_path / "nw.onnx")), smp, SaliencyOptions(methods=["grad"], sanity=True),
                   preprocess=pp)
    (s,) = out.result.sanity
    assert s.status == "skipped" and not s.flagged and "randomised" in s.reason
    (check,) = [c for c in evaluate("saliency", out.metrics) if c.check.startswith("sanity_spearman")]
    assert check.status == "skipped"
    from jacaudit.report.formats import markdown
    assert "**skipped**" in markdown._sanity_verdict(s)
