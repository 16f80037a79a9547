"""Input gradients of an ONNX graph computed by onnxruntime itself: jacaudit writes the backward of the graph as
another ONNX graph, and onnxruntime runs the forward and that backward (issue 10: at small batches the torch
interpreter pays torch's per-op dispatch and autograd overhead, ~5-10 us a node, where onnxruntime pays ~1 us).

For one input signature (the feeds' shapes and dtypes; plus the values of integer feeds where those set shapes)
and one set of inputs to differentiate, ``build``:

* runs the graph as written once in the torch interpreter (no grad) to learn every tensor's shape and dtype, and
  keeps the values of the tensors the signature fixes (initializers, Constant nodes, shape arithmetic);
* walks the nodes that lie between the differentiated inputs and the outputs backwards and writes, for each, its
  vector-Jacobian product as ONNX nodes (``RULES``): a Conv's input gradient is a stride-1 Conv with the flipped
  kernel (strided depthwise: of the zero-inserted gradient; other strided: a ConvTranspose with the same weight),
  with a following BatchNormalization's per-channel factor folded into that kernel; an activation's is an
  elementwise factor (x*sigmoid(x), x*hardsigmoid(x) and x*clip(x+3,0,6)[/6] as one expression each); a
  broadcast's a ReduceSum; a MaxPool's a one-hot of the first maximum of each window put back by Col2Im (no
  Indices output: onnxruntime's kernel for it is 10-40x slower); a GRU's or an LSTM's the gates of every step
  recomputed from onnxruntime's own Y in batched products (an LSTM's cells by a forward Scan) and the backward
  recurrence as one Scan; shapes are constants;
* differentiates a node without a rule (a GRU/LSTM of another form, Einsum, a linear Resize...)
  in torch, between onnxruntime pieces of the backward, on the tensors onnxruntime's forward returned (a torch
  "island": the interpreter's op run again under autograd);
* names the forward tensors the backward reads (the residuals), and recomputes in the backward those that a
  cheap elementwise op computes from another residual, so that the forward keeps onnxruntime's fusions and
  returns few tensors (each one a reorder out of its NCHWc convolution layout).

Before that, an If whose condition the signature fixes (a shape test, an integer feed whose values key the
plan: silero-vad's sample rate) is replaced by the branch it takes (``OrtGradient._inline_ifs``). A node with
subgraphs left on the path (Loop, Scan, an If on float values: a body may be the whole model, whose torch
recompute would cost more than the interpreter's own run), a random op, more than ``MAX_ISLANDS`` islands, a
non-float32 tensor on the path, or shapes that follow from float input values make ``build`` refuse with the
reason, and the caller runs the torch interpreter as before. ``OrtGradient`` wraps the sessions as one torch
autograd Function: its forward is onnxruntime's forward (with the residuals), its backward the backward
session(s) and islands in turn; a backward that must itself be differentiable (``create_graph``) differentiates
the torch interpreter on the saved inputs instead. ``Runtime`` is what ``OnnxModel.run`` calls for
``runtime="onnxruntime"``/``"auto"``: float32 CPU feeds outside torch.func transforms and forward-mode AD only;
everywhere else the torch interpreter runs.

Conventions at kinks are the interpreter's (tests/models/test_ortgrad.py): Relu passes the gradient where its
output is > 0, LeakyRelu's slope is 1 at 0, Clip and HardSigmoid pass it on their closed intervals, MaxPool to
the first maximum of a window in row-major order. Values are float32 throughout: near a kink, a rounding
difference between onnxruntime's and torch's forward can put one unit on the other side (benchmarks/README.md
gives the per-model differences).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# a strided depthwise Conv's input gradient: "zeros" (the zero-inserted gradient through a stride-1 Conv) or
# "convtranspose" (what other strided Convs run)
STRIDED = "zeros"
BWD_OPSET = 18

# Ops whose outputs never carry a derivative (integer/boolean results or shape queries).
_NONDIFF = frozenset("""Shape Size Equal Greater GreaterOrEqual Less LessOrEqual Not And Or Xor ArgMax ArgMin
NonZero IsNaN IsInf ConstantOfShape Range RandomNormal RandomUniform RandomNormalLike RandomUniformLike
Multinomial Bernoulli EyeLike OneHot""".split())


#: a node on the differentiated path without an ONNX rule (an LSTM, a GRU, an Einsum...) runs its vector-Jacobian
#: product in torch, on the forward tensors onnxruntime returned, between the onnxruntime pieces of the backward
#: (an "island"); nodes with subgraphs (If/Loop/Scan) do not (their bodies are often the whole model: a torch
#: recompute of it costs more than the interpreter's own run), nor more than this many islands in one graph
MAX_ISLANDS = 8
#: random ops: a torch recompute would draw other values than onnxruntime's forward did
_NO_ISLAND = frozenset("""Dropout RandomNormal RandomUniform RandomNormalLike RandomUniformLike Multinomial
Bernoulli""".split())
ISLAND_DOMAIN = "jacaudit.island"
#: ops whose rules take the gradient of every output (the others' derive only from the first: a second output
#: of theirs, such as MaxPool's Indices, carries none)
_ALL_OUTPUTS = frozenset({"Split", "GRU", "LSTM"})


class Refused(Exception):
    """The graph (or this signature) has no onnxruntime gradient here; the message says why."""


_TORCH_TO_ONNX = {torch.float32: 1, torch.int64: 7, torch.int32: 6, torch.bool: 9, torch.float64: 11,
                  torch.float16: 10, torch.uint8: 2, torch.int8: 3}


class _Meta:
    """What the plan keeps of a probed tensor that the signature does not fix: its shape and dtype."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


def _onnx_type(v) -> int:
    t = _TORCH_TO_ONNX.get(v.dtype)
    if t is None:
        raise Refused(f"a {v.dtype} tensor among the residuals")
    return t


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


class _Builder:
    """Writes the backward graph: nodes, constants, and the residuals it reads from the forward."""

    def __init__(self, values: dict[str, Any], const: set[str]):
        self.values = values
        self.const = const
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self.residuals: dict[str, str] = {}  # forward name -> name in the backward graph
        self._k = 0

    def fresh(self, hint: str = "t") -> str:
        self._k += 1
        return f"__g{self._k}_{hint}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> Any:
        from onnx import helper
        outs = [self.fresh(op) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def c(self, arr, dtype=np.float32) -> str:
        a = np.asarray(arr, dtype=dtype)
        name = self.fresh("c")
        self.inits[name] = a
        return name

    def ci(self, arr) -> str:
        return self.c(arr, np.int64)

    def fwd(self, name: str) -> str:
        """A forward tensor in the backward graph: a constant when the signature fixes it, else a residual."""
        if name in self.const:
            key = "__k_" + name
            if key not in self.inits:
                self.inits[key] = _np(self.values[name])
            return key
        r = self.residuals.get(name)
        if r is None:
            r = self.residuals[name] = "__r_" + name
        return r

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.values[name].shape)

    def value(self, name: str) -> np.ndarray:
        if name not in self.const:
            raise Refused(f"tensor {name!r} must be fixed by the input signature (it is computed from input values)")
        return _np(self.values[name])

    # -- shape helpers -------------------------------------------------------------------------------------
    def reshape(self, g: str, shape) -> str:
        return self.node("Reshape", [g, self.ci(list(shape))])

    def unbroadcast(self, g: str, out_shape, in_shape) -> str:
        out_shape, in_shape = tuple(out_shape), tuple(in_shape)
        if out_shape == in_shape:
            return g
        lead = len(out_shape) - len(in_shape)
        padded = (1,) * lead + in_shape
        axes = [i for i, (o, s) in enumerate(zip(out_shape, padded)) if i < lead or (s == 1 and o != 1)]
        if axes:
            g = self.node("ReduceSum", [g, self.ci(axes)], keepdims=1)
        return self.reshape(g, in_shape) if (lead or axes) else g

    def zeros(self, shape) -> str:
        from onnx import helper, TensorProto
        return self.node("ConstantOfShape", [self.ci(list(shape))],
                         value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))

    def mask_mul(self, g: str, cond: str) -> str:
        # Mul by the mask as floats: onnxruntime's Where with a scalar operand is ~30x slower than Cast + Mul
        return self.node("Mul", [g, self.node("Cast", [cond], to=1)])


# ---------------------------------------------------------------------------------------------------------
# vector-Jacobian products: rule(b, node, attrs, g_outputs, diff) -> {input name: gradient name}
# ---------------------------------------------------------------------------------------------------------
RULES: dict[str, Any] = {}


def rule(*ops):
    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


def _attrs(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@rule("Identity", "Dropout")
def _identity(b, n, a, g, diff):
    if n.op_type == "Dropout" and (len(n.input) > 2 and n.input[2] and bool(b.value(n.input[2]))):
        raise Refused("Dropout in training mode")
    return {n.input[0]: g[0]}


@rule("Cast")
def _cast(b, n, a, g, diff):
    if a.get("to") != 1:
        raise Refused("a Cast to another float type on the differentiated path")
    return {n.input[0]: g[0]}


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b, n, a, g, diff):
    return {n.input[0]: b.reshape(g[0], b.shape(n.input[0]))}


def _scalar(b, name) -> float | None:
    if name not in b.const:
        return None
    v = b.value(name)
    return float(v.reshape(())) if v.size == 1 else None


def _self_gated(b, n, diff):
    """Mul(x, F(x)) with F's nodes read by this Mul only: (x, kind, factor) for F = Sigmoid ("silu"),
    HardSigmoid(1/6, 1/2) ("hardswish"), Clip(x + 3, 0, 6) optionally / 6 or * 1/6 ("hardswish6", factor 1 or
    1/6: how paddle2onnx/tf2onnx and torch's opset-11 exports write HardSwish); else None."""
    for x, gname in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
        gate = b.producer.get(gname)
        if gate is None or b.consumers.get(gname) != 1 or x not in diff or b.shape(x) != b.shape(n.output[0]):
            continue
        if gate.op_type == "Sigmoid" and gate.input[0] == x:
            return x, "silu", 1.0
        if gate.op_type == "HardSigmoid" and gate.input[0] == x:
            at = _attrs(gate)
            if abs(float(at.get("alpha", 0.2)) - 1 / 6) < 1e-6 and float(at.get("beta", 0.5)) == 0.5:
                return x, "hardswish", 1.0
            continue
        factor = 1.0
        if gate.op_type in ("Div", "Mul") and len(gate.input) == 2:
            k = _scalar(b, gate.input[1])
            if k is None or k == 0 or b.consumers.get(gate.input[0]) != 1:
                continue
            factor = 1.0 / k if gate.op_type == "Div" else k
            gate = b.producer.get(gate.input[0])
            if gate is None:
                continue
        if gate.op_type == "Clip" and len(gate.input) >= 3:
            add = b.producer.get(gate.input[0])
            if add is None or add.op_type != "Add" or b.consumers.get(gate.input[0]) != 1 or x not in add.input:
                continue
            other = add.input[1] if add.input[0] == x else add.input[0]
            lo, hi, three = _scalar(b, gate.input[1]), _scalar(b, gate.input[2]), _scalar(b, other)
            if (lo, hi, three) == (0.0, 6.0, 3.0):
                return x, "hardswish6", factor
    return None


@rule("Add", "Sub", "Mul", "Div")
def _binary(b, n, a, g, diff):
    A, B = n.input[0], n.input[1]
    out = b.shape(n.output[0])
    res = {}
    op = n.op_type
    if op == "Mul":
        gated = _self_gated(b, n, diff)
        if gated is not None:
            x, kind, factor = gated
            xr = b.fwd(x)
            if kind == "silu":  # d/dx x*s(x) = s * (1 + x * (1 - s))
                sg = b.node("Sigmoid", [xr])
                d = b.node("Mul", [sg, b.node("Add", [b.node("Mul", [xr, b.node("Sub", [b.c(1.0), sg])]),
                                                       b.c(1.0)])])
            elif kind == "hardswish":  # u + x/6 * [0 <= x/6 + 1/2 <= 1] (HardSigmoid's closed interval)
                u = b.node("HardSigmoid", [xr], alpha=1.0 / 6.0, beta=0.5)
                m = b.node("Cast", [b.node("LessOrEqual", [b.node("Abs", [xr]), b.c(3.0)])], to=1)
                d = b.node("Add", [u, b.node("Mul", [b.node("Mul", [xr, b.c(1.0 / 6.0)]), m])])
            else:  # d/dx x*clip(x+3, 0, 6) = clip(x+3, 0, 6) + x * [-3 <= x <= 3]  (Clip's closed interval)
                c = b.node("Clip", [b.node("Add", [xr, b.c(3.0)]), b.c(0.0), b.c(6.0)])
                m = b.node("Cast", [b.node("LessOrEqual", [b.node("Abs", [xr]), b.c(3.0)])], to=1)
                d = b.node("Add", [c, b.node("Mul", [xr, m])])
            gg = g[0] if factor == 1.0 else b.node("Mul", [g[0], b.c(factor)])
            return {x: b.node("Mul", [gg, d])}
    if A in diff:
        if op in ("Add", "Sub"):
            ga = g[0]
        elif op == "Mul":
            ga = b.node("Mul", [g[0], b.fwd(B)])
        else:
            ga = b.node("Div", [g[0], b.fwd(B)])
        res[A] = b.unbroadcast(ga, out, b.shape(A))
    if B in diff:
        if op == "Add":
            gb = g[0]
        elif op == "Sub":
            gb = b.node("Neg", [g[0]])
        elif op == "Mul":
            gb = b.node("Mul", [g[0], b.fwd(A)])
        else:  # d(A/B)/dB = -Y/B
            gb = b.node("Neg", [b.node("Div", [b.node("Mul", [g[0], b.fwd(n.output[0])]), b.fwd(B)])])
        gb = b.unbroadcast(gb, out, b.shape(B))
        res[B] = b.node("Add", [res[B], gb]) if B in res else gb  # x * x
    return res


@rule("Sum")
def _sum(b, n, a, g, diff):
    out = b.shape(n.output[0])
    res = {}
    for x in n.input:
        if x in diff:
            gx = b.unbroadcast(g[0], out, b.shape(x))
            res[x] = b.node("Add", [res[x], gx]) if x in res else gx
    return res


@rule("Neg")
def _neg(b, n, a, g, diff):
    return {n.input[0]: b.node("Neg", [g[0]])}


@rule("Relu")
def _relu(b, n, a, g, diff):
    return {n.input[0]: b.mask_mul(g[0], b.node("Greater", [b.fwd(n.output[0]), b.c(0.0)]))}


@rule("LeakyRelu")
def _leaky(b, n, a, g, diff):
    alpha = float(a.get("alpha", 0.01))
    # 1 where x >= 0 (the interpreter's where(x >= 0, x, alpha x)), alpha below
    pos = b.node("Cast", [b.node("GreaterOrEqual", [b.fwd(n.input[0]), b.c(0.0)])], to=1)
    f = b.node("Add", [b.node("Mul", [pos, b.c(1.0 - alpha)]), b.c(alpha)])
    gx = b.node("Mul", [g[0], f])
    return {n.input[0]: gx}


@rule("Sigmoid")
def _sigmoid(b, n, a, g, diff):
    y = b.fwd(n.output[0])
    d = b.node("Mul", [y, b.node("Sub", [b.c(1.0), y])])
    return {n.input[0]: b.node("Mul", [g[0], d])}


@rule("Tanh")
def _tanh(b, n, a, g, diff):
    y = b.fwd(n.output[0])
    d = b.node("Sub", [b.c(1.0), b.node("Mul", [y, y])])
    return {n.input[0]: b.node("Mul", [g[0], d])}


@rule("Exp")
def _exp(b, n, a, g, diff):
    return {n.input[0]: b.node("Mul", [g[0], b.fwd(n.output[0])])}


@rule("Log")
def _log(b, n, a, g, diff):
    return {n.input[0]: b.node("Div", [g[0], b.fwd(n.input[0])])}


@rule("Sqrt")
def _sqrt(b, n, a, g, diff):
    return {n.input[0]: b.node("Div", [b.node("Mul", [g[0], b.c(0.5)]), b.fwd(n.output[0])])}


@rule("Reciprocal")
def _recip(b, n, a, g, diff):
    y = b.fwd(n.output[0])
    return {n.input[0]: b.node("Neg", [b.node("Mul", [g[0], b.node("Mul", [y, y])])])}


@rule("Erf")
def _erf(b, n, a, g, diff):
    x = b.fwd(n.input[0])
    d = b.node("Mul", [b.node("Exp", [b.node("Neg", [b.node("Mul", [x, x])])]), b.c(2.0 / math.sqrt(math.pi))])
    return {n.input[0]: b.node("Mul", [g[0], d])}


@rule("Pow")
def _pow(b, n, a, g, diff):
    if n.input[1] in diff:
        raise Refused("Pow with a differentiated exponent")
    p = b.value(n.input[1])
    if p.size != 1:
        raise Refused("Pow with a non-scalar exponent")
    p = float(p.reshape(()))
    x = b.fwd(n.input[0])
    if p == 2.0:
        d = b.node("Mul", [x, b.c(2.0)])
    elif p == 1.0:
        return {n.input[0]: g[0]}
    else:
        d = b.node("Mul", [b.node("Pow", [x, b.c(p - 1.0)]), b.c(p)])
    gx = b.node("Mul", [g[0], d])
    return {n.input[0]: b.unbroadcast(gx, b.shape(n.output[0]), b.shape(n.input[0]))}


@rule("HardSigmoid")
def _hardsigmoid(b, n, a, g, diff):
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    t = b.node("Add", [b.node("Mul", [b.fwd(n.input[0]), b.c(alpha)]), b.c(beta)])
    # alpha on the closed interval 0 <= alpha x + beta <= 1 (the interpreter's documented convention)
    m = b.node("And", [b.node("GreaterOrEqual", [t, b.c(0.0)]), b.node("LessOrEqual", [t, b.c(1.0)])])
    return {n.input[0]: b.mask_mul(b.node("Mul", [g[0], b.c(alpha)]), m)}


@rule("HardSwish")
def _hardswish(b, n, a, g, diff):
    # d/dx x*u(x), u = clip(x/6+1/2, 0, 1): u + x/6 on -3 <= x <= 3 (torch's hardswish_backward: 0 below -3,
    # x/3 + 1/2 on [-3, 3], 1 above), without Where (slow in onnxruntime)
    x = b.fwd(n.input[0])
    u = b.node("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)
    m = b.node("Cast", [b.node("LessOrEqual", [b.node("Abs", [x]), b.c(3.0)])], to=1)
    d = b.node("Add", [u, b.node("Mul", [b.node("Mul", [x, b.c(1.0 / 6.0)]), m])])
    return {n.input[0]: b.node("Mul", [g[0], d])}


@rule("Clip")
def _clip(b, n, a, g, diff):
    x = b.fwd(n.input[0])
    lo = hi = None
    if n.op_type == "Clip" and len(n.input) > 1:
        if len(n.input) > 1 and n.input[1]:
            if n.input[1] in diff:
                raise Refused("Clip with a differentiated bound")
            lo = float(b.value(n.input[1]).reshape(()))
        if len(n.input) > 2 and n.input[2]:
            if n.input[2] in diff:
                raise Refused("Clip with a differentiated bound")
            hi = float(b.value(n.input[2]).reshape(()))
    else:
        lo, hi = a.get("min"), a.get("max")
    m = None
    if lo is not None:
        m = b.node("GreaterOrEqual", [x, b.c(lo)])
    if hi is not None:
        m2 = b.node("LessOrEqual", [x, b.c(hi)])
        m = m2 if m is None else b.node("And", [m, m2])
    return {n.input[0]: g[0] if m is None else b.mask_mul(g[0], m)}


@rule("Gelu")
def _gelu(b, n, a, g, diff):
    x = b.fwd(n.input[0])
    if a.get("approximate", b"none") in ("tanh", b"tanh"):
        k = math.sqrt(2.0 / math.pi)
        x2 = b.node("Mul", [x, x])
        u = b.node("Mul", [b.node("Mul", [x, b.node("Add", [b.c(1.0), b.node("Mul", [x2, b.c(0.044715)])])]),
                           b.c(k)])
        t = b.node("Tanh", [u])
        du = b.node("Mul", [b.node("Add", [b.c(1.0), b.node("Mul", [x2, b.c(3 * 0.044715)])]), b.c(k)])
        d = b.node("Add", [b.node("Mul", [b.node("Add", [b.c(1.0), t]), b.c(0.5)]),
                           b.node("Mul", [b.node("Mul", [b.node("Mul", [x, b.c(0.5)]),
                                                          b.node("Sub", [b.c(1.0), b.node("Mul", [t, t])])]), du])])
    else:
        cdf = b.node("Mul", [b.node("Add", [b.c(1.0), b.node("Erf", [b.node("Mul", [x, b.c(1 / math.sqrt(2))])])]),
                             b.c(0.5)])
        pdf = b.node("Mul", [b.node("Exp", [b.node("Mul", [b.node("Mul", [x, x]), b.c(-0.5)])]),
                             b.c(1 / math.sqrt(2 * math.pi))])
        d = b.node("Add", [cdf, b.node("Mul", [x, pdf])])
    return {n.input[0]: b.node("Mul", [g[0], d])}


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@rule("Softmax", "LogSoftmax")
def _softmax(b, n, a, g, diff, opset=13):
    rank = len(b.shape(n.input[0]))
    axis = _norm_axis(int(a.get("axis", -1 if b.opset >= 13 else 1)), rank)
    if b.opset < 13 and axis != rank - 1:
        raise Refused(f"{n.op_type} before opset 13 over axes {axis}.. (flattened)")
    y = b.fwd(n.output[0])
    if n.op_type == "Softmax":
        s = b.node("ReduceSum", [b.node("Mul", [g[0], y]), b.ci([axis])], keepdims=1)
        gx = b.node("Mul", [y, b.node("Sub", [g[0], s])])
    else:
        s = b.node("ReduceSum", [g[0], b.ci([axis])], keepdims=1)
        gx = b.node("Sub", [g[0], b.node("Mul", [b.node("Exp", [y]), s])])
    return {n.input[0]: gx}


def _t_last2(b, x: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return b.node("Transpose", [x], perm=perm)


@rule("MatMul")
def _matmul(b, n, a, g, diff):
    A, B = n.input[0], n.input[1]
    sa, sb, so = b.shape(A), b.shape(B), b.shape(n.output[0])
    if len(sa) < 2 or len(sb) < 2:
        raise Refused("MatMul with a 1-D operand")
    res = {}
    if A in diff:
        if B in b.const and len(sb) == 2:
            bt = b.c(_np(b.values[B]).T.copy())
        else:
            bt = _t_last2(b, b.fwd(B), len(sb))
        ga = b.node("MatMul", [g[0], bt])
        res[A] = b.unbroadcast(ga, so[:-2] + (sa[-2], sa[-1]), sa)
    if B in diff:
        gb = b.node("MatMul", [_t_last2(b, b.fwd(A), len(sa)), g[0]])
        gb = b.unbroadcast(gb, so[:-2] + (sb[-2], sb[-1]), sb)
        res[B] = b.node("Add", [res[B], gb]) if B in res else gb
    return res


@rule("Gemm")
def _gemm(b, n, a, g, diff):
    A, B = n.input[0], n.input[1]
    C = n.input[2] if len(n.input) > 2 and n.input[2] else None
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))
    res = {}
    gy = g[0] if alpha == 1.0 else b.node("Mul", [g[0], b.c(alpha)])
    if A in diff:
        # dA' = gy @ B'^T; B' = B^T if tb
        if B in b.const:
            bm = _np(b.values[B])
            bpt = bm if tb else bm.T  # B'^T
            ga = b.node("MatMul", [gy, b.c(np.ascontiguousarray(bpt))])
        else:
            ga = b.node("Gemm", [gy, b.fwd(B)], transB=0 if tb else 1)
        res[A] = b.node("Transpose", [ga], perm=[1, 0]) if ta else ga
    if B in diff:
        # dB' = A'^T @ gy
        gb = b.node("Gemm", [b.fwd(A), gy], transA=0 if ta else 1)
        gb = b.node("Transpose", [gb], perm=[1, 0]) if tb else gb
        res[B] = b.node("Add", [res[B], gb]) if B in res else gb
    if C is not None and C in diff:
        gc = g[0] if beta == 1.0 else b.node("Mul", [g[0], b.c(beta)])
        res[C] = b.unbroadcast(gc, b.shape(n.output[0]), b.shape(C))
    return res


def _conv_pads(a, in_sp, k, s, d) -> list[int]:
    nd = len(in_sp)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        p = list(a.get("pads", [0] * (2 * nd)))
        return p
    if auto == "VALID":
        return [0] * (2 * nd)
    begin, end = [], []
    for i in range(nd):
        out = -(-in_sp[i] // s[i])
        total = max((out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - in_sp[i], 0)
        lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
        begin.append(lo)
        end.append(total - lo)
    return begin + end


def _const_weight(b, n) -> np.ndarray:
    """A Conv/ConvTranspose node's weight, which must be fixed (the input gradient only: weights are constants)."""
    W = n.input[1]
    if W in b.diff or (len(n.input) > 2 and n.input[2] in b.diff):
        raise Refused(f"{n.op_type} with differentiated weights")
    if W not in b.const:
        raise Refused(f"{n.op_type} whose weight is computed from input values")
    return _np(b.values[W]).astype(np.float32)


@rule("Conv")
def _conv(b, n, a, g, diff):
    X = n.input[0]
    w = _const_weight(b, n)
    xs, ys = b.shape(X), b.shape(n.output[0])
    nd = len(xs) - 2
    k = list(w.shape[2:])
    s = list(a.get("strides", [1] * nd))
    d = list(a.get("dilations", [1] * nd))
    grp = int(a.get("group", 1))
    pads = _conv_pads(a, xs[2:], k, s, d)
    pb, pe = pads[:nd], pads[nd:]
    scale = b.pending_scale.pop(n.output[0], None)
    if scale is not None:  # a BatchNormalization after this Conv: its per-channel factor folded into the weight
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    cin_g = w.shape[1]
    wt = _flip_swap(w, grp)
    gy = g[0]
    if any(v != 1 for v in s):
        if STRIDED == "zeros" and cin_g == 1 and grp > 1:
            # depthwise: onnxruntime's grouped ConvTranspose is slow (~3x torch's at batch 32); the zero-inserted
            # gradient through the stride-1 depthwise form below costs st^2 more multiply-adds, few for depthwise
            gy, ylen = _zero_inserted(b, gy, s, ys)
        else:
            return {X: _conv_transpose(b, gy, w, grp, s, d, pb, pe, k, xs, ys)}
    else:
        ylen = [ys[2 + i] for i in range(nd)]
    # stride 1: a convolution of g with the flipped kernel, input/output channels swapped per group
    lo = [(k[i] - 1) * d[i] - pb[i] for i in range(nd)]
    hi = [xs[2 + i] + pb[i] - ylen[i] for i in range(nd)]
    if any(v < 0 for v in lo + hi):
        crop_lo = [max(-v, 0) for v in lo]
        crop_hi = [max(-v, 0) for v in hi]
        rank = nd + 2
        gy = b.node("Slice", [gy, b.ci(crop_lo), b.ci([ylen[i] - crop_hi[i] for i in range(nd)]),
                              b.ci(list(range(2, rank)))])
        lo = [max(v, 0) for v in lo]
        hi = [max(v, 0) for v in hi]
    gx = b.node("Conv", [gy, b.c(wt)], group=grp, dilations=d, pads=lo + hi, strides=[1] * nd, kernel_shape=k)
    return {X: gx}


def _conv_transpose(b, gy, w, grp, s, d, pb, pe, k, xs, ys) -> str:
    nd = len(s)
    outpad = []
    for i in range(nd):
        full = s[i] * (ys[2 + i] - 1) + (k[i] - 1) * d[i] + 1 - pb[i] - pe[i]
        op = xs[2 + i] - full
        if op < 0 or op >= max(s[i], d[i]):
            raise Refused("Conv geometry without a ConvTranspose inverse")
        outpad.append(op)
    return b.node("ConvTranspose", [gy, b.c(w)], group=grp, dilations=d, pads=pb + pe, strides=s,
                  kernel_shape=k, output_padding=outpad)


def _flip_swap(w: np.ndarray, grp: int) -> np.ndarray:
    """(C_out, C_in/G, kh, kw) -> the kernel of the transposed correlation: flipped, channels swapped per group."""
    cout, cin_g = w.shape[0], w.shape[1]
    k = w.shape[2:]
    nd = len(k)
    wf = np.flip(w, axis=tuple(range(2, 2 + nd)))
    return np.ascontiguousarray(wf.reshape(grp, cout // grp, cin_g, *k).transpose(0, 2, 1, *range(3, 3 + nd))
                                .reshape(grp * cin_g, cout // grp, *k))


def _zero_inserted(b, gy: str, st: list[int], ys) -> tuple[str, list[int]]:
    """g with st-1 zeros after each position (nearest upsampling times a 0/1 mask): (name, spatial lengths)."""
    nd = len(st)
    up = b.node("Resize", [gy, "", b.c([1.0, 1.0] + [float(v) for v in st])], mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    L = [ys[2 + i] * st[i] for i in range(nd)]
    mask = np.zeros([1, 1] + L, np.float32)
    mask[(slice(None), slice(None)) + tuple(slice(0, None, v) for v in st)] = 1.0
    return b.node("Mul", [up, b.c(mask)]), L


@rule("ConvTranspose")
def _conv_transpose_rule(b, n, a, g, diff):
    X = n.input[0]
    w = _const_weight(b, n)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "") or "output_shape" in a:
        raise Refused("ConvTranspose with auto_pad or output_shape")
    xs = b.shape(X)
    nd = len(xs) - 2
    s = list(a.get("strides", [1] * nd))
    d = list(a.get("dilations", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    # the adjoint of a transposed convolution is the convolution with the same weight and geometry (its output
    # is x's size: output_padding < stride only adds positions no input reaches)
    gx = b.node("Conv", [g[0], b.c(w)], group=int(a.get("group", 1)), dilations=d, pads=pads, strides=s,
                kernel_shape=list(w.shape[2:]))
    return {X: gx}


@rule("AveragePool")
def _avgpool(b, n, a, g, diff):
    xs, ys = b.shape(n.input[0]), b.shape(n.output[0])
    nd = len(xs) - 2
    k = list(a["kernel_shape"])
    s = list(a.get("strides", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "", "VALID") or list(a.get("dilations", [1] * nd)) != [1] * nd:
        raise Refused("AveragePool with auto_pad SAME or dilations")
    if any(pads) and not int(a.get("count_include_pad", 0)):
        raise Refused("AveragePool with pads excluded from the count")
    for i in range(nd):  # every window whole (no ceil_mode partial window): one divisor
        if (ys[2 + i] - 1) * s[i] + k[i] > xs[2 + i] + pads[i] + pads[nd + i]:
            raise Refused("AveragePool with partial windows (ceil_mode)")
    c = xs[1]
    w = np.full([c, 1] + k, 1.0 / float(np.prod(k)), np.float32)
    return {n.input[0]: _conv_transpose(b, g[0], w, c, s, [1] * nd, pads[:nd], pads[nd:], k, xs, ys)}


@rule("BatchNormalization")
def _bn(b, n, a, g, diff):
    if int(a.get("training_mode", 0)) or len([o for o in n.output if o]) > 1:
        raise Refused("BatchNormalization in training mode")
    for p in n.input[1:5]:
        if p in diff or p not in b.const:
            raise Refused("BatchNormalization with computed statistics")
    scale, var = _np(b.values[n.input[1]]), _np(b.values[n.input[4]])
    eps = float(a.get("epsilon", 1e-5))
    f = (scale / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)
    X = n.input[0]
    if X in b.conv_single_use:  # the Conv before folds f into its weight
        b.pending_scale[X] = f
        return {X: g[0]}
    rank = len(b.shape(n.input[0]))
    f = f.reshape((-1,) + (1,) * (rank - 2))
    return {n.input[0]: b.node("Mul", [g[0], b.c(f)])}


@rule("GlobalAveragePool")
def _gap(b, n, a, g, diff):
    xs = b.shape(n.input[0])
    cnt = int(np.prod(xs[2:]))
    return {n.input[0]: b.node("Expand", [b.node("Mul", [g[0], b.c(1.0 / cnt)]), b.ci(list(xs))])}


def _axes(b, n, a) -> list[int] | None:
    if "axes" in a:
        return list(a["axes"])
    if len(n.input) > 1 and n.input[1]:
        return [int(v) for v in b.value(n.input[1]).reshape(-1)]
    return None


@rule("ReduceMean", "ReduceSum")
def _reduce(b, n, a, g, diff):
    xs = b.shape(n.input[0])
    rank = len(xs)
    axes = _axes(b, n, a)
    if not axes:  # no axes (absent or empty): all of them, or none with noop_with_empty_axes
        if int(a.get("noop_with_empty_axes", 0)):
            return {n.input[0]: g[0]}
        axes = list(range(rank))
    axes = sorted(_norm_axis(v, rank) for v in axes)
    kept = [1 if i in axes else xs[i] for i in range(rank)]
    gx = b.node("Expand", [b.reshape(g[0], kept), b.ci(list(xs))])
    if n.op_type == "ReduceMean":
        cnt = int(np.prod([xs[i] for i in axes]))
        gx = b.node("Mul", [gx, b.c(1.0 / cnt)])
    return {n.input[0]: gx}


@rule("Transpose")
def _transpose(b, n, a, g, diff):
    rank = len(b.shape(n.input[0]))
    perm = list(a.get("perm", list(range(rank))[::-1]))
    inv = [0] * rank
    for i, p in enumerate(perm):
        inv[p] = i
    return {n.input[0]: b.node("Transpose", [g[0]], perm=inv)}


@rule("Concat")
def _concat(b, n, a, g, diff):
    rank = len(b.shape(n.output[0]))
    axis = _norm_axis(int(a["axis"]), rank)
    sizes = [b.shape(x)[axis] for x in n.input]
    parts = b.node("Split", [g[0], b.ci(sizes)], n_out=len(sizes), axis=axis)
    if len(sizes) == 1:
        parts = [parts]
    res = {}
    for x, p in zip(n.input, parts):
        if x in diff:
            res[x] = b.node("Add", [res[x], p]) if x in res else p
    return res


@rule("Split")
def _split(b, n, a, g, diff):
    rank = len(b.shape(n.input[0]))
    axis = _norm_axis(int(a.get("axis", 0)), rank)
    parts = []
    for o, go in zip(n.output, g):
        parts.append(go if go is not None else b.zeros(b.shape(o)))
    return {n.input[0]: b.node("Concat", parts, axis=axis) if len(parts) > 1 else parts[0]}


@rule("Slice")
def _slice(b, n, a, g, diff):
    xs = b.shape(n.input[0])
    rank = len(xs)
    if b.opset < 10:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts = [int(v) for v in b.value(n.input[1]).reshape(-1)]
        ends = [int(v) for v in b.value(n.input[2]).reshape(-1)]
        axes = [int(v) for v in b.value(n.input[3]).reshape(-1)] if len(n.input) > 3 and n.input[3] \
            else list(range(len(starts)))
        steps = [int(v) for v in b.value(n.input[4]).reshape(-1)] if len(n.input) > 4 and n.input[4] \
            else [1] * len(starts)
    before = [0] * rank
    after = [0] * rank
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        ax = _norm_axis(ax, rank)
        dim = xs[ax]
        if sp != 1:
            raise Refused("Slice with a step other than 1")
        st = st + dim if st < 0 else st
        en = en + dim if en < 0 else en
        st, en = min(max(st, 0), dim), min(max(en, 0), dim)
        before[ax] = st
        after[ax] = dim - max(en, st)
    return {n.input[0]: b.node("Pad", [g[0], b.ci(before + after)], mode="constant")}


@rule("Gather")
def _gather(b, n, a, g, diff):
    X, I = n.input[0], n.input[1]
    xs = b.shape(X)
    rank = len(xs)
    axis = _norm_axis(int(a.get("axis", 0)), rank)
    ishape = b.shape(I)
    if len(ishape) > 1:
        raise Refused("Gather with multi-dimensional indices")
    gy = g[0]
    if len(ishape) == 0:
        gy = b.node("Unsqueeze", [gy, b.ci([axis])])
        m = 1
    else:
        m = ishape[0]
    idx = b.fwd(I)
    idx = b.node("Cast", [idx], to=7)
    idx = b.node("Where", [b.node("Less", [idx, b.ci(0)]), b.node("Add", [idx, b.ci(xs[axis])]), idx])
    shp = [1] * rank
    shp[axis] = m
    gshape = list(xs)
    gshape[axis] = m
    full = b.node("Expand", [b.reshape(idx, shp), b.ci(gshape)])
    gx = b.node("ScatterElements", [b.zeros(xs), full, gy], axis=axis, reduction="add")
    return {X: gx}


@rule("Expand")
def _expand(b, n, a, g, diff):
    return {n.input[0]: b.unbroadcast(g[0], b.shape(n.output[0]), b.shape(n.input[0]))}


@rule("Where")
def _where(b, n, a, g, diff):
    C, A, B = n.input
    out = b.shape(n.output[0])
    res = {}
    cond = b.fwd(C)
    if A in diff:
        res[A] = b.unbroadcast(b.mask_mul(g[0], cond), out, b.shape(A))
    if B in diff:
        gb = b.unbroadcast(b.mask_mul(g[0], b.node("Not", [cond])), out, b.shape(B))
        res[B] = b.node("Add", [res[B], gb]) if B in res else gb
    return res


@rule("Pad")
def _pad(b, n, a, g, diff):
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise Refused(f"Pad mode {mode}")
    xs = b.shape(n.input[0])
    rank = len(xs)
    pads = list(a["pads"]) if "pads" in a else [int(v) for v in b.value(n.input[1]).reshape(-1)]
    if len(n.input) > 3 and n.input[3]:
        raise Refused("Pad with axes")
    if any(p < 0 for p in pads):
        raise Refused("Pad with negative pads")
    if mode == "constant":
        starts = pads[:rank]
        ends = [pads[i] + xs[i] for i in range(rank)]
        return {n.input[0]: b.node("Slice", [g[0], b.ci(starts), b.ci(ends), b.ci(list(range(rank)))])}
    # reflect/edge/wrap pad each axis on its own: the adjoint is one axis at a time, the centre plus what the
    # borders copied, put back where they came from
    gx = g[0]
    for ax in range(rank):
        pl, pr, L = pads[ax], pads[rank + ax], xs[ax]
        if not pl and not pr:
            continue
        if (mode == "reflect" and max(pl, pr) > L - 1) or (mode == "wrap" and max(pl, pr) > L) or L == 0:
            raise Refused(f"Pad mode {mode} wider than the axis")

        def part(lo, hi, gx=gx, ax=ax):
            return b.node("Slice", [gx, b.ci([lo]), b.ci([hi]), b.ci([ax])])

        def put(t, before, after, ax=ax):
            p = [0] * (2 * rank)
            p[ax], p[rank + ax] = before, after
            return b.node("Pad", [t, b.ci(p)], mode="constant")

        def flip(t, ax=ax):
            return b.node("Slice", [t, b.ci([-1]), b.ci([-(2 ** 62)]), b.ci([ax]), b.ci([-1])])
        terms = [part(pl, pl + L)]
        if pl:
            left = part(0, pl)
            terms.append(put(flip(left), 1, L - pl - 1) if mode == "reflect" else
                         put(b.node("ReduceSum", [left, b.ci([ax])], keepdims=1), 0, L - 1) if mode == "edge" else
                         put(left, L - pl, 0))
        if pr:
            right = part(pl + L, pl + L + pr)
            terms.append(put(flip(right), L - 1 - pr, 1) if mode == "reflect" else
                         put(b.node("ReduceSum", [right, b.ci([ax])], keepdims=1), L - 1, 0) if mode == "edge" else
                         put(right, 0, L - pr))
        gx = b.node("Sum", terms) if len(terms) > 1 else terms[0]
    return {n.input[0]: gx}


@rule("Resize", "Upsample")
def _resize(b, n, a, g, diff):
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    xs, ys = b.shape(n.input[0]), b.shape(n.output[0])
    if mode != "nearest":
        raise Refused(f"Resize mode {mode}")
    ctm = a.get("coordinate_transformation_mode", b"half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    nm = a.get("nearest_mode", b"round_prefer_floor")
    nm = nm.decode() if isinstance(nm, bytes) else nm
    f = []
    for x, y in zip(xs, ys):
        if y % x:
            raise Refused("Resize by a non-integer factor")
        f.append(y // x)
    if n.op_type == "Resize" and b.opset >= 11:
        # block replication for an integer factor: asymmetric + floor, or half_pixel/pytorch_half_pixel + round
        ok = (ctm == "asymmetric" and nm == "floor") or \
             (ctm in ("half_pixel", "pytorch_half_pixel") and nm in ("round_prefer_floor", "round_prefer_ceil"))
        if not ok:
            raise Refused(f"Resize nearest with {ctm}/{nm}")
    # g (x0*f0, x1*f1, ...) -> (x0, f0, x1, f1, ...) -> sum over the f axes
    inter = []
    for x, k in zip(xs, f):
        inter += [x, k]
    gg = b.reshape(g[0], inter)
    gx = b.node("ReduceSum", [gg, b.ci([2 * i + 1 for i in range(len(xs))])], keepdims=0)
    return {n.input[0]: gx}


# -- recurrent layers ----------------------------------------------------------------------------------------
#: GRU and LSTM input gradients as ONNX nodes (``_gru``, ``_lstm``): the gates of every step from onnxruntime's
#: own Y in batched products, the backward recurrence one onnxruntime Scan (~15 us a step at batch 1 against
#: ~30 us for the torch island's three kernels a step); tests switch them off to compare with the islands
GRU_RULE = [True]
LSTM_RULE = [True]


def _to_loop(b, t: str, D: int, reverse_only: bool, axis: int) -> str:
    """A per-direction tensor (D on axis 0, time on ``axis``) between time order and the loop's order (each
    direction's steps in the order its recurrence runs: the reverse direction flipped); an involution."""
    if D == 1 and not reverse_only:
        return t

    def flip(x):
        return b.node("Slice", [x, b.ci([-1]), b.ci([-(2 ** 62)]), b.ci([axis]), b.ci([-1])])
    if D == 1:
        return flip(t)
    fwd_part, rev_part = b.node("Split", [t, b.ci([1, 1])], n_out=2, axis=0)
    return b.node("Concat", [fwd_part, flip(rev_part)], axis=0)


def _rnn_form(a: dict, acts: list[str]) -> tuple[int, str] | None:
    """(number of directions, direction) of an RNN node whose activations are ``acts`` (the defaults), without
    clip, in layout 0; else None."""
    if a.get("clip") is not None or int(a.get("layout", 0)):
        return None
    direction = a.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    D = 2 if direction == "bidirectional" else 1
    given = a.get("activations")
    if given:
        low = [v.decode().lower() if isinstance(v, bytes) else str(v).lower() for v in given]
        if low not in (acts * D, acts):
            return None
    return D, direction


class _Rnn:
    """What the GRU and LSTM rules share: the node's checks, its constants, and in each direction's loop order
    (D, T, B, ...) the states before every step (from Y), the recurrent products and the input projections."""

    def __init__(self, b, n, a, diff, G: int, acts: list[str], slots: int):
        self.b = b
        ins = list(n.input) + [""] * (slots - len(n.input))
        self.X, Wn, Rn, Bn, L = ins[:5]
        form = _rnn_form(a, acts)
        if form is None:
            raise Refused(f"{n.op_type} with clip, layout 1 or other activations")
        D, direction = form
        if L or any(v in diff for v in (Wn, Rn, Bn) if v) or any(v and v not in b.const for v in (Wn, Rn, Bn)):
            raise Refused(f"{n.op_type} with sequence lengths or non-constant weights")
        xs = b.shape(self.X)
        if len(xs) != 3 or not n.output or not n.output[0] or xs[0] == 0 or xs[1] == 0:
            raise Refused(f"{n.op_type} without its Y output, or over an empty sequence")
        self.T, self.B, self.I = xs
        self.w = b.value(Wn).astype(np.float32)      # (D, G H, I)
        self.r = b.value(Rn).astype(np.float32)      # (D, G H, H)
        self.H = H = self.r.shape[-1]
        self.D, self.G, self.rev = D, G, direction == "reverse"
        bias = b.value(Bn).astype(np.float32) if Bn else np.zeros((D, 2 * G * H), np.float32)
        self.wb, self.rb = bias[:, :G * H], bias[:, G * H:]

    def loop(self, t: str) -> str:
        return _to_loop(self.b, t, self.D, self.rev, 1)

    def state0(self, name: str) -> str:
        """An initial state (D, B, H) as (D, 1, B, H): a constant, a residual, or zeros."""
        b, D, B, H = self.b, self.D, self.B, self.H
        if name and name in b.const:
            return b.c(b.value(name).astype(np.float32).reshape(D, 1, B, H))
        if name:
            return b.reshape(b.fwd(name), (D, 1, B, H))
        return b.c(np.zeros((D, 1, B, H), np.float32))

    def before(self, seq: str, first: str) -> str:
        """(D, T, B, H) loop-order values of a step's predecessor: ``first``, then ``seq`` shifted by one."""
        if self.T == 1:
            return first
        b = self.b
        return b.node("Concat", [first, b.node("Slice", [seq, b.ci([0]), b.ci([self.T - 1]), b.ci([1])])], axis=1)

    def y_loop(self, y: str) -> str:
        """Y (T, D, B, H) in loop order (D, T, B, H)."""
        return self.loop(self.b.node("Transpose", [y], perm=[1, 0, 2, 3]))

    def products(self, hp: str) -> tuple[str, str]:
        """(hp R^T + Rb, X W^T + Wb), each (D, T, B, G H) in loop order."""
        b, D, T, B, H, I, GH = self.b, self.D, self.T, self.B, self.H, self.I, self.G * self.H
        ah = b.node("Add", [b.node("MatMul", [b.reshape(hp, (D, T * B, H)),
                                              b.c(np.ascontiguousarray(self.r.transpose(0, 2, 1)))]),
                            b.c(self.rb.reshape(D, 1, GH))])
        xw = b.node("Add", [b.node("MatMul", [b.reshape(b.fwd(self.X), (T * B, I)),
                                              b.c(np.ascontiguousarray(self.w.reshape(D * GH, I).T))]),
                            b.c(self.wb.reshape(D * GH))])
        xw = self.loop(b.node("Transpose", [b.reshape(xw, (T, B, D, GH))], perm=[2, 0, 1, 3]))
        return b.reshape(ah, (D, T, B, GH)), xw

    def out_grads(self, gy: str | None):
        """The loop-order gradient of Y (D, T, B, H), that of the last step (D, B, H), and that of each step's
        predecessor (a zero first): (None, None, None) when Y's gradient is None."""
        if gy is None:
            return None, None, None
        b, D, T, B, H = self.b, self.D, self.T, self.B, self.H
        gyl = self.y_loop(gy)
        last = b.reshape(b.node("Slice", [gyl, b.ci([T - 1]), b.ci([T]), b.ci([1])]), (D, B, H))
        prev = self.before(gyl, b.c(np.zeros((D, 1, B, H), np.float32))) if T > 1 else None
        return gyl, last, prev

    def input_grad(self, gpre: str) -> str:
        """The gradient of X from those of the pre-activations, (D, T, B, G H) in loop order."""
        b, D, T, B, I, GH = self.b, self.D, self.T, self.B, self.I, self.G * self.H
        gpre = b.reshape(b.node("Transpose", [self.loop(gpre)], perm=[1, 2, 0, 3]), (T * B, D * GH))
        return b.reshape(b.node("MatMul", [gpre, b.c(np.ascontiguousarray(self.w.reshape(D * GH, I)))]), (T, B, I))

    def scan(self, body_nodes, state_ins, state_outs, seq_ins, seq_outs, inits, reverse: bool, carry, seqs):
        """One Scan over the loop's steps (axis 1 of the sequences; ``reverse``: the last step first), the body
        written with its own constants (nothing crosses into it but the Scan's inputs)."""
        from onnx import helper, numpy_helper, TensorProto
        b = self.b
        V = helper.make_tensor_value_info
        body = helper.make_graph(
            body_nodes, "recurrence", [V(k, TensorProto.FLOAT, s) for k, s in state_ins + seq_ins],
            [V(k, TensorProto.FLOAT, s) for k, s in state_outs + seq_outs],
            [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in inits.items()])
        k, m = len(seq_ins), len(seq_outs)
        d = 1 if reverse else 0
        return b.node("Scan", list(carry) + list(seqs), n_out=len(state_outs) + m, body=body, num_scan_inputs=k,
                      scan_input_axes=[1] * k, scan_input_directions=[d] * k, scan_output_axes=[1] * m,
                      scan_output_directions=[d] * m)


@rule("GRU")
def _gru(b, n, a, g, diff):
    """linear_before_reset GRU (onnxruntime's and torch's form), default activations, no clip, layout 0, no
    sequence lengths, constant W/R/B. Per direction d, in its loop order, with hp the state before a step:
    a = hp R^T + Rb, z/r = sigmoid(xw + a) (their parts), n = tanh(xw_h + r a_h), h = (1 - z) n + z hp.
    With dh the total gradient of a step's h: d(xw) = dh * [(hp - n) z (1 - z), kn a_h r (1 - r), kn] for
    kn = (1 - z)(1 - n^2); d(a) is the same with kn r as its third part; dhp = dh z + d(a) R, plus the previous
    step's output gradient. Every coefficient comes from Y at once; the Scan runs only dhp's recurrence."""
    from onnx import helper
    if not GRU_RULE[0]:
        raise Refused("GRU rule switched off")
    if not int(a.get("linear_before_reset", 0)):
        raise Refused("GRU without linear_before_reset")
    R = _Rnn(b, n, a, diff, 3, ["sigmoid", "tanh"], 6)
    X, H0 = R.X, (list(n.input) + [""] * 6)[5]
    D, T, B_, H = R.D, R.T, R.B, R.H
    hp = R.before(R.y_loop(b.fwd(n.output[0])), R.state0(H0))              # (D, T, B, H)
    ah, xw = R.products(hp)
    a_zr, a_h = b.node("Split", [ah, b.ci([2 * H, H])], n_out=2, axis=3)
    x_zr, x_h = b.node("Split", [xw, b.ci([2 * H, H])], n_out=2, axis=3)
    zr = b.node("Sigmoid", [b.node("Add", [x_zr, a_zr])])
    z, rr = b.node("Split", [zr, b.ci([H, H])], n_out=2, axis=3)
    nn_ = b.node("Tanh", [b.node("Add", [x_h, b.node("Mul", [rr, a_h])])])
    one = b.c(1.0)
    omz = b.node("Sub", [one, z])
    kn = b.node("Mul", [omz, b.node("Sub", [one, b.node("Mul", [nn_, nn_])])])
    kz = b.node("Mul", [b.node("Mul", [b.node("Sub", [hp, nn_]), z]), omz])
    kr = b.node("Mul", [b.node("Mul", [kn, a_h]), b.node("Mul", [rr, b.node("Sub", [one, rr])])])
    ax4 = b.ci([3])
    kx = b.node("Concat", [b.node("Unsqueeze", [v, ax4]) for v in (kz, kr, kn)], axis=3)    # (D, T, B, 3, H)
    kh = b.node("Concat", [b.node("Unsqueeze", [v, ax4]) for v in (kz, kr, b.node("Mul", [kn, rr]))], axis=3)
    _, last, prev = R.out_grads(g[0])
    gyh = g[1] if len(g) > 1 else None
    start = gyh if last is None else last if gyh is None else b.node("Add", [last, gyh])
    # the Scan: state dh (D, B, H); per step (loop step T-1 first) kh, z and the predecessor's output
    # gradient; out: each step's dh
    st, s3 = [D, B_, H], [D, B_, 3, H]
    body = [helper.make_node("Unsqueeze", ["dh", "ax"], ["dh_u"]), helper.make_node("Mul", ["dh_u", "kh"], ["ghh"]),
            helper.make_node("Reshape", ["ghh", "s3"], ["ghh3"]), helper.make_node("MatMul", ["ghh3", "R"], ["mm"]),
            helper.make_node("Mul", ["dh", "z"], ["dz"]), helper.make_node("Identity", ["dh"], ["dh_step"])]
    seq_ins, seqs = [("kh", s3), ("z", st)], [kh, z]
    if prev is not None:
        body += [helper.make_node("Add", ["mm", "dz"], ["part"]), helper.make_node("Add", ["part", "gp"], ["dh_next"])]
        seq_ins.append(("gp", st))
        seqs.append(prev)
    else:
        body.append(helper.make_node("Add", ["mm", "dz"], ["dh_next"]))
    dh0, dhs = R.scan(body, [("dh", st)], [("dh_next", st)], seq_ins, [("dh_step", st)],
                      {"R": R.r, "s3": np.array([D, B_, 3 * H], np.int64), "ax": np.array([2], np.int64)},
                      True, [start], seqs)
    res = {}
    if X in diff:
        res[X] = R.input_grad(b.reshape(b.node("Mul", [b.node("Unsqueeze", [dhs, ax4]), kx]), (D, T, B_, 3 * H)))
    if H0 and H0 in diff:
        res[H0] = dh0
    return res


@rule("LSTM")
def _lstm(b, n, a, g, diff):
    """LSTM without peepholes, input_forget or clip, default activations, layout 0, no sequence lengths,
    constant W/R/B (gates i, o, f, c). Per direction, in its loop order, with hp/cp the state and cell before a
    step: pre = xw + hp R^T + Rb; i, o, f = sigmoid, g = tanh of their parts; c = f cp + i g (one forward Scan
    of that elementwise recurrence gives every cell, since onnxruntime returns only the last); h = o tanh(c).
    Backward, with dh/dc the gradients reaching a step's h and c: dct = dc + dh o (1 - tanh(c)^2); the
    pre-activations' gradients are dct g i(1-i), dh tanh(c) o(1-o), dct cp f(1-f), dct i (1-g^2); dcp = dct f;
    dhp = d(pre) R plus the predecessor's output gradient: one backward Scan."""
    from onnx import helper
    if not LSTM_RULE[0]:
        raise Refused("LSTM rule switched off")
    ins = list(n.input) + [""] * (8 - len(n.input))
    H0, C0, P = ins[5], ins[6], ins[7]
    if P or int(a.get("input_forget", 0)):
        raise Refused("LSTM with peepholes or input_forget")
    R = _Rnn(b, n, a, diff, 4, ["sigmoid", "tanh", "tanh"], 8)
    X = R.X
    D, B_, H = R.D, R.B, R.H
    hp = R.before(R.y_loop(b.fwd(n.output[0])), R.state0(H0))
    ah, xw = R.products(hp)
    pre = b.node("Add", [ah, xw])                                             # (D, T, B, 4H): i, o, f, c
    iof_pre, g_pre = b.node("Split", [pre, b.ci([3 * H, H])], n_out=2, axis=3)
    iof = b.node("Sigmoid", [iof_pre])
    gg = b.node("Tanh", [g_pre])
    i_, o_, f_ = b.node("Split", [iof, b.ci([H, H, H])], n_out=3, axis=3)
    st = [D, B_, H]
    c0 = R.state0(C0)
    # every cell: c_t = f_t c_{t-1} + i_t g_t, forward
    cells = R.scan([helper.make_node("Mul", ["f", "c"], ["fc"]), helper.make_node("Add", ["fc", "ig"], ["c_next"]),
                    helper.make_node("Identity", ["c_next"], ["c_step"])],
                   [("c", st)], [("c_next", st)], [("f", st), ("ig", st)], [("c_step", st)], {}, False,
                   [b.reshape(c0, st)], [f_, b.node("Mul", [i_, gg])])[1]
    cp = R.before(cells, c0)
    tc = b.node("Tanh", [cells])
    one = b.c(1.0)
    a_h = b.node("Mul", [o_, b.node("Sub", [one, b.node("Mul", [tc, tc])])])     # dh -> dc
    dsig = b.node("Mul", [iof, b.node("Sub", [one, iof])])                    # sigmoid' of i, o, f
    di_, do_, df_ = b.node("Split", [dsig, b.ci([H, H, H])], n_out=3, axis=3)
    ax4 = b.ci([3])
    k = b.node("Concat", [b.node("Unsqueeze", [v, ax4]) for v in (
        b.node("Mul", [gg, di_]), b.node("Mul", [tc, do_]), b.node("Mul", [cp, df_]),
        b.node("Mul", [i_, b.node("Sub", [one, b.node("Mul", [gg, gg])])]))], axis=3)   # (D, T, B, 4, H)
    _, last, prev = R.out_grads(g[0])
    gyh = g[1] if len(g) > 1 else None
    gyc = g[2] if len(g) > 2 else None
    dh_start = gyh if last is None else last if gyh is None else b.node("Add", [last, gyh])
    if dh_start is None:
        dh_start = b.c(np.zeros(st, np.float32))
    dc_start = gyc if gyc is not None else b.c(np.zeros(st, np.float32))
    s4 = [D, B_, 4, H]
    body = [helper.make_node("Mul", ["dh", "ah"], ["dha"]), helper.make_node("Add", ["dc", "dha"], ["dct"]),
            helper.make_node("Unsqueeze", ["dct", "ax"], ["u"]), helper.make_node("Unsqueeze", ["dh", "ax"], ["uh"]),
            helper.make_node("Concat", ["u", "uh", "u", "u"], ["cat"], axis=2),
            helper.make_node("Mul", ["cat", "k"], ["gp4"]), helper.make_node("Reshape", ["gp4", "s4"], ["gpre"]),
            helper.make_node("MatMul", ["gpre", "R"], ["mm"]), helper.make_node("Mul", ["dct", "f"], ["dc_next"])]
    seq_ins, seqs = [("ah", st), ("k", s4), ("f", st)], [a_h, k, f_]
    if prev is not None:
        body.append(helper.make_node("Add", ["mm", "gp"], ["dh_next"]))
        seq_ins.append(("gp", st))
        seqs.append(prev)
    else:
        body.append(helper.make_node("Identity", ["mm"], ["dh_next"]))
    dh0, dc0, gpres = R.scan(body, [("dh", st), ("dc", st)], [("dh_next", st), ("dc_next", st)], seq_ins,
                             [("gpre", [D, B_, 4 * H])],
                             {"R": R.r, "s4": np.array([D, B_, 4 * H], np.int64), "ax": np.array([2], np.int64)},
                             True, [dh_start, dc_start], seqs)
    res = {}
    if X in diff:
        res[X] = R.input_grad(gpres)
    if H0 and H0 in diff:
        res[H0] = dh0
    if C0 and C0 in diff:
        res[C0] = dc0
    return res

@rule("MaxPool")
def _maxpool(b, n, a, g, diff):
    """The gradient of each window goes to its first maximum in row-major window order (torch's max-pool and
    the interpreter, ties included), found in the backward graph from the pool's input; the forward keeps
    onnxruntime's own MaxPool (asked for its Indices output, onnxruntime runs a generic kernel 10-40x slower
    than its NCHWc one: ResNet-50's stem 2.3 vs 0.06 ms, a CRNN's five pools 3.2 vs 0.08 ms at batch 1).
    The windows are K strided Slices of the -inf-padded input (or, small and unpadded, a one-hot grouped
    Conv); the first maximum of each, a one-hot of it times the incoming gradient, and Col2Im puts each
    window's share back (overlaps summed, pads dropped). Where the input holds +-inf or NaN (the forward's
    outputs there are not finite), the gradients of those windows are not meaningful.
    (Measured and not kept, at batch 1: for windows that tile the input, ArgMax over the kernel axes of a
    reshape, row first, and a GatherElements of the row: the CRNN's backward 19 vs 8 ms; the shares
    interleaved by a Transpose (2.8 vs 0.18 ms, the CRNN) or shifted Pads summed per stride phase (1.9 vs
    0.2 ms, YOLO's SPPF) instead of Col2Im.)"""
    xs, ys = b.shape(n.input[0]), b.shape(n.output[0])
    nd = len(xs) - 2
    k = [int(v) for v in a["kernel_shape"]]
    s = [int(v) for v in a.get("strides", [1] * nd)]
    d = [int(v) for v in a.get("dilations", [1] * nd)]
    pb = _conv_pads(a, xs[2:], k, s, d)[:nd]
    N, C = int(ys[0]), int(ys[1])
    Ho, H = [int(v) for v in ys[2:]], [int(v) for v in xs[2:]]
    sp = list(range(2, 2 + nd))
    x = b.fwd(n.input[0])
    span = [(Ho[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1 for i in range(nd)]  # the padded extent windows read
    pe = [span[i] - pb[i] - H[i] for i in range(nd)]                        # < 0: the tail no window reads
    Hr = [H[i] + min(pe[i], 0) for i in range(nd)]                           # the extent windows read
    if any(v < 0 for v in pe):
        x = b.node("Slice", [x, b.ci([0] * nd), b.ci(Hr), b.ci(sp)])
    if any(pb) or any(v > 0 for v in pe):
        x = b.node("Pad", [x, b.ci([0, 0] + pb + [0, 0] + [max(v, 0) for v in pe]), b.c(-np.inf)], mode="constant")
    offsets = [tuple(o) for o in np.ndindex(*k)]
    K = len(offsets)
    ys5 = [N, C, 1] + Ho
    if K <= 4 and not any(pb) and not any(v > 0 for v in pe):
        # small unpadded windows (a CRNN's 2x2, 2x1): a grouped Conv with one-hot kernels copies them out
        # exactly (x*1 plus zeros), 0.52 vs 0.81 ms for K strided Slices + Concat on 64x48x320
        wk = np.zeros((C * K, 1, *k), np.float32)
        for j, o in enumerate(offsets):
            wk[(np.arange(C) * K + j, 0) + tuple(o)] = 1.0
        win = b.reshape(b.node("Conv", [x, b.c(wk)], group=C, kernel_shape=k, strides=s, dilations=d),
                        [N, C, K] + Ho)
    else:
        wins = []
        for o in offsets:
            st = [o[i] * d[i] for i in range(nd)]
            en = [st[i] + (Ho[i] - 1) * s[i] + 1 for i in range(nd)]
            wins.append(b.reshape(b.node("Slice", [x, b.ci(st), b.ci(en), b.ci(sp), b.ci(s)]), ys5))
        win = wins[0] if K == 1 else b.node("Concat", wins, axis=2)         # (N, C, K, *Ho)
    # the first maximum of each window: the window's maxima scored K, K-1, ... by position, the best score kept
    # (onnxruntime's ArgMax is 8x slower than a ReduceMax here)
    ax2 = b.ci([2])
    eq = b.node("Cast", [b.node("Equal", [win, b.node("ReduceMax", [win, ax2], keepdims=1)])], to=1)
    score = b.node("Mul", [eq, b.c(np.arange(K, 0, -1).reshape([1, 1, K] + [1] * nd))])
    hot = b.node("Cast", [b.node("Equal", [score, b.node("ReduceMax", [score, ax2], keepdims=1)])], to=1)
    share = b.reshape(b.node("Mul", [hot, b.reshape(g[0], ys5)]), [N, C * K, int(np.prod(Ho))])
    # Col2Im sums each window's share back into the (padded) extent the windows read, the pads dropped
    gx = b.node("Col2Im", [share, b.ci(Hr), b.ci(k)], dilations=d, strides=s,
                pads=pb + [max(v, 0) for v in pe])
    if Hr != H:  # the tail no window reads: zero gradient
        gx = b.node("Pad", [gx, b.ci([0, 0] + [0] * nd + [0, 0] + [H[i] - Hr[i] for i in range(nd)])], mode="constant")
    return {n.input[0]: gx}


@rule("LayerNormalization")
def _layernorm(b, n, a, g, diff):
    X = n.input[0]
    for p in n.input[1:]:
        if p and (p in diff or p not in b.const):
            raise Refused("LayerNormalization with computed scale/bias")
    xs = b.shape(X)
    rank = len(xs)
    axis = _norm_axis(int(a.get("axis", -1)), rank)
    eps = float(a.get("epsilon", 1e-5))
    axes = list(range(axis, rank))
    x = b.fwd(X)
    ax = b.ci(axes)
    mean = b.node("ReduceMean", [x, ax], keepdims=1)
    xc = b.node("Sub", [x, mean])
    var = b.node("ReduceMean", [b.node("Mul", [xc, xc]), ax], keepdims=1)
    inv = b.node("Reciprocal", [b.node("Sqrt", [b.node("Add", [var, b.c(eps)])])])
    xhat = b.node("Mul", [xc, inv])
    gh = b.node("Mul", [g[0], b.fwd(n.input[1])])
    m1 = b.node("ReduceMean", [gh, ax], keepdims=1)
    m2 = b.node("ReduceMean", [b.node("Mul", [gh, xhat]), ax], keepdims=1)
    gx = b.node("Mul", [inv, b.node("Sub", [b.node("Sub", [gh, m1]), b.node("Mul", [xhat, m2])])])
    return {X: gx}


# ---------------------------------------------------------------------------------------------------------
def _const_names(graph, fed=()) -> set[str]:
    """Tensors fixed by the input signature: initializers (but those the caller feeds), Constant outputs,
    Shape/Size, and what nodes compute from those alone."""
    const = ({t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}) - set(fed)
    for nd in graph.node:
        ins = [i for i in nd.input if i]
        if nd.domain not in ("", "ai.onnx") or nd.op_type in ("If", "Loop", "Scan") or nd.op_type.startswith(
                "Random") or nd.op_type in ("Multinomial", "Bernoulli"):
            continue
        if nd.op_type in ("Shape", "Size", "Constant") or all(i in const for i in ins):
            const.update(o for o in nd.output if o)
    return const


#: unary elementwise ops (other inputs constant) whose outputs the backward recomputes from a residual input
REMAT = frozenset("""Sigmoid HardSigmoid HardSwish Relu LeakyRelu Clip Tanh Neg Identity Add Sub Mul Div Erf
Softplus Abs""".split())


def _rematerialize(b, nodes) -> list:
    """Replace residuals computed by a REMAT op from another residual (or a recomputed one) with that op in the
    backward graph; returns the nodes to put first (forward order)."""
    from onnx import helper
    producer = {}
    for i, nd in enumerate(nodes):
        for o in nd.output:
            if o:
                producer[o] = (i, nd)
    remat: dict[str, tuple[int, Any, str]] = {}
    changed = True
    while changed:
        changed = False
        for f in list(b.residuals):
            if f in remat or f not in producer:
                continue
            i, nd = producer[f]
            if nd.op_type not in REMAT or nd.domain not in ("", "ai.onnx") or len([o for o in nd.output if o]) != 1:
                continue
            if nd.op_type == "Cast" and _attrs(nd).get("to") != 1:
                continue
            srcs = [x for x in nd.input if x and x not in b.const]
            if len(srcs) != 1 or srcs[0] not in b.residuals or srcs[0] == f:
                continue
            remat[f] = (i, nd, srcs[0])
            changed = True
    out = []
    for f, (i, nd, src) in sorted(remat.items(), key=lambda kv: kv[1][0]):
        ins = [b.residuals[x] if x == src else (b.fwd(x) if x else "") for x in nd.input]
        out.append(helper.make_node(nd.op_type, ins, [b.residuals[f]], **_attrs(nd)))
    for f in remat:
        del b.residuals[f]
    return out


#: input slots whose values set output shapes (or which branch/how many iterations run)
_SHAPE_SLOTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 3),
                "ConstantOfShape": (0,), "Range": (0, 1, 2), "Resize": (1, 2, 3), "Upsample": (1,), "TopK": (1,),
                "OneHot": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "ReduceMean": (1,),
                "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL1": (1,),
                "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
                "If": (0,), "Loop": (0, 1), "CenterCropPad": (1,), "Trilu": (1,)}
#: ops whose output shapes follow from their input values
_VALUE_SHAPED = frozenset({"NonZero", "Compress", "Unique", "StringSplit", "RegexFullMatch"})


def shapes_from_values(graph, feeds: dict[str, torch.Tensor]) -> str:
    """Whether the values of the feeds can change tensor shapes: "" (no: shapes follow from the feeds' shapes),
    "ints" (the values of the non-float feeds can: the plan is keyed by them too), or "floats" (the values of
    float feeds can: no plan is valid beyond one call)."""
    float_t = {k for k, v in feeds.items() if v.is_floating_point()}
    taint = {k: ("floats" if k in float_t else "ints") for k in feeds}
    worst = ""
    for nd in graph.node:
        if nd.op_type in ("Shape", "Size"):
            continue
        kinds = {taint[i] for i in list(nd.input) + sorted(_subgraph_names(nd)) if i in taint}
        if not kinds:
            continue
        kind = "floats" if "floats" in kinds else "ints"
        slots = _SHAPE_SLOTS.get(nd.op_type, ())
        hit = [taint[nd.input[i]] for i in slots if i < len(nd.input) and nd.input[i] in taint]
        if nd.op_type in _VALUE_SHAPED:
            hit.append(kind)
        for h in hit:
            if h == "floats":
                return "floats"
            worst = "ints"
        for o in nd.output:
            if o:
                taint[o] = kind
    return worst


def _subgraph_names(nd) -> set[str]:
    """Every tensor name the node's subgraphs (If/Loop/Scan bodies) read, recursively."""
    names: set[str] = set()
    for a in nd.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for inner in sub.node:
                names.update(i for i in inner.input if i)
                names |= _subgraph_names(inner)
    return names



def _propagate_known(graph, known: set[str]) -> set[str]:
    """``known`` and what nodes (no subgraphs, no random ops) compute from those alone."""
    known = set(known)
    for nd in graph.node:
        if nd.op_type in ("If", "Loop", "Scan") or nd.op_type in _NO_ISLAND:
            continue
        ins = [i for i in nd.input if i]
        if ins and all(i in known for i in ins):
            known.update(o for o in nd.output if o)
    return known


def _rename_in_node(nd, rename: dict[str, str]) -> None:
    """Rename the names ``nd`` reads, in place, and those its subgraphs read from outside them."""
    for i, x in enumerate(nd.input):
        if x in rename:
            nd.input[i] = rename[x]
    for at in nd.attribute:
        if at.type == 5:  # GRAPH
            _rename_refs(at.g, rename)
        elif at.type == 10:  # GRAPHS
            for sg in at.graphs:
                _rename_refs(sg, rename)


def _rename_refs(g, rename: dict[str, str]) -> None:
    """Rename the outer-scope names a (nested) subgraph reads, in place, where it does not define them."""
    local = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for nd in g.node for o in nd.output}
    ren = {k: v for k, v in rename.items() if k not in local}
    if not ren:
        return
    for nd in g.node:
        _rename_in_node(nd, ren)
    for o in g.output:
        if o.name in ren:
            o.name = ren[o.name]


def _inline(proto, ifs: list[int], choice: dict[int, bool], level: int):
    """A copy of ``proto`` with each If (node indices ``ifs``) replaced by the nodes of the branch ``choice``
    takes (its names prefixed, so that they cannot meet the outer graph's) and Identity nodes onto the If's
    outputs."""
    import onnx
    from onnx import helper
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    new_nodes = []
    for i, nd in enumerate(g.node):
        if i not in choice:
            new_nodes.append(nd)
            continue
        at = {a.name: a for a in nd.attribute}
        br = onnx.GraphProto()
        br.CopyFrom(at["then_branch" if choice[i] else "else_branch"].g)
        tag = f"__jac_if{level}_{i}/"
        local = {t.name for t in br.initializer} | {o for n2 in br.node for o in n2.output if o}
        rename = {x: tag + x for x in local}
        for t in br.initializer:
            t.name = rename[t.name]
            g.initializer.append(t)
        for n2 in br.node:
            c = onnx.NodeProto()
            c.CopyFrom(n2)
            _rename_in_node(c, rename)
            for k, x in enumerate(c.output):
                if x in rename:
                    c.output[k] = rename[x]
            if c.name:
                c.name = tag + c.name
            new_nodes.append(c)
        for o_br, o_if in zip(br.output, nd.output):
            if o_if:
                new_nodes.append(helper.make_node("Identity", [rename.get(o_br.name, o_br.name)], [o_if]))
    new_nodes = [_copy(n) for n in new_nodes]
    del g.node[:]
    g.node.extend(new_nodes)
    return out


def _copy(nd):
    import onnx
    c = onnx.NodeProto()
    c.CopyFrom(nd)
    return c


class Island:
    """A node whose vector-Jacobian product torch computes during the backward: the interpreter's op run again
    on the forward tensors onnxruntime returned (its inputs), differentiated by autograd."""

    def __init__(self, node, inputs, gouts, wrt, gnames, op_type):
        self.node = node        # the compiled interpreter node
        self.inputs = inputs    # per input slot: None, (name, constant tensor, None) or (name, None, residual name)
        self.gouts = gouts      # (forward output name, name of its gradient in the backward)
        self.wrt = wrt          # differentiated inputs (forward names)
        self.gnames = gnames    # the names their gradients get in the backward
        self.op_type = op_type

    def run(self, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vals: dict[str, Any] = {}
        for item in self.inputs:
            if item is not None:
                name, const, rname = item
                vals[name] = const if rname is None else torch.from_numpy(np.asarray(env[rname]))
        xs = [vals[x].detach().requires_grad_(True) for x in self.wrt]
        vals.update(zip(self.wrt, xs))
        graph = self.graph_ref()
        if graph is None:
            raise RuntimeError("the model of this gradient plan was freed")
        with torch.enable_grad():
            graph._exec([self.node], vals, None)
        pairs = [(vals[o], torch.from_numpy(np.asarray(env[gn]))) for o, gn in self.gouts]
        pairs = [(o, g) for o, g in pairs if isinstance(o, torch.Tensor) and o.requires_grad]
        gx = torch.autograd.grad([o for o, _ in pairs], xs, [g for _, g in pairs], allow_unused=True) \
            if pairs else [None] * len(xs)
        return {gn: (np.zeros(tuple(x.shape), np.float32) if g is None else
                     np.ascontiguousarray(g.detach().to(torch.float32).numpy()))
                for gn, x, g in zip(self.gnames, xs, gx)}

def _island(b, nd, cn, go, diff):
    """Puts a torch island for ``nd`` (compiled node ``cn``) in the backward: a marker node that reads the
    gradients of its outputs and its residual inputs and writes its inputs' gradients."""
    from onnx import helper
    inputs = []
    for x in nd.input:
        if not x:
            inputs.append(None)
        elif x in b.const:
            v = b.values[x]
            inputs.append((x, v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)), None))
        else:
            inputs.append((x, None, b.fwd(x)))
    wrt = [x for x in dict.fromkeys(nd.input) if x and x in diff]
    gnames = [b.fresh("island") for _ in wrt]
    gouts = [(o, g) for o, g in zip(nd.output, go) if o and g]
    isl = Island(cn, inputs, gouts, wrt, gnames, nd.op_type)
    reads = [g for _, g in gouts] + [it[2] for it in inputs if it is not None and it[2] is not None]
    b.islands.append(isl)
    b.nodes.append(helper.make_node("Island", reads, gnames, domain=ISLAND_DOMAIN, index=len(b.islands) - 1))
    return dict(zip(wrt, gnames))


def island_summary(ops: list[str]) -> str:
    """"LSTM x2, Einsum": the op types of a plan's torch islands, counted."""
    import collections
    return ", ".join(f"{op} x{k}" if k > 1 else op for op, k in sorted(collections.Counter(ops).items()))


def _backward_types(bnodes, binputs, bouts, inits) -> dict[str, int]:
    """The element type of every tensor of the backward (onnx's shape inference; an island's outputs are
    float32 gradients), for the names that cross from one step to another."""
    import onnx
    from onnx import helper
    vinfo = []
    for nd in bnodes:
        if nd.domain == ISLAND_DOMAIN:
            vinfo += [helper.make_tensor_value_info(o, 1, None) for o in nd.output]
    g = helper.make_graph(bnodes, "jacaudit_backward", binputs, bouts,
                          [onnx.numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in inits.items()],
                          value_info=vinfo)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", BWD_OPSET), helper.make_opsetid(ISLAND_DOMAIN, 1)],
                          ir_version=8)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    types = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type.elem_type
        if t:
            types[v.name] = t
    return types


def _segments(bnodes, inits: dict[str, np.ndarray], binputs, bouts, types: dict[str, int], islands):
    """The backward as steps: onnxruntime sessions between the islands (each with the names it reads and the
    names later steps read), and the islands. Returns [(kind, session or island, inputs, outputs)], plus the
    names each step is the last to read (freed after it)."""
    from onnx import helper
    import onnx
    groups: list = []
    cur: list = []
    for nd in bnodes:
        if nd.domain == ISLAND_DOMAIN:
            groups.append(("ort", cur))
            groups.append(("island", nd))
            cur = []
        else:
            cur.append(nd)
    groups.append(("ort", cur))
    final = [o.name for o in bouts]
    reads, writes = [], []
    for kind, obj in groups:
        if kind == "island":
            reads.append(set(obj.input))
            writes.append(set(obj.output))
        else:
            made = {o for nd in obj for o in nd.output if o}
            used = {i for nd in obj for i in nd.input if i} - made
            reads.append(used)
            writes.append(made)
    needed = set(final)
    vis = {v.name: v for v in binputs}
    plan_rev = []
    for i in range(len(groups) - 1, -1, -1):
        kind, obj = groups[i]
        if kind == "island":
            plan_rev.append(("island", islands[_attrs(obj)["index"]], list(obj.input), list(obj.output)))
            needed = (needed - writes[i]) | reads[i]
            continue
        outs = sorted(writes[i] & needed)
        if not outs:
            continue
        ins = sorted(n for n in reads[i] if n not in inits)
        ginputs = [vis[n] if n in vis else helper.make_tensor_value_info(n, types.get(n, 1), None) for n in ins]
        gouts = [helper.make_tensor_value_info(n, types.get(n, 1), None) for n in outs]
        used_inits = [onnx.numpy_helper.from_array(np.ascontiguousarray(inits[n]), n) for n in sorted(reads[i])
                      if n in inits]
        g = helper.make_graph(obj, f"jacaudit_backward_{i}", ginputs, gouts, used_inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", BWD_OPSET)], ir_version=8)
        plan_rev.append(("ort", m.SerializeToString(), ins, outs))
        needed = (needed - writes[i]) | set(ins)
    steps = plan_rev[::-1]
    last: dict[str, int] = {}
    for j, (_, _, ins, _) in enumerate(steps):
        for n in ins:
            last[n] = j
    free = [[n for n, j in last.items() if j == k] for k in range(len(steps))]
    return steps, free


class Plan:
    """The two onnxruntime sessions of one input signature and the names they exchange."""

    def __init__(self, fwd_sess, fwd_outputs, n_outputs, residual_names, bwd_sess, bwd_grad_inputs, wrt,
                 diff_outputs, n_nodes):
        self.fwd = fwd_sess
        self.fwd_outputs = fwd_outputs  # graph outputs, then residuals
        self.n_outputs = n_outputs
        self.residual_names = residual_names  # names in the backward graph, in fwd_outputs[n_outputs:] order
        self.bwd = bwd_sess
        self.bwd_grad_inputs = bwd_grad_inputs  # output index -> name of its cotangent input (None: not differentiable)
        self.wrt = wrt
        self.diff_outputs = diff_outputs
        self.n_nodes = n_nodes  # the backward graph's nodes (a torch island's marker counting as one)


def _session(model_bytes: bytes):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    so.inter_op_num_threads = 1
    # fatal only: a failed run raises with the same message (the caller turns it into one line or falls back
    # to the interpreter); onnxruntime's own error lines on stderr would be a second, raw copy
    so.log_severity_level = 4
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _probe(plain_graph, feeds: dict[str, torch.Tensor], const: set[str]) -> dict[str, Any]:
    """Run the graph as written once (no grad): every tensor's shape and dtype (``_Meta``), and the values of the
    tensors in ``const``. Each tensor is dropped after its last reader ran, so the probe holds what a forward
    holds, not every tensor of the graph at once (PP-OCRv4's recogniser at batch 32: tens of GB)."""
    nodes = plain_graph.nodes
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for x in list(n.inputs) + list(n.implicit):
            if x:
                last[x] = i
    values: dict[str, Any] = dict(plain_graph.initializers)
    values.update({k: v.detach() for k, v in feeds.items()})
    out: dict[str, Any] = {}
    with torch.no_grad():
        for i, n in enumerate(nodes):
            plain_graph._exec([n], values, None)
            for o in n.outputs:
                if not o:
                    continue
                v = values.get(o)
                if isinstance(v, torch.Tensor):
                    out[o] = v if o in const else _Meta(v.shape, v.dtype)
                if last.get(o, -1) <= i and o not in const:
                    values.pop(o, None)
            for x in set(n.inputs) | set(n.implicit):
                if x and last.get(x) == i and x not in const and x not in plain_graph.initializers:
                    values.pop(x, None)
    return out


def build(proto, plain_graph, feeds: dict[str, torch.Tensor], wrt: list[str], out_names: list[str],
          fwd_cache: dict) -> Plan:
    """The gradient plan for this signature, or Refused."""
    import onnx
    from onnx import helper

    graph = proto.graph
    opset = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), 1)
    for nd in graph.node:
        if nd.domain not in ("", "ai.onnx"):
            raise Refused(f"operator {nd.domain}::{nd.op_type}")
    const = _const_names(graph, feeds)
    values = _probe(plain_graph, feeds, const)
    for t in graph.initializer:
        values[t.name] = plain_graph.initializers.get(t.name)
    values.update({k: v.detach() for k, v in feeds.items()})
    # differentiable tensors: float32 tensors computed from a differentiated input
    diff = set(wrt)
    for nd in graph.node:
        if nd.op_type in _NONDIFF:
            continue
        if any(i in diff for i in nd.input if i) or any(i in diff for i in _subgraph_names(nd)):
            for o in nd.output:
                v = values.get(o)
                if o and isinstance(v, (torch.Tensor, _Meta)) and v.is_floating_point():
                    if v.dtype != torch.float32:
                        raise Refused(f"a {v.dtype} tensor ({o!r}) on the differentiated path")
                    diff.add(o)
    diff_outputs = [o for o in out_names if o in diff]
    if not diff_outputs:
        raise Refused("no output depends on the differentiated inputs")
    # nodes between the inputs and the outputs, backwards
    need = set(diff_outputs)
    path_idx = []
    nodes = list(graph.node)
    for i in range(len(nodes) - 1, -1, -1):
        nd = nodes[i]
        if any(o in need for o in nd.output if o) and (any(x in diff for x in nd.input if x)
                                                        or any(x in diff for x in _subgraph_names(nd))):
            path_idx.append(i)
            need.update(x for x in nd.input if x in diff)
    path = [nodes[i] for i in path_idx]
    b = _Builder(values, const)
    b.diff = diff
    b.opset = opset
    b.pending_scale = {}
    consumers: dict[str, int] = {}
    for nd in nodes:
        for x in list(nd.input) + sorted(_subgraph_names(nd)):
            if x:
                consumers[x] = consumers.get(x, 0) + 1
    gout = {o.name for o in graph.output}
    for o in gout:
        consumers[o] = consumers.get(o, 0) + 1  # a graph output is read by the caller too
    b.consumers = consumers
    b.producer = {o: nd for nd in nodes for o in nd.output if o}
    b.conv_single_use = {nd.output[0] for nd in nodes if nd.op_type == "Conv" and consumers.get(nd.output[0]) == 1
                         and nd.output[0] not in gout and len(nd.input) > 1 and nd.input[1] in const}
    fwd_model = onnx.ModelProto()
    fwd_model.CopyFrom(proto)
    fg = fwd_model.graph
    grads: dict[str, list[str]] = {}
    grad_in = {}
    for o in diff_outputs:
        gname = "__grad_" + o
        grad_in[o] = gname
        grads.setdefault(o, []).append(gname)

    def total(name):
        parts = grads.get(name)
        if not parts:
            return None
        if len(parts) > 1:
            s = b.node("Sum", parts)
            grads[name] = [s]
            return s
        return parts[0]

    b.islands = []
    compiled = {}
    for cn in plain_graph.nodes:
        for o in cn.outputs:
            if o:
                compiled[o] = cn
    for nd in path:
        fn = RULES.get(nd.op_type)
        go = [total(o) if o else None for o in nd.output]
        if all(x is None for x in go):
            continue
        why = None
        if fn is not None:
            if nd.op_type not in _ALL_OUTPUTS and go[0] is None:
                continue  # only a secondary output is read (e.g. MaxPool's Indices): no derivative flows
            mark = (len(b.nodes), set(b.residuals), set(b.inits))
            try:
                res = fn(b, nd, _attrs(nd), go, diff)
            except Refused as e:  # a variant the rule does not write (Pad reflect, a strided Slice...)
                if nd.op_type in _NO_ISLAND:
                    raise
                del b.nodes[mark[0]:]
                for k in set(b.residuals) - mark[1]:
                    del b.residuals[k]
                for k in set(b.inits) - mark[2]:
                    del b.inits[k]
                why = f"{nd.op_type} (node {nd.name or nd.output[0]!r}): {e}"
        else:
            why = f"{nd.op_type} (node {nd.name or nd.output[0]!r}) has no ONNX gradient rule"
        if why is not None:
            if nd.op_type in _NO_ISLAND:
                raise Refused(why + " (random: a torch island would draw other values)")
            if _subgraph_names(nd) or any(at.type in (5, 10) for at in nd.attribute):
                raise Refused(why + " (a node with subgraphs: not run as a torch island)")
            if len(b.islands) >= MAX_ISLANDS:
                raise Refused(why + f" (more than {MAX_ISLANDS} such nodes)")
            cn = next((compiled[o] for o in nd.output if o in compiled), None)
            if cn is None:
                raise Refused(why + " (not found in the compiled graph)")
            res = _island(b, nd, cn, go, diff)
        for k, v in res.items():
            if k in diff:
                grads.setdefault(k, []).append(v)
    outs = []
    for w in wrt:
        t = total(w)
        if t is None:
            t = b.zeros(tuple(values[w].shape))
        outs.append(helper.make_node("Identity", [t], ["__d_" + w]))
    # residuals that a cheap elementwise op computes from another residual: recomputed in the backward graph
    # (the forward then keeps onnxruntime's fusions, e.g. x*sigmoid(x) as one QuickGelu, and returns fewer
    # tensors: each one an NCHWc -> NCHW reorder in onnxruntime's convolution pipeline)
    # (forward nodes of opset 11+ only: their attributes mean the same in the backward's opset 18)
    pre = _rematerialize(b, nodes) if opset >= 11 else []
    # the backward model
    bnodes = pre + b.nodes + outs
    residuals = list(b.residuals.items())  # (forward name, backward name)
    binputs = []
    for fname, bname in residuals:
        v = values[fname]
        binputs.append(helper.make_tensor_value_info(bname, _onnx_type(v), list(v.shape)))
    for o in diff_outputs:
        binputs.append(helper.make_tensor_value_info(grad_in[o], 1, list(values[o].shape)))
    inits = [onnx.numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in b.inits.items()]
    bouts = [helper.make_tensor_value_info("__d_" + w, 1, list(values[w].shape)) for w in wrt]
    steps = free = None
    try:
        if not b.islands:
            bg = helper.make_graph(bnodes, "jacaudit_backward", binputs, bouts, inits)
            bmodel = helper.make_model(bg, opset_imports=[helper.make_opsetid("", BWD_OPSET)], ir_version=8)
            bbytes = bmodel.SerializeToString()
            bsess = _session(bbytes)
        else:
            import weakref
            for isl in b.islands:
                isl.graph_ref = weakref.ref(plain_graph)
            types = _backward_types(bnodes, binputs, bouts, b.inits)
            steps, free = _segments(bnodes, b.inits, binputs, bouts, types, b.islands)
            steps = [(k, _session(o) if k == "ort" else o, i, out) for k, o, i, out in steps]
            bsess = bbytes = None
    except Refused:
        raise
    except Exception as e:
        raise Refused(f"onnxruntime refused the backward graph: {str(e).splitlines()[0][:200]}") from None
    # the forward session: the graph with the residuals among its outputs (cached by the residual set)
    res_fwd = [f for f, _ in residuals]
    key = (tuple(out_names), tuple(res_fwd))
    fsess = fwd_cache.get(key)
    if fsess is None:
        have = {o.name for o in fg.output}
        for f in out_names:  # internal tensors asked for (e.g. the logits before a final Softmax)
            if f not in have:
                fg.output.append(helper.make_tensor_value_info(f, _onnx_type(values[f]), None))
                have.add(f)
        for f in res_fwd:
            if f not in have:
                fg.output.append(helper.make_tensor_value_info(f, _onnx_type(values[f]), None))
                have.add(f)
        try:
            fsess = _session(fwd_model.SerializeToString())
        except Exception as e:
            raise Refused(f"onnxruntime refused the forward graph: {str(e).splitlines()[0][:200]}") from None
        if len(fwd_cache) >= 8:
            fwd_cache.clear()
        fwd_cache[key] = fsess
    plan = Plan(fsess, list(out_names) + res_fwd, len(out_names), [bn for _, bn in residuals], bsess,
                [grad_in.get(o) for o in out_names], list(wrt), diff_outputs, len(bnodes))
    plan.bwd_bytes = bbytes  # for profiling (benchmarks)
    plan.steps, plan.free = steps, free  # with islands: the backward's onnxruntime pieces and torch islands
    plan.islands = [isl.op_type for isl in b.islands]
    plan.recurrent = [nd.op_type for nd in path if nd.op_type in ("RNN", "GRU", "LSTM")]
    return plan


# ---------------------------------------------------------------------------------------------------------
class _OrtFunction(torch.autograd.Function):
    """Outputs of the graph from onnxruntime; their input gradients from the backward session."""

    @staticmethod
    def forward(ctx, engine, plan, feeds_np, wrt_names, *xs):
        feeds_np = dict(feeds_np)
        for name, x in zip(wrt_names, xs):
            feeds_np[name] = x.detach().numpy()
        outs = plan.fwd.run(plan.fwd_outputs, feeds_np)
        ctx.engine, ctx.plan, ctx.wrt_names = engine, plan, wrt_names
        ctx.rest = {k: v for k, v in feeds_np.items() if k not in wrt_names}
        ctx.save_for_backward(*xs)
        ctx.residuals = outs[plan.n_outputs:]
        res = [torch.from_numpy(np.asarray(o)) for o in outs[:plan.n_outputs]]
        nondiff = [r for r, gi in zip(res, plan.bwd_grad_inputs) if gi is None or not r.is_floating_point()]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)
        ctx.shapes = [tuple(r.shape) for r in res]
        return tuple(res)

    @staticmethod
    def backward(ctx, *grads):
        plan = ctx.plan
        if torch.is_grad_enabled():
            # a backward that is itself differentiated (create_graph): the torch interpreter on the saved inputs
            return (None, None, None, None) + ctx.engine.torch_vjp(ctx.rest, ctx.wrt_names, ctx.saved_tensors, grads,
                                                                    plan)
        feeds = dict(zip(plan.residual_names, ctx.residuals))
        for gi, g, shape in zip(plan.bwd_grad_inputs, grads, ctx.shapes):
            if gi is None:
                continue
            feeds[gi] = np.zeros(shape, np.float32) if g is None else \
                np.ascontiguousarray(g.detach().to(torch.float32).numpy())
        if plan.steps is None:
            outs = plan.bwd.run(None, feeds)
        else:  # onnxruntime pieces and torch islands in turn
            env = feeds
            for (kind, obj, ins, outs_), gone in zip(plan.steps, plan.free):
                if kind == "ort":
                    env.update(zip(outs_, obj.run(outs_, {n: env[n] for n in ins})))
                else:
                    env.update(obj.run(env))
                for n in gone:
                    env.pop(n, None)
            outs = [env["__d_" + w] for w in plan.wrt]
        return (None, None, None, None) + tuple(torch.from_numpy(np.asarray(o)) for o in outs)


class OrtGradient:
    """The onnxruntime forward/backward of one OnnxModel, planned per input signature (``run``)."""

    @property
    def model(self):
        return self._model()

    MAX_PLANS = 8

    def __init__(self, model):
        import weakref
        self._model = weakref.ref(model)  # the model owns its runtime (no cycle: freed with the model)
        self.plans: dict[Any, Any] = {}  # signature -> Plan or the refusal message
        self.fwd_cache: dict = {}
        self.refused: str | None = None  # the last refusal (inspect/the notes say why torch ran)
        self.value_shaped: str | None = None  # shapes_from_values of the graph (decided on the first plan)
        self.last_islands: list[str] = []  # the torch islands of the last plan run (op types)
        self._inlined: dict = {}  # branches taken -> (proto, compiled graph, forward-session cache)

    def plan(self, feeds: dict[str, torch.Tensor], wrt: list[str], out_names: list[str]):
        sig = (tuple((k, tuple(v.shape), v.dtype) for k, v in feeds.items()), tuple(wrt), tuple(out_names))
        if self.value_shaped is None:
            self.value_shaped = shapes_from_values(self.model.proto.graph, feeds)
        if self.value_shaped == "floats":
            self.refused = "tensor shapes follow from input values (NonZero, a computed Reshape/Expand shape, ...)"
            return None
        if self.value_shaped == "ints":  # integer inputs set shapes: their values are part of the signature
            import hashlib
            sig += tuple((k, hashlib.blake2b(v.detach().numpy().tobytes(), digest_size=16).hexdigest())
                         for k, v in feeds.items() if not v.is_floating_point())
        p = self.plans.get(sig)
        if p is None:
            if len(self.plans) >= self.MAX_PLANS:
                self.plans.clear()
            try:
                proto, pg, cache = self.model.proto, self.model.plain_graph, self.fwd_cache
                if any(nd.op_type == "If" for nd in proto.graph.node):
                    proto, pg, cache = self._inline_ifs(feeds)
                p = build(proto, pg, feeds, wrt, out_names, cache)
            except Refused as e:
                p = str(e)
            except Exception as e:  # e.g. the feeds do not fit the graph: the torch interpreter says how
                p = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            self.plans[sig] = p
        if isinstance(p, str):
            self.refused = p
            return None
        return p

    def _inline_ifs(self, feeds: dict[str, torch.Tensor]):
        """The graph with every If whose condition the signature fixes (shapes, constants, and integer feeds
        whose values key the plan) replaced by the branch it takes, nested ones too (silero-vad: an If on the
        sample rate around the whole model, Ifs on shapes inside): (proto, compiled graph, forward-session
        cache), cached by the branches taken. Ifs left (a condition from float values) refuse as before."""
        from .interpreter import compile_model
        model = self.model
        proto, pg = model.proto, model.plain_graph
        taken: list = []
        for _ in range(16):  # nesting depth
            graph = proto.graph
            known = _const_names(graph, feeds)
            if self.value_shaped == "ints":
                known |= _propagate_known(graph, known | {k for k, v in feeds.items() if not v.is_floating_point()})
            ifs = [i for i, nd in enumerate(graph.node) if nd.op_type == "If" and nd.input[0] in known]
            if not ifs:
                break
            vals = _probe(pg, feeds, {graph.node[i].input[0] for i in ifs})
            choice = {i: bool(np.asarray(_np(vals[graph.node[i].input[0]])).reshape(-1)[0]) for i in ifs}
            taken.append(tuple(choice[i] for i in ifs))
            key = tuple(taken)
            hit = self._inlined.get(key)
            if hit is not None:
                proto, pg = hit[0], hit[1]
                continue
            proto = _inline(proto, ifs, choice, len(taken))
            pg = compile_model(proto, model.device, model.dtype)
            pg.input_names = list(model.graph.input_names)
            if len(self._inlined) >= 8:
                self._inlined.clear()
            self._inlined[key] = (proto, pg, {})
        if not taken:
            return model.proto, model.plain_graph, self.fwd_cache
        return self._inlined[tuple(taken)]

    def run(self, feeds: dict[str, torch.Tensor], out_names: list[str]):
        """The outputs through onnxruntime, differentiable w.r.t. the float feeds that require grad; None when
        this graph/signature has no onnxruntime gradient (the caller runs the torch interpreter)."""
        wrt = [k for k, v in feeds.items() if v.requires_grad]
        p = self.plan(feeds, wrt, out_names)
        if p is None:
            return None
        self.last_islands = p.islands
        rest = {k: v.detach().numpy() for k, v in feeds.items() if k not in wrt}
        try:
            outs = _OrtFunction.apply(self, p, rest, wrt, *[feeds[k] for k in wrt])
        except Exception as e:  # noqa: BLE001 -- e.g. feeds of another type/shape than the graph declares
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            self.refused = f"onnxruntime's forward failed on these feeds: {msg}"
            for k, v in list(self.plans.items()):
                if v is p:
                    self.plans[k] = self.refused
            return None
        return list(outs)

    def torch_vjp(self, rest_np, wrt_names, saved, grads, plan):
        feeds = {k: torch.from_numpy(np.asarray(v)) for k, v in rest_np.items()}
        xs = list(saved)  # the Function's own inputs: the gradient's graph reaches the caller's tensors
        feeds.update(zip(wrt_names, xs))
        # the Function's outputs (graph outputs and internal tensors asked for), through the interpreter
        outs = self.model.with_runtime("torch").run(feeds, outputs=plan.fwd_outputs[:plan.n_outputs])
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        gx = torch.autograd.grad([o for o, _ in pairs], xs, [g for _, g in pairs], create_graph=True,
                                 allow_unused=True)
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, gx))


# ---------------------------------------------------------------------------------------------------------
RUNTIMES = ("auto", "onnxruntime", "torch")
#: "auto" differentiates through onnxruntime up to this batch size (the first dimension of the differentiated
#: input), and above it too for graphs without grouped (e.g. depthwise) convolutions; the torch interpreter for
#: larger batches of graphs with them (benchmarks/README.md, corpus run of issue 10's fourth session:
#: onnxruntime's backward wins where torch's per-op overhead dominates, and at batch 32 on ResNet/ViT/YOLO-class
#: graphs; it loses at batch 32 on MobileNetV3/EfficientNet-class ones, whose grouped-convolution input gradients
#: and squeeze-excitation products torch runs faster)
AUTO_GRAD_MAX_BATCH = 8
#: and above it, the interpreter for plans with a layer of these ops on the path: onnxruntime's backward of a GRU
#: (its ONNX rule, or its island) recomputes the input projections and gates of every step from onnxruntime's
#: outputs, FLOP-bound at batch 32 (the speech BiGRU: rule 3.73x onnxruntime's forward, the interpreter 3.12x; at
#: batch 1 the rule 3.23x, the interpreter 5.42x); the LSTM rule (a CRNN) wins at both (3.57x vs 3.98x at batch
#: 32, benchmarks/README.md)
AUTO_LARGE_BATCH_INTERPRETER = frozenset({"GRU"})


def has_grouped_conv(graph) -> bool:
    from onnx import helper
    for nd in graph.node:
        if nd.op_type in ("Conv", "ConvTranspose"):
            for a in nd.attribute:
                if a.name == "group" and helper.get_attribute_value(a) > 1:
                    return True
    return False

from .onednn import _peek, _wrapped  # noqa: E402 -- the same transform probes as the oneDNN paths


def plain_feeds(feeds: dict[str, Any]) -> bool:
    """Every feed a plain CPU torch tensor (float ones float32), outside transforms and forward-mode AD."""
    import torch.autograd.forward_ad as fad
    if _peek() is not None or fad._current_level >= 0:
        return False
    for v in feeds.values():
        if not isinstance(v, torch.Tensor) or not v.is_cpu or v.layout is not torch.strided or _wrapped(v) \
                or (v.is_floating_point() and v.dtype is not torch.float32) or v.is_complex():
            return False
    return True


class Runtime:
    """onnxruntime under an OnnxModel: values-only calls run the graph in an onnxruntime session; calls that
    record a gradient run ``OrtGradient`` when the mode and batch size say so. ``run`` returns None where the
    torch interpreter must run (the caller's path)."""

    def __init__(self, model, mode: str):
        import weakref
        self._model = weakref.ref(model)
        self.mode = mode
        self.grad = OrtGradient(model)
        self._sess: dict[tuple, Any] = {}
        self._sess_error: dict[tuple, str] = {}
        self._inputs: set[str] | None = None
        self._grouped: bool | None = None
        self.last: str | None = None  # "onnxruntime" or the reason the torch interpreter ran (the last call)
        import collections
        #: calls that took derivatives, per path ("onnxruntime" or the interpreter's reason): the reports'
        #: environment.gradients (engine/gradpaths.py)
        self.grad_paths: collections.Counter = collections.Counter()

    @property
    def model(self):
        return self._model()

    def input_names(self) -> set[str]:
        if self._inputs is None:
            self._inputs = {i.name for i in self.model.proto.graph.input}
        return self._inputs

    def session(self, internal: tuple[str, ...] = ()):
        """The values-only session; ``internal``: with those internal tensors among its outputs too."""
        if internal not in self._sess and internal not in self._sess_error:
            try:
                proto = self.model.proto
                if internal:
                    import onnx
                    from onnx import helper
                    proto = onnx.ModelProto()
                    proto.CopyFrom(self.model.proto)
                    for name in internal:
                        proto.graph.output.append(helper.make_empty_tensor_value_info(name))
                if len(self._sess) >= 8:
                    self._sess.clear()
                self._sess[internal] = _session(proto.SerializeToString())
            except Exception as e:
                self._sess_error[internal] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return self._sess.get(internal)

    def run(self, feeds: dict[str, torch.Tensor], outputs: list[str], out_names: list[str]):
        res = self._run(feeds, outputs, out_names)
        derivative = torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad
                                                     for v in feeds.values())
        if derivative or (self.last or "").startswith("a transform"):  # torch.func / forward AD: derivatives too
            key = self.last or "?"
            if key == "onnxruntime" and derivative and self.grad.last_islands:
                key = "onnxruntime with torch islands (" + island_summary(self.grad.last_islands) + ")"
            self.grad_paths[key] += 1
        return res

    def _run(self, feeds: dict[str, torch.Tensor], outputs: list[str], out_names: list[str]):
        if not plain_feeds(feeds):
            self.last = "a transform, forward-mode AD, or a non-float32/non-CPU feed"
            return None
        names = self.input_names()
        extra = [k for k in feeds if k not in names]
        if extra:  # e.g. an initializer the graph does not list as an input: the interpreter's semantics
            self.last = f"feed {extra[0]!r} is not an input of the graph as onnxruntime runs it"
            return None
        want_grad = torch.is_grad_enabled() and any(v.requires_grad for v in feeds.values())
        if want_grad:
            wrt = [k for k, v in feeds.items() if v.requires_grad]
            if self.mode == "auto":
                x = feeds[wrt[0]]
                if x.dim() > 0 and x.shape[0] > AUTO_GRAD_MAX_BATCH:
                    if self._grouped is None:
                        self._grouped = has_grouped_conv(self.model.proto.graph)
                    if self._grouped:
                        self.last = f"batch {x.shape[0]} > {AUTO_GRAD_MAX_BATCH} with grouped convolutions"
                        return None
                    plan = self.grad.plan(feeds, wrt, list(out_names) + [o for o in outputs if o not in out_names])
                    slow = sorted(set(plan.recurrent) & AUTO_LARGE_BATCH_INTERPRETER) if plan is not None else []
                    if slow:
                        self.last = f"batch {x.shape[0]} > {AUTO_GRAD_MAX_BATCH} with a {'/'.join(slow)} layer"
                        return None
            targets = list(out_names) + [o for o in outputs if o not in out_names]
            res = self.grad.run(feeds, targets)
            if res is None:
                self.last = self.grad.refused
                return None
            self.last = "onnxruntime"
            got = dict(zip(targets, res))
            return [got[o] for o in outputs]
        internal = tuple(o for o in outputs if o not in out_names)
        sess = self.session(internal)
        if sess is None:
            self.last = self._sess_error.get(internal)
            return None
        try:
            outs = sess.run(outputs, {k: v.detach().numpy() for k, v in feeds.items()})
        except Exception as e:  # bad feeds: the torch interpreter's message
            self.last = f"onnxruntime: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
            return None
        if any(not isinstance(o, np.ndarray) or o.dtype.kind not in "fiub" for o in outs):
            self.last = "an output torch cannot hold"
            return None
        self.last = "onnxruntime"
        return [torch.from_numpy(o) for o in outs]
