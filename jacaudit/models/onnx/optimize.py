"""Graph-level work at load time that makes the interpreter's forward and backward cheaper.

``optimize(compiled_graph)`` mutates a :class:`~jacaudit.models.onnx.interpreter.CompiledGraph` in place:

1. constant folding -- a node whose inputs are all initializers (ConstantOfShape weights, Reshape of a
   constant shape, Cast/Transpose of weights, ...) runs once; its outputs become initializers;
2. BatchNormalization (inference) folded into the Conv that feeds it (``W' = W * s``, ``b' = (b - mean) * s +
   beta`` with ``s = gamma / sqrt(var + eps)``), when the Conv's output has no other reader;
3. channels_last: 4-D Conv weights stored channels_last, so oneDNN/cuDNN run NHWC kernels and the layout
   propagates through the convolutions (torch picks channels_last output when the weight is).

With constant folding, ops whose parameters have become constants are also specialised
(``specialize_ops``): a Clip with constant scalar bounds (ReLU6) runs ``torch.clamp`` with Python-number
bounds (27x faster than tensor bounds on CPU) and, under autograd, a fused backward (one kernel instead of
clamp's ge/le/and/where, ~20x faster); same values and the same derivative as the Clip op (1 on the closed
interval, whatever the torch release).

4. pattern fusion (``fuse.fuse_patterns``, after constant folding): the HardSwish/HardSigmoid/SiLU/Mish/GELU
   and LayerNorm decompositions exporters write run as one torch op with a fused backward, keeping the
   derivative conventions at kinks.

None of these change the function (BN folding changes rounding only); derivatives with respect to the
input are unchanged. Tensors named in ``keep`` (outputs/``wrt`` a caller needs) are never folded away.
Returns what was done, for the benchmark's per-step measurements.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.autograd.forward_ad as _forward_ad

__all__ = ["optimize", "fold_constants", "fold_batchnorm", "channels_last", "specialize_ops"]

_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
            "Bernoulli", "Dropout", "If", "Loop", "Scan"}


def fold_constants(g, keep: Iterable[str] = ()) -> int:
    keep = set(keep) | set(g.output_names)
    inputs = set(g.input_names) - set(g.initializers)
    folded = 0
    remaining = []
    for n in g.nodes:
        args_names = [i for i in n.inputs if i is not None]
        if (n.ctx.op_type in _NO_FOLD or n.implicit or n.fn is None
                or any(o in keep for o in n.outputs if o)
                or any(i in inputs or i not in g.initializers for i in args_names)):
            remaining.append(n)
            continue
        try:
            n.ctx.values = g.initializers
            with torch.no_grad():
                res = n.fn(n.ctx, *[g.initializers[i] if i is not None else None for i in n.inputs])
        except Exception:
            remaining.append(n)
            continue
        if not isinstance(res, (tuple, list)):
            res = (res,)
        if not all(isinstance(r, torch.Tensor) for r in res):
            remaining.append(n)
            continue
        for name, val in zip(n.outputs, res):
            if name:
                g.initializers[name] = g._cast(val.detach())
        folded += 1
    g.nodes[:] = remaining
    g._plans = {}
    return folded


def fold_batchnorm(g, keep: Iterable[str] = ()) -> int:
    keep = set(keep) | set(g.output_names)
    readers: dict[str, int] = {}
    for n in g.nodes:
        for i in list(n.inputs) + list(n.implicit):
            if i:
                readers[i] = readers.get(i, 0) + 1
    producer = {o: n for n in g.nodes for o in n.outputs if o}
    drop = set()
    folded = 0
    for bn in g.nodes:
        if bn.ctx.op_type != "BatchNormalization" or len([o for o in bn.outputs if o]) != 1:
            continue
        if bn.ctx.attr("training_mode", 0) or len(bn.inputs) < 5 or bn.ctx.attr("spatial", 1) == 0:
            continue
        x, scale, bias, mean, var = bn.inputs[:5]
        conv = producer.get(x)
        if conv is None or conv.ctx.op_type != "Conv" or readers.get(x, 0) != 1 or x in keep:
            continue
        params = [scale, bias, mean, var]
        if any(p not in g.initializers for p in params):
            continue
        w_name = conv.inputs[1]
        b_name = conv.inputs[2] if len(conv.inputs) > 2 else None
        if w_name not in g.initializers or (b_name is not None and b_name not in g.initializers):
            continue
        W = g.initializers[w_name]
        if not W.is_floating_point():
            continue
        eps = float(bn.ctx.attr("epsilon", 1e-5))
        s = g.initializers[scale].double() / torch.sqrt(g.initializers[var].double() + eps)
        b0 = g.initializers[b_name].double() if b_name is not None else torch.zeros_like(s)
        W2 = (W.double() * s.reshape(-1, *([1] * (W.dim() - 1)))).to(W.dtype)
        B2 = ((b0 - g.initializers[mean].double()) * s + g.initializers[bias].double()).to(W.dtype)
        tag = f"{bn.outputs[0]}__bnfold"
        g.initializers[tag + "_W"] = W2
        g.initializers[tag + "_B"] = B2
        conv.inputs = [conv.inputs[0], tag + "_W", tag + "_B"]
        conv.outputs = list(bn.outputs)
        conv.ctx.output_names = list(bn.outputs)
        conv.ctx.n_outputs = len(bn.outputs)
        drop.add(id(bn))
        folded += 1
    g.nodes[:] = [n for n in g.nodes if id(n) not in drop]
    g._plans = {}
    return folded


class _ClampConst(torch.autograd.Function):
    """clamp(x, lo, hi) with constant float bounds, lo <= hi; derivative 1 on the closed interval [lo, hi] and
    0 outside: the Clip op's documented convention (``ops/_util.clamp_closed``), in every torch release (torch's
    own clamp gives 1 at a bound up to 2.13, 0.5 or 0 from 2.14, so its backward is not used).

    The backward is ``hardtanh_backward`` (one fused kernel; it passes the gradient where lo' < x < hi')
    with the bounds moved one ulp outwards in x's dtype, which for values of that dtype is exactly
    lo <= x <= hi. (A NaN input, whose output is NaN anyway, gets the incoming gradient instead of 0.)
    vmap through ``generate_vmap_rule``; forward mode through ``jvp``; the backward is differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, lo, hi, lo_out, hi_out):
        return torch.clamp(x, lo, hi)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, _, lo_out, hi_out = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.bounds = (lo_out, hi_out)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(g, x, *ctx.bounds), None, None, None, None

    @staticmethod
    def jvp(ctx, t, *_):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(t, x, *ctx.bounds)


class _ClampConstEager(torch.autograd.Function):
    """_ClampConst in the ctx-style form, which autograd applies ~4x faster (~7 us vs ~28 us a call);
    used when no torch.func transform is active (the ctx style does not run under them)."""

    @staticmethod
    def forward(ctx, x, lo, hi, lo_out, hi_out):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.bounds = (lo_out, hi_out)
        return torch.clamp(x, lo, hi)

    backward = _ClampConst.backward
    jvp = _ClampConst.jvp


class _ClipConst:
    """A Clip node's function with its (constant) bounds bound; other dtypes fall back to the op."""

    def __init__(self, fn, lo: torch.Tensor, hi: torch.Tensor, bound_args: tuple = ()):
        self.fn = fn
        self.bound_args = bound_args  # the initializer tensors the node reads (Clip-11); a fed value differs
        self.dtype = lo.dtype
        self.lo, self.hi = float(lo), float(hi)
        ninf = torch.tensor(-float("inf"), dtype=lo.dtype)
        self.lo_out = float(torch.nextafter(lo.reshape(()), ninf))
        self.hi_out = float(torch.nextafter(hi.reshape(()), -ninf))

    def __call__(self, ctx, x, *rest):
        if x.dtype != self.dtype or any(a is not b for a, b in zip(rest, self.bound_args)):
            return self.fn(ctx, x, *rest)
        transformed = torch._C._functorch.peek_interpreter_stack() is not None
        if not torch.is_grad_enabled() and not transformed and _forward_ad._current_level < 0:
            return torch.clamp(x, self.lo, self.hi)  # values only: no derivative of any mode can see it
        # under forward-mode AD too: clamp's own jvp at a bound is torch-version dependent (0 from torch 2.14)
        fn = _ClampConst if transformed else _ClampConstEager
        return fn.apply(x, self.lo, self.hi, self.lo_out, self.hi_out)


def specialize_ops(g) -> int:
    """Bind constant parameters into op functions where a faster exact kernel exists (Clip with constant
    scalar bounds, float32/float64). Returns the number of nodes specialised."""
    changed = 0
    for n in g.nodes:
        if n.ctx.op_type != "Clip" or n.ctx.node.domain not in ("", "ai.onnx") or isinstance(n.fn, _ClipConst) \
                or n.fn is None:
            continue
        bound_args: tuple = ()
        if n.ctx.opset < 11:
            lo, hi = n.ctx.attr("min"), n.ctx.attr("max")
            if lo is None or hi is None:
                continue
            lo, hi = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
        else:
            if len(n.inputs) < 3 or n.inputs[1] is None or n.inputs[2] is None:
                continue
            lo, hi = g.initializers.get(n.inputs[1]), g.initializers.get(n.inputs[2])
            if lo is None or hi is None:
                continue
            bound_args = (lo, hi)
        if lo.numel() != 1 or hi.numel() != 1 or lo.dtype != hi.dtype or lo.dtype not in (torch.float32,
                                                                                           torch.float64):
            continue
        lo, hi = lo.detach().reshape(()).cpu(), hi.detach().reshape(()).cpu()
        if not bool(torch.isfinite(lo)) or not bool(torch.isfinite(hi)) or not bool(lo <= hi):
            continue
        n.fn = _ClipConst(n.fn, lo, hi, bound_args)
        changed += 1
    if changed:
        g._plans = {}
    return changed


def channels_last(g) -> int:
    changed = 0
    for n in g.nodes:
        if n.ctx.op_type not in ("Conv",) or len(n.inputs) < 2:
            continue
        w = g.initializers.get(n.inputs[1])
        if w is not None and w.dim() == 4 and w.is_floating_point():
            g.initializers[n.inputs[1]] = w.contiguous(memory_format=torch.channels_last)
            changed += 1
    return changed


def _fused(done: dict, g, keep) -> None:
    from .fuse import fuse_patterns
    counts = fuse_patterns(g, keep)
    done["fuse_patterns"] = sum(counts.values())
    done.update({f"fuse_{k}": v for k, v in counts.items()})


def optimize(g, keep: Iterable[str] = (), steps: Iterable[str] = ("fold_constants", "fold_batchnorm",
                                                                    "channels_last"),
             specialize: bool = True) -> dict[str, int]:
    """Run the steps in order on a CompiledGraph (in place); returns {step: count of changes}.

    ``fold_constants`` is followed by ``specialize_ops`` and ``fuse_patterns`` unless ``specialize=False``
    (benchmarks); ``done`` then holds ``fuse_patterns`` (total) and ``fuse_<kind>`` per pattern that fired."""
    keep = list(keep)
    done: dict[str, int] = {}
    for step in steps:
        if step == "fold_constants":
            done[step] = fold_constants(g, keep)
            if specialize:
                done["specialize_ops"] = specialize_ops(g)
                _fused(done, g, keep)
        elif step == "fold_batchnorm":
            done[step] = fold_batchnorm(g, keep)
        elif step == "specialize_ops":
            done[step] = specialize_ops(g)
        elif step == "fuse_patterns":
            _fused(done, g, keep)
        elif step == "channels_last":
            done[step] = channels_last(g)
        else:
            raise ValueError(f"unknown optimize step {step!r}")
    if specialize and "fold_constants" in steps:  # Conv -> activation, after BatchNormalization folding
        from .fuse import fuse_conv_activation
        done["fuse_conv_act"] = fuse_conv_activation(g, keep)
        from .fuse import stem_channels_last
        done["stem_channels_last"] = stem_channels_last(g, keep)
    return done
