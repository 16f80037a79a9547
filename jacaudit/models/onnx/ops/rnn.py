"""Recurrent ops: RNN, GRU, LSTM (all directions, layouts, activations, clip, sequence_lens).

The time loop is plain Python over torch ops, so vmap/jacrev/jacfwd run through it. Variable
``sequence_lens`` are handled with constant masks and a per-batch reversal index (no data-dependent
control flow): past a sequence's end the state is carried unchanged and Y is zero.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ....errors import UnsupportedError
from ..registry import op
from ._util import clamp_closed, ints
from . import rnn_fast

# ---------------------------------------------------------------------------------------------
# activations: name -> (fn(x, alpha, beta), default alpha, default beta, uses alpha, uses beta)
# ---------------------------------------------------------------------------------------------
_ACTS: dict[str, tuple[Callable, float, float, bool, bool]] = {
    "relu": (lambda x, a, b: torch.relu(x), 0.0, 0.0, False, False),
    "tanh": (lambda x, a, b: torch.tanh(x), 0.0, 0.0, False, False),
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), 0.0, 0.0, False, False),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0, True, True),
    "leakyrelu": (lambda x, a, b: F.leaky_relu(x, a), 0.01, 0.0, True, False),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, 0.0, True, False),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0, True, True),
    "hardsigmoid": (lambda x, a, b: clamp_closed(a * x + b, 0.0, 1.0), 0.2, 0.5, True, True),
    "elu": (lambda x, a, b: torch.where(x >= 0, x, a * (torch.exp(torch.clamp(x, max=0.0)) - 1)), 1.0, 0.0,
            True, False),
    "softsign": (lambda x, a, b: x / (1 + x.abs()), 0.0, 0.0, False, False),
    "softplus": (lambda x, a, b: F.softplus(x), 0.0, 0.0, False, False),
}


def _activations(ctx, defaults: list[str], num_dir: int) -> list[list[Callable]]:
    """Per direction, the list of activation callables (alpha/beta consumed in order)."""
    names = ctx.attr("activations")
    if not names:
        names = defaults * num_dir
    elif len(names) == len(defaults) and num_dir == 2:
        names = list(names) * 2
    alphas = list(ctx.attr("activation_alpha") or [])
    betas = list(ctx.attr("activation_beta") or [])
    ai = bi = 0
    fns: list[Callable] = []
    for nm in names:
        key = nm.lower()
        if key not in _ACTS:
            raise UnsupportedError(f"{ctx.op_type}: unknown activation {nm!r}")
        f, da, db, ua, ub = _ACTS[key]
        a, b = da, db
        if ua and ai < len(alphas):
            a = float(alphas[ai])
            ai += 1
        if ub and bi < len(betas):
            b = float(betas[bi])
            bi += 1
        fns.append(lambda x, f=f, a=a, b=b: f(x, a, b))
    k = len(defaults)
    return [fns[d * k:(d + 1) * k] for d in range(num_dir)]


class _Seq:
    """Sequence bookkeeping: time-major X, per-batch lengths, masks and the reversal index."""

    def __init__(self, x: torch.Tensor, seq_lens):
        self.T, self.B = x.shape[0], x.shape[1]
        lens = ints(seq_lens) if seq_lens is not None else []
        if lens and any(L != self.T for L in lens):
            self.lens = lens
        else:
            self.lens = None
        self.device = x.device

    def mask(self, t: int, dtype) -> torch.Tensor | None:
        """(B, 1) bool: which batch entries are still running at step t (None: all)."""
        if self.lens is None:
            return None
        return torch.tensor([t < L for L in self.lens], device=self.device).reshape(self.B, 1)

    def reverse(self, x: torch.Tensor) -> torch.Tensor:
        """Reverse each sequence's valid prefix along time (an involution)."""
        if self.lens is None:
            return torch.flip(x, dims=[0])
        idx = torch.tensor([[L - 1 - t if t < L else t for L in self.lens] for t in range(self.T)],
                           dtype=torch.int64, device=self.device)  # (T, B)
        idx = idx.reshape(self.T, self.B, *([1] * (x.dim() - 2))).expand(x.shape)
        return torch.gather(x, 0, idx)


def _prep(ctx, x, initial_h, initial_c=None):
    layout = int(ctx.attr("layout", 0)) if ctx.opset >= 14 else 0
    if layout:
        x = x.transpose(0, 1)
        if initial_h is not None:
            initial_h = initial_h.transpose(0, 1)
        if initial_c is not None:
            initial_c = initial_c.transpose(0, 1)
    return layout, x, initial_h, initial_c


def _finish(layout, ys: list[torch.Tensor], hs: list[torch.Tensor], cs: list[torch.Tensor] | None):
    """ys: per direction (T, B, H) -> Y (T, D, B, H); hs -> (D, B, H); layout 1 transposes."""
    y = torch.stack(ys, dim=1)
    yh = torch.stack(hs, dim=0)
    yc = torch.stack(cs, dim=0) if cs is not None else None
    if layout:
        y = y.permute(2, 0, 1, 3)
        yh = yh.transpose(0, 1)
        yc = yc.transpose(0, 1) if yc is not None else None
    return y, yh, yc


def _directions(ctx) -> list[bool]:
    d = (ctx.attr("direction", "forward") or "forward").lower()
    if d == "forward":
        return [False]
    if d == "reverse":
        return [True]
    if d == "bidirectional":
        return [False, True]
    raise ValueError(f"{ctx.op_type}: unknown direction {d!r}")


def _run_dir(seq: _Seq, x, reverse: bool, step, h0, c0=None):
    """Run ``step(xw_t, h, c) -> (h, c)`` over time; returns (Y (T,B,H), h_last, c_last)."""
    xs = seq.reverse(x) if reverse else x
    h, c = h0, c0
    outs = []
    for t, xt in enumerate(xs.unbind(0)):  # unbind: one backward (a stack), not a zero-filled sequence a step
        hn, cn = step(xt, h, c)
        m = seq.mask(t, hn.dtype)
        if m is not None:
            hn = torch.where(m, hn, h)
            if cn is not None:
                cn = torch.where(m, cn, c)
            outs.append(torch.where(m, hn, torch.zeros_like(hn)))
        else:
            outs.append(hn)
        h, c = hn, cn
    y = torch.stack(outs, dim=0)
    if reverse:
        y = seq.reverse(y)
    return y, h, c


# The fast GRU/LSTM path (rnn_fast) on or off (tests compare the two).
_FAST_RNN = [True]


def _clip(ctx):
    c = ctx.attr("clip")
    if c is None:
        return lambda v: v
    c = float(c)
    return lambda v: clamp_closed(v, -c, c)  # derivative 1 on [-c, c], the bounds included (Clip's convention)


def _outputs(ctx, y, yh, yc=None):
    if yc is None:
        return y, yh
    return y, yh, yc


# ---------------------------------------------------------------------------------------------
@op("RNN", since=1)
def rnn(ctx, x, w, r, b=None, seq_lens=None, initial_h=None):
    layout, x, initial_h, _ = _prep(ctx, x, initial_h)
    dirs = _directions(ctx)
    hs = int(ctx.attr("hidden_size", r.shape[-1]) or r.shape[-1])
    acts = _activations(ctx, ["Tanh"], len(dirs))
    clip = _clip(ctx)
    seq = _Seq(x, seq_lens)
    dt = x.dtype
    ys, hl = [], []
    for d, rev in enumerate(dirs):
        wd, rd = w[d].to(dt), r[d].to(dt)
        bias = (b[d, :hs] + b[d, hs:]).to(dt) if b is not None else None
        xw = torch.matmul(x, wd.t())
        if bias is not None:
            xw = xw + bias
        h0 = initial_h[d].to(dt) if initial_h is not None else x.new_zeros(seq.B, hs)
        f = acts[d][0]

        def step(xt, h, c, rd=rd, f=f):
            return f(clip(xt + torch.matmul(h, rd.t()))), None

        y, h, _ = _run_dir(seq, xw, rev, step, h0)
        ys.append(y)
        hl.append(h)
    y, yh, _ = _finish(layout, ys, hl, None)
    return _outputs(ctx, y, yh)


@op("GRU", since=1)
def gru(ctx, x, w, r, b=None, seq_lens=None, initial_h=None):
    layout, x, initial_h, _ = _prep(ctx, x, initial_h)
    dirs = _directions(ctx)
    hs = int(ctx.attr("hidden_size", r.shape[-1]) or r.shape[-1])
    acts = _activations(ctx, ["Sigmoid", "Tanh"], len(dirs))
    lbr = bool(ctx.attr("linear_before_reset", 0))
    clip = _clip(ctx)
    seq = _Seq(x, seq_lens)
    if lbr and seq.lens is None and _FAST_RNN[0] and rnn_fast._eligible(ctx, ["Sigmoid", "Tanh"], len(dirs),
                                                                         x, (w, r, b), (initial_h,)):
        y, yh = rnn_fast.gru_fast(x, w, r, b, initial_h, hs, len(dirs), dirs == [True])
        if layout:
            y, yh = y.permute(2, 0, 1, 3), yh.transpose(0, 1)
        return _outputs(ctx, y, yh)
    dt = x.dtype
    ys, hl = [], []
    for d, rev in enumerate(dirs):
        wd, rd = w[d].to(dt), r[d].to(dt)  # (3H, I), (3H, H); gate order z, r, h
        if b is not None:
            wb, rb = b[d, :3 * hs].to(dt), b[d, 3 * hs:].to(dt)
        else:
            wb = rb = None
        xw = torch.matmul(x, wd.t())  # (T, B, 3H)
        if wb is not None:
            xw = xw + wb
        r_zr, r_h = rd[:2 * hs], rd[2 * hs:]
        rb_zr = rb[:2 * hs] if rb is not None else None
        rb_h = rb[2 * hs:] if rb is not None else None
        h0 = initial_h[d].to(dt) if initial_h is not None else x.new_zeros(seq.B, hs)
        f, g = acts[d]

        def step(xt, h, c, r_zr=r_zr, r_h=r_h, rb_zr=rb_zr, rb_h=rb_h, f=f, g=g):
            hr = torch.matmul(h, r_zr.t())
            if rb_zr is not None:
                hr = hr + rb_zr
            zr = xt[..., :2 * hs] + hr
            z = f(clip(zr[..., :hs]))
            rr = f(clip(zr[..., hs:]))
            xh = xt[..., 2 * hs:]
            if lbr:
                hh = torch.matmul(h, r_h.t())
                if rb_h is not None:
                    hh = hh + rb_h
                n = g(clip(xh + rr * hh))
            else:
                hh = torch.matmul(rr * h, r_h.t())
                if rb_h is not None:
                    hh = hh + rb_h
                n = g(clip(xh + hh))
            return (1 - z) * n + z * h, None

        y, h, _ = _run_dir(seq, xw, rev, step, h0)
        ys.append(y)
        hl.append(h)
    y, yh, _ = _finish(layout, ys, hl, None)
    return _outputs(ctx, y, yh)


@op("LSTM", since=1)
def lstm(ctx, x, w, r, b=None, seq_lens=None, initial_h=None, initial_c=None, p=None):
    layout, x, initial_h, initial_c = _prep(ctx, x, initial_h, initial_c)
    dirs = _directions(ctx)
    hs = int(ctx.attr("hidden_size", r.shape[-1]) or r.shape[-1])
    acts = _activations(ctx, ["Sigmoid", "Tanh", "Tanh"], len(dirs))
    input_forget = bool(ctx.attr("input_forget", 0))
    clip = _clip(ctx)
    seq = _Seq(x, seq_lens)
    if not input_forget and p is None and seq.lens is None and _FAST_RNN[0] and \
            rnn_fast._eligible(ctx, ["Sigmoid", "Tanh", "Tanh"], len(dirs), x, (w, r, b),
                                                                          (initial_h, initial_c)):
        y, yh, yc = rnn_fast.lstm_fast(x, w, r, b, initial_h, initial_c, hs, len(dirs), dirs == [True])
        if layout:
            y, yh, yc = y.permute(2, 0, 1, 3), yh.transpose(0, 1), yc.transpose(0, 1)
        return _outputs(ctx, y, yh, yc)
    dt = x.dtype
    ys, hl, cl = [], [], []
    for d, rev in enumerate(dirs):
        wd, rd = w[d].to(dt), r[d].to(dt)  # gate order i, o, f, c
        xw = torch.matmul(x, wd.t())  # (T, B, 4H)
        if b is not None:
            xw = xw + (b[d, :4 * hs] + b[d, 4 * hs:]).to(dt)
        if p is not None:
            pi, po, pf = p[d, :hs].to(dt), p[d, hs:2 * hs].to(dt), p[d, 2 * hs:].to(dt)
        else:
            pi = po = pf = None
        h0 = initial_h[d].to(dt) if initial_h is not None else x.new_zeros(seq.B, hs)
        c0 = initial_c[d].to(dt) if initial_c is not None else x.new_zeros(seq.B, hs)
        f, g, hfn = acts[d]

        def step(xt, h, c, rd=rd, pi=pi, po=po, pf=pf, f=f, g=g, hfn=hfn):
            gates = xt + torch.matmul(h, rd.t())
            gi, go, gf, gc = gates[..., :hs], gates[..., hs:2 * hs], gates[..., 2 * hs:3 * hs], gates[..., 3 * hs:]
            if pi is not None:
                gi = gi + pi * c
                gf = gf + pf * c
            i = f(clip(gi))
            fg = 1 - i if input_forget else f(clip(gf))
            cc = g(clip(gc))
            cn = fg * c + i * cc
            if po is not None:
                go = go + po * cn
            o = f(clip(go))
            return o * hfn(cn), cn

        y, h, c = _run_dir(seq, xw, rev, step, h0, c0)
        ys.append(y)
        hl.append(h)
        cl.append(c)
    y, yh, yc = _finish(layout, ys, hl, cl)
    return _outputs(ctx, y, yh, yc)
