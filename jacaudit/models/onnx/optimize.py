"""Graph-level work at load time that makes the interpreter's forward and backward cheaper.

``optimize(compiled_graph)`` mutates a :class:`~jacaudit.models.onnx.interpreter.CompiledGraph` in place:

1. constant folding -- a node whose inputs are all initializers (ConstantOfShape weights, Reshape of a
   constant shape, Cast/Transpose of weights, ...) runs once; its outputs become initializers;
2. BatchNormalization (inference) folded into the Conv that feeds it (``W' = W * s``, ``b' = (b - mean) * s +
   beta`` with ``s = gamma / sqrt(var + eps)``), when the Conv's output has no other reader;
3. channels_last: 4-D Conv weights stored channels_last, so oneDNN/cuDNN run NHWC kernels and the layout
   propagates through the convolutions (torch picks channels_last output when the weight is).

None of these change the function (BN folding changes rounding only); derivatives with respect to the
input are unchanged. Tensors named in ``keep`` (outputs/``wrt`` a caller needs) are never folded away.
Returns what was done, for the benchmark's per-step measurements.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["optimize", "fold_constants", "fold_batchnorm", "channels_last"]

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


def optimize(g, keep: Iterable[str] = (), steps: Iterable[str] = ("fold_constants", "fold_batchnorm",
                                                                    "channels_last")) -> dict[str, int]:
    """Run the steps in order on a CompiledGraph (in place); returns {step: count of changes}."""
    keep = list(keep)
    done: dict[str, int] = {}
    for step in steps:
        if step == "fold_constants":
            done[step] = fold_constants(g, keep)
        elif step == "fold_batchnorm":
            done[step] = fold_batchnorm(g, keep)
        elif step == "channels_last":
            done[step] = channels_last(g)
        else:
            raise ValueError(f"unknown optimize step {step!r}")
    return done
