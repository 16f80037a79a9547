"""Control flow: If, Loop, Scan.

Graph attributes arrive compiled (``CompiledGraph``); bodies run through ``ctx.run_subgraph`` and see the
enclosing scope. The control decisions (If's condition, Loop's trip count and condition) are read as Python
values; everything computed on float data stays in torch, so gradients flow through the taken branch and
every iteration. Under ``vmap`` an If whose condition itself is batched runs both branches and selects
elementwise (possible when the branches' outputs have compatible shapes).
"""
from __future__ import annotations

from typing import Any

import torch

from ..registry import op


def _graph_output_types(ctx, attr_name: str):
    """(torch dtype, [dim or None]) for each output of a graph attribute, from the node's proto."""
    from ..registry import onnx_to_torch_dtype

    for a in ctx.node.attribute:
        if a.name == attr_name and a.HasField("g"):
            out = []
            for vi in a.g.output:
                tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
                if tt is None:
                    out.append((None, None))
                    continue
                dt = onnx_to_torch_dtype(tt.elem_type)
                dims = None
                if tt.HasField("shape"):
                    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
                out.append((dt, dims))
            return out
    return []


class NonUniformControl(RuntimeError):
    """A control value (If condition, Loop trip count/condition) differs across a vmapped batch."""


def _control_scalar(t):
    """The Python value of a one-element control tensor.

    Under ``vmap`` the tensor may be batched; ``.item()`` then refuses. When every batch entry holds the
    same value (always so under jacfwd/jacrev, whose batches are tangents, and for control values that do
    not depend on the vmapped input) the functorch wrappers are peeled and that common value is used;
    when the entries differ, :class:`NonUniformControl` is raised.
    """
    if not isinstance(t, torch.Tensor):
        return t
    if t.numel() != 1:
        raise ValueError(f"control value must hold a single element, got shape {tuple(t.shape)}")
    try:
        return t.reshape(()).item()
    except RuntimeError:
        pass
    try:
        import torch._C._functorch as _F

        base = t
        while _F.is_functorch_wrapped_tensor(base) or _F.is_batchedtensor(base):
            base = _F.get_unwrapped(base)
    except Exception as e:  # pragma: no cover - functorch internals changed
        raise NonUniformControl("cannot read a control value under this transform") from e
    flat = base.detach().reshape(-1)
    if flat.numel() == 0:
        raise NonUniformControl("empty batched control value")
    first = flat[0]
    if not bool((flat == first).all()):
        raise NonUniformControl("a Loop/If control value differs across the vmapped batch "
                                "(data-dependent control flow cannot be vectorised)")
    return first.item()


def _scalar_bool(t) -> bool:
    return bool(_control_scalar(t))


# ---------------------------------------------------------------------------------------------
# If
# ---------------------------------------------------------------------------------------------
@op("If", since=1)
def if_(ctx, cond):
    then_g = ctx.attr("then_branch")
    else_g = ctx.attr("else_branch")
    try:
        c = _scalar_bool(cond)
    except NonUniformControl:
        # the condition is batched under vmap and differs per entry: run both branches, select per entry
        t_out = ctx.run_subgraph(then_g, [])
        e_out = ctx.run_subgraph(else_g, [])
        sel = cond.reshape(()).to(torch.bool)
        res = []
        for a, b in zip(t_out, e_out):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                raise
            if a.dtype != b.dtype:
                b = b.to(a.dtype)
            res.append(torch.where(sel, a, b))
        return tuple(res)
    return tuple(ctx.run_subgraph(then_g if c else else_g, []))


# ---------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------
def _stack_or_empty(items: list, spec, device) -> torch.Tensor:
    if items:
        return torch.stack(items, dim=0)
    dt, dims = spec if spec else (None, None)
    shape = [0] + [d if d is not None else 0 for d in (dims or [])]
    return torch.zeros(shape, dtype=dt or torch.float32, device=device)


@op("Loop", since=1)
def loop(ctx, M=None, cond=None, *v_initial):
    body = ctx.attr("body")
    n_in = len(body.input_names)
    n_carried = n_in - 2
    n_out = len(body.output_names)
    n_scan = n_out - 1 - n_carried
    if len(v_initial) != n_carried:
        raise ValueError(f"Loop body takes {n_carried} loop-carried values, node gives {len(v_initial)}")

    max_trip = None
    if M is not None and (not isinstance(M, torch.Tensor) or M.numel() > 0):
        max_trip = int(_control_scalar(M))
    keep_going = True
    if cond is not None and (not isinstance(cond, torch.Tensor) or cond.numel() > 0):
        keep_going = _scalar_bool(cond)
    cond_t = cond if isinstance(cond, torch.Tensor) and cond.numel() > 0 else torch.tensor(True)
    it_dtype = M.dtype if isinstance(M, torch.Tensor) and M.numel() > 0 else torch.int64

    state = list(v_initial)
    scans: list[list[Any]] = [[] for _ in range(n_scan)]
    it = 0
    dev = ctx.device
    while keep_going and (max_trip is None or it < max_trip):
        outs = ctx.run_subgraph(body, [torch.tensor(it, dtype=it_dtype, device=dev), cond_t, *state])
        cond_t = outs[0]
        state = list(outs[1:1 + n_carried])
        for k in range(n_scan):
            scans[k].append(outs[1 + n_carried + k])
        keep_going = _scalar_bool(cond_t)
        it += 1

    specs = _graph_output_types(ctx, "body")[1 + n_carried:] if any(not s for s in scans) else []
    res = list(state)
    for k in range(n_scan):
        res.append(_stack_or_empty(scans[k], specs[k] if k < len(specs) else None, dev))
    return tuple(res)


# ---------------------------------------------------------------------------------------------
# Scan
# ---------------------------------------------------------------------------------------------
def _scan_core(ctx, states: list, scan_inputs: list, length: int | None = None):
    """One (unbatched) scan; returns final states + stacked scan outputs (opset-9 semantics)."""
    body = ctx.attr("body")
    n_state = len(states)
    n_scan_in = len(scan_inputs)
    n_scan_out = len(body.output_names) - n_state
    in_axes = list(ctx.attr("scan_input_axes", None) or [0] * n_scan_in)
    in_dirs = list(ctx.attr("scan_input_directions", None) or ctx.attr("directions", None) or [0] * n_scan_in)
    out_axes = list(ctx.attr("scan_output_axes", None) or [0] * n_scan_out)
    out_dirs = list(ctx.attr("scan_output_directions", None) or [0] * n_scan_out)
    in_axes = [a + x.dim() if a < 0 else a for a, x in zip(in_axes, scan_inputs)]

    seq_len = None
    for x, a in zip(scan_inputs, in_axes):
        L = x.shape[a]
        if seq_len is None:
            seq_len = L
        elif L != seq_len:
            raise ValueError(f"scan inputs have different sequence lengths ({seq_len} vs {L})")
    seq_len = seq_len or 0
    n_iter = seq_len if length is None else min(length, seq_len)

    outs_acc: list[list[torch.Tensor]] = [[] for _ in range(n_scan_out)]
    for t in range(n_iter):
        slices = []
        for x, a, d in zip(scan_inputs, in_axes, in_dirs):
            slices.append(x.select(a, (n_iter - 1 - t) if d else t))
        outs = ctx.run_subgraph(body, [*states, *slices])
        states = list(outs[:n_state])
        for k in range(n_scan_out):
            outs_acc[k].append(outs[n_state + k])

    results = list(states)
    specs = _graph_output_types(ctx, "body")[n_state:] if n_iter == 0 else []
    for k in range(n_scan_out):
        items = outs_acc[k]
        if out_dirs[k] if k < len(out_dirs) else 0:
            items = items[::-1]
        if items:
            rank = items[0].dim() + 1
            ax = out_axes[k] if k < len(out_axes) else 0
            ax = ax + rank if ax < 0 else ax
            results.append(torch.stack(items, dim=ax))
        else:
            results.append(_stack_or_empty([], specs[k] if k < len(specs) else None, ctx.device))
    return results


@op("Scan", since=9)
def scan9(ctx, *inputs):
    m = int(ctx.attr("num_scan_inputs"))
    n_state = len(inputs) - m
    return tuple(_scan_core(ctx, list(inputs[:n_state]), list(inputs[n_state:])))


@op("Scan", since=8)
def scan8(ctx, sequence_lens=None, *inputs):
    """Opset 8: a leading batch axis on every input/output; scan axis 1; optional per-batch lengths."""
    m = int(ctx.attr("num_scan_inputs"))
    n_state = len(inputs) - m
    states = list(inputs[:n_state])
    scans = list(inputs[n_state:])
    batch = (states[0] if states else scans[0]).shape[0]
    max_len = scans[0].shape[1] if scans else 0
    lens = None
    if sequence_lens is not None and sequence_lens.numel() > 0:
        lens = [int(v) for v in sequence_lens.reshape(-1).tolist()]
    per_batch = []
    for b in range(batch):
        L = lens[b] if lens is not None else None
        res = _scan_core(ctx, [s[b] for s in states], [x[b] for x in scans], L)
        per_batch.append(res)
    out = []
    n_res = len(per_batch[0]) if per_batch else 0
    for k in range(n_res):
        items = [r[k] for r in per_batch]
        if k >= n_state and lens is not None:  # pad short sequences with zeros up to the longest
            padded = []
            for it in items:
                if it.shape[0] < max_len:
                    pad = it.new_zeros((max_len - it.shape[0],) + tuple(it.shape[1:]))
                    it = torch.cat([it, pad], dim=0)
                padded.append(it)
            items = padded
        out.append(torch.stack(items, dim=0))
    return tuple(out)
