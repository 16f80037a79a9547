"""Gradient conformance: derivatives through the interpreter vs central differences through onnxruntime.

For a test case with a float input and a float output, we differentiate output k w.r.t. the first float
input with ``torch.func.jacrev`` (reverse mode; ``jvp`` when the full Jacobian would be large) through the
interpreter in float64, and compare the directional derivative J·v along a seeded random direction v
with central differences computed by onnxruntime — on a float64 copy of the
graph where onnxruntime has double kernels, else in float32 with a step and tolerance for that dtype.
Richardson extrapolation of two steps separates truncation error from a kink: where the two steps disagree
by orders of magnitude the point is reported as non-smooth, not as an engine failure.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Piecewise-constant ops (Floor, Round, Sign, Hardmax, ...) are checked like any other: their derivative
# is 0 away from the jumps, and at a jump the one-sided differences disagree, which reports the point as
# non-smooth instead of comparing against a meaningless slope.
FULL_JACOBIAN_LIMIT = 1_000_000


@dataclass
class GradResult:
    status: str  # pass | fail | skip
    detail: str = ""


def to_float64(model):
    """A copy of the model with every float32 tensor (types, initializers, Cast targets, constants) as double."""
    import onnx
    from onnx import TensorProto, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)

    def fix_tensor(t):
        if t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(t).astype(np.float64)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    def fix_type(tp):
        if tp.HasField("tensor_type") and tp.tensor_type.elem_type == TensorProto.FLOAT:
            tp.tensor_type.elem_type = TensorProto.DOUBLE
        if tp.HasField("sequence_type"):
            fix_type(tp.sequence_type.elem_type)

    def fix_graph(g):
        for vi in list(g.input) + list(g.output):
            fix_type(vi.type)
        del g.value_info[:]
        for t in g.initializer:
            fix_tensor(t)
        for n in g.node:
            for a in n.attribute:
                if a.name in ("to", "dtype", "output_datatype") and a.type == onnx.AttributeProto.INT \
                        and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.DOUBLE
                if a.type == onnx.AttributeProto.TENSOR:
                    fix_tensor(a.t)
                if a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)
                for sg in a.graphs:
                    fix_graph(sg)
    fix_graph(m.graph)
    return m


class OrtFunction:
    """f(x) -> list of outputs through onnxruntime, in float64 where the graph allows, else float32."""

    def __init__(self, model, feeds: dict, wrt: str):
        import onnxruntime as ort

        self.wrt = wrt
        self.dtype = None
        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.intra_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        for cand, dt in ((lambda: to_float64(model), np.float64), (lambda: model, np.float32)):
            try:
                m = cand()
                sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                fd = {k: (v.astype(dt) if v.dtype == np.float32 else v) for k, v in feeds.items()}
                sess.run(None, fd)
                self.sess, self.feeds, self.dtype = sess, fd, dt
                break
            except Exception:
                continue
        if self.dtype is None:
            raise RuntimeError("onnxruntime cannot run this graph")

    def __call__(self, x: np.ndarray):
        return self.sess.run(None, {**self.feeds, self.wrt: np.asarray(x, dtype=self.dtype)})


def check_case(model, feeds: dict, seed: int = 0, expected: list | None = None) -> GradResult:
    """Directional derivative check for one model + one set of input arrays."""
    import torch

    from jacaudit.models.onnx.model import OnnxModel

    ops = {n.op_type for n in model.graph.node}
    graph_inputs = [vi.name for vi in model.graph.input]
    float_inputs = [n for n in graph_inputs if n in feeds and feeds[n].dtype in (np.float32, np.float64)
                    and feeds[n].size > 0]
    if not float_inputs:
        return GradResult("skip", "no float input")
    wrt = float_inputs[0]
    out_names = [o.name for o in model.graph.output]
    try:
        ref = OrtFunction(model, feeds, wrt)
    except Exception:
        return GradResult("skip", "onnxruntime cannot run this graph (no reference)")
    x0 = feeds[wrt].astype(np.float64)
    base = ref(x0)
    float_outs = [i for i, o in enumerate(base) if isinstance(o, np.ndarray) and o.dtype.kind == "f" and o.size]
    if not float_outs:
        return GradResult("skip", "no float output")
    if expected is not None:
        for k in float_outs:
            e = np.asarray(expected[k]) if k < len(expected) else None
            if e is not None and e.dtype.kind == "f" and (e.shape != base[k].shape or not np.allclose(
                    base[k].astype(np.float64), e.astype(np.float64), rtol=1e-3, atol=1e-4, equal_nan=True)):
                return GradResult("skip", "onnxruntime's forward differs from the reference output here, "
                                          "so its finite differences are no truth")
    try:
        m = OnnxModel(model, dtype=torch.float64)
    except Exception as e:
        return GradResult("skip", f"not loadable: {e}")
    tfeeds = {k: torch.from_numpy(np.array(v.astype(np.float64) if v.dtype == np.float32 else v, copy=True))
              for k, v in feeds.items()}
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(x0.shape)
    scale = max(1.0, float(np.max(np.abs(x0))))
    if ref.dtype == np.float64:
        h, tol = 1e-4 * scale, 1e-4
    else:
        h, tol = 1e-2 * scale, 5e-2

    def fd(step):
        plus, minus = ref(x0 + step * v), ref(x0 - step * v)
        return plus, minus

    p1, m1 = fd(h)
    p2, m2 = fd(h / 2)
    for k in float_outs:
        if p1[k].shape != base[k].shape or m1[k].shape != base[k].shape:
            return GradResult("skip", "output shape depends on the float input")
    worst = 0.0
    for k in float_outs:
        d1 = (p1[k].astype(np.float64) - m1[k].astype(np.float64)) / (2 * h)
        d2 = (p2[k].astype(np.float64) - m2[k].astype(np.float64)) / h
        rich = (4 * d2 - d1) / 3
        # one-sided differences: at a kink (ReLU-like) forward and backward slopes differ by O(1)
        b0 = base[k].astype(np.float64)
        asym_full = ((p1[k].astype(np.float64) - b0) - (b0 - m1[k].astype(np.float64))) / h
        if not np.all(np.isfinite(rich)):
            return GradResult("skip", "non-finite finite difference")
        f = m.function(tfeeds, wrt=wrt, output=out_names[k])
        xt = torch.from_numpy(x0.copy())
        n_out = base[k].size
        try:
            if n_out * x0.size <= FULL_JACOBIAN_LIMIT:
                J = torch.func.jacrev(f)(xt).reshape(n_out, x0.size).numpy()
                ours = J @ v.reshape(-1)
                theirs = rich.reshape(-1)
                spread = np.abs(d1 - d2).reshape(-1)
                asym = asym_full.reshape(-1)
            else:
                # Too large for a full Jacobian: forward mode gives J·v directly. (Reverse mode, uᵀJ·v,
                # is checked against it by the engine's own tests; on degenerate graphs such as the
                # constant-weight `light` models, where the exact derivative is 0, the two differ by
                # rounding noise amplified through 50 layers, so forward mode is the fair comparison.)
                _, jv = torch.func.jvp(f, (xt,), (torch.from_numpy(v),))
                ours = jv.reshape(-1).numpy()
                theirs = rich.reshape(-1)
                spread = np.abs(d1 - d2).reshape(-1)
                asym = asym_full.reshape(-1)
        except Exception as e:
            return GradResult("fail", f"jacrev through the interpreter raised {type(e).__name__}: {e}")
        # rounding noise of the finite difference itself: ~eps·|f|/h per output element
        eps = float(np.finfo(ref.dtype).eps)
        noise = 100 * eps * float(np.linalg.norm(b0)) / h
        denom = max(np.linalg.norm(theirs), np.linalg.norm(ours), noise / tol, 1e-12)
        err = np.linalg.norm(ours - theirs) / denom
        if err > tol:
            # A kink between x-h and x+h: the two step sizes disagree wildly; not an engine failure.
            kink = max(np.linalg.norm(spread), np.linalg.norm(asym)) / denom
            if kink > tol:
                return GradResult("skip", f"non-smooth at this point (one-sided slopes differ by {kink:.2g})")
            if b0.size > 1 and np.ptp(b0) == 0:
                # e.g. the constant-weight `light` graphs: every logit equal, softmax exactly uniform. The
                # exact derivative is 0 by symmetry; what is computed is rounding amplified through the layers.
                return GradResult("skip", "every output element is identical (degenerate point): derivative "
                                          "0 by symmetry, rounding dominates")
            return GradResult("fail", f"output {out_names[k]!r}: rel err {err:.3g} > {tol:g} "
                                      f"({'float64' if ref.dtype == np.float64 else 'float32'} FD)")
        worst = max(worst, err)
    return GradResult("pass", f"max rel err {worst:.2g} ({'float64' if ref.dtype == np.float64 else 'float32'} FD)")
