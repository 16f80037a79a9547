"""Load-time pattern fusion: the decomposed activations and normalisations exporters write, run as one torch op
with a fused backward.

``fuse_patterns(compiled_graph, keep)`` rewrites a :class:`~jacaudit.models.onnx.interpreter.CompiledGraph` in
place (after constant folding, so the constants of a pattern are initializers) and returns ``{kind: count}``:

* ``hardswish``: the HardSwish op, ``x * HardSigmoid(x; alpha=1/6, beta=0.5)`` and ``x * Clip(x + 3, 0, 6) / 6``
  (or ``* (1/6)``, either association) -> ``F.hardswish`` forward with a backward that keeps jacaudit's kink
  convention (the derivative from inside [-3, 3] at -3 and 3: -0.5 and 1.5; torch's own hardswish gives 0 and 1
  there, so its backward is not used);
* ``hardsigmoid``: the HardSigmoid op -> ``clamp(alpha x + beta, 0, 1)`` with a ``hardtanh_backward`` derivative
  (alpha on the closed interval ``0 <= alpha x + beta <= 1``, 0 outside: Clip's convention); and
  ``Clip(x + 3, 0, 6) / 6`` (or ``* (1/6)``; relu6(x + 3) / 6, as SE gates are written) -> ``F.hardsigmoid`` (the
  same formula) with derivative 1/6 on the closed interval [-3, 3], 0 outside (Clip's convention);
* ``silu``: ``x * Sigmoid(x)`` and the Swish op with alpha 1 -> ``F.silu``;
* ``mish``: ``x * Tanh(Softplus(x))`` -> ``F.mish``;
* ``gelu``: ``0.5 * x * (1 + Erf(x / sqrt(2)))`` (``Div`` by sqrt 2 or ``Mul`` by 1/sqrt 2; the three Muls in any
  association) -> ``F.gelu``; the tanh form ``0.5 x (1 + Tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` -> ``F.gelu(...,
  approximate='tanh')``;
* ``layernorm``: ``ReduceMean -> Sub -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Div [-> Mul gamma] [-> Add beta]``
  over the trailing axes -> ``F.layer_norm``.

A pattern fuses only when its constants are the expected ones in float32 (the float32 value of the constant, or
within one float32 ulp of it), every intermediate tensor is read only inside the pattern and is not in ``keep``
(graph outputs, tensors a caller asked for), and its dtype is float32/float64 at run time (others run the
pattern's plain formula). The fused functions are smooth torch ops or autograd Functions with ``jvp`` and a vmap
rule, so ``torch.func`` transforms run through them. Values change by rounding only; derivatives by rounding only,
at the kinks not at all. The graph as written (``OnnxModel.plain_graph``) is untouched: internal tensors inside a
fused pattern stay reachable by name through it.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

from . import onednn

__all__ = ["fuse_patterns", "fuse_conv_activation", "stem_channels_last"]

_FAST = (torch.float32, torch.float64)


def _transformed() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def _bounds(dtype, lo: float, hi: float) -> tuple[float, float]:
    """(lo, hi) moved one ulp outwards in ``dtype``: hardtanh_backward's open interval is then ``[lo, hi]``."""
    ninf = torch.tensor(-math.inf, dtype=dtype)
    return (float(torch.nextafter(torch.tensor(lo, dtype=dtype), ninf)),
            float(torch.nextafter(torch.tensor(hi, dtype=dtype), -ninf)))


_HSW_BOUNDS = {dt: _bounds(dt, -3.0, 3.0) for dt in _FAST}
_HSG_BOUNDS = {dt: _bounds(dt, 0.0, 1.0) for dt in _FAST}


# ------------------------------------------------------------------------------------------------------------
# HardSwish
# ------------------------------------------------------------------------------------------------------------
def _hardswish_grad_plain(g, x):
    """g * d/dx hardswish(x): hardsigmoid(x) + x/6 on the closed interval [-3, 3]; 0 below, 1 above (so -0.5 at
    -3 and 1.5 at 3). Linear in g (it is the jvp too); five fused kernels."""
    lo, hi = _HSW_BOUNDS[x.dtype]
    inner = torch.ops.aten.hardtanh_backward(g * x, x, lo, hi)
    return torch.add(g * F.hardsigmoid(x), inner, alpha=1.0 / 6.0)


# x scaled by one minus half an ulp of 1: exactly -3 and 3 move one ulp inside [-3, 3] (their neighbours outside
# move onto -3 and 3), every other value by a relative half ulp (the derivative changes by rounding only).
_HSW_SHRINK = {torch.float32: 1.0 - 2.0 ** -24, torch.float64: 1.0 - 2.0 ** -53}


def _hardswish_grad_fused(g, x):
    """The same derivative in two kernels: torch's ``hardswish_backward`` (``x/3 + 1/2`` on the open interval
    (-3, 3), 0 at and below -3, 1 at and above 3 in torch 2.13) at ``x`` shrunk by half an ulp, which puts -3
    and 3 inside (-0.5 and 1.5 up to an ulp) and keeps every value outside [-3, 3] outside. Used only when
    ``_hardswish_grad_probe`` finds this torch's kernel so (the kink convention must not follow a release)."""
    return torch.ops.aten.hardswish_backward(g, x * _HSW_SHRINK[x.dtype])


def _hardswish_grad_probe() -> bool:
    """Does the fused form give the plain form's derivative here: exactly at and outside the kinks (and their
    float neighbours), to rounding inside?"""
    try:
        for dt in _FAST:
            k = [torch.tensor(v, dtype=dt) for v in (-3.0, 3.0)]
            near = []
            for v in k:
                near += [v, torch.nextafter(v, torch.tensor(-math.inf, dtype=dt)),
                         torch.nextafter(v, torch.tensor(math.inf, dtype=dt))]
            x = torch.stack(near + [torch.tensor(v, dtype=dt) for v in
                                    (0.0, 1.0, -1.0, 2.5, -2.5, 3.5, -3.5, 1e6, -1e6, math.inf, -math.inf)])
            g = torch.linspace(0.5, 2.0, x.numel(), dtype=dt)
            a, b = _hardswish_grad_fused(g, x), _hardswish_grad_plain(g, x)
            outside = (x < -3) | (x > 3)
            if not torch.equal(a[outside], b[outside]):
                return False
            if not torch.allclose(a, b, rtol=4 * torch.finfo(dt).eps, atol=0):
                return False
        return True
    except Exception:  # noqa: BLE001 -- any surprise: the plain form
        return False


_hardswish_grad = _hardswish_grad_fused if _hardswish_grad_probe() else _hardswish_grad_plain


class _HardSwish(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return F.hardswish(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _hardswish_grad(g, x)

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return _hardswish_grad(t, x)


class _HardSwishEager(torch.autograd.Function):
    """The ctx-style form (autograd applies it faster); used when no torch.func transform is active."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return F.hardswish(x)

    backward = _HardSwish.backward
    jvp = _HardSwish.jvp


def _hardswish_plain(x):
    from .ops._util import clamp_closed
    return x * clamp_closed(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


def hardswish(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _FAST:
        if x.dtype in (torch.float16, torch.bfloat16):
            return hardswish(x.float()).to(x.dtype)
        return _hardswish_plain(x)
    if not torch.is_grad_enabled() and not _transformed() and _forward_ad._current_level < 0:
        return F.hardswish(x)
    return (_HardSwish if _transformed() else _HardSwishEager).apply(x)


# ------------------------------------------------------------------------------------------------------------
# HardSigmoid (any alpha, beta)
# ------------------------------------------------------------------------------------------------------------
class _HardSigmoid(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, alpha, beta):
        return torch.clamp(x * alpha + beta, 0.0, 1.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, alpha, beta = inputs
        z = x * alpha + beta  # (recomputed: the saved pre-activation; the forward's is not visible here)
        ctx.save_for_backward(z)
        ctx.save_for_forward(z)
        ctx.alpha = alpha

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        lo, hi = _HSG_BOUNDS[z.dtype]
        return torch.ops.aten.hardtanh_backward(g, z, lo, hi) * ctx.alpha, None, None

    @staticmethod
    def jvp(ctx, t, *_):
        (z,) = ctx.saved_tensors
        lo, hi = _HSG_BOUNDS[z.dtype]
        return torch.ops.aten.hardtanh_backward(t, z, lo, hi) * ctx.alpha


class _HardSigmoidEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, beta):
        z = x * alpha + beta
        ctx.save_for_backward(z)
        ctx.save_for_forward(z)
        ctx.alpha = alpha
        return torch.clamp(z, 0.0, 1.0)

    backward = _HardSigmoid.backward
    jvp = _HardSigmoid.jvp


def hardsigmoid(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    if x.dtype not in _FAST:
        if x.dtype in (torch.float16, torch.bfloat16):
            return hardsigmoid(x.float(), alpha, beta).to(x.dtype)
        from .ops._util import clamp_closed
        return clamp_closed(x * alpha + beta, 0.0, 1.0)
    if not torch.is_grad_enabled() and not _transformed() and _forward_ad._current_level < 0:
        return torch.clamp(x * alpha + beta, 0.0, 1.0)
    return (_HardSigmoid if _transformed() else _HardSigmoidEager).apply(x, alpha, beta)


# ------------------------------------------------------------------------------------------------------------
# HardSigmoid written as Clip(x + 3, 0, 6) / 6 (relu6(x + 3) / 6: SE gates, PaddleOCR-class exports)
# ------------------------------------------------------------------------------------------------------------
def _hsig6_grad(g, x):
    """g * d/dx relu6(x + 3) / 6: 1/6 on the closed interval [-3, 3] (Clip's convention), 0 outside."""
    lo, hi = _HSW_BOUNDS[x.dtype]
    return torch.ops.aten.hardtanh_backward(g, x, lo, hi) * (1.0 / 6.0)


class _HardSigmoid6(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return F.hardsigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _hsig6_grad(g, x)

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return _hsig6_grad(t, x)


class _HardSigmoid6Eager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return F.hardsigmoid(x)

    backward = _HardSigmoid6.backward
    jvp = _HardSigmoid6.jvp


def hardsigmoid_relu6(x: torch.Tensor) -> torch.Tensor:
    """relu6(x + 3) / 6 (torch's hardsigmoid kernel computes exactly that) with the Clip kink convention."""
    if x.dtype not in _FAST:
        if x.dtype in (torch.float16, torch.bfloat16):
            return hardsigmoid_relu6(x.float()).to(x.dtype)
        from .ops._util import clamp_closed
        return clamp_closed(x + 3.0, 0.0, 6.0) / 6.0
    if not torch.is_grad_enabled() and not _transformed() and _forward_ad._current_level < 0:
        return F.hardsigmoid(x)
    return (_HardSigmoid6 if _transformed() else _HardSigmoid6Eager).apply(x)


def _float_in(fn):
    def impl(x, *a, **k):
        if x.dtype in _FAST:
            return fn(x, *a, **k)
        return fn(x.float(), *a, **k).to(x.dtype)
    return impl


silu = _float_in(F.silu)
mish = _float_in(F.mish)
gelu = _float_in(F.gelu)


# ------------------------------------------------------------------------------------------------------------
# the fused node
# ------------------------------------------------------------------------------------------------------------
class _Fused:
    """A fused node's function: ``fn(x, *params)``; ``kind`` names the pattern (for errors and tests)."""

    def __init__(self, kind: str, fn, *args, **kwargs):
        self.kind, self.f, self.args, self.kwargs = kind, fn, args, kwargs

    def __call__(self, ctx, x, *tensors):
        return self.f(x, *tensors, *self.args, **self.kwargs)

    def __repr__(self):
        return f"<fused {self.kind}>"


class _Matcher:
    def __init__(self, g, keep: Iterable[str]):
        self.g = g
        self.keep = set(keep) | set(g.output_names)
        self.refresh()

    def refresh(self):
        self.readers: dict[str, int] = {}
        self.producer = {}
        for n in self.g.nodes:
            for i in list(n.inputs) + list(n.implicit):
                if i:
                    self.readers[i] = self.readers.get(i, 0) + 1
            for o in n.outputs:
                if o:
                    self.producer[o] = n

    def op(self, name, *types):
        """The standard-domain node producing ``name`` if its op type is one of ``types``."""
        n = self.producer.get(name)
        if n is None or n.fn is None or n.ctx.op_type not in types or n.ctx.node.domain not in ("", "ai.onnx"):
            return None
        if len([o for o in n.outputs if o]) != 1:
            return None
        return n

    def internal(self, name, reads: int = 1) -> bool:
        """An intermediate tensor that may vanish: read exactly ``reads`` times, none of them outside."""
        return name not in self.keep and self.readers.get(name, 0) == reads and name not in self.g.input_names

    def scalar(self, name):
        t = self.g.initializers.get(name) if name else None
        if t is None or not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
            return None
        return float(t.reshape(()))

    def tensor(self, name):
        return self.g.initializers.get(name) if name else None


def _close(v, want: float) -> bool:
    """``v`` is ``want`` to float32 precision: equal to it in float32, or within one float32 ulp."""
    if v is None:
        return False
    w32 = np.float32(want)
    if np.float32(v) == w32:
        return True
    return abs(np.float32(v) - w32) <= np.spacing(w32)


def _other(node, name):
    """The other input of a binary node one of whose inputs is ``name`` (None if neither is)."""
    a, b = (node.inputs + [None, None])[:2]
    if a == name:
        return b
    if b == name:
        return a
    return None


def _replace(g, m: _Matcher, last, drop: list, kind: str, fn, inputs: list[str]) -> None:
    last.fn = fn
    last.inputs = list(inputs)
    last.ctx.op_type = f"Fused{kind}"
    ids = {id(n) for n in drop if n is not last}
    g.nodes[:] = [n for n in g.nodes if id(n) not in ids]
    m.refresh()


def _x_times(m: _Matcher, mul, inner_types):
    """For ``Mul(x, inner(x))``: (x, inner node) where inner is one of inner_types and reads x (either order)."""
    if mul is None or mul.ctx.op_type != "Mul" or len(mul.inputs) != 2:
        return None
    for a, b in ((0, 1), (1, 0)):
        x, y = mul.inputs[a], mul.inputs[b]
        inner = m.op(y, *inner_types)
        if inner is None or not inner.inputs or not m.internal(y):
            continue
        if inner.inputs[0] == x:
            return x, inner
        sp = m.op(inner.inputs[0], "Softplus") if inner.ctx.op_type == "Tanh" else None
        if sp is not None and sp.inputs[0] == x:  # Mish
            return x, inner
    return None


def _fuse_unary_mul(g, m, counts):
    """x * HardSigmoid(x) / x * Sigmoid(x) / x * Tanh(Softplus(x)) / x * Clip(x + 3, 0, 6) [/ 6]."""
    changed = True
    while changed:
        changed = False
        for mul in list(g.nodes):
            if mul.ctx.op_type not in ("Mul", "Div") or mul.fn is None or mul.ctx.node.domain not in ("", "ai.onnx"):
                continue
            if mul.ctx.op_type == "Mul":
                hit = _x_times(m, mul, ("Sigmoid", "HardSigmoid", "Tanh"))
                if hit is not None:
                    x, inner = hit
                    if inner.ctx.op_type == "Sigmoid":
                        _replace(g, m, mul, [inner, mul], "SiLU", _Fused("silu", silu), [x])
                        counts["silu"] += 1
                        changed = True
                        break
                    if inner.ctx.op_type == "HardSigmoid":
                        if _close(inner.ctx.attr("alpha", 0.2), 1 / 6) and _close(inner.ctx.attr("beta", 0.5), 0.5):
                            _replace(g, m, mul, [inner, mul], "HardSwish", _Fused("hardswish", hardswish), [x])
                            counts["hardswish"] += 1
                            changed = True
                            break
                        continue
                    if inner.ctx.op_type == "Tanh":  # Mish: x * tanh(softplus(x))
                        sp = m.op(inner.inputs[0], "Softplus")
                        if sp is not None and sp.inputs[0] == x and m.internal(inner.inputs[0]):
                            _replace(g, m, mul, [sp, inner, mul], "Mish", _Fused("mish", mish), [x])
                            counts["mish"] += 1
                            changed = True
                            break
                        continue
            # x * Clip(x + 3, 0, 6) * (1/6)  or  / 6, either association
            hit = _relu6_hardswish(m, mul)
            if hit is not None:
                x, nodes = hit
                _replace(g, m, mul, nodes, "HardSwish", _Fused("hardswish", hardswish), [x])
                counts["hardswish"] += 1
                changed = True
                break


def _fuse_relu6_hardsigmoid(g, m, counts):
    """Clip(x + 3, 0, 6) / 6 or * (1/6) -> HardSigmoid(1/6, 1/2); after the HardSwish pass (x times that is a
    HardSwish and is fused as one)."""
    changed = True
    while changed:
        changed = False
        for node in list(g.nodes):
            if node.ctx.op_type not in ("Mul", "Div") or node.fn is None or len(node.inputs) != 2 \
                    or node.ctx.node.domain not in ("", "ai.onnx"):
                continue
            for c in node.inputs:
                hit = _clip_06_of_x_plus_3(m, c)
                if hit is not None and m.internal(c) and _div6(m, node, c):
                    _replace(g, m, node, hit[1] + [node], "HardSigmoid",
                             _Fused("hardsigmoid", hardsigmoid_relu6), [hit[0]])
                    counts["hardsigmoid"] += 1
                    changed = True
                    break
            if changed:
                break


def _clip_06_of_x_plus_3(m, name):
    """If ``name`` = Clip(x + 3, 0, 6) (or Relu6-style Min/Max chain not handled): (x, [add, clip])."""
    clip = m.op(name, "Clip")
    if clip is None:
        return None
    if clip.ctx.opset < 11:
        lo, hi = clip.ctx.attr("min"), clip.ctx.attr("max")
    else:
        if len(clip.inputs) < 3:
            return None
        lo, hi = m.scalar(clip.inputs[1]), m.scalar(clip.inputs[2])
    if lo is None or hi is None or float(lo) != 0.0 or float(hi) != 6.0:
        return None
    add = m.op(clip.inputs[0], "Add")
    if add is None or not m.internal(clip.inputs[0]):
        return None
    for a, b in ((0, 1), (1, 0)):
        if m.scalar(add.inputs[b]) == 3.0 and add.inputs[a] not in m.g.initializers:
            return add.inputs[a], [add, clip]
    return None


def _div6(m, node, name):
    """``node`` is Div(name, 6) or Mul(name, 1/6) (either order for Mul): True."""
    if node.ctx.op_type == "Div":
        return node.inputs[0] == name and m.scalar(node.inputs[1]) == 6.0
    if node.ctx.op_type == "Mul":
        other = _other(node, name)
        return other is not None and _close(m.scalar(other), 1 / 6)
    return False


def _relu6_hardswish(m, last):
    if len(last.inputs) != 2:
        return None
    # (a) last = Mul(x, Clip(x+3,0,6) / 6)  or Mul(x, Clip(..) * 1/6)
    if last.ctx.op_type == "Mul":
        for a, b in ((0, 1), (1, 0)):
            x, y = last.inputs[a], last.inputs[b]
            scale = m.op(y, "Div", "Mul")
            if scale is None or not m.internal(y):
                continue
            for c in scale.inputs:
                hit = _clip_06_of_x_plus_3(m, c)
                if hit is not None and hit[0] == x and m.internal(c) and _div6(m, scale, c):
                    return x, hit[1] + [scale, last]
    # (b) last = Div(Mul(x, Clip(x+3,0,6)), 6) or Mul(Mul(..), 1/6)
    for c in last.inputs:
        prod = m.op(c, "Mul")
        if prod is None or not m.internal(c) or not _div6(m, last, c) or len(prod.inputs) != 2:
            continue
        for a, b in ((0, 1), (1, 0)):
            x, y = prod.inputs[a], prod.inputs[b]
            hit = _clip_06_of_x_plus_3(m, y)
            if hit is not None and hit[0] == x and m.internal(y):
                return x, hit[1] + [prod, last]
    return None


def _fuse_native(g, m, counts):
    for n in g.nodes:
        if n.fn is None or n.ctx.node.domain not in ("", "ai.onnx") or len(n.inputs) < 1:
            continue
        t = n.ctx.op_type
        if t == "HardSwish":
            n.fn = _Fused("hardswish", hardswish)
            n.ctx.op_type = "FusedHardSwish"
            counts["hardswish"] += 1
        elif t == "HardSigmoid":
            alpha, beta = float(n.ctx.attr("alpha", 0.2)), float(n.ctx.attr("beta", 0.5))
            n.fn = _Fused("hardsigmoid", hardsigmoid, alpha, beta)
            n.ctx.op_type = "FusedHardSigmoid"
            counts["hardsigmoid"] += 1
        elif t == "Swish" and float(n.ctx.attr("alpha", 1.0)) == 1.0:
            n.fn = _Fused("silu", silu)
            n.ctx.op_type = "FusedSiLU"
            counts["silu"] += 1


# ------------------------------------------------------------------------------------------------------------
# GELU
# ------------------------------------------------------------------------------------------------------------
def _mul_chain(m, last, n_factors_max=3):
    """Flatten a tree of Muls rooted at ``last`` (internal products only): (factor names, mul nodes)."""
    factors, nodes = [], []

    def walk(name, node):
        nodes.append(node)
        for i in node.inputs:
            sub = m.op(i, "Mul")
            if sub is not None and m.internal(i) and len(sub.inputs) == 2 and len(nodes) < n_factors_max - 1:
                walk(i, sub)
            else:
                factors.append(i)

    if last.ctx.op_type != "Mul" or len(last.inputs) != 2:
        return None
    walk(last.outputs[0], last)
    return factors, nodes


def _fuse_gelu(g, m, counts):
    changed = True
    while changed:
        changed = False
        for last in list(g.nodes):
            if last.fn is None or last.ctx.op_type != "Mul" or last.ctx.node.domain not in ("", "ai.onnx"):
                continue
            chain = _mul_chain(m, last)
            if chain is None:
                continue
            factors, muls = chain
            if len(factors) != 3:
                continue
            halves = [f for f in factors if _close(m.scalar(f), 0.5)]
            if len(halves) != 1:
                continue
            rest = [f for f in factors if f != halves[0]]
            hit = None
            for a, b in ((0, 1), (1, 0)):
                x, onep = rest[a], rest[b]
                add = m.op(onep, "Add")
                if add is None or not m.internal(onep) or len(add.inputs) != 2:
                    continue
                for c in add.inputs:
                    if _close(m.scalar(_other(add, c)), 1.0):
                        r = _gelu_inner(m, c, x)
                        if r is not None:
                            hit = (x, r[0], r[1] + [add])
                            break
                if hit:
                    break
            if hit is None:
                continue
            x, approx, nodes = hit
            _replace(g, m, last, nodes + muls, "Gelu", _Fused("gelu", gelu, approximate=approx), [x])
            counts["gelu"] += 1
            changed = True
            break


def _gelu_inner(m, name, x):
    """Erf(x / sqrt 2) or Tanh(sqrt(2/pi) * (x + 0.044715 x^3)) -> (approximate, nodes) if it reads x."""
    if not m.internal(name):
        return None
    erf = m.op(name, "Erf")
    if erf is not None:
        s = m.op(erf.inputs[0], "Div", "Mul")
        if s is None or not m.internal(erf.inputs[0]):
            return None
        if s.ctx.op_type == "Div" and s.inputs[0] == x and _close(m.scalar(s.inputs[1]), math.sqrt(2)):
            return "none", [s, erf]
        if s.ctx.op_type == "Mul" and _close(m.scalar(_other(s, x)), 1 / math.sqrt(2)):
            return "none", [s, erf]
        return None
    th = m.op(name, "Tanh")
    if th is None:
        return None
    s = m.op(th.inputs[0], "Mul")  # sqrt(2/pi) * inner
    if s is None or not m.internal(th.inputs[0]):
        return None
    for a, b in ((0, 1), (1, 0)):
        if not _close(m.scalar(s.inputs[a]), math.sqrt(2 / math.pi)):
            continue
        inner = m.op(s.inputs[b], "Add")  # x + 0.044715 x^3
        if inner is None or not m.internal(s.inputs[b]):
            continue
        c = _other(inner, x)
        if c is None:
            continue
        r = _cubic(m, c, x)
        if r is not None:
            return "tanh", r + [inner, s, th]
    return None


def _cubic(m, name, x):
    """0.044715 * x^3 with x^3 as Pow(x, 3) or Mul(x, Mul(x, x)) / Mul(Mul(x, x), x); either Mul order."""
    k = m.op(name, "Mul")
    if k is None or not m.internal(name):
        return None
    for a, b in ((0, 1), (1, 0)):
        if not _close(m.scalar(k.inputs[a]), 0.044715):
            continue
        cube = k.inputs[b]
        p = m.op(cube, "Pow")
        if p is not None and m.internal(cube) and p.inputs[0] == x and m.scalar(p.inputs[1]) == 3.0:
            return [p, k]
        q = m.op(cube, "Mul")
        if q is not None and m.internal(cube):
            for c, d in ((0, 1), (1, 0)):
                if q.inputs[c] == x:
                    sq = m.op(q.inputs[d], "Mul")
                    if sq is not None and m.internal(q.inputs[d]) and sq.inputs == [x, x]:
                        return [sq, q, k]
    return None


# ------------------------------------------------------------------------------------------------------------
# LayerNorm
# ------------------------------------------------------------------------------------------------------------
def _reduce_axes(m, node):
    if node is None or int(node.ctx.attr("keepdims", 1)) != 1:
        return None
    if node.ctx.opset >= 18:
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return None
        t = m.tensor(node.inputs[1])
        if t is None:
            return None
        return sorted(int(v) for v in t.reshape(-1).tolist())
    a = node.ctx.attr("axes")
    return None if a is None else sorted(int(v) for v in a)


def _layer_norm(x, *wb, axes, eps, has_w, has_b):
    """F.layer_norm over the trailing ``len(axes)`` dims when ``axes`` are those of ``x`` and the parameters have
    the normalised shape; otherwise the pattern's own formula."""
    w = wb[0] if has_w else None
    b = wb[-1] if has_b else None
    r = x.dim()
    k = len(axes)
    norm = sorted(a + r if a < 0 else a for a in axes)
    shape = tuple(x.shape[r - k:]) if k <= r else None
    if (norm != list(range(r - k, r)) or any(p is not None and (tuple(p.shape) != shape or p.dtype != x.dtype)
                                              for p in (w, b)) or not x.is_floating_point()):
        mu = x.mean(dim=norm, keepdim=True)
        d = x - mu
        y = d / torch.sqrt((d * d).mean(dim=norm, keepdim=True) + eps)
        if w is not None:
            y = y * w
        return y + b if b is not None else y
    if x.dtype not in _FAST:
        y = F.layer_norm(x.float(), shape, None if w is None else w.float(), None if b is None else b.float(), eps)
        return y.to(x.dtype)
    return F.layer_norm(x, shape, w, b, eps)


def _fuse_layernorm(g, m, counts):
    changed = True
    while changed:
        changed = False
        for div in list(g.nodes):
            if div.fn is None or div.ctx.op_type != "Div" or div.ctx.node.domain not in ("", "ai.onnx"):
                continue
            d_name, s_name = div.inputs[0], div.inputs[1]
            sub = m.op(d_name, "Sub")
            sqrt = m.op(s_name, "Sqrt")
            if sub is None or sqrt is None or not m.internal(d_name, 2) or not m.internal(s_name):
                continue
            x, mu_name = sub.inputs
            mean1 = m.op(mu_name, "ReduceMean")
            if mean1 is None or mean1.inputs[0] != x or not m.internal(mu_name):
                continue
            add_eps = m.op(sqrt.inputs[0], "Add")
            if add_eps is None or not m.internal(sqrt.inputs[0]):
                continue
            var_name = next((i for i in add_eps.inputs if m.scalar(i) is None), None)
            eps = m.scalar(_other(add_eps, var_name)) if var_name else None
            mean2 = m.op(var_name, "ReduceMean")
            if eps is None or eps < 0 or mean2 is None or not m.internal(var_name):
                continue
            sq = m.op(mean2.inputs[0], "Pow", "Mul")
            if sq is None or not m.internal(mean2.inputs[0]):
                continue
            if sq.ctx.op_type == "Pow" and not (sq.inputs[0] == d_name and m.scalar(sq.inputs[1]) == 2.0):
                continue
            if sq.ctx.op_type == "Mul" and sq.inputs != [d_name, d_name]:
                continue
            if sq.ctx.op_type == "Mul" and m.readers.get(d_name) != 3:
                continue
            ax1, ax2 = _reduce_axes(m, mean1), _reduce_axes(m, mean2)
            if ax1 is None or ax1 != ax2:
                continue
            if len(set(ax1)) != len(ax1) or not all(a < 0 for a in ax1) and not all(a >= 0 for a in ax1):
                continue
            nodes = [mean1, sub, sq, mean2, add_eps, sqrt, div]
            last, params, has_w, has_b = div, [], False, False
            cur = div.outputs[0]
            # optional affine: Mul(gamma) then Add(beta), constants of the normalised shape
            mulw = _sole_reader(g, m, cur, "Mul")
            if mulw is not None:
                w = _other(mulw, cur)
                if w in g.initializers and w != cur:
                    nodes.append(mulw)
                    params.append(w)
                    has_w, last, cur = True, mulw, mulw.outputs[0]
            addb = _sole_reader(g, m, cur, "Add")
            if addb is not None:
                b = _other(addb, cur)
                if b in g.initializers and b != cur:
                    nodes.append(addb)
                    params.append(b)
                    has_b, last = True, addb
            fn = _Fused("layernorm", _layer_norm, axes=tuple(ax1), eps=float(eps), has_w=has_w, has_b=has_b)
            _replace(g, m, last, nodes, "LayerNorm", fn, [x] + params)
            counts["layernorm"] += 1
            changed = True
            break


def _sole_reader(g, m, name, op_type):
    if not m.internal(name):
        return None
    for n in g.nodes:
        if name in n.inputs and n.ctx.op_type == op_type and n.fn is not None and len(n.inputs) == 2 \
                and n.ctx.node.domain in ("", "ai.onnx"):
            return n
    return None


# ------------------------------------------------------------------------------------------------------------
# Linear: MatMul(x, W) [+ b] and Gemm(x, W[, c]) with constant W, b -> oneDNN (onednn.linear)
# ------------------------------------------------------------------------------------------------------------
class _Linear:
    """A fused node's function: x @ W (+ b) through oneDNN where ``onednn.usable`` and ``linear_wanted`` say
    so, otherwise the original nodes' functions in order (the plain path: other dtypes, torch.func transforms,
    forward-mode AD, small products, or a fed tensor in place of the constants)."""

    kind = "linear"

    def __init__(self, w_src, b_src, w, b, plain):
        self.w_src, self.b_src = w_src, b_src  # the initializers the node reads (a fed value differs)
        self.weights = onednn.LinearWeights(w)  # w (K, N) float32, prepacked
        self.b = b  # bias (N,) or None
        self.plain = plain  # list of (fn, ctx, input slots): slot i of the node's inputs, or "prev"
        self.k, self.n = w.shape
        self.route: dict = {}  # x.shape -> oneDNN or not (linear_wanted)

    def __call__(self, ctx, x, *params):
        route = self.route.get(x.shape)
        if route is None:
            if len(self.route) >= 16:
                self.route.clear()
            route = self.route[x.shape] = (x.dim() >= 2 and x.shape[-1] == self.k
                                           and onednn.linear_wanted(x, self.n))
        if (route and params[0] is self.w_src and (len(params) < 2 or params[1] is self.b_src)
                and onednn.usable(x)):
            return onednn.linear(x, self.weights, self.b)
        args = (x,) + params
        y = None
        for fn, c, slots in self.plain:
            y = fn(c, *[y if s == "prev" else args[s] for s in slots])
        return y

    def __repr__(self):
        return "<fused linear>"


def _plain_step(node, slots):
    import copy
    c = copy.copy(node.ctx)  # the node's own context (its op_type is renamed below)
    return node.fn, c, slots


def _fuse_linear(g, m, counts):
    if not onednn.ENABLED:
        return
    for node in list(g.nodes):
        if node.fn is None or node.ctx.node.domain not in ("", "ai.onnx") or node not in g.nodes:
            continue
        t = node.ctx.op_type
        if t == "MatMul" and len(node.inputs) == 2:
            x, wn = node.inputs
            W = m.tensor(wn)
            if x is None or x in g.initializers or W is None or W.dim() != 2 or W.dtype != torch.float32:
                continue
            steps = [_plain_step(node, (0, 1))]
            inputs, drop, last, bias, b_src = [x, wn], [node], node, None, None
            y = node.outputs[0]
            add = _sole_reader(g, m, y, "Add") if len(node.outputs) == 1 else None
            if add is not None:
                bn = _other(add, y)
                bt = m.tensor(bn)
                if bt is not None and bn != y and bt.dim() == 1 and bt.shape[0] == W.shape[1] \
                        and bt.dtype == torch.float32:
                    steps.append(_plain_step(add, ("prev", 2) if add.inputs[0] == y else (2, "prev")))
                    inputs.append(bn)
                    drop.append(add)
                    last, bias, b_src = add, bt.detach().contiguous(), bt
            fn = _Linear(W, b_src, W.detach(), bias, steps)
            _replace(g, m, last, drop, "Linear", fn, inputs)
            counts["linear"] += 1
        elif t == "Gemm" and len(node.inputs) >= 2:
            a = node.ctx
            if int(a.attr("transA", 0)) or float(a.attr("alpha", 1.0)) != 1.0:
                continue
            x, bname = node.inputs[0], node.inputs[1]
            cname = node.inputs[2] if len(node.inputs) > 2 else None
            B = m.tensor(bname)
            if x is None or x in g.initializers or B is None or B.dim() != 2 or B.dtype != torch.float32:
                continue
            W = B.t() if int(a.attr("transB", 0)) else B
            bias = None
            if cname is not None:
                C = m.tensor(cname)
                if C is None or float(a.attr("beta", 1.0)) != 1.0 or C.dtype != torch.float32 \
                        or C.numel() != W.shape[1] or C.dim() > 2 or (C.dim() >= 1 and C.shape[-1] != W.shape[1]):
                    continue
                bias = C.detach().reshape(-1).contiguous()
            fn = _Linear(B, m.tensor(cname) if cname else None, W.detach(), bias,
                         [_plain_step(node, tuple(range(len(node.inputs))))])
            node.fn = fn
            node.ctx.op_type = "FusedLinear"
            counts["linear"] += 1


# ------------------------------------------------------------------------------------------------------------
# Conv -> activation: one oneDNN kernel with a post-op, for values only (after BatchNormalization folding)
# ------------------------------------------------------------------------------------------------------------
_POST_OPS = {"Relu": "relu", "FusedSiLU": "swish", "FusedHardSwish": "hardswish"}


class _ConvAct:
    """A fused node's function: Conv then an activation. Values only (``ops.nn.conv_activated``: no gradient
    asked for, no transform, float32, a convolution torch runs in oneDNN): one oneDNN convolution with the
    activation as its post-op (Conv+ReLU, +SiLU, +HardSwish: 20-30% faster than the two at batch 32, measured);
    otherwise the two nodes' own functions in order, so derivatives are the plain path's."""

    kind = "conv_act"

    def __init__(self, attr, conv_step, act_step):
        from .ops.nn import conv_activated
        self.attr = attr
        self.conv_fn, self.conv_ctx = conv_step
        self.act_fn, self.act_ctx = act_step
        self.activated = conv_activated
        self.rejected: set = set()  # input shapes (and contiguity) the post-op path does not take

    def __call__(self, ctx, x, w, b=None):
        if not (x.requires_grad and torch.is_grad_enabled()):
            key = (x.shape, x.is_contiguous())
            if key not in self.rejected:
                y = self.activated(self.conv_ctx, x, w, b, self.attr)
                if y is False:  # not for this shape
                    if len(self.rejected) >= 16:
                        self.rejected.clear()
                    self.rejected.add(key)
                elif y is not None:
                    return y
        return self.act_fn(self.act_ctx, self.conv_fn(self.conv_ctx, x, w, b))

    def __repr__(self):
        return f"<fused conv+{self.attr}>"


def fuse_conv_activation(g, keep: Iterable[str] = ()) -> int:
    """Conv (2-D weight constant, one output) whose output only an activation of ``_POST_OPS`` reads ->
    one node (``_ConvAct``). Run after BatchNormalization folding. Returns the number fused."""
    if not onednn.ENABLED:
        return 0
    m = _Matcher(g, keep)
    done = 0
    for act in list(g.nodes):
        attr = _POST_OPS.get(act.ctx.op_type)
        if attr is None or act.fn is None or not act.inputs or act.inputs[0] is None:
            continue
        if act.ctx.op_type == "Relu" and (act.ctx.node.domain not in ("", "ai.onnx") or len(act.inputs) != 1):
            continue
        if attr != "relu" and not (isinstance(act.fn, _Fused) and act.fn.kind in ("silu", "hardswish")):
            continue
        c = act.inputs[0]
        conv = m.op(c, "Conv")
        if conv is None or not m.internal(c) or len(conv.inputs) < 2:
            continue
        w = m.tensor(conv.inputs[1])
        if w is None or w.dim() != 4 or w.dtype != torch.float32 or conv.inputs[0] in g.initializers:
            continue
        if len(conv.inputs) > 2 and conv.inputs[2] is not None and m.tensor(conv.inputs[2]) is None:
            continue
        fn = _ConvAct(attr, _plain_step(conv, ())[:2], _plain_step(act, ())[:2])
        _replace(g, m, act, [conv, act], "ConvAct", fn, [i for i in conv.inputs if i is not None])
        done += 1
    if done:
        g._plans = {}
    return done


# ------------------------------------------------------------------------------------------------------------
def fuse_patterns(g, keep: Iterable[str] = ()) -> dict[str, int]:
    """Fuse the patterns above in place; returns {kind: count} for the kinds that fired."""
    counts = {k: 0 for k in ("hardswish", "hardsigmoid", "silu", "mish", "gelu", "layernorm", "linear")}
    m = _Matcher(g, keep)
    _fuse_layernorm(g, m, counts)
    _fuse_gelu(g, m, counts)
    _fuse_unary_mul(g, m, counts)
    _fuse_relu6_hardsigmoid(g, m, counts)
    _fuse_native(g, m, counts)  # after: a HardSigmoid inside x * HardSigmoid(x) is gone by now
    _fuse_linear(g, m, counts)  # last: the Adds above read no MatMul output
    g._plans = {}
    return {k: v for k, v in counts.items() if v}


# ------------------------------------------------------------------------------------------------------------
# A stem convolution (1-4 input channels) feeding a depthwise one: its output channels_last
# ------------------------------------------------------------------------------------------------------------
class _NCHWGrad(torch.autograd.Function):
    """Identity whose backward gives the gradient NCHW-contiguous (the plain path's layout for an NCHW input)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class _StemCL:
    """A Conv (or Conv+activation) node's function, run with its weight channels_last so that oneDNN gives the
    output channels_last: the depthwise convolution it feeds runs channels_last anyway ("depthwise_nhwc"), and
    with the output NCHW the copy to channels_last and, with a gradient, oneDNN's NCHW input gradient of the
    3-channel convolution cost more than the convolution (MobileNetV3-small's stem + first depthwise layer,
    batch 32, forward + input gradient: 52 -> 25 ms; batch 1: 1.2 -> 0.5 ms). The same kernels (values
    bit-equal, gradients to float32 rounding: oneDNN's channels_last input gradient sums in another
    order); the input gradient is given back NCHW. Float32 NCHW 4-D CPU inputs of convolutions that torch runs
    in oneDNN, no transform or forward-mode AD (``onednn.usable``); otherwise the node's own function as is."""

    kind = "stem_cl"

    def __init__(self, fn, conv_ctx):
        self.fn = fn
        self.w = self.wcl = None
        self.geo = ([int(v) for v in conv_ctx.attr("strides", [1, 1])],
                    [int(v) for v in conv_ctx.attr("dilations", [1, 1])])
        self.ok: dict = {}  # per input shape: torch runs this convolution in oneDNN

    def __call__(self, ctx, x, w, b=None):
        if x.dim() == 4 and w.dim() == 4 and x.is_contiguous() and onednn.usable(x, w, b) and STEM_CL[0] \
                and self._onednn(x, w):
            if self.w is not w:
                self.w, self.wcl = w, w.contiguous(memory_format=torch.channels_last)
            if x.requires_grad and torch.is_grad_enabled():
                x = _NCHWGrad.apply(x)
            return self.fn(ctx, x, self.wcl, b)
        return self.fn(ctx, x, w, b)

    def _onednn(self, x, w) -> bool:
        ok = self.ok.get(x.shape)
        if ok is None:
            if len(self.ok) >= 16:
                self.ok.clear()
            ok = self.ok[x.shape] = onednn.torch_uses_onednn(x, w, *self.geo, 1)
        return ok

    def __getattr__(self, k):  # the wrapped function's attributes (e.g. a fused node's kind and steps)
        if k in ("fn", "w", "wcl", "geo", "ok"):
            raise AttributeError(k)
        return getattr(self.fn, k)

    def __repr__(self):
        return f"<stem channels_last {self.fn!r}>"


STEM_CL = [True]  # on or off (tests compare the two)
_UNARY = ("Relu", "Clip", "LeakyRelu", "FusedHardSwish", "FusedSiLU", "HardSwish", "Sigmoid")


def _conv_ctx(n):
    return n.fn.conv_ctx if n.ctx.op_type == "FusedConvAct" else n.ctx


def _conv_group(n) -> int:
    return int(_conv_ctx(n).attr("group", 1))


def stem_channels_last(g, keep: Iterable[str] = ()) -> int:
    """Conv / FusedConvAct nodes of a constant float32 weight (O, 1-4, kh, kw), groups 1, whose output only a
    depthwise Conv / FusedConvAct (groups == O == its weight's outputs) reads, directly or through one unary
    activation read only by it -> ``_StemCL``. Returns the number changed."""
    if not onednn.ENABLED:
        return 0
    m = _Matcher(g, keep)
    readers: dict[str, list] = {}
    for n in g.nodes:
        for i in n.inputs:
            if i:
                readers.setdefault(i, []).append(n)
    done = 0
    for n in list(g.nodes):
        if n.ctx.op_type not in ("Conv", "FusedConvAct") or n.fn is None or isinstance(n.fn, _StemCL):
            continue
        if len(n.inputs) < 2 or n.inputs[0] in g.initializers or len([o for o in n.outputs if o]) != 1:
            continue
        w = m.tensor(n.inputs[1])
        if w is None or w.dim() != 4 or w.dtype != torch.float32 or not 1 <= w.shape[1] <= 4 or _conv_group(n) != 1:
            continue
        y = n.outputs[0]
        nxt = readers.get(y, [])
        if not m.internal(y) or len(nxt) != 1:
            continue
        d = nxt[0]
        if d.ctx.op_type in _UNARY and d.fn is not None and len(d.outputs) == 1 and d.inputs[0] == y \
                and m.internal(d.outputs[0]) and len(readers.get(d.outputs[0], [])) == 1:
            y = d.outputs[0]
            d = readers[y][0]
        if d.ctx.op_type not in ("Conv", "FusedConvAct") or d.fn is None or not d.inputs or d.inputs[0] != y:
            continue
        wd = m.tensor(d.inputs[1]) if len(d.inputs) > 1 else None
        if wd is None or wd.dim() != 4 or wd.shape[1] != 1 or not (1 < _conv_group(d) == wd.shape[0] == w.shape[0]):
            continue
        n.fn = _StemCL(n.fn, _conv_ctx(n))
        done += 1
    if done:
        g._plans = {}
    return done

