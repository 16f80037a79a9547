"""ortgrad (models/onnx/ortgrad.py): input gradients of ONNX graphs computed by onnxruntime through a backward
graph jacaudit writes, against truths that share no code with it: the float64 torch interpreter's autograd
(the same file loaded with dtype=float64, runtime "torch"), central finite differences in float64 through that
interpreter's forward, and onnxruntime's own InferenceSession for values. Every graph is built here with
onnx.helper (and one small CNN exported from torch); each test first asserts that onnxruntime really ran."""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from jacaudit.models import load  # noqa: E402
from jacaudit.models.onnx import ortgrad  # noqa: E402

N = helper.make_node
F = TensorProto.FLOAT
RTOL = 1e-4


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def _rng(seed=0):
    return np.random.default_rng(seed)


def W(*shape, seed=1, scale=0.5):
    return (_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def I64(v):
    return np.asarray(v, dtype=np.int64)


def F32(v):
    return np.asarray(v, dtype=np.float32)


def vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, list(shape) if shape is not None else None)


def save_model(tmp_path, nodes, inputs, outputs, inits=None, opset=17, name="m"):
    """inputs: {name: shape}; outputs: {name: shape or None} (float) or a list of value infos."""
    ins = [vi(k, s) for k, s in inputs.items()]
    outs = outputs if isinstance(outputs, list) else [vi(k, s) for k, s in outputs.items()]
    init = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, name, ins, outs, init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=8 if opset <= 17 else 9)
    model = onnx.shape_inference.infer_shapes(model)  # the outputs' shapes (declared here without one)
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return str(path)


def _save_graph(tmp_path, graph, name):
    """A hand-built graph (its own inputs, e.g. int64 feeds) saved as opset 17: (onnxruntime model, float64
    interpreter model)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path = str(tmp_path / f"{name}.onnx")
    onnx.save(model, path)
    return load(path, runtime="onnxruntime"), load(path, dtype=torch.float64, runtime="torch")


def make_feeds(inputs, kinds=None, seed=0, scale=1.0):
    rng = _rng(seed)
    kinds = kinds or {}
    feeds = {}
    for k, s in inputs.items():
        kind = kinds.get(k, "normal")
        if kind == "positive":
            a = rng.uniform(0.5, 2.0, s)
        elif kind == "spread":  # covers both sides of +-3 (HardSwish, HardSigmoid), away from the kinks
            a = rng.standard_normal(s) * 3.0
        else:
            a = rng.standard_normal(s) * scale
        feeds[k] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return feeds


def cotangents(outs, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=o.dtype) if o.is_floating_point() else None for o in outs]


def vjp(model, feeds, ws, wrt):
    feeds = {k: (v.clone().requires_grad_(True) if k in wrt else v.clone()) for k, v in feeds.items()}
    outs = model.run(feeds)
    pairs = [(o, w.to(o.dtype)) for o, w in zip(outs, ws) if w is not None and o.requires_grad]
    gs = torch.autograd.grad([o for o, _ in pairs], [feeds[k] for k in wrt], [w for _, w in pairs],
                             allow_unused=True)
    gs = [torch.zeros_like(feeds[k]) if g is None else g for k, g in zip(wrt, gs)]
    return outs, gs


def close(g, truth, rtol=RTOL, what=""):
    g, truth = g.double(), truth.double()
    scale = max(truth.abs().max().item(), 1e-12)
    err = (g - truth).abs().max().item()
    assert err <= rtol * scale, f"{what}: max|g - truth| = {err:.3e}, max|truth| = {scale:.3e}"


def check(path, inputs, kinds=None, wrt=None, fd=False, scale=1.0, rtol=RTOL, seed=0):
    """onnxruntime's VJP (float32) against the float64 interpreter's autograd (and optionally central finite
    differences); returns the onnxruntime model."""
    wrt = list(wrt or inputs)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    feeds = make_feeds(inputs, kinds, seed=seed, scale=scale)
    # cotangents from the shapes of the float64 outputs
    with torch.no_grad():
        outs64 = m64.run({k: v.double() for k, v in feeds.items()})
    ws = cotangents(outs64)
    outs, gs = vjp(m, feeds, ws, wrt)
    assert m._ort.last == "onnxruntime", m._ort.last
    outs64, gs64 = vjp(m64, {k: v.double() for k, v in feeds.items()}, ws, wrt)
    for o, o64 in zip(outs, outs64):
        assert o.shape == o64.shape
        if o.is_floating_point():
            close(o, o64, 1e-4, "forward")
        else:
            assert torch.equal(o, o64.to(o.dtype))
    for k, g, g64 in zip(wrt, gs, gs64):
        assert g.shape == feeds[k].shape and g.dtype == torch.float32
        close(g, g64, rtol, f"gradient wrt {k}")
    if fd:
        finite_differences(m64, feeds, ws, wrt, gs, gs64)
    return m


def finite_differences(m64, feeds, ws, wrt, gs, gs64, h=1e-5, n_dirs=3):
    gen = torch.Generator().manual_seed(11)
    base = {k: v.double() for k, v in feeds.items()}
    for _ in range(n_dirs):
        vs = {k: torch.randn(base[k].shape, generator=gen, dtype=torch.float64) for k in wrt}

        def f(sign):
            fe = dict(base)
            for k in wrt:
                fe[k] = base[k] + sign * h * vs[k]
            with torch.no_grad():
                outs = m64.run(fe)
            return sum((o * w.double()).sum() for o, w in zip(outs, ws) if w is not None)
        fdv = ((f(1) - f(-1)) / (2 * h)).item()
        ours = sum((g.double() * vs[k]).sum() for k, g in zip(wrt, gs)).item()
        ref = sum((g.double() * vs[k]).sum() for k, g in zip(wrt, gs64)).item()
        size = sum(g.double().abs().sum().item() * vs[k].abs().max().item() for k, g in zip(wrt, gs64))
        assert abs(ref - fdv) <= 1e-6 * max(size, 1.0), (ref, fdv)
        assert abs(ours - fdv) <= 1e-4 * max(size, 1.0), (ours, fdv)


def unary(tmp_path, op, shape=(2, 3, 4, 5), opset=17, extra_inputs=(), inits=None, name="u", **attrs):
    path = save_model(tmp_path, [N(op, ["x", *extra_inputs], ["y"], **attrs)], {"x": shape}, {"y": None},
                      inits, opset=opset, name=name)
    return path, {"x": shape}


# ---------------------------------------------------------------------------------------------------------
# Conv
# ---------------------------------------------------------------------------------------------------------
CONV = [
    # id, x shape, w shape, attrs
    ("s1_pad1", (2, 3, 8, 8), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1])),
    ("s1_nopad", (1, 3, 7, 6), (5, 3, 3, 2), {}),
    ("s2_pad1_odd", (2, 3, 9, 9), (4, 3, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    ("s2_even", (1, 2, 8, 10), (3, 2, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    ("s3_asym", (1, 3, 10, 11), (4, 3, 3, 3), dict(strides=[3, 3], pads=[0, 1, 2, 0])),
    ("s1_asym", (1, 2, 7, 7), (3, 2, 3, 3), dict(pads=[2, 0, 0, 1])),
    ("s_mixed", (1, 2, 9, 8), (3, 2, 3, 3), dict(strides=[1, 2], pads=[1, 0, 1, 1])),
    ("same_upper_s2", (1, 3, 7, 8), (4, 3, 3, 3), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    ("same_lower_s2", (1, 3, 8, 7), (4, 3, 4, 4), dict(strides=[2, 2], auto_pad="SAME_LOWER")),
    ("same_upper_s1_k4", (1, 2, 6, 6), (3, 2, 4, 4), dict(auto_pad="SAME_UPPER")),
    ("same_lower_s1_k4", (1, 2, 6, 6), (3, 2, 4, 4), dict(auto_pad="SAME_LOWER")),
    ("valid_s2", (1, 3, 9, 8), (4, 3, 3, 3), dict(strides=[2, 2], auto_pad="VALID")),
    ("dil2", (1, 3, 9, 9), (4, 3, 3, 3), dict(dilations=[2, 2], pads=[2, 2, 2, 2])),
    ("dil2_s2", (1, 3, 11, 10), (4, 3, 3, 3), dict(dilations=[2, 2], strides=[2, 2], pads=[1, 2, 2, 1])),
    ("group2", (2, 4, 7, 7), (6, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1])),
    ("group2_s2", (1, 4, 9, 8), (6, 2, 3, 3), dict(group=2, strides=[2, 2], pads=[1, 1, 1, 1])),
    ("depthwise_s1", (2, 4, 7, 7), (4, 1, 3, 3), dict(group=4, pads=[1, 1, 1, 1])),
    ("depthwise_s2", (2, 4, 8, 8), (4, 1, 3, 3), dict(group=4, strides=[2, 2], pads=[1, 1, 1, 1])),
    ("depthwise_s2_odd", (1, 3, 9, 7), (3, 1, 3, 3), dict(group=3, strides=[2, 2], pads=[1, 1, 1, 1])),
    ("depthwise_s2_k5", (1, 3, 11, 11), (3, 1, 5, 5), dict(group=3, strides=[2, 2], pads=[2, 2, 2, 2])),
    ("depthwise_s2_nopad", (1, 3, 9, 10), (3, 1, 3, 3), dict(group=3, strides=[2, 2])),
    ("depthwise_s3_asym", (1, 2, 10, 11), (2, 1, 3, 3), dict(group=2, strides=[3, 3], pads=[0, 1, 2, 0])),
    ("depthwise_mult2_s2", (1, 3, 8, 9), (6, 1, 3, 3), dict(group=3, strides=[2, 2], pads=[1, 1, 1, 1])),
    ("depthwise_s2_same_upper", (1, 3, 7, 8), (3, 1, 3, 3), dict(group=3, strides=[2, 2], auto_pad="SAME_UPPER")),
    ("depthwise_s2_dil2", (1, 2, 11, 11), (2, 1, 3, 3), dict(group=2, strides=[2, 2], dilations=[2, 2],
                                                             pads=[2, 2, 2, 2])),
    ("pw_s2", (2, 4, 9, 8), (5, 4, 1, 1), dict(strides=[2, 2])),
    ("pw_s1", (2, 4, 5, 5), (5, 4, 1, 1), {}),
    ("k1_s3", (1, 2, 8, 8), (3, 2, 1, 1), dict(strides=[3, 3])),
    ("conv1d_s2", (2, 3, 11), (4, 3, 3), dict(strides=[2], pads=[1, 2])),
    ("conv1d_s1_dil", (2, 3, 10), (4, 3, 3), dict(dilations=[2], pads=[2, 1])),
    ("conv1d_depthwise_s2", (1, 4, 13), (4, 1, 5), dict(group=4, strides=[2], pads=[2, 2])),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cid,xs,ws,attrs", CONV, ids=[c[0] for c in CONV])
def test_conv(tmp_path, cid, xs, ws, attrs, bias):
    inits = {"w": W(*ws)}
    ins = ["x", "w"]
    if bias:
        inits["b"] = W(ws[0], seed=2)
        ins.append("b")
    nodes = [N("Conv", ins, ["y"], kernel_shape=list(ws[2:]), **attrs)]
    path = save_model(tmp_path, nodes, {"x": xs}, {"y": None}, inits)
    check(path, {"x": xs}, fd=cid in ("s2_pad1_odd", "depthwise_s2_odd", "same_lower_s2"))


@pytest.mark.parametrize("cid,xs,ws,attrs", [c for c in CONV if c[0].startswith("depthwise") and "s1" not in c[0]],
                         ids=[c[0] for c in CONV if c[0].startswith("depthwise") and "s1" not in c[0]])
def test_strided_depthwise_convtranspose_variant(tmp_path, monkeypatch, cid, xs, ws, attrs):
    """The other strided-depthwise form (ortgrad.STRIDED = "convtranspose") gives the same gradient."""
    monkeypatch.setattr(ortgrad, "STRIDED", "convtranspose")
    path = save_model(tmp_path, [N("Conv", ["x", "w"], ["y"], kernel_shape=list(ws[2:]), **attrs)],
                      {"x": xs}, {"y": None}, {"w": W(*ws)})
    check(path, {"x": xs})


def _bn_inits(c, seed=3):
    r = _rng(seed)
    return {"sc": F32(r.uniform(0.5, 2.0, c)), "bb": F32(r.standard_normal(c)),
            "mu": F32(r.standard_normal(c) * 0.3), "var": F32(r.uniform(0.2, 3.0, c))}


@pytest.mark.parametrize("stride,group", [(1, 1), (2, 1), (2, 4), (1, 4)])
def test_conv_batchnorm_single_use(tmp_path, stride, group):
    cin, cout = 4, 4
    inits = {"w": W(cout, cin // group, 3, 3), **_bn_inits(cout)}
    nodes = [N("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[stride] * 2, pads=[1, 1, 1, 1], group=group),
             N("BatchNormalization", ["c", "sc", "bb", "mu", "var"], ["bn"], epsilon=1e-3),
             N("Relu", ["bn"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, cin, 9, 9)}, {"y": None}, inits)
    check(path, {"x": (2, cin, 9, 9)}, fd=(stride, group) == (2, 4))


def test_conv_batchnorm_conv_output_read_twice(tmp_path):
    """The Conv's output feeds BN and an Add: BN's factor must not be folded into the Conv's whole gradient."""
    inits = {"w": W(3, 2, 3, 3), **_bn_inits(3)}
    nodes = [N("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             N("BatchNormalization", ["c", "sc", "bb", "mu", "var"], ["bn"]),
             N("Add", ["bn", "c"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (1, 2, 8, 8)}, {"y": None}, inits)
    check(path, {"x": (1, 2, 8, 8)}, fd=True)


def test_conv_output_is_graph_output_and_batchnorm(tmp_path):
    inits = {"w": W(3, 2, 3, 3), **_bn_inits(3)}
    nodes = [N("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             N("BatchNormalization", ["c", "sc", "bb", "mu", "var"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (1, 2, 6, 6)}, {"y": None, "c": None}, inits)
    check(path, {"x": (1, 2, 6, 6)})


def test_batchnorm_on_input(tmp_path):
    nodes = [N("BatchNormalization", ["x", "sc", "bb", "mu", "var"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 3, 4, 5)}, {"y": None}, _bn_inits(3))
    check(path, {"x": (2, 3, 4, 5)})


def test_two_convs_batchnorm_chain(tmp_path):
    inits = {"w": W(4, 3, 3, 3), "w2": W(4, 1, 3, 3, seed=5), **_bn_inits(4)}
    inits.update({k + "2": v for k, v in _bn_inits(4, seed=9).items()})
    nodes = [N("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             N("BatchNormalization", ["c", "sc", "bb", "mu", "var"], ["b1"]),
             N("Relu", ["b1"], ["r"]),
             N("Conv", ["r", "w2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], group=4),
             N("BatchNormalization", ["c2", "sc2", "bb2", "mu2", "var2"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 3, 9, 9)}, {"y": None}, inits)
    check(path, {"x": (2, 3, 9, 9)})


# ---------------------------------------------------------------------------------------------------------
# MaxPool, pooling, reductions
# ---------------------------------------------------------------------------------------------------------
POOL = [
    ("k2s2", (2, 3, 8, 8), dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("k3s2_overlap", (2, 3, 9, 9), dict(kernel_shape=[3, 3], strides=[2, 2])),
    ("k3s2_pads", (1, 3, 8, 8), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("k3s2_ceil", (1, 2, 8, 8), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("k3s2_ceil_pads", (1, 2, 10, 9), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("k3s1_pads", (1, 2, 6, 6), dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    ("k2_dil2", (1, 2, 9, 9), dict(kernel_shape=[2, 2], dilations=[2, 2])),
    ("same_upper", (1, 2, 7, 7), dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    ("1d", (2, 3, 11), dict(kernel_shape=[3], strides=[2], pads=[1, 1])),
    # storage_order only changes the Indices output's values, which the gradient no longer reads
    ("storage_order", (1, 2, 6, 6), dict(kernel_shape=[2, 2], storage_order=1)),
    ("gaps_k2s3", (1, 2, 11, 10), dict(kernel_shape=[2, 2], strides=[3, 3])),   # elements no window reads
    ("k3s2_dil2_ceil", (1, 2, 12, 11), dict(kernel_shape=[3, 3], strides=[2, 2], dilations=[2, 2], ceil_mode=1)),
    ("k5s1_sppf", (1, 3, 7, 7), dict(kernel_shape=[5, 5], pads=[2, 2, 2, 2])),  # YOLO's SPPF
    ("k3x2_s3x2_rect", (1, 2, 9, 8), dict(kernel_shape=[3, 2], strides=[3, 2])),  # a CRNN's last pool
    ("same_lower_s3", (1, 2, 8, 7), dict(kernel_shape=[4, 4], strides=[3, 3], auto_pad="SAME_LOWER")),
    ("3d", (1, 2, 5, 6, 5), dict(kernel_shape=[2, 3, 2], strides=[2, 2, 1], pads=[0, 1, 0, 0, 1, 1])),
]


@pytest.mark.parametrize("pid,xs,attrs", POOL, ids=[p[0] for p in POOL])
def test_maxpool(tmp_path, pid, xs, attrs):
    nodes = [N("MaxPool", ["x"], ["y"], **attrs)]
    path = save_model(tmp_path, nodes, {"x": xs}, {"y": None})
    check(path, {"x": xs}, fd=pid == "k3s2_pads")


def test_maxpool_with_indices_output_declared(tmp_path):
    nodes = [N("MaxPool", ["x"], ["y", "idx"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]
    outs = [vi("y", None), vi("idx", None, TensorProto.INT64)]
    path = save_model(tmp_path, nodes, {"x": (1, 2, 7, 7)}, outs)
    check(path, {"x": (1, 2, 7, 7)})


def test_global_average_pool(tmp_path):
    path, ins = unary(tmp_path, "GlobalAveragePool", shape=(2, 3, 5, 7))
    check(path, ins)


REDUCE = [
    ("mean_attr_keep", "ReduceMean", 17, dict(axes=[2, 3], keepdims=1), None),
    ("mean_attr_nokeep", "ReduceMean", 17, dict(axes=[1], keepdims=0), None),
    ("mean_attr_neg", "ReduceMean", 17, dict(axes=[-1, 1], keepdims=0), None),
    ("mean_all", "ReduceMean", 17, dict(keepdims=0), None),
    ("sum_input_keep", "ReduceSum", 17, dict(keepdims=1), [1, 3]),
    ("sum_input_nokeep", "ReduceSum", 17, dict(keepdims=0), [-2]),
    ("sum_all_nokeep", "ReduceSum", 17, dict(keepdims=0), None),
    ("mean_input_op18", "ReduceMean", 18, dict(keepdims=0), [2, 3]),
    ("mean_input_op18_keep", "ReduceMean", 18, dict(keepdims=1), [0, -1]),
]


@pytest.mark.parametrize("rid,op,opset,attrs,axes", REDUCE, ids=[r[0] for r in REDUCE])
def test_reduce(tmp_path, rid, op, opset, attrs, axes):
    ins, inits = ["x"], {}
    if axes is not None:
        ins.append("ax")
        inits["ax"] = I64(axes)
    nodes = [N(op, ins, ["r"], **attrs), N("Tanh", ["r"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 3, 4, 5)}, {"y": None}, inits, opset=opset)
    # a sum over everything stays off Tanh's flat tails
    check(path, {"x": (2, 3, 4, 5)}, scale=0.1 if rid.endswith("all") or "all_" in rid else 1.0)


# ---------------------------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------------------------
UNARY = [
    ("Relu", {}, "normal", 17, None),
    ("LeakyRelu", dict(alpha=0.2), "normal", 17, None),
    ("LeakyRelu", {}, "normal", 17, None),
    ("Sigmoid", {}, "normal", 17, None),
    ("Tanh", {}, "normal", 17, None),
    ("Exp", {}, "normal", 17, None),
    ("Log", {}, "positive", 17, None),
    ("Sqrt", {}, "positive", 17, None),
    ("Reciprocal", {}, "positive", 17, None),
    ("Erf", {}, "normal", 17, None),
    ("HardSigmoid", {}, "spread", 17, None),
    ("HardSigmoid", dict(alpha=0.3, beta=0.4), "spread", 17, None),
    ("HardSwish", {}, "spread", 17, None),
    ("Gelu", {}, "normal", 20, None),
    ("Gelu", dict(approximate="tanh"), "normal", 20, None),
    ("Neg", {}, "normal", 17, None),
    ("Identity", {}, "normal", 17, None),
    ("Dropout", {}, "normal", 17, None),
    ("Cast", dict(to=1), "normal", 17, None),
    ("Softmax", {}, "normal", 17, None),
    ("Softmax", dict(axis=1), "normal", 17, None),
    ("LogSoftmax", {}, "normal", 17, None),
    ("LogSoftmax", dict(axis=-3), "normal", 17, None),
    ("Transpose", dict(perm=[0, 2, 3, 1]), "normal", 17, None),
    ("Transpose", {}, "normal", 17, None),
    ("Flatten", dict(axis=2), "normal", 17, None),
    ("Flatten", {}, "normal", 17, None),
]


@pytest.mark.parametrize("op,attrs,kind,opset,_", UNARY,
                         ids=[f"{u[0]}-{'-'.join(f'{k}{v}' for k, v in u[1].items())}" for u in UNARY])
def test_unary(tmp_path, op, attrs, kind, opset, _):
    path = save_model(tmp_path, [N(op, ["x"], ["y"], **attrs)], {"x": (2, 3, 4, 5)}, {"y": None}, opset=opset)
    check(path, {"x": (2, 3, 4, 5)}, kinds={"x": kind}, fd=op in ("Gelu", "HardSwish", "Softmax"))


POW = [(2.0, "normal"), (3.0, "normal"), (1.0, "normal"), (0.5, "positive"), (-1.5, "positive")]


@pytest.mark.parametrize("p,kind", POW)
def test_pow_constant_exponent(tmp_path, p, kind):
    path, ins = unary(tmp_path, "Pow", extra_inputs=["p"], inits={"p": F32(p)})
    check(path, ins, kinds={"x": kind})


def test_pow_exponent_shape_1(tmp_path):
    path, ins = unary(tmp_path, "Pow", extra_inputs=["p"], inits={"p": F32([3.0])})
    check(path, ins)


CLIP = [("min_max", F32(-0.5), F32(0.7)), ("min_only", F32(0.1), None), ("max_only", None, F32(0.2)),
        ("none", None, None), ("relu6", F32(0.0), F32(6.0))]


@pytest.mark.parametrize("cid,lo,hi", CLIP, ids=[c[0] for c in CLIP])
def test_clip(tmp_path, cid, lo, hi):
    ins, inits = ["x"], {}
    if lo is not None or hi is not None:
        ins.append("lo" if lo is not None else "")
        if lo is not None:
            inits["lo"] = lo
    if hi is not None:
        ins.append("hi")
        inits["hi"] = hi
    path = save_model(tmp_path, [N("Clip", ins, ["y"])], {"x": (2, 3, 4, 5)}, {"y": None}, inits)
    check(path, {"x": (2, 3, 4, 5)}, kinds={"x": "spread" if cid == "relu6" else "normal"})


BINARY = [
    # id, op, nodes input names, inputs {name: shape}, inits, kinds
    ("add_bcast_const", "Add", ["x", "c"], {"x": (2, 3, 4)}, {"c": W(3, 1)}, {}),
    ("sub_const_first", "Sub", ["c", "x"], {"x": (2, 3, 4)}, {"c": W(4)}, {}),
    ("mul_bcast_const", "Mul", ["x", "c"], {"x": (2, 3, 4)}, {"c": W(1, 3, 1)}, {}),
    ("div_by_const", "Div", ["x", "c"], {"x": (2, 3, 4)}, {"c": F32(_rng(3).uniform(0.5, 2, (4,)))}, {}),
    ("div_const_by_x", "Div", ["c", "x"], {"x": (2, 3, 4)}, {"c": W(3, 1)}, {"x": "positive"}),
    ("add_two_inputs_bcast", "Add", ["a", "b"], {"a": (2, 1, 4), "b": (3, 1)}, {}, {}),
    ("sub_two_inputs_bcast", "Sub", ["a", "b"], {"a": (3, 1), "b": (2, 1, 4)}, {}, {}),
    ("mul_two_inputs_bcast", "Mul", ["a", "b"], {"a": (2, 1, 4), "b": (3, 1)}, {}, {}),
    ("div_two_inputs_bcast", "Div", ["a", "b"], {"a": (2, 3, 4), "b": (1, 4)}, {}, {"b": "positive"}),
    ("mul_x_x", "Mul", ["x", "x"], {"x": (2, 3, 4)}, {}, {}),
    ("add_x_x", "Add", ["x", "x"], {"x": (2, 3, 4)}, {}, {}),
    ("sub_x_x_scalar", "Sub", ["x", "c"], {"x": (2, 3, 4)}, {"c": F32(0.3)}, {}),
    ("div_x_x", "Div", ["x", "x"], {"x": (2, 3)}, {}, {"x": "positive"}),
]


@pytest.mark.parametrize("bid,op,names,inputs,inits,kinds", BINARY, ids=[b[0] for b in BINARY])
def test_binary(tmp_path, bid, op, names, inputs, inits, kinds):
    # Tanh after: the output gradient is not the cotangent itself
    nodes = [N(op, names, ["z"]), N("Tanh", ["z"], ["y"])]
    path = save_model(tmp_path, nodes, inputs, {"y": None}, inits)
    check(path, inputs, kinds=kinds, fd=bid in ("mul_two_inputs_bcast", "div_two_inputs_bcast"))


def test_div_both_operands_depend_on_input(tmp_path):
    # x / (x*x + 1) and x / exp(x): the numerator and the denominator both carry x
    nodes = [N("Mul", ["x", "x"], ["xx"]), N("Add", ["xx", "one"], ["den"]), N("Div", ["x", "den"], ["q1"]),
             N("Exp", ["x"], ["e"]), N("Div", ["x", "e"], ["q2"]), N("Add", ["q1", "q2"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (3, 5)}, {"y": None}, {"one": F32(1.0)})
    check(path, {"x": (3, 5)}, fd=True)


def test_mul_x_x_through_chain(tmp_path):
    nodes = [N("Sigmoid", ["x"], ["s"]), N("Mul", ["s", "s"], ["m"]), N("Mul", ["m", "x"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 7)}, {"y": None})
    check(path, {"x": (2, 7)}, fd=True)


def test_sum(tmp_path):
    nodes = [N("Sum", ["a", "b", "a", "c"], ["z"]), N("Tanh", ["z"], ["y"])]
    path = save_model(tmp_path, nodes, {"a": (2, 3, 4), "b": (3, 1)}, {"y": None}, {"c": W(4)})
    check(path, {"a": (2, 3, 4), "b": (3, 1)})


def test_where_constant_and_computed_condition(tmp_path):
    cond = np.array([[True, False, True, False]])
    nodes = [N("Greater", ["x", "zero"], ["pos"]), N("Mul", ["x", "two"], ["x2"]),
             N("Where", ["pos", "x", "x2"], ["w1"]),   # a leaky relu from Where
             N("Where", ["cc", "w1", "b"], ["w2"]),    # broadcast condition, b broadcast (1, 4)
             N("Tanh", ["w2"], ["y"])]
    inits = {"zero": F32(0.0), "two": F32(0.2), "cc": cond}
    path = save_model(tmp_path, nodes, {"x": (3, 4), "b": (1, 4)}, {"y": None}, inits)
    check(path, {"x": (3, 4), "b": (1, 4)})


# ---------------------------------------------------------------------------------------------------------
# MatMul, Gemm
# ---------------------------------------------------------------------------------------------------------
def test_matmul_const_weight_2d(tmp_path):
    path = save_model(tmp_path, [N("MatMul", ["x", "w"], ["y"])], {"x": (2, 3, 4, 5)}, {"y": None}, {"w": W(5, 6)})
    check(path, {"x": (2, 3, 4, 5)})


def test_matmul_const_weight_broadcast_batch(tmp_path):
    path = save_model(tmp_path, [N("MatMul", ["x", "w"], ["y"])], {"x": (3, 4, 5)}, {"y": None},
                      {"w": W(2, 1, 5, 6)})
    check(path, {"x": (3, 4, 5)})


def test_matmul_const_left(tmp_path):
    path = save_model(tmp_path, [N("MatMul", ["w", "x"], ["y"])], {"x": (2, 3, 5)}, {"y": None}, {"w": W(4, 3)})
    check(path, {"x": (2, 3, 5)})


def test_matmul_two_inputs_broadcast_batch(tmp_path):
    nodes = [N("MatMul", ["a", "b"], ["y"])]
    ins = {"a": (2, 1, 4, 5), "b": (3, 5, 6)}
    path = save_model(tmp_path, nodes, ins, {"y": None})
    check(path, ins, fd=True)


def test_matmul_same_tensor_both_operands(tmp_path):
    nodes = [N("MatMul", ["x", "x"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 4, 4)}, {"y": None})
    check(path, {"x": (2, 4, 4)})


@pytest.mark.parametrize("heads", [False, True])
def test_attention_softmax_qk_v(tmp_path, heads):
    """softmax(Q K^T / sqrt(d)) V with Q, K, V all computed from x (MatMul with both operands input-dependent)."""
    B, T, D = 2, 5, 8
    inits = {"wq": W(D, D, seed=1), "wk": W(D, D, seed=2), "wv": W(D, D, seed=3), "s": F32(1 / np.sqrt(D))}
    nodes = [N("MatMul", ["x", "wq"], ["q"]), N("MatMul", ["x", "wk"], ["k"]), N("MatMul", ["x", "wv"], ["v"])]
    if heads:  # (B, T, 2, D/2) -> (B, 2, T, D/2)
        inits["hs"] = I64([B, T, 2, D // 2])
        inits["os"] = I64([B, T, D])
        for t in "qkv":
            nodes += [N("Reshape", [t, "hs"], [t + "r"]), N("Transpose", [t + "r"], [t + "h"], perm=[0, 2, 1, 3])]
        q, k, v, perm = "qh", "kh", "vh", [0, 1, 3, 2]
    else:
        q, k, v, perm = "q", "k", "v", [0, 2, 1]
    nodes += [N("Transpose", [k], ["kt"], perm=perm), N("MatMul", [q, "kt"], ["sc"]), N("Mul", ["sc", "s"], ["ss"]),
              N("Softmax", ["ss"], ["p"], axis=-1), N("MatMul", ["p", v], ["o"])]
    if heads:
        nodes += [N("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]), N("Reshape", ["ot", "os"], ["y"])]
    else:
        nodes += [N("Identity", ["o"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (B, T, D)}, {"y": None}, inits)
    check(path, {"x": (B, T, D)}, fd=not heads)


GEMM = [
    # id, transA, transB, alpha, beta, C shape (None: no C), B differentiated
    ("plain", 0, 0, 1.0, 1.0, (6,), False),
    ("transB", 0, 1, 1.0, 1.0, (1, 6), False),
    ("transA", 1, 0, 1.0, 1.0, (4, 1), False),
    ("transAB_alpha_beta", 1, 1, 0.7, 1.3, (4, 6), False),
    ("alpha_beta_scalarC", 0, 0, 2.0, 0.5, (), False),
    ("noC", 0, 1, 1.5, 1.0, None, False),
    ("B_input", 0, 0, 0.5, 2.0, (6,), True),
    ("B_input_transAB", 1, 1, 1.0, 0.3, (1, 6), True),
]


@pytest.mark.parametrize("gid,ta,tb,alpha,beta,cs,bdiff", GEMM, ids=[g[0] for g in GEMM])
def test_gemm(tmp_path, gid, ta, tb, alpha, beta, cs, bdiff):
    M, K, Nn = 4, 5, 6
    ashape = (K, M) if ta else (M, K)
    bshape = (Nn, K) if tb else (K, Nn)
    ins = {"a": ashape}
    inits = {}
    if bdiff:
        ins["b"] = bshape
    else:
        inits["b"] = W(*bshape)
    names = ["a", "b"]
    if cs is not None:
        inits["c"] = W(*cs, seed=4) if cs else F32(0.4)
        names.append("c")
    nodes = [N("Gemm", names, ["z"], transA=ta, transB=tb, alpha=alpha, beta=beta), N("Tanh", ["z"], ["y"])]
    path = save_model(tmp_path, nodes, ins, {"y": None}, inits)
    check(path, ins, fd=gid == "B_input_transAB")


@pytest.mark.parametrize("cs", [(6,), (4, 1), (4, 6)])
def test_gemm_differentiated_c(tmp_path, cs):
    nodes = [N("Gemm", ["a", "b", "c"], ["y"], transB=1, alpha=0.5, beta=1.7)]
    ins = {"a": (4, 5), "c": cs}
    path = save_model(tmp_path, nodes, ins, {"y": None}, {"b": W(6, 5)})
    check(path, ins)


# ---------------------------------------------------------------------------------------------------------
# shape and data movement
# ---------------------------------------------------------------------------------------------------------
def test_reshape_squeeze_unsqueeze(tmp_path):
    nodes = [N("Reshape", ["x", "s1"], ["r"]), N("Unsqueeze", ["r", "ax0"], ["u"]), N("Tanh", ["u"], ["t"]),
             N("Squeeze", ["t", "ax0"], ["q"]), N("Flatten", ["q"], ["f"], axis=1), N("Mul", ["f", "wf"], ["y"])]
    inits = {"s1": I64([2, -1, 5]), "ax0": I64([1]), "wf": W(60)}
    path = save_model(tmp_path, nodes, {"x": (2, 3, 4, 5)}, {"y": None}, inits)
    check(path, {"x": (2, 3, 4, 5)})


@pytest.mark.parametrize("axis", [1, -1, 0])
def test_concat(tmp_path, axis):
    # x, Sigmoid(x) and a constant concatenated: the input reaches the output twice
    xs = (2, 3, 4)
    cshape = list(xs)
    cshape[axis] = 2
    nodes = [N("Sigmoid", ["x"], ["s"]), N("Concat", ["x", "c", "s", "x"], ["z"], axis=axis), N("Tanh", ["z"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": xs}, {"y": None}, {"c": W(*cshape)})
    check(path, {"x": xs})


@pytest.mark.parametrize("which", ["all", "some"])
def test_split(tmp_path, which):
    nodes = [N("Split", ["x", "sp"], ["a", "b", "c"], axis=1)]
    if which == "all":
        nodes += [N("Tanh", ["a"], ["ta"]), N("Mul", ["b", "b"], ["mb"]), N("Sigmoid", ["c"], ["sc"])]
        outs = {"ta": None, "mb": None, "sc": None}
    else:  # the middle part is not read: its gradient is zero
        nodes += [N("Tanh", ["a"], ["ta"]), N("Sigmoid", ["c"], ["sc"]), N("Concat", ["ta", "sc"], ["y"], axis=1)]
        outs = {"y": None}
    path = save_model(tmp_path, nodes, {"x": (2, 6, 3)}, outs, {"sp": I64([2, 3, 1])})
    check(path, {"x": (2, 6, 3)})


def test_split_equal_parts_attr_axis(tmp_path):
    nodes = [N("Split", ["x"], ["a", "b"], axis=-1), N("Mul", ["a", "b"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (3, 8)}, {"y": None})
    check(path, {"x": (3, 8)})


SLICE = [
    ("pos", [1, 0], [3, 4], [1, 2], None),
    ("neg_starts_ends", [-4, 1], [-1, 100], [-1, 1], None),
    ("neg_axes_only", [0], [-2], [-2], None),
    ("no_axes", [0, 1, 1, 0], [1, 3, 3, 4], None, None),
    ("huge_end", [2], [2**62], [3], None),
    ("step1_explicit", [1], [4], [2], [1]),
]


@pytest.mark.parametrize("sid,starts,ends,axes,steps", SLICE, ids=[s[0] for s in SLICE])
def test_slice(tmp_path, sid, starts, ends, axes, steps):
    ins = ["x", "st", "en"]
    inits = {"st": I64(starts), "en": I64(ends)}
    if axes is not None or steps is not None:
        ins.append("ax" if axes is not None else "")
        if axes is not None:
            inits["ax"] = I64(axes)
    if steps is not None:
        ins.append("sp")
        inits["sp"] = I64(steps)
    nodes = [N("Slice", ins, ["s"]), N("Tanh", ["s"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 3, 5, 6)}, {"y": None}, inits)
    check(path, {"x": (2, 3, 5, 6)})


GATHER = [
    ("scalar_axis0", 0, np.int64(1)),
    ("scalar_axis1_neg_index", 1, np.int64(-1)),
    ("1d_axis0", 0, I64([2, 0])),
    ("1d_repeated_axis1", 1, I64([0, 2, 2, 1, 0])),
    ("1d_negative_indices", 2, I64([-1, 0, -3, -1])),
    ("neg_axis", -1, I64([3, -2, 1])),
    ("int32_indices", 1, np.asarray([1, -1, 1], dtype=np.int32)),
]


@pytest.mark.parametrize("gid,axis,idx", GATHER, ids=[g[0] for g in GATHER])
def test_gather(tmp_path, gid, axis, idx):
    nodes = [N("Gather", ["x", "i"], ["g"], axis=axis), N("Tanh", ["g"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (3, 4, 5)}, {"y": None}, {"i": np.asarray(idx)})
    check(path, {"x": (3, 4, 5)})


def test_gather_indices_computed_from_argmax(tmp_path):
    """Indices from the input's values (ArgMax): a residual of the forward, not a constant."""
    nodes = [N("ArgMax", ["x"], ["am"], axis=1, keepdims=0), N("Gather", ["x", "am"], ["g"], axis=1),
             N("Tanh", ["g"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (3, 6)}, {"y": None})
    check(path, {"x": (3, 6)})


@pytest.mark.parametrize("xs,shape", [((3, 1), (2, 3, 4)), ((1, 4), (3, 4)), ((4,), (2, 1, 4)), ((2, 1, 3), (2, 4, 3))])
def test_expand(tmp_path, xs, shape):
    nodes = [N("Expand", ["x", "s"], ["e"]), N("Tanh", ["e"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": xs}, {"y": None}, {"s": I64(shape)})
    check(path, {"x": xs})


@pytest.mark.parametrize("pads,value", [([0, 0, 1, 2, 0, 0, 2, 1], 0.5), ([1, 0, 0, 0, 0, 2, 0, 3], None),
                                        ([0, 0, 0, 0, 0, 0, 0, 0], 0.0)])
def test_pad_constant(tmp_path, pads, value):
    ins, inits = ["x", "p"], {"p": I64(pads)}
    if value is not None:
        ins.append("v")
        inits["v"] = F32(value)
    nodes = [N("Pad", ins, ["z"], mode="constant"), N("Tanh", ["z"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (1, 2, 3, 4)}, {"y": None}, inits)
    check(path, {"x": (1, 2, 3, 4)})


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads", [[0, 0, 1, 1, 0, 0, 1, 1], [0, 0, 3, 0, 0, 0, 0, 5], [0, 1, 0, 2, 0, 1, 3, 0]],
                         ids=["both_sides", "one_side_each", "channels_too"])
def test_pad_reflect_edge_wrap(tmp_path, mode, pads):
    """The adjoint of a border-copying Pad: the centre plus each copied border put back where it came from
    (reflect: mirrored without the edge; edge: summed into the edge; wrap: from the other end), axis by axis."""
    xs = (1, 2, 4, 6)
    nodes = [N("Pad", ["x", "p"], ["z"], mode=mode), N("Tanh", ["z"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": xs}, {"y": None}, {"p": I64(pads)}, opset=19 if mode == "wrap" else 17)
    m = check(path, {"x": xs}, fd=True)
    assert m._ort.grad.plan(make_feeds({"x": xs}), ["x"], ["y"]).islands == []


RESIZE = [
    ("asym_floor_2x3", dict(coordinate_transformation_mode="asymmetric", nearest_mode="floor"), [1, 1, 2, 3]),
    ("half_pixel_rpf_2", dict(coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_floor"),
     [1, 1, 2, 2]),
    ("default_attrs_2", {}, [1, 1, 2, 2]),
    ("pytorch_half_pixel_rpc_3", dict(coordinate_transformation_mode="pytorch_half_pixel",
                                      nearest_mode="round_prefer_ceil"), [1, 1, 3, 3]),
    ("asym_floor_channels", dict(coordinate_transformation_mode="asymmetric", nearest_mode="floor"), [1, 2, 1, 2]),
]


@pytest.mark.parametrize("rid,attrs,scales", RESIZE, ids=[r[0] for r in RESIZE])
@pytest.mark.parametrize("by", ["scales", "sizes"])
def test_resize_nearest(tmp_path, rid, attrs, scales, by):
    xs = (2, 3, 4, 5)
    if by == "scales":
        ins, inits = ["x", "", "sc"], {"sc": F32(scales)}
    else:
        ins, inits = ["x", "", "", "sz"], {"sz": I64([a * b for a, b in zip(xs, scales)])}
    nodes = [N("Resize", ins, ["r"], mode="nearest", **attrs), N("Mul", ["r", "r"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": xs}, {"y": None}, inits)
    check(path, {"x": xs}, fd=rid == "half_pixel_rpf_2" and by == "scales")


def test_resize_linear_runs_as_a_torch_island(tmp_path):
    xs = (1, 2, 4, 4)
    nodes = [N("Resize", ["x", "", "sc"], ["y"], mode="linear")]
    path = save_model(tmp_path, nodes, {"x": xs}, {"y": None}, {"sc": F32([1, 1, 2, 2])})
    m = check(path, {"x": xs}, fd=True)
    assert m._ort.grad.plan(make_feeds({"x": xs}), ["x"], ["y"]).islands == ["Resize"]


@pytest.mark.parametrize("axis,shape", [(-1, (2, 3, 8)), (1, (2, 3, 4)), (2, (2, 3, 4, 5))])
def test_layernorm(tmp_path, axis, shape):
    norm = shape[axis:] if axis >= 0 else shape[axis:]
    inits = {"sc": F32(_rng(5).uniform(0.5, 1.5, norm)), "bb": W(*norm, seed=6)}
    nodes = [N("LayerNormalization", ["x", "sc", "bb"], ["ln"], axis=axis, epsilon=1e-5), N("Tanh", ["ln"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": shape}, {"y": None}, inits)
    check(path, {"x": shape}, fd=axis == -1)


def test_layernorm_no_bias(tmp_path):
    inits = {"sc": F32(_rng(5).uniform(0.5, 1.5, (6,)))}
    nodes = [N("LayerNormalization", ["x", "sc"], ["ln"]), N("Mul", ["ln", "ln"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (3, 6)}, {"y": None}, inits)
    check(path, {"x": (3, 6)})


# ---------------------------------------------------------------------------------------------------------
# inputs, outputs, fallbacks, transforms
# ---------------------------------------------------------------------------------------------------------
def _two_in_two_out(tmp_path):
    nodes = [N("MatMul", ["x", "w"], ["h"]), N("Mul", ["h", "s"], ["hs"]), N("Tanh", ["hs"], ["y1"]),
             N("Sigmoid", ["h"], ["sg"]), N("Add", ["sg", "s"], ["y2"])]
    ins = {"x": (3, 4), "s": (3, 5)}
    return save_model(tmp_path, nodes, ins, {"y1": None, "y2": None}, {"w": W(4, 5)}), ins


def test_two_inputs_one_requires_grad_two_outputs(tmp_path):
    path, ins = _two_in_two_out(tmp_path)
    check(path, ins, wrt=["x"], fd=True)
    check(path, ins, wrt=["s"])
    check(path, ins, wrt=["x", "s"])


def test_only_one_output_gets_a_cotangent(tmp_path):
    path, ins = _two_in_two_out(tmp_path)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    feeds = make_feeds(ins)
    for keep in (0, 1):
        ws = [torch.randn(3, 5, generator=torch.Generator().manual_seed(keep)) if i == keep else None
              for i in range(2)]
        _, (g,) = vjp(m, feeds, ws, ["x"])
        assert m._ort.last == "onnxruntime"
        _, (g64,) = vjp(m64, {k: v.double() for k, v in feeds.items()}, ws, ["x"])
        close(g, g64)


def test_int64_output_next_to_float(tmp_path):
    nodes = [N("MatMul", ["x", "w"], ["h"]), N("Tanh", ["h"], ["y"]), N("ArgMax", ["h"], ["am"], axis=1)]
    outs = [vi("y", None), vi("am", None, TensorProto.INT64)]
    path = save_model(tmp_path, nodes, {"x": (4, 5)}, outs, {"w": W(5, 6)})
    m = check(path, {"x": (4, 5)})
    x = make_feeds({"x": (4, 5)})["x"].requires_grad_(True)
    y, am = m.run({"x": x})
    assert m._ort.last == "onnxruntime"
    assert am.dtype == torch.int64 and not am.requires_grad and y.requires_grad
    assert torch.equal(am.reshape(-1), torch.argmax(torch.tanh(x.detach() @ torch.from_numpy(W(5, 6))), 1))


def _lstm_graph(tmp_path):
    H, I_ = 4, 3
    inits = {"W": W(1, 4 * H, I_, seed=1), "R": W(1, 4 * H, H, seed=2), "B": W(1, 8 * H, seed=3)}
    nodes = [N("Tanh", ["x"], ["t"]), N("LSTM", ["t", "W", "R", "B"], ["Y", "Yh"], hidden_size=H),
             N("Squeeze", ["Yh", "z"], ["y"])]
    inits["z"] = I64([0])
    return save_model(tmp_path, nodes, {"x": (5, 2, I_)}, {"y": None}, inits), {"x": (5, 2, I_)}


def test_lstm_runs_as_a_torch_island_between_onnxruntime_pieces(tmp_path, rnn_islands):
    path, ins = _lstm_graph(tmp_path)
    m = check(path, ins, fd=True)
    plan = m._ort.grad.plan(make_feeds(ins), ["x"], ["y"])
    assert plan.islands == ["LSTM"] and [k for k, *_ in plan.steps] == ["ort", "island", "ort"]


def _rnn_block(tmp_path, op, bidir=True, fed_state=False, direction=None, lbr=1, only_yh=False, only_y=False,
               T=6, bias=True, cell=False):
    """Conv1d -> (T, B, C) -> a bidirectional RNN node -> both outputs used, with a skip path around the RNN
    (the gradient of the RNN's input adds up from both sides of the island) and a fed initial state (an LSTM's
    initial cell too); ``cell``: an LSTM's last cell Y_c is an output as well."""
    H, C, B = 3, 4, 2
    G = 4 if op == "LSTM" else 3
    direction = direction or ("bidirectional" if bidir else "forward")
    D = 2 if direction == "bidirectional" else 1
    inits = {"cw": W(C, 2, 3, seed=1), "W": W(D, G * H, C, seed=2), "R": W(D, G * H, H, seed=3),
             "B": W(D, 2 * G * H, seed=4), "perm_w": W(C, D * H, seed=5)}
    attrs = dict(hidden_size=H, direction=direction)
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    rnn_in = ["t", "W", "R", "B", "", "h0"] if fed_state else ["t", "W", "R", "B"]
    if fed_state and op == "LSTM":
        rnn_in.append("c0")
    if not bias:
        rnn_in[3] = ""
    outs = ["Y", "Yh"] + (["Yc"] if op == "LSTM" else [])
    nodes = [N("Conv", ["x", "cw"], ["c"], pads=[1, 1]), N("Tanh", ["c"], ["ct"]),
             N("Transpose", ["ct"], ["t"], perm=[2, 0, 1]),                     # (T, B, C)
             N(op, rnn_in, outs, **attrs),                                         # Y (T, D, B, H)
             N("Transpose", ["Y"], ["yt"], perm=[0, 2, 1, 3]),
             N("Reshape", ["yt", "shp"], ["yr"]),                                  # (T, B, D*H)
             N("MatMul", ["yr", "perm_w_t"], ["proj"]),                            # (T, B, C)
             N("Add", ["proj", "t"], ["skip"]),                                    # around the island
             N("Sigmoid", ["skip"], ["y"]), N("Mul", ["Yh", "Yh"], ["yh2"]), N("Tanh", ["Yc"], ["yc"])][
        :None if cell else 10]
    inits["shp"] = I64([T, B, D * H])
    inits["perm_w_t"] = W(D * H, C, seed=6)
    inputs = {"x": (B, 2, T)}
    if fed_state:
        inputs["h0"] = (D, B, H)
        if op == "LSTM":
            inputs["c0"] = (D, B, H)
    outs = {"yh2": None} if only_yh else {"y": None} if only_y else {"y": None, "yh2": None}
    if cell:
        outs["yc"] = None
    return save_model(tmp_path, nodes, inputs, outs, inits), inputs


@pytest.fixture
def rnn_islands(monkeypatch):
    """GRU and LSTM as torch islands (their ONNX rules, ``ortgrad._gru``/``_lstm``, switched off)."""
    from jacaudit.models.onnx import ortgrad
    monkeypatch.setattr(ortgrad, "GRU_RULE", [False])
    monkeypatch.setattr(ortgrad, "LSTM_RULE", [False])


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidir", [True, False], ids=["bidirectional", "forward"])
def test_rnn_islands_in_an_exported_shape(tmp_path, op, bidir, rnn_islands):
    path, ins = _rnn_block(tmp_path, op, bidir)
    m = check(path, ins, fd=bidir)
    plan = m._ort.grad.plan(make_feeds(ins), ["x"], ["y", "yh2"])
    assert plan.islands == [op]


_RNN_CASES = ["bidirectional", "reverse", "forward", "only_yh", "only_y", "h0_only", "one_step", "no_bias"]


@pytest.mark.parametrize("op,case", [(op, c) for op in ("GRU", "LSTM") for c in _RNN_CASES] + [("LSTM", "cell")])
def test_rnn_rules_in_onnxruntime(tmp_path, op, case):
    """The GRU's and LSTM's ONNX rules (gates from Y, the backward recurrence as one Scan; an LSTM's cells by a
    forward Scan): no island, against the float64 interpreter and finite differences, on every variant they
    take (an LSTM's fed initial cell and its last cell as an output among them)."""
    kw = {"bidirectional": {}, "reverse": dict(direction="reverse"), "forward": dict(direction="forward"),
          "only_yh": dict(only_yh=True), "only_y": dict(only_y=True), "h0_only": {}, "one_step": dict(T=1),
          "no_bias": dict(bias=False), "cell": dict(cell=True)}[case]
    path, ins = _rnn_block(tmp_path, op, fed_state=True, **kw)
    wrt = ["h0"] if case == "h0_only" else list(ins)
    m = check(path, ins, wrt=wrt, fd=True)
    outs = [o.name for o in onnx.load(path).graph.output]
    plan = m._ort.grad.plan(make_feeds(ins), wrt, outs)
    assert plan.islands == [] and plan.steps is None
    bnodes = onnx.load_from_string(plan.bwd_bytes).graph.node
    assert "Scan" in {nd.op_type for nd in bnodes}
    assert plan.n_nodes == len(bnodes)  # what inspect and verify call "backward graph of N nodes"


def test_rnn_rules_refuse_to_the_island(tmp_path):
    """A GRU with linear_before_reset=0 (not onnxruntime's fast form) and an LSTM with peepholes: the rules
    refuse and the nodes are torch islands."""
    path, ins = _rnn_block(tmp_path, "GRU", fed_state=True, lbr=0)
    m = check(path, ins, wrt=["x", "h0"])
    assert m._ort.grad.plan(make_feeds(ins), ["x", "h0"], ["y", "yh2"]).islands == ["GRU"]
    H, I_ = 3, 2
    inits = {"W": W(1, 4 * H, I_, seed=1), "R": W(1, 4 * H, H, seed=2), "B": W(1, 8 * H, seed=3),
             "P": W(1, 3 * H, seed=4), "z": I64([1])}
    nodes = [N("LSTM", ["x", "W", "R", "B", "", "", "", "P"], ["Y"], hidden_size=H), N("Squeeze", ["Y", "z"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (4, 2, I_)}, {"y": None}, inits, name="peep")
    m = check(path, {"x": (4, 2, I_)}, fd=True)
    assert m._ort.grad.plan(make_feeds({"x": (4, 2, I_)}), ["x"], ["y"]).islands == ["LSTM"]


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_rnn_rules_catch_a_planted_error(tmp_path, monkeypatch, op):
    """The checks see a rule go wrong when the reverse direction's steps are left in time order (no flip
    into the order its recurrence runs)."""
    from jacaudit.models.onnx import ortgrad
    path, ins = _rnn_block(tmp_path, op, fed_state=True)
    monkeypatch.setattr(ortgrad, "_to_loop", lambda b, t, D, rev, axis: t)
    with pytest.raises(AssertionError):
        check(path, ins, wrt=["x"])


@pytest.mark.parametrize("case", ["reverse", "lbr0", "only_yh", "forward"])
def test_gru_island_variants(tmp_path, case, rnn_islands):
    """The GRU as a torch island (its rule off, or linear_before_reset=0, which the rule refuses), on the
    variants: a reverse-only node, linear_before_reset=0, only Y_h read, forward."""
    kw = dict(direction="reverse") if case == "reverse" else dict(lbr=0) if case == "lbr0" else \
        dict(only_yh=True) if case == "only_yh" else dict(direction="forward")
    path, ins = _rnn_block(tmp_path, "GRU", fed_state=True, **kw)
    m = check(path, ins, wrt=["x", "h0"], fd=case == "reverse")
    outs = ["yh2"] if case == "only_yh" else ["y", "yh2"]
    plan = m._ort.grad.plan(make_feeds(ins), ["x", "h0"], outs)
    assert plan.islands == ["GRU"]


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_rnn_island_gradient_reaches_a_fed_initial_state(tmp_path, op):
    path, ins = _rnn_block(tmp_path, op, fed_state=True)
    check(path, ins, wrt=["x", "h0"])
    check(path, ins, wrt=["h0"])


@pytest.mark.parametrize("as_island", [False, True], ids=["rule", "island"])
def test_two_stacked_lstms(tmp_path, as_island, monkeypatch):
    from jacaudit.models.onnx import ortgrad
    monkeypatch.setattr(ortgrad, "LSTM_RULE", [not as_island])
    H, I_ = 3, 2
    inits = {"W1": W(1, 4 * H, I_, seed=1), "R1": W(1, 4 * H, H, seed=2),
             "W2": W(1, 4 * H, H, seed=3), "R2": W(1, 4 * H, H, seed=4), "z": I64([1])}
    nodes = [N("LSTM", ["x", "W1", "R1"], ["Y1"], hidden_size=H), N("Squeeze", ["Y1", "z"], ["s1"]),
             N("Relu", ["s1"], ["r1"]),
             N("LSTM", ["r1", "W2", "R2"], ["Y2"], hidden_size=H), N("Squeeze", ["Y2", "z"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (4, 2, I_)}, {"y": None}, inits)
    m = check(path, {"x": (4, 2, I_)}, fd=True)
    plan = m._ort.grad.plan(make_feeds({"x": (4, 2, I_)}), ["x"], ["y"])
    assert plan.islands == (["LSTM", "LSTM"] if as_island else [])


def test_an_op_without_a_rule_is_an_island_too(tmp_path):
    """Einsum has no ONNX rule: torch differentiates it between the onnxruntime pieces."""
    nodes = [N("Tanh", ["a"], ["ta"]), N("Einsum", ["ta", "b"], ["e"], equation="ij,jk->ik"),
             N("Sigmoid", ["e"], ["y"])]
    path = save_model(tmp_path, nodes, {"a": (3, 4), "b": (4, 5)}, {"y": None})
    m = check(path, {"a": (3, 4), "b": (4, 5)}, fd=True)
    assert m._ort.grad.plan(make_feeds({"a": (3, 4), "b": (4, 5)}), ["a", "b"], ["y"]).islands == ["Einsum"]


def test_too_many_islands_and_subgraph_nodes_are_refused(tmp_path):
    from jacaudit.models.onnx import ortgrad
    nodes, prev = [], "a"
    for i in range(ortgrad.MAX_ISLANDS + 1):
        nodes.append(N("Einsum", [prev, "b"], [f"e{i}"], equation="ij,jk->ik"))
        prev = f"e{i}"
    nodes.append(N("Identity", [prev], ["y"]))
    path = save_model(tmp_path, nodes, {"a": (3, 3), "b": (3, 3)}, {"y": None})
    m = load(path, runtime="onnxruntime")
    feeds = make_feeds({"a": (3, 3), "b": (3, 3)}, scale=0.3)
    vjp(m, feeds, [torch.ones(3, 3)], ["a"])
    assert "more than" in m._ort.last and "Einsum" in m._ort.last, m._ort.last
    # a Loop on the path: its body may be the whole model: refused, the interpreter runs
    body = helper.make_graph([N("Identity", ["cin"], ["cout"]), N("Tanh", ["v"], ["vout"])], "body",
                             [vi("i", (), TensorProto.INT64), vi("cin", (), TensorProto.BOOL), vi("v", (2, 3))],
                             [vi("cout", (), TensorProto.BOOL), vi("vout", (2, 3))])
    nodes = [N("Loop", ["trips", "", "x"], ["y"], body=body)]
    path = save_model(tmp_path, nodes, {"x": (2, 3)}, {"y": (2, 3)}, {"trips": I64(2)})
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    x = make_feeds({"x": (2, 3)})["x"]
    _, (g,) = vjp(m, {"x": x}, [torch.ones(2, 3)], ["x"])
    assert "Loop" in m._ort.last and "subgraphs" in m._ort.last, m._ort.last
    _, (g64,) = vjp(m64, {"x": x.double()}, [torch.ones(2, 3)], ["x"])
    close(g, g64)


def test_an_island_under_create_graph_differentiates_the_interpreter(tmp_path):
    path, ins = _lstm_graph(tmp_path)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    x = make_feeds(ins)["x"]
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    def hvp(model, dt):
        xx = x.to(dt).clone().requires_grad_(True)
        (y,) = model.run({"x": xx})
        (g,) = torch.autograd.grad((y ** 2).sum(), xx, create_graph=True)
        (h,) = torch.autograd.grad((g * v.to(dt)).sum(), xx)
        return g, h

    g, h = hvp(m, torch.float32)
    assert m._ort.last == "onnxruntime"
    g64, h64 = hvp(m64, torch.float64)
    close(g, g64)
    close(h, h64)


def _small_conv_graph(tmp_path, batch, group=1):
    nodes = [N("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], group=group),
             N("Relu", ["c"], ["r"]), N("GlobalAveragePool", ["r"], ["g"]), N("Flatten", ["g"], ["y"])]
    xs = (batch, 2, 6, 6)
    w = W(3, 2, 3, 3) if group == 1 else W(2, 1, 3, 3)
    return save_model(tmp_path, nodes, {"x": xs}, {"y": None}, {"w": w}), xs


@pytest.mark.parametrize("group", [1, 2])
def test_auto_runtime_batch_threshold(tmp_path, group):
    """auto: onnxruntime up to AUTO_GRAD_MAX_BATCH inputs, and above for graphs without grouped convolutions."""
    path, _ = _small_conv_graph(tmp_path, "N", group)
    m = load(path, runtime="auto")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    assert 16 > ortgrad.AUTO_GRAD_MAX_BATCH
    for batch, expect_ort in ((1, True), (ortgrad.AUTO_GRAD_MAX_BATCH, True), (16, group == 1)):
        feeds = make_feeds({"x": (batch, 2, 6, 6)}, seed=batch)
        ws = [torch.randn(batch, 3 if group == 1 else 2, generator=torch.Generator().manual_seed(batch))]
        _, (g,) = vjp(m, feeds, ws, ["x"])
        if expect_ort:
            assert m._ort.last == "onnxruntime", (batch, m._ort.last)
        else:
            assert m._ort.last == f"batch {batch} > {ortgrad.AUTO_GRAD_MAX_BATCH} with grouped convolutions", \
                m._ort.last
        _, (g64,) = vjp(m64, {"x": feeds["x"].double()}, ws, ["x"])
        close(g, g64)


def test_torch_runtime_never_uses_onnxruntime(tmp_path):
    path, xs = _small_conv_graph(tmp_path, 1)
    assert load(path)._ort is None and load(path, runtime="torch")._ort is None
    assert load(path, runtime="onnxruntime", dtype=torch.float64)._ort is None


def _smooth_graph(tmp_path):
    nodes = [N("MatMul", ["x", "w"], ["h"]), N("Tanh", ["h"], ["t"]), N("Sigmoid", ["t"], ["s"]),
             N("Mul", ["s", "x2"], ["m"]), N("Softmax", ["m"], ["y"], axis=-1)]
    inits = {"w": W(5, 5)}
    nodes.insert(0, N("Mul", ["x", "x"], ["x2"]))
    return save_model(tmp_path, nodes, {"x": (3, 5)}, {"y": None}, inits), {"x": (3, 5)}


def test_create_graph_hessian_vector_product(tmp_path):
    path, ins = _smooth_graph(tmp_path)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    x0 = make_feeds(ins)["x"]
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 5, generator=gen)
    v = torch.randn(3, 5, generator=gen)

    def hvp(model, x):
        x = x.clone().requires_grad_(True)
        (y,) = model.run({"x": x})
        last = model._ort.last if model._ort is not None else None
        (g,) = torch.autograd.grad(y, x, w.to(x.dtype), create_graph=True)
        (hv,) = torch.autograd.grad(g, x, v.to(x.dtype))
        return g, hv, last

    g, hv, last = hvp(m, x0)
    assert last == "onnxruntime"
    g64, hv64, _ = hvp(m64, x0.double())
    close(g, g64)
    close(hv, hv64)
    # the finite difference of the float64 gradient along v
    h = 1e-5
    gp, _, _ = hvp(m64, x0.double() + h * v.double())
    gm, _, _ = hvp(m64, x0.double() - h * v.double())
    close(hv64, (gp - gm) / (2 * h), 1e-6)


def test_jacrev_and_vmap_run_the_interpreter(tmp_path):
    path, ins = _smooth_graph(tmp_path)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    x0 = make_feeds(ins)["x"]
    jac = torch.func.jacrev(lambda x: m.run({"x": x})[0])(x0)
    assert m._ort.last != "onnxruntime" and "transform" in m._ort.last, m._ort.last
    jac64 = torch.func.jacrev(lambda x: m64.run({"x": x})[0])(x0.double())
    close(jac, jac64)
    xs = torch.stack([x0, x0 * 0.5, -x0])
    ys = torch.func.vmap(lambda x: m.run({"x": x})[0])(xs)
    assert "transform" in m._ort.last, m._ort.last
    with torch.no_grad():
        for i in range(3):
            close(ys[i], m64.run({"x": xs[i].double()})[0], 1e-5)
    # and afterwards onnxruntime is used again
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    x = x0.clone().requires_grad_(True)
    (m.run({"x": x})[0] * w).sum().backward()
    assert m._ort.last == "onnxruntime"
    x64 = x0.double().requires_grad_(True)
    (m64.run({"x": x64})[0] * w.double()).sum().backward()
    close(x.grad, x64.grad)
    close(x.grad, torch.einsum("ij,ijkl->kl", w.double(), jac64))


def test_forward_values_match_onnxruntime_session(tmp_path):
    path, ins = _two_in_two_out(tmp_path)
    m = load(path, runtime="onnxruntime")
    feeds = make_feeds(ins)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    want = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        got = m.run(feeds)
    assert m._ort.last == "onnxruntime"
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-6)
    got = m.run(feeds)  # no feed requires grad: the plain session too
    assert m._ort.last == "onnxruntime"
    assert all(not o.requires_grad for o in got)
    # the gradient path's forward gives the same values
    got = m.run({"x": feeds["x"].clone().requires_grad_(True), "s": feeds["s"]})
    assert m._ort.last == "onnxruntime"
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.detach().numpy(), b, rtol=1e-6, atol=1e-6)


def test_float64_feed_falls_back_to_the_interpreter(tmp_path):
    path, ins = _small_conv_graph(tmp_path, 2)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    x = make_feeds({"x": ins})["x"].double().requires_grad_(True)
    (y,) = m.run({"x": x})
    assert m._ort.last != "onnxruntime", m._ort.last
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (g,) = torch.autograd.grad(y, x, w)
    x64 = x.detach().clone().requires_grad_(True)
    (g64,) = torch.autograd.grad(m64.run({"x": x64})[0], x64, w)
    close(g, g64, 1e-5)


def test_plan_is_cached_per_signature(tmp_path):
    path, _ = _small_conv_graph(tmp_path, "N")
    m = load(path, runtime="onnxruntime")
    f1 = make_feeds({"x": (2, 2, 6, 6)})
    p1 = m._ort.grad.plan(f1, ["x"], ["y"])
    assert p1 is not None and m._ort.grad.plan(make_feeds({"x": (2, 2, 6, 6)}, seed=3), ["x"], ["y"]) is p1
    p2 = m._ort.grad.plan(make_feeds({"x": (3, 2, 6, 6)}), ["x"], ["y"])
    assert p2 is not None and p2 is not p1
    # a plan for one signature gives the right gradient for another batch's values (no stale constants)
    check(path, {"x": (3, 2, 6, 6)}, seed=4)
    check(path, {"x": (2, 2, 6, 6)}, seed=5)


# ---------------------------------------------------------------------------------------------------------
# a small CNN exported from torch
# ---------------------------------------------------------------------------------------------------------
class _SE(torch.nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc1 = torch.nn.Conv2d(c, c // r, 1)
        self.fc2 = torch.nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = self.pool(x)
        s = torch.relu(self.fc1(s))
        return x * torch.nn.functional.hardsigmoid(self.fc2(s))


class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.act = torch.nn.Hardswish()
        self.dw = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.se = _SE(8)
        self.pw = torch.nn.Conv2d(8, 12, 1)
        self.pool = torch.nn.MaxPool2d(3, stride=2, padding=1)
        self.fc = torch.nn.Linear(12 * 2 * 2, 5)

    def forward(self, x):
        x = self.act(self.bn1(self.stem(x)))
        x = self.act(self.bn2(self.dw(x)))
        x = self.se(x)
        x = self.pool(torch.relu(self.pw(x)))
        return self.fc(torch.flatten(x, 1))


def test_exported_small_cnn(tmp_path):
    torch.manual_seed(0)
    net = _CNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    net.eval()
    path = str(tmp_path / "cnn.onnx")
    x = torch.randn(2, 3, 15, 15)
    torch.onnx.export(net, (x,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    onnx.checker.check_model(onnx.load(path))
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Conv", "HardSwish", "HardSigmoid", "MaxPool", "Mul", "Gemm"} <= ops, ops
    m = check(path, {"x": (2, 3, 15, 15)}, fd=True)
    # and the torch module itself agrees on the gradient
    xt = make_feeds({"x": (2, 3, 15, 15)})["x"].requires_grad_(True)
    w = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad(m.run({"x": xt})[0], xt, w)
    assert m._ort.last == "onnxruntime"
    xt2 = xt.detach().clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(net(xt2), xt2, w)
    close(g, gt, 1e-4)


# ---------------------------------------------------------------------------------------------------------
# more geometry, opsets and calling conventions
# ---------------------------------------------------------------------------------------------------------
CONV3D = [
    ("s1", (1, 2, 5, 6, 5), (3, 2, 3, 3, 3), dict(pads=[1, 1, 1, 1, 1, 1])),
    ("s2", (1, 2, 7, 6, 5), (3, 2, 3, 3, 3), dict(strides=[2, 2, 2], pads=[1, 0, 1, 1, 1, 0])),
    ("depthwise_s2", (1, 3, 7, 6, 7), (3, 1, 3, 3, 3), dict(group=3, strides=[2, 2, 2], pads=[1, 1, 1, 1, 1, 1])),
]


@pytest.mark.parametrize("cid,xs,ws,attrs", CONV3D, ids=[c[0] for c in CONV3D])
def test_conv3d(tmp_path, cid, xs, ws, attrs):
    path = save_model(tmp_path, [N("Conv", ["x", "w"], ["y"], kernel_shape=list(ws[2:]), **attrs)],
                      {"x": xs}, {"y": None}, {"w": W(*ws)})
    check(path, {"x": xs})


def test_depthwise_s2_same_lower(tmp_path):
    xs, ws = (1, 3, 8, 7), (3, 1, 4, 3)
    path = save_model(tmp_path, [N("Conv", ["x", "w"], ["y"], kernel_shape=[4, 3], group=3, strides=[2, 2],
                                   auto_pad="SAME_LOWER")], {"x": xs}, {"y": None}, {"w": W(*ws)})
    check(path, {"x": xs})


def test_matmul_lower_rank_left_operand_const_3d_weight(tmp_path):
    path = save_model(tmp_path, [N("MatMul", ["x", "w"], ["y"])], {"x": (4, 5)}, {"y": None}, {"w": W(2, 5, 6)})
    check(path, {"x": (4, 5)})


def test_gemm_same_tensor_both_operands(tmp_path):
    nodes = [N("Gemm", ["x", "x"], ["z"], transB=1, alpha=0.5), N("Tanh", ["z"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (4, 3)}, {"y": None})
    check(path, {"x": (4, 3)})


def test_softmax_opset11_last_axis(tmp_path):
    nodes = [N("Softmax", ["x"], ["s"], axis=2), N("LogSoftmax", ["x"], ["l"], axis=2), N("Mul", ["s", "l"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 3, 5)}, {"y": None}, opset=11)
    check(path, {"x": (2, 3, 5)})


def test_upsample_opset9(tmp_path):
    nodes = [N("Upsample", ["x", "sc"], ["r"], mode="nearest"), N("Mul", ["r", "r"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (1, 2, 3, 4)}, {"y": None}, {"sc": F32([1, 1, 2, 3])}, opset=9)
    check(path, {"x": (1, 2, 3, 4)})


def test_output_also_read_inside_the_graph(tmp_path):
    nodes = [N("MatMul", ["x", "w"], ["h"]), N("Tanh", ["h"], ["y"]), N("Mul", ["h", "h"], ["y2"])]
    path = save_model(tmp_path, nodes, {"x": (3, 4)}, {"h": None, "y": None, "y2": None}, {"w": W(4, 5)})
    check(path, {"x": (3, 4)})


def test_output_independent_of_the_differentiated_input(tmp_path):
    nodes = [N("Tanh", ["x"], ["y1"]), N("Sigmoid", ["s"], ["y2"]), N("Mul", ["x", "s"], ["y3"])]
    ins = {"x": (3, 4), "s": (3, 4)}
    path = save_model(tmp_path, nodes, ins, {"y1": None, "y2": None, "y3": None})
    m = check(path, ins, wrt=["x"])
    x = make_feeds(ins)["x"].requires_grad_(True)
    y1, y2, y3 = m.run({"x": x, "s": make_feeds(ins)["s"]})
    assert m._ort.last == "onnxruntime" and not y2.requires_grad and y1.requires_grad and y3.requires_grad


def test_differentiated_input_unused(tmp_path):
    nodes = [N("Tanh", ["x"], ["y"])]
    ins = {"x": (3, 4), "s": (2,)}
    path = save_model(tmp_path, nodes, ins, {"y": None})
    check(path, ins, wrt=["x", "s"])


def test_where_condition_is_a_bool_graph_input(tmp_path):
    nodes = [N("Where", ["c", "x", "t"], ["w"]), N("Tanh", ["w"], ["y"])]
    graph_inputs = [vi("c", (3, 4), TensorProto.BOOL), vi("x", (3, 4)), vi("t", (1, 4))]
    graph = helper.make_graph(nodes, "w", graph_inputs, [vi("y", None)])
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    onnx.checker.check_model(model)
    path = str(tmp_path / "w.onnx")
    onnx.save(model, path)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    f = make_feeds({"x": (3, 4), "t": (1, 4)})
    c = torch.from_numpy(_rng(4).standard_normal((3, 4)) > 0)
    ws = [torch.randn(3, 4, generator=torch.Generator().manual_seed(1))]
    _, gs = vjp(m, {"c": c, **f}, ws, ["x", "t"])
    assert m._ort.last == "onnxruntime", m._ort.last
    _, gs64 = vjp(m64, {"c": c, **{k: v.double() for k, v in f.items()}}, ws, ["x", "t"])
    for g, g64 in zip(gs, gs64):
        close(g, g64)


def test_non_contiguous_and_expanded_feeds(tmp_path):
    nodes = [N("MatMul", ["x", "w"], ["h"]), N("Mul", ["h", "s"], ["z"]), N("Tanh", ["z"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (3, 4), "s": (3, 5)}, {"y": None}, {"w": W(4, 5)})
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, generator=gen)
    x = base.t().requires_grad_(False)  # a transposed view
    s = torch.randn(1, 5, generator=gen).expand(3, 5)  # stride 0
    assert not x.is_contiguous() and not s.is_contiguous()
    xg = x.detach().requires_grad_(True)
    w = torch.randn(3, 5, generator=gen)
    (y,) = m.run({"x": xg, "s": s})
    assert m._ort.last == "onnxruntime"
    (g,) = torch.autograd.grad(y, xg, w)
    x64 = x.detach().double().contiguous().requires_grad_(True)
    (y64,) = m64.run({"x": x64, "s": s.double().contiguous()})
    (g64,) = torch.autograd.grad(y64, x64, w.double())
    close(y, y64)
    close(g, g64)
    with torch.no_grad():
        (yv,) = m.run({"x": x, "s": s})
    assert m._ort.last == "onnxruntime"
    close(yv, y64)


def test_backward_twice_with_retain_graph(tmp_path):
    path, ins = _two_in_two_out(tmp_path)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    f = make_feeds(ins)
    x = f["x"].clone().requires_grad_(True)
    y1, y2 = m.run({"x": x, "s": f["s"]})
    assert m._ort.last == "onnxruntime"
    gen = torch.Generator().manual_seed(9)
    w1, w2 = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    (ga,) = torch.autograd.grad(y1, x, w1, retain_graph=True)
    (gb,) = torch.autograd.grad(y2, x, w2)
    x64 = f["x"].double().requires_grad_(True)
    z1, z2 = m64.run({"x": x64, "s": f["s"].double()})
    (ha,) = torch.autograd.grad(z1, x64, w1.double(), retain_graph=True)
    (hb,) = torch.autograd.grad(z2, x64, w2.double())
    close(ga, ha)
    close(gb, hb)


KINKS = [
    ("Relu", {}, [0.0]),
    ("LeakyRelu", dict(alpha=0.1), [0.0]),  # 1 at 0: the interpreter's where(x >= 0, x, alpha x)
    ("HardSwish", {}, [-3.0, 3.0]),
    ("HardSigmoid", dict(alpha=0.25, beta=0.5), [-2.0, 2.0]),  # alpha on the closed interval (test_kinks.py)
    ("Clip", {}, [-1.0, 1.0]),
]


@pytest.mark.parametrize("op,attrs,kinks", KINKS, ids=["Relu", "LeakyRelu", "HardSwish", "HardSigmoid", "Clip"])
def test_kink_conventions_match_the_interpreter(tmp_path, op, attrs, kinks):
    """At the kinks themselves the gradient follows the interpreter's (torch's) convention."""
    ins, inits = ["x"], {}
    if op == "Clip":
        ins, inits = ["x", "lo", "hi"], {"lo": F32(-1.0), "hi": F32(1.0)}
    path = save_model(tmp_path, [N(op, ins, ["y"], **attrs)], {"x": (2, 6)}, {"y": None}, inits)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    vals = kinks + [k + d for k in kinks for d in (-0.25, 0.25)]
    vals = (vals * 12)[:12]
    x = torch.tensor(vals, dtype=torch.float32).reshape(2, 6)
    ws = [torch.randn(2, 6, generator=torch.Generator().manual_seed(1))]
    _, (g,) = vjp(m, {"x": x}, ws, ["x"])
    assert m._ort.last == "onnxruntime"
    _, (g64,) = vjp(m64, {"x": x.double()}, ws, ["x"])
    close(g, g64, 1e-6)


@pytest.mark.parametrize("attrs", [dict(kernel_shape=[2, 2], strides=[2, 2]),
                                   dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                                   dict(kernel_shape=[3, 3], strides=[1, 1])])
def test_maxpool_ties_go_where_the_interpreter_sends_them(tmp_path, attrs):
    """Exactly equal values inside a window (a coarse input): the gradient goes to the same element."""
    xs = (1, 2, 6, 6)
    nodes = [N("MaxPool", ["x"], ["y"], **attrs)]
    path = save_model(tmp_path, nodes, {"x": xs}, {"y": None})
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    x = torch.from_numpy(np.round(_rng(2).standard_normal(xs) * 0.7).astype(np.float32))
    with torch.no_grad():
        (y,) = m64.run({"x": x.double()})
    ws = [torch.randn(y.shape, generator=torch.Generator().manual_seed(1))]
    _, (g,) = vjp(m, {"x": x}, ws, ["x"])
    assert m._ort.last == "onnxruntime"
    _, (g64,) = vjp(m64, {"x": x.double()}, ws, ["x"])
    close(g, g64, 1e-6)


def test_gather_indices_from_an_int64_graph_input_change_between_calls(tmp_path):
    nodes = [N("Gather", ["x", "i"], ["g"], axis=1), N("Tanh", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "gi", [vi("x", (3, 5)), vi("i", (4,), TensorProto.INT64)], [vi("y", (3, 4))])
    m, m64 = _save_graph(tmp_path, graph, "gi")
    x = make_feeds({"x": (3, 5)})["x"]
    w = [torch.randn(3, 4, generator=torch.Generator().manual_seed(1))]
    for idx in ([0, 1, 1, -1], [4, 3, 0, 0]):
        i = torch.tensor(idx)
        _, (g,) = vjp(m, {"x": x, "i": i}, w, ["x"])
        assert m._ort.last == "onnxruntime"
        _, (g64,) = vjp(m64, {"x": x.double(), "i": i}, w, ["x"])
        close(g, g64)


def test_create_graph_two_outputs_one_input_of_two(tmp_path):
    path, ins = _two_in_two_out(tmp_path)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    f = make_feeds(ins)
    gen = torch.Generator().manual_seed(4)
    w1, w2, v = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(3, 4, generator=gen)

    def hvp(model, dt):
        x = f["x"].to(dt).clone().requires_grad_(True)
        y1, y2 = model.run({"x": x, "s": f["s"].to(dt)})
        last = model._ort.last if model._ort is not None else None
        (g,) = torch.autograd.grad([y1, y2], x, [w1.to(dt), w2.to(dt)], create_graph=True)
        (hv,) = torch.autograd.grad(g, x, v.to(dt))
        return g, hv, last

    g, hv, last = hvp(m, torch.float32)
    assert last == "onnxruntime"
    g64, hv64, _ = hvp(m64, torch.float64)
    close(g, g64)
    close(hv, hv64)


def test_fed_initializer_input_value_changes_between_calls(tmp_path):
    nodes = [N("Mul", ["x", "w"], ["m"]), N("Tanh", ["m"], ["y"])]
    graph = helper.make_graph(nodes, "fi", [vi("x", (3, 4)), vi("w", (3, 4))], [vi("y", (3, 4))],
                              [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path = str(tmp_path / "fi.onnx")
    onnx.save(model, path)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    x = make_feeds({"x": (3, 4)})["x"]
    ws = [torch.randn(3, 4, generator=torch.Generator().manual_seed(1))]
    for wv in (2.0, -0.5):
        wt = torch.full((3, 4), wv)
        _, (g,) = vjp(m, {"x": x, "w": wt}, ws, ["x"])
        assert m._ort.last == "onnxruntime"
        _, (g64,) = vjp(m64, {"x": x.double(), "w": wt.double()}, ws, ["x"])
        close(g, g64)


def test_shape_input_values_change_between_calls(tmp_path):
    nodes = [N("Expand", ["x", "s"], ["e"]), N("Tanh", ["e"], ["y"])]
    graph = helper.make_graph(nodes, "ex", [vi("x", (2, 1)), vi("s", (3,), TensorProto.INT64)],
                              [vi("y", ("a", "b", "c"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path = str(tmp_path / "ex.onnx")
    onnx.save(model, path)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    x = make_feeds({"x": (2, 1)})["x"]
    for sv in ([2, 2, 1], [1, 2, 3]):
        s = torch.tensor(sv)
        with torch.no_grad():
            (y64,) = m64.run({"x": x.double(), "s": s})
        ws = [torch.randn(y64.shape, generator=torch.Generator().manual_seed(1))]
        _, (g,) = vjp(m, {"x": x, "s": s}, ws, ["x"])
        _, (g64,) = vjp(m64, {"x": x.double(), "s": s}, ws, ["x"])
        close(g, g64)


@pytest.mark.parametrize("op,opset", [("ReduceSum", 13), ("ReduceMean", 18)])
def test_reduce_noop_with_empty_axes_no_axes_input(tmp_path, op, opset):
    nodes = [N(op, ["x"], ["r"], noop_with_empty_axes=1), N("Tanh", ["r"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 3)}, {"y": None}, opset=opset)
    check(path, {"x": (2, 3)})


@pytest.mark.parametrize("op,opset", [("ReduceSum", 13), ("ReduceMean", 18)])
def test_reduce_noop_with_empty_axes_empty_axes_input(tmp_path, op, opset):
    nodes = [N(op, ["x", "ax"], ["r"], noop_with_empty_axes=1), N("Tanh", ["r"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 3)}, {"y": None}, {"ax": np.zeros((0,), np.int64)}, opset=opset)
    check(path, {"x": (2, 3)})


def test_pow_int64_exponent(tmp_path):
    path, ins = unary(tmp_path, "Pow", extra_inputs=["p"], inits={"p": I64(3)})
    check(path, ins)


def test_split_opset18_num_outputs(tmp_path):
    nodes = [N("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3), N("Mul", ["a", "c"], ["m"]),
             N("Add", ["m", "b"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 6)}, {"y": None}, opset=18)
    check(path, {"x": (2, 6)})


def test_extra_feed_on_the_gradient_path(tmp_path):
    path, ins = unary(tmp_path, "Tanh", shape=(2, 3))
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    x = make_feeds(ins)["x"]
    ws = [torch.randn(2, 3, generator=torch.Generator().manual_seed(1))]
    _, (g,) = vjp(m, {"x": x, "unused": torch.zeros(1)}, ws, ["x"])
    _, (g64,) = vjp(m64, {"x": x.double(), "unused": torch.zeros(1, dtype=torch.float64)}, ws, ["x"])
    close(g, g64)


ISLANDED = [
    ("slice_step2", [N("Slice", ["x", "s", "e", "a", "st"], ["z"]), N("Tanh", ["z"], ["y"])],
     {"s": I64([0]), "e": I64([5]), "a": I64([3]), "st": I64([2])}, "Slice"),
    ("resize_half_pixel_floor", [N("Resize", ["x", "", "sc"], ["y"], mode="nearest", nearest_mode="floor")],
     {"sc": F32([1, 1, 2, 2])}, "Resize"),
    ("softplus", [N("Softplus", ["x"], ["y"])], {}, "Softplus"),
]


@pytest.mark.parametrize("rid,nodes,inits,op", ISLANDED, ids=[r[0] for r in ISLANDED])
def test_variants_without_a_rule_run_as_torch_islands(tmp_path, rid, nodes, inits, op):
    """A node whose rule does not write this variant (or an op with no rule) is differentiated by torch
    between the onnxruntime pieces; anything the rule had written for it is dropped."""
    xs = (1, 2, 4, 6)
    path = save_model(tmp_path, nodes, {"x": xs}, {"y": None}, inits)
    m = check(path, {"x": xs}, fd=rid == "softplus")
    plan = m._ort.grad.plan(make_feeds({"x": xs}), ["x"], ["y"])
    assert plan.islands == [op]


CONV_EDGE = [
    ("1x1_input_k3_pad1", (1, 2, 1, 1), (3, 2, 3, 3), dict(pads=[1, 1, 1, 1])),
    ("2x2_k3_s2_pad1", (1, 2, 2, 2), (3, 2, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    ("dw_3x3_k3_s2", (1, 2, 3, 3), (2, 1, 3, 3), dict(group=2, strides=[2, 2])),
    ("dw_2x2_k3_s2_pad1", (1, 2, 2, 2), (2, 1, 3, 3), dict(group=2, strides=[2, 2], pads=[1, 1, 1, 1])),
    ("k2_s3", (1, 2, 8, 9), (3, 2, 2, 2), dict(strides=[3, 3])),
    ("dw_k2_s3", (1, 2, 8, 9), (2, 1, 2, 2), dict(group=2, strides=[3, 3])),
    ("dw_k1_s2", (1, 3, 7, 6), (3, 1, 1, 1), dict(group=3, strides=[2, 2])),
    ("big_pads", (1, 2, 4, 4), (3, 2, 3, 3), dict(pads=[3, 2, 3, 2])),
    ("dw_big_pads_s2", (1, 2, 5, 5), (2, 1, 3, 3), dict(group=2, strides=[2, 2], pads=[2, 3, 2, 3])),
    ("1d_len1", (2, 3, 1), (4, 3, 3), dict(pads=[1, 1])),
]


@pytest.mark.parametrize("cid,xs,ws,attrs", CONV_EDGE, ids=[c[0] for c in CONV_EDGE])
def test_conv_edge_geometry(tmp_path, cid, xs, ws, attrs):
    path = save_model(tmp_path, [N("Conv", ["x", "w"], ["y"], kernel_shape=list(ws[2:]), **attrs)],
                      {"x": xs}, {"y": None}, {"w": W(*ws)})
    check(path, {"x": xs})


def test_forward_mode_ad_runs_the_interpreter(tmp_path):
    import torch.autograd.forward_ad as fad
    path, ins = _smooth_graph(tmp_path)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    x0 = make_feeds(ins)["x"]
    v = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    with fad.dual_level():
        (y,) = m.run({"x": fad.make_dual(x0, v)})
        t = fad.unpack_dual(y).tangent
    assert m._ort.last != "onnxruntime" and "forward-mode" in m._ort.last, m._ort.last
    _, t64 = torch.func.jvp(lambda x: m64.run({"x": x})[0], (x0.double(),), (v.double(),))
    close(t, t64)
    # and the reverse-mode onnxruntime VJP is its transpose: <w, J v> == <J^T w, v>
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    x = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.run({"x": x})[0], x, w)
    assert m._ort.last == "onnxruntime"
    assert abs((g.double() * v.double()).sum().item() - (w.double() * t64).sum().item()) <= 1e-5 * (
        g.abs().sum().item() * v.abs().max().item())


def test_resize_opset10_and_upsample_opset7(tmp_path):
    nodes = [N("Resize", ["x", "sc"], ["r"], mode="nearest"), N("Mul", ["r", "r"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (1, 2, 3, 4)}, {"y": None}, {"sc": F32([1, 1, 2, 2])}, opset=10,
                      name="r10")
    check(path, {"x": (1, 2, 3, 4)})
    nodes = [N("Upsample", ["x"], ["r"], mode="nearest", scales=[1.0, 1.0, 3.0, 2.0]), N("Mul", ["r", "r"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (1, 2, 3, 4)}, {"y": None}, opset=7, name="u7")
    check(path, {"x": (1, 2, 3, 4)})


def test_differentiated_input_is_also_a_graph_output(tmp_path):
    nodes = [N("Tanh", ["x"], ["y"]), N("Identity", ["x"], ["xi"])]
    path = save_model(tmp_path, nodes, {"x": (3, 4)}, [vi("x", (3, 4)), vi("y", (3, 4)), vi("xi", (3, 4))])
    check(path, {"x": (3, 4)})


def test_two_maxpools_of_one_tensor(tmp_path):
    nodes = [N("MaxPool", ["x"], ["a"], kernel_shape=[2, 2], strides=[2, 2]),
             N("MaxPool", ["x"], ["b"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
             N("Mul", ["a", "b"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 3, 6, 6)}, {"y": None})
    check(path, {"x": (2, 3, 6, 6)})


class _Block(torch.nn.Module):
    def __init__(self, d=16, h=2):
        super().__init__()
        self.h = h
        self.ln1 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, 2 * d)
        self.fc2 = torch.nn.Linear(2 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.reshape(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (D // self.h) ** 0.5, dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


def test_exported_transformer_block(tmp_path):
    torch.manual_seed(1)
    net = _Block().eval()
    path = str(tmp_path / "block.onnx")
    torch.onnx.export(net, (torch.randn(2, 5, 16),), path, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"])
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"LayerNormalization", "MatMul", "Softmax", "Erf"} <= ops, ops
    check(path, {"x": (2, 5, 16)}, fd=True)


def _declared_input_model(tmp_path, elem, shape):
    nodes = [N("Cast", ["x"], ["c"], to=1), N("Tanh", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "d", [vi("x", shape, elem)], [vi("y", None)])
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    onnx.checker.check_model(model)
    path = str(tmp_path / "d.onnx")
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("case", ["dtype", "shape"])
def test_feed_that_differs_from_the_declared_input(tmp_path, case):
    """The interpreter runs such feeds; the gradient path must give its gradient (or fall back), not crash."""
    if case == "dtype":
        path = _declared_input_model(tmp_path, TensorProto.DOUBLE, (2, 3))
        x = make_feeds({"x": (2, 3)})["x"]
    else:  # fixed (2, 3) declared, (4, 3) fed
        path = _declared_input_model(tmp_path, F, (2, 3))
        x = make_feeds({"x": (4, 3)})["x"]
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    try:
        with torch.no_grad():
            (y64,) = m64.run({"x": x.double()})
    except Exception:
        pytest.skip("the interpreter refuses this feed too")
    ws = [torch.randn(y64.shape, generator=torch.Generator().manual_seed(1))]
    _, (g,) = vjp(m, {"x": x}, ws, ["x"])
    _, (g64,) = vjp(m64, {"x": x.double()}, ws, ["x"])
    close(g, g64)


# ---------------------------------------------------------------------------------------------------------
# self-gated products (SiLU, HardSwish as x * HardSigmoid(x) or x * Clip(x + 3, 0, 6) / 6): one rule each
# ---------------------------------------------------------------------------------------------------------
def _gated(kind):
    c = {"three": F32(3.0), "zero": F32(0.0), "six": F32(6.0), "sixth": F32(1 / 6), "five": F32(5.0)}
    if kind == "silu":
        nodes = [N("Sigmoid", ["x"], ["s"]), N("Mul", ["x", "s"], ["y"])]
    elif kind == "silu_swapped":
        nodes = [N("Sigmoid", ["x"], ["s"]), N("Mul", ["s", "x"], ["y"])]
    elif kind == "hardsigmoid_gate":
        nodes = [N("HardSigmoid", ["x"], ["s"], alpha=1 / 6, beta=0.5), N("Mul", ["x", "s"], ["y"])]
    elif kind == "clip6":
        nodes = [N("Add", ["x", "three"], ["a"]), N("Clip", ["a", "zero", "six"], ["c"]), N("Mul", ["x", "c"], ["y"])]
    elif kind == "clip6_div6":
        nodes = [N("Add", ["three", "x"], ["a"]), N("Clip", ["a", "zero", "six"], ["c"]), N("Div", ["c", "six"], ["d"]),
                 N("Mul", ["x", "d"], ["y"])]
    elif kind == "clip6_mul_sixth_swapped":
        nodes = [N("Add", ["x", "three"], ["a"]), N("Clip", ["a", "zero", "six"], ["c"]),
                 N("Mul", ["c", "sixth"], ["d"]), N("Mul", ["d", "x"], ["y"])]
    elif kind == "clip6_then_div6":  # torch's opset-11 form: (x * clip(x + 3, 0, 6)) / 6
        nodes = [N("Add", ["x", "three"], ["a"]), N("Clip", ["a", "zero", "six"], ["c"]), N("Mul", ["x", "c"], ["m"]),
                 N("Div", ["m", "six"], ["y"])]
    elif kind == "near_miss_clip5":
        nodes = [N("Add", ["x", "three"], ["a"]), N("Clip", ["a", "zero", "five"], ["c"]), N("Mul", ["x", "c"], ["y"])]
    elif kind == "near_miss_hardsigmoid_default":
        nodes = [N("HardSigmoid", ["x"], ["s"]), N("Mul", ["x", "s"], ["y"])]
    elif kind == "gate_read_twice":
        nodes = [N("Sigmoid", ["x"], ["s"]), N("Mul", ["x", "s"], ["m"]), N("Mul", ["s", "s"], ["q"]),
                 N("Add", ["m", "q"], ["y"])]
    elif kind == "clip_read_twice":
        nodes = [N("Add", ["x", "three"], ["a"]), N("Clip", ["a", "zero", "six"], ["c"]), N("Mul", ["x", "c"], ["m"]),
                 N("Add", ["m", "c"], ["y"])]
    used = {i for nd in nodes for i in nd.input}
    return nodes, {k: v for k, v in c.items() if k in used}


GATED = ["silu", "silu_swapped", "hardsigmoid_gate", "clip6", "clip6_div6", "clip6_mul_sixth_swapped",
         "clip6_then_div6", "near_miss_clip5", "near_miss_hardsigmoid_default", "gate_read_twice", "clip_read_twice"]


@pytest.mark.parametrize("kind", GATED)
def test_self_gated_products(tmp_path, kind):
    nodes, inits = _gated(kind)
    path = save_model(tmp_path, nodes, {"x": (2, 3, 4, 5)}, {"y": None}, inits)
    check(path, {"x": (2, 3, 4, 5)}, kinds={"x": "spread"}, fd=kind in ("silu", "clip6_div6"))


def test_self_gated_gate_is_also_a_graph_output(tmp_path):
    nodes, inits = _gated("clip6_div6")
    path = save_model(tmp_path, nodes, {"x": (2, 6)}, {"y": None, "d": None, "a": None}, inits)
    check(path, {"x": (2, 6)}, kinds={"x": "spread"})
    nodes, inits = _gated("silu")
    path = save_model(tmp_path, nodes, {"x": (2, 6)}, {"y": None, "s": None}, inits, name="silu")
    check(path, {"x": (2, 6)})


@pytest.mark.parametrize("kind", ["hardsigmoid_gate", "clip6", "clip6_div6", "clip6_mul_sixth_swapped",
                                  "clip6_then_div6"])
def test_self_gated_hardswish_kinks_match_the_float32_interpreter(tmp_path, kind):
    """At x = -3 and 3 exactly. The float32 interpreter is the truth here: in float64, alpha = float32(1/6)
    puts alpha * 3 + 0.5 just outside [0, 1], a rounding artifact the float32 graphs never see."""
    nodes, inits = _gated(kind)
    path = save_model(tmp_path, nodes, {"x": (2, 6)}, {"y": None}, inits)
    m = load(path, runtime="onnxruntime")
    m32 = load(path, runtime="torch")
    x = torch.tensor([-3.0, 3.0, -3.25, 3.25, -2.75, 2.75] * 2).reshape(2, 6)
    ws = [torch.randn(2, 6, generator=torch.Generator().manual_seed(1))]
    _, (g,) = vjp(m, {"x": x}, ws, ["x"])
    assert m._ort.last == "onnxruntime"
    _, (g32,) = vjp(m32, {"x": x}, ws, ["x"])
    close(g, g32, 1e-6)


def test_clip_opset9_attributes(tmp_path):
    nodes = [N("Clip", ["x"], ["c"], min=-0.5, max=0.7), N("Tanh", ["c"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 3, 4)}, {"y": None}, opset=9)
    check(path, {"x": (2, 3, 4)})


def test_clip_opset9_attributes_recomputed_residual(tmp_path):
    nodes = [N("Clip", ["x"], ["c"], min=-0.5, max=0.7), N("Mul", ["c", "x"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 3, 4)}, {"y": None}, opset=9)
    check(path, {"x": (2, 3, 4)})


@pytest.mark.parametrize("chain", ["sigmoid_tanh", "relu_mul", "leaky_add", "hardswish_div"])
def test_recomputed_residual_chains(tmp_path, chain):
    """Residuals an elementwise op computes from another residual (recomputed in the backward)."""
    inits = {"k": F32(0.7), "b": F32(0.2)}
    if chain == "sigmoid_tanh":
        nodes = [N("Sigmoid", ["x"], ["s"]), N("Tanh", ["s"], ["t"]), N("Mul", ["t", "x"], ["y"])]
    elif chain == "relu_mul":
        nodes = [N("Relu", ["x"], ["r"]), N("Mul", ["r", "k"], ["m"]), N("Mul", ["m", "x"], ["y"])]
    elif chain == "leaky_add":
        nodes = [N("LeakyRelu", ["x"], ["r"], alpha=0.2), N("Add", ["r", "b"], ["a"]), N("Mul", ["a", "r"], ["y"])]
    else:
        nodes = [N("HardSwish", ["x"], ["h"]), N("Div", ["h", "k"], ["d"]), N("Erf", ["d"], ["e"]),
                 N("Mul", ["e", "h"], ["y"])]
    used = {i for nd in nodes for i in nd.input}
    path = save_model(tmp_path, nodes, {"x": (3, 7)}, {"y": None}, {k: v for k, v in inits.items() if k in used})
    check(path, {"x": (3, 7)}, kinds={"x": "spread"}, fd=chain == "sigmoid_tanh")


@pytest.mark.parametrize("how", ["add", "concat_shape"])
def test_shape_input_through_arithmetic(tmp_path, how):
    """An int64 input that sets Expand's shape after an Add / a Concat with Shape(x): new values, new plan."""
    if how == "add":
        nodes = [N("Add", ["s", "one"], ["s1"]), N("Expand", ["x", "s1"], ["e"]), N("Tanh", ["e"], ["y"])]
        values = ([1, 1, 2], [0, 1, 2])
    else:
        nodes = [N("Shape", ["x"], ["sh"]), N("Concat", ["s", "sh"], ["s1"], axis=0), N("Expand", ["x", "s1"], ["e"]),
                 N("Tanh", ["e"], ["y"])]
        values = ([2], [3])
    graph = helper.make_graph(nodes, "sa", [vi("x", (2, 1)), vi("s", (len(values[0]),), TensorProto.INT64)],
                              [vi("y", ("a", "b", "c"))], [numpy_helper.from_array(np.int64(1), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path = str(tmp_path / "sa.onnx")
    onnx.save(model, path)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    x = make_feeds({"x": (2, 1)})["x"]
    for sv in values:
        s = torch.tensor(sv)
        with torch.no_grad():
            (y64,) = m64.run({"x": x.double(), "s": s})
        ws = [torch.randn(y64.shape, generator=torch.Generator().manual_seed(1))]
        _, (g,) = vjp(m, {"x": x, "s": s}, ws, ["x"])
        assert m._ort.last == "onnxruntime", m._ort.last
        _, (g64,) = vjp(m64, {"x": x.double(), "s": s}, ws, ["x"])
        close(g, g64)


def test_shape_set_by_float_input_values(tmp_path):
    """Slice's end counts the positive entries of x: every call's shapes depend on x's values."""
    nodes = [N("Greater", ["x", "zero"], ["p"]), N("Cast", ["p"], ["pf"], to=TensorProto.INT64),
             N("ReduceSum", ["pf", "ax"], ["n"], keepdims=1), N("Slice", ["x", "st", "n", "ax"], ["s"]),
             N("Tanh", ["s"], ["y"])]
    inits = {"zero": F32(0.0), "ax": I64([0]), "st": I64([0])}
    path = save_model(tmp_path, nodes, {"x": (6,)}, [vi("y", ("n",))], inits)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    for vals in ([0.5, -1.0, 2.0, 0.3, -0.2, 1.5], [-0.5, -1.0, 2.0, -0.3, -0.2, 1.5], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]):
        x = torch.tensor(vals)
        with torch.no_grad():
            (y64,) = m64.run({"x": x.double()})
        ws = [torch.randn(y64.shape, generator=torch.Generator().manual_seed(1))]
        outs, (g,) = vjp(m, {"x": x}, ws, ["x"])
        assert outs[0].shape == y64.shape
        _, (g64,) = vjp(m64, {"x": x.double()}, ws, ["x"])
        close(g, g64)


def test_interleaved_forwards_keep_their_own_residuals(tmp_path):
    path, xs = _small_conv_graph(tmp_path, 2)
    m = load(path, runtime="onnxruntime")
    m64 = load(path, dtype=torch.float64, runtime="torch")
    f1, f2 = make_feeds({"x": xs}, seed=1)["x"], make_feeds({"x": xs}, seed=2)["x"]
    x1, x2 = f1.clone().requires_grad_(True), f2.clone().requires_grad_(True)
    (y1,) = m.run({"x": x1})
    (y2,) = m.run({"x": x2})
    assert m._ort.last == "onnxruntime"
    w = torch.randn(y1.shape, generator=torch.Generator().manual_seed(3))
    (g2,) = torch.autograd.grad(y2, x2, w)
    (g1,) = torch.autograd.grad(y1, x1, w)
    for f, g in ((f1, g1), (f2, g2)):
        x64 = f.double().requires_grad_(True)
        (h,) = torch.autograd.grad(m64.run({"x": x64})[0], x64, w.double())
        close(g, h)


def test_scalar_tensors(tmp_path):
    """0-d input, a 0-d Gather result and a 0-d ReduceMean output."""
    nodes = [N("Gather", ["v", "i"], ["gv"]), N("Mul", ["gv", "x"], ["p"]), N("Expand", ["p", "sh"], ["e"]),
             N("Mul", ["e", "v"], ["ev"]), N("ReduceMean", ["ev"], ["y"], keepdims=0), N("Tanh", ["ev"], ["z"])]
    inits = {"i": np.asarray(2, np.int64), "sh": I64([5])}
    path = save_model(tmp_path, nodes, {"x": (), "v": (5,)}, {"y": None, "z": None}, inits)
    check(path, {"x": (), "v": (5,)}, fd=True)


def test_softmax_opset11_2d_default_axis(tmp_path):
    nodes = [N("Softmax", ["x"], ["s"]), N("Mul", ["s", "s"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (3, 6)}, {"y": None}, opset=11)
    check(path, {"x": (3, 6)})


# ---------------------------------------------------------------------------------------------------------
# If nodes whose condition the signature fixes: inlined (the branch taken), then differentiated as usual
# ---------------------------------------------------------------------------------------------------------
def _branch(name, nodes, outs, inits=None):
    return helper.make_graph(nodes, name, [], [vi(o, None) for o in outs],
                             [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])


def test_if_on_a_shape_is_inlined_nested_and_with_clashing_names(tmp_path):
    """The outer If's condition is a shape test; the branch taken holds an If on a shape of its own tensor
    and an initializer named like one of the outer graph's."""
    inner_then = _branch("it", [N("Sigmoid", ["bt"], ["it_o"])], ["it_o"])
    inner_else = _branch("ie", [N("Neg", ["bt"], ["ie_o"])], ["ie_o"])
    then_g = _branch("then", [N("Mul", ["x", "w"], ["bt"]),                       # its 'w' shadows the outer one
                              N("Size", ["bt"], ["n"]), N("Greater", ["n", "k0"], ["c2"]),
                              N("If", ["c2"], ["b_o"], then_branch=inner_then, else_branch=inner_else)],
                     ["b_o"], {"w": F32(np.full((2, 3), 0.5)), "k0": I64(3)})
    else_g = _branch("else", [N("Relu", ["x"], ["e_o"])], ["e_o"])
    nodes = [N("Tanh", ["x"], ["t"]), N("Shape", ["x"], ["s"]), N("ReduceSum", ["s"], ["ss"], keepdims=0),
             N("Greater", ["ss", "k"], ["c"]),
             N("If", ["c"], ["f"], then_branch=then_g, else_branch=else_g), N("Mul", ["t", "w"], ["tw"]),
             N("Add", ["f", "tw"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": (2, 3)}, {"y": None}, {"k": I64(1), "w": F32(np.full((2, 3), 3.0))})
    m = check(path, {"x": (2, 3)}, fd=True)
    plan = m._ort.grad.plan(make_feeds({"x": (2, 3)}), ["x"], ["y"])
    assert plan.islands == [] and len(m._ort.grad._inlined) == 2  # two rounds: outer, then inner


def test_if_on_an_integer_feed_takes_the_branch_of_each_value(tmp_path):
    """silero-vad's shape: an If on the sample rate (an int64 feed) around the model; each value is its own
    plan, each differentiated through the branch it takes."""
    then_g = _branch("then", [N("Sigmoid", ["x"], ["a"]), N("Mul", ["a", "x"], ["t_o"])], ["t_o"])
    else_g = _branch("else", [N("Tanh", ["x"], ["e_o"])], ["e_o"])
    nodes = [N("Equal", ["sr", "k"], ["c"]), N("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [vi("x", (2, 4)), vi("sr", (), TensorProto.INT64)], [vi("y", (2, 4))],
                              [onnx.numpy_helper.from_array(np.asarray(16000, np.int64), "k")])
    m, m64 = _save_graph(tmp_path, graph, "if_sr")
    x = make_feeds({"x": (2, 4)})["x"]
    ws = [torch.randn(2, 4, generator=torch.Generator().manual_seed(1))]
    for sr in (16000, 8000, 16000):
        feeds = {"x": x, "sr": torch.tensor(sr)}
        _, (g,) = vjp(m, feeds, ws, ["x"])
        assert m._ort.last == "onnxruntime", m._ort.last
        _, (g64,) = vjp(m64, {"x": x.double(), "sr": torch.tensor(sr)}, ws, ["x"])
        close(g, g64, what=f"sr={sr}")


def test_if_on_float_values_is_refused(tmp_path):
    then_g = _branch("then", [N("Sigmoid", ["x"], ["t_o"])], ["t_o"])
    else_g = _branch("else", [N("Tanh", ["x"], ["e_o"])], ["e_o"])
    nodes = [N("ReduceSum", ["x"], ["s"], keepdims=0), N("Greater", ["s", "z"], ["c"]),
             N("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    path = save_model(tmp_path, nodes, {"x": (2, 3)}, {"y": None}, {"z": F32(0.0)})
    m = load(path, runtime="onnxruntime")
    vjp(m, make_feeds({"x": (2, 3)}), [torch.ones(2, 3)], ["x"])
    assert m._ort.last != "onnxruntime", m._ort.last


@pytest.mark.parametrize("as_island", [False, True], ids=["rule", "island"])
def test_auto_sends_large_batches_with_a_gru_to_the_interpreter(tmp_path, as_island, monkeypatch):
    """auto: onnxruntime's GRU backward (rule or island) is slower than the interpreter at batch 32 (it
    recomputes every step's input projection and gates): above AUTO_GRAD_MAX_BATCH those plans run the
    interpreter; below, onnxruntime."""
    from jacaudit.models.onnx import ortgrad
    monkeypatch.setattr(ortgrad, "GRU_RULE", [not as_island])
    H, I_ = 3, 2
    inits = {"W": W(1, 3 * H, I_, seed=1), "R": W(1, 3 * H, H, seed=2)}
    nodes = [N("Transpose", ["x"], ["t"], perm=[1, 0, 2]),   # (B, T, I) -> (T, B, I)
             N("GRU", ["t", "W", "R"], ["Y"], hidden_size=H, linear_before_reset=1), N("Tanh", ["Y"], ["y"])]
    path = save_model(tmp_path, nodes, {"x": ("B", 4, I_)}, {"y": None}, inits)
    m = load(path, runtime="auto")
    big = ortgrad.AUTO_GRAD_MAX_BATCH + 1
    for b, want in ((2, "onnxruntime"), (big, "with a GRU layer")):
        xx = torch.randn(b, 4, I_).requires_grad_(True)
        (y,) = m.run({"x": xx})
        (g,) = torch.autograd.grad(y.sum(), xx)
        assert want in m._ort.last, (b, m._ort.last)
        assert torch.isfinite(g).all()
