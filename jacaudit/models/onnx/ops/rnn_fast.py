"""A fast path for the common GRU and LSTM nodes: both directions stepped together, a hand-written backward.

The plain recurrence in ``rnn.py`` runs ~15 torch ops per time step and direction, each recorded by autograd
(and each ``x[t]`` read made its backward zero-fill the whole sequence). Here, for the nodes exporters write
for ``torch.nn.GRU``/``LSTM`` (default activations, no clip, equal sequence lengths, float32/float64; GRU with
``linear_before_reset=1``; LSTM without peepholes and ``input_forget=0``):

* the input projection of every step is one matmul per direction (``X W^T + b``, outside the recurrence,
  through ordinary autograd);
* the directions run in the same step (``h`` is ``(D, B, H)``, one ``baddbmm`` for the recurrent product), the
  reverse direction on the time-flipped projection;
* the recurrence is one ``torch.autograd.Function`` (GRU: 5 kernels a step forward, 5 backward; LSTM: 7 and 6)
  whose backward is backpropagation through time written out, with the per-step coefficients that do not
  depend on the incoming gradient computed for all steps at once.

It is taken from three cell steps on (time steps x directions >= 3); below, the plain path's few ops cost
less than its set-up.

Same function and the same derivative (the activations are smooth; rounding differs). Gradients flow to ``X``
and the initial states; the node falls back to the plain path when ``W``/``R``/``B`` require a gradient, under
``torch.func`` transforms and forward-mode AD (the plain path runs there). A backward with ``create_graph=True``
(a second derivative) differentiates the plain recurrence on the saved inputs, so higher derivatives are right.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
from .. import onednn as _onednn

_FAST = (torch.float32, torch.float64)


def _eligible(ctx, defaults: list[str], num_dir: int, x, params, states) -> bool:
    """params (W, R, B): constants (no gradient asked for); states (initial h, c): may take a gradient."""
    if ctx.attr("clip") is not None:
        return False
    names = ctx.attr("activations")
    if names:
        low = [n.lower() for n in names]
        d = [n.lower() for n in defaults]
        if low != d * num_dir and not (num_dir == 2 and low == d):
            return False
    if x.dtype not in _FAST or x.dim() != 3:
        return False
    if x.shape[0] * num_dir < 3:  # one or two cell steps: the plain path's few ops cost less than the set-up
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0:
        return False
    for t in params:
        if t is not None and (t.requires_grad or t.dtype != x.dtype):
            return False
    return all(t is None or t.dtype == x.dtype for t in states)


def _proj(x, w, b, n_gates: int, num_dir: int, hs: int, reverse_only: bool):
    """(T, D, B, G): x W_d^T + b_d per direction (one matmul each); the second direction (or a reverse-only
    node) time-flipped so that step t of the loop reads original time T-1-t."""
    T, B, I = x.shape
    parts = []
    for d in range(num_dir):
        xd = torch.flip(x, dims=[0]) if (d == 1 or reverse_only) else x
        xd = xd.reshape(T * B, I)
        if _onednn.usable(xd) and _onednn.linear_wanted(xd, w.shape[1]):  # the weight is a graph constant
            yd = _onednn.linear(xd, _onednn.LinearWeights(w[d].t(), pack=False), None if b is None else b[d])
        else:
            wd = w[d].t()
            yd = torch.addmm(b[d], xd, wd) if b is not None else torch.mm(xd, wd)
        parts.append(yd.view(T, B, -1))
    return torch.stack(parts, dim=1)


def _unflip(yp, num_dir: int, reverse_only: bool):
    """Per-step outputs (T, D, B, H) back to ONNX time order per direction."""
    if num_dir == 2:
        return torch.stack([yp[:, 0], torch.flip(yp[:, 1], dims=[0])], dim=1)
    return torch.flip(yp, dims=[0]) if reverse_only else yp


# ------------------------------------------------------------------------------------------------------------
# GRU (linear_before_reset = 1; gates z, r, h)
# ------------------------------------------------------------------------------------------------------------
def _gru_forward(xw, h0, rt, rb, save: bool):
    """xw (T, D, B, 3H), h0 (D, B, H), rt = R^T (D, H, 3H), rb (D, 1, 3H) or None.
    Returns (Hs (T+1, D, B, H) with Hs[0] = h0, saved) where saved = (ZR, N, G) when ``save``; G holds
    (z, r pre-activations, R_h h + Rb_h) per step."""
    T, D, B, G = xw.shape
    H = G // 3
    hs = xw.new_empty((T + 1, D, B, H))
    hs[0] = h0
    zr = xw.new_empty((T, D, B, 2 * H))
    nn_ = xw.new_empty((T, D, B, H))
    gg = xw.new_empty((T, D, B, G))
    # the addend of each step's recurrent product: [xw_z + Rb_z, xw_r + Rb_r, Rb_h], so that one baddbmm gives
    # the z, r pre-activations and the recurrent part of the candidate
    add = torch.empty_like(xw)
    if rb is not None:
        torch.add(xw[..., :2 * H], rb[..., :2 * H], out=add[..., :2 * H])
        add[..., 2 * H:] = rb[..., 2 * H:]
    else:
        add[..., :2 * H] = xw[..., :2 * H]
        add[..., 2 * H:] = 0
    hsu, zru, nu, ggu, addu = hs.unbind(0), zr.unbind(0), nn_.unbind(0), gg.unbind(0), add.unbind(0)
    xn = xw[..., 2 * H:].unbind(0)
    g_zr = gg[..., :2 * H].unbind(0)
    g_n = gg[..., 2 * H:].unbind(0)
    z_ = zr[..., :H].unbind(0)
    r_ = zr[..., H:].unbind(0)
    h = hsu[0]
    for t in range(T):
        torch.baddbmm(addu[t], h, rt, out=ggu[t])
        torch.sigmoid(g_zr[t], out=zru[t])
        torch.tanh(torch.addcmul(xn[t], r_[t], g_n[t]), out=nu[t])
        torch.lerp(nu[t], h, z_[t], out=hsu[t + 1])  # n + z (h - n) = (1 - z) n + z h
        h = hsu[t + 1]
    return hs, ((zr, nn_, gg) if save else None)


def _gru_backward(gy, gh, hs, saved, r):
    """gy (T, D, B, H) gradient of the per-step outputs, gh (D, B, H) of the last state (or None);
    r = R (D, 3H, H). Returns (g_xw (T, D, B, 3H), g_h0 (D, B, H))."""
    zr, n, hr = saved
    T, D, B, H = n.shape
    z, rr = zr[..., :H], zr[..., H:]
    hn = hr[..., 2 * H:]
    hp = hs[:-1]
    # dL/d(pre-activation) = dh * K: K for z, r, n of the input projection, and for the recurrent product
    # (whose n-part is r * dn_pre); all the per-step coefficients at once
    one_m_z = 1 - z
    dn_k = one_m_z * (1 - n * n)                 # dn_pre / dh
    kx = torch.empty((T, D, B, 3, H), dtype=n.dtype, device=n.device)
    kx[:, :, :, 0] = (hp - n) * z * one_m_z      # dz_pre / dh
    kx[:, :, :, 1] = dn_k * hn * rr * (1 - rr)   # dr_pre / dh
    kx[:, :, :, 2] = dn_k
    kh = kx.clone()
    kh[:, :, :, 2] = dn_k * rr
    # the loop keeps dh_t per step (3 kernels a step: the gate gradients of the recurrent product, their
    # product with R, plus dh_t * z_t and the next step's output gradient in one addcmul); the input
    # projection's gradients are one product of all steps after it
    dhs = torch.empty((T, D, B, H), dtype=n.dtype, device=n.device)
    ghh = torch.empty((D, B, 3, H), dtype=n.dtype, device=n.device)
    ghh3 = ghh.view(D, B, 3 * H)
    dhu, khu, zu = dhs.unbind(0), kh.unbind(0), z.unbind(0)
    gyu = gy.unbind(0) if gy is not None else None
    zero = n.new_zeros((D, B, H))
    if gh is not None:
        dh = gh if gyu is None else gh + gyu[T - 1]
    else:
        dh = gyu[T - 1] if gyu is not None else zero
    dhu[T - 1].copy_(dh)
    for t in range(T - 1, -1, -1):
        dh = dhu[t]
        torch.mul(dh.unsqueeze(2), khu[t], out=ghh)
        if t == 0:
            dh = torch.baddbmm(dh * zu[0], ghh3, r)
        elif gyu is not None:
            torch.baddbmm(torch.addcmul(gyu[t - 1], dh, zu[t]), ghh3, r, out=dhu[t - 1])
        else:
            torch.baddbmm(dh * zu[t], ghh3, r, out=dhu[t - 1])
    gx = dhs.unsqueeze(3) * kx                                             # (T, D, B, 3, H)
    return gx.view(T, D, B, 3 * H), dh


def _gru_plain(xw, h0, rt, rb):
    """The same recurrence in differentiable torch ops (double backward; reference)."""
    T, D, B, G = xw.shape
    H = G // 3
    h = h0
    out = []
    for xt in xw.unbind(0):
        hr = torch.bmm(h, rt) if rb is None else torch.baddbmm(rb, h, rt)
        zr = torch.sigmoid(xt[..., :2 * H] + hr[..., :2 * H])
        z, r = zr[..., :H], zr[..., H:]
        n = torch.tanh(xt[..., 2 * H:] + r * hr[..., 2 * H:])
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out, 0)


class _GRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xw, h0, rt, rb):
        hs, saved = _gru_forward(xw, h0, rt, rb, save=True)
        ctx.save_for_backward(xw, h0)
        ctx.rt, ctx.rb = rt, rb
        ctx.hs, ctx.saved = hs, saved
        return hs[1:]

    @staticmethod
    def backward(ctx, gy):
        xw, h0 = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain recurrence
            with torch.enable_grad():
                xr = xw if xw.requires_grad else xw.detach().requires_grad_(True)
                hr_ = h0 if h0.requires_grad else h0.detach().requires_grad_(True)
                y = _gru_plain(xr, hr_, ctx.rt, ctx.rb)
                gx, g0 = torch.autograd.grad(y, (xr, hr_), gy, create_graph=True, allow_unused=True)
            return gx, g0, None, None
        gx, g0 = _gru_backward(gy, None, ctx.hs, ctx.saved, ctx.rt.transpose(1, 2))
        return gx, g0, None, None


def gru_fast(x, w, r, b, initial_h, hs: int, num_dir: int, reverse_only: bool):
    """x (T, B, I) time-major -> (Y (T, D, B, H), Y_h (D, B, H))."""
    dt = x.dtype
    T, B, _ = x.shape
    w, r = w.to(dt), r.to(dt)
    wb = rb = None
    if b is not None:
        b = b.to(dt)
        wb, rb = b[:, :3 * hs], b[:, 3 * hs:]
    xw = _proj(x, w, wb, 3, num_dir, hs, reverse_only)
    h0 = initial_h.to(dt) if initial_h is not None else x.new_zeros((num_dir, B, hs))
    rt = r.transpose(1, 2).contiguous()  # (D, H, 3H)
    rb3 = rb.unsqueeze(1).contiguous() if rb is not None else None
    if T == 0:
        return x.new_zeros((0, num_dir, B, hs)), h0
    if torch.is_grad_enabled() and (xw.requires_grad or h0.requires_grad):
        yp = _GRUFunction.apply(xw.contiguous(), h0.contiguous(), rt, rb3)
    else:
        yp = _gru_forward(xw.contiguous(), h0, rt, rb3, save=False)[0][1:]
    return _unflip(yp, num_dir, reverse_only), yp[-1]


# ------------------------------------------------------------------------------------------------------------
# LSTM (gates i, o, f, c; no peepholes, input_forget = 0)
# ------------------------------------------------------------------------------------------------------------
def _lstm_forward(xw, h0, c0, rt, save: bool):
    """xw (T, D, B, 4H) (both biases in), h0/c0 (D, B, H), rt = R^T (D, H, 4H).
    Returns (Hs (T+1, D, B, H), Cs (T+1, D, B, H), saved = (A, TC)) with A the activated gates."""
    T, D, B, G = xw.shape
    H = G // 4
    hs = xw.new_empty((T + 1, D, B, H))
    cs = xw.new_empty((T + 1, D, B, H))
    hs[0] = h0
    cs[0] = c0
    a = xw.new_empty((T, D, B, G))       # sigmoid(i, o, f), tanh(c)
    tc = xw.new_empty((T, D, B, H))      # tanh(c_t)
    hsu, csu, au, tcu = hs.unbind(0), cs.unbind(0), a.unbind(0), tc.unbind(0)
    xu = xw.unbind(0)
    a_iof = a[..., :3 * H].unbind(0)
    a_c = a[..., 3 * H:].unbind(0)
    ai, ao, af = a[..., :H].unbind(0), a[..., H:2 * H].unbind(0), a[..., 2 * H:3 * H].unbind(0)
    g = xw.new_empty((D, B, G))
    g_iof, g_c = g[..., :3 * H], g[..., 3 * H:]
    h, c = hsu[0], csu[0]
    for t in range(T):
        torch.baddbmm(xu[t], h, rt, out=g)
        torch.sigmoid(g_iof, out=a_iof[t])
        torch.tanh(g_c, out=a_c[t])
        torch.addcmul(af[t] * c, ai[t], a_c[t], out=csu[t + 1])
        c = csu[t + 1]
        torch.tanh(c, out=tcu[t])
        torch.mul(ao[t], tcu[t], out=hsu[t + 1])
        h = hsu[t + 1]
    return hs, cs, ((a, tc) if save else None)


def _lstm_backward(gy, gh, gc, hs, cs, saved, r):
    """gy (T, D, B, H), gh/gc (D, B, H) or None, r = R (D, 4H, H). Returns (g_xw, g_h0, g_c0)."""
    a, tc = saved
    T, D, B, H = tc.shape
    i, o, f, cc = a[..., :H], a[..., H:2 * H], a[..., 2 * H:3 * H], a[..., 3 * H:]
    cp = cs[:-1]
    kc = o * (1 - tc * tc)                     # dc / dh (through h = o tanh c)
    ko = tc * o * (1 - o)                      # do_pre / dh
    kd = torch.empty((T, D, B, 4, H), dtype=tc.dtype, device=tc.device)  # d(pre) / dc, o-block unused
    kd[:, :, :, 0] = cc * i * (1 - i)
    kd[:, :, :, 1] = 0
    kd[:, :, :, 2] = cp * f * (1 - f)
    kd[:, :, :, 3] = i * (1 - cc * cc)
    gx = torch.empty((T, D, B, 4, H), dtype=tc.dtype, device=tc.device)
    gxu, kdu, kcu, kou, fu = gx.unbind(0), kd.unbind(0), kc.unbind(0), ko.unbind(0), f.unbind(0)
    gx_o = gx[:, :, :, 1].unbind(0)
    gyu = gy.unbind(0) if gy is not None else None
    dh, dc = gh, gc
    zero = tc.new_zeros((D, B, H))
    if dc is None:
        dc = zero
    for t in range(T - 1, -1, -1):
        if gyu is not None:
            dh = gyu[t] if dh is None else dh + gyu[t]
        if dh is None:
            dh = zero
        dc = torch.addcmul(dc, dh, kcu[t])
        torch.mul(dc.unsqueeze(2), kdu[t], out=gxu[t])
        torch.mul(dh, kou[t], out=gx_o[t])
        dh = torch.bmm(gxu[t].view(D, B, 4 * H), r)
        dc = dc * fu[t]
    return gx.view(T, D, B, 4 * H), dh, dc


def _lstm_plain(xw, h0, c0, rt):
    T, D, B, G = xw.shape
    H = G // 4
    h, c = h0, c0
    out = []
    for xt in xw.unbind(0):
        g = torch.baddbmm(xt, h, rt)
        i, o, f = torch.sigmoid(g[..., :H]), torch.sigmoid(g[..., H:2 * H]), torch.sigmoid(g[..., 2 * H:3 * H])
        c = f * c + i * torch.tanh(g[..., 3 * H:])
        h = o * torch.tanh(c)
        out.append(h)
    return torch.stack(out, 0), c


class _LSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xw, h0, c0, rt):
        hs, cs, saved = _lstm_forward(xw, h0, c0, rt, save=True)
        ctx.save_for_backward(xw, h0, c0)
        ctx.rt = rt
        ctx.hs, ctx.cs, ctx.saved = hs, cs, saved
        return hs[1:], cs[-1]

    @staticmethod
    def backward(ctx, gy, gc):
        xw, h0, c0 = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain recurrence
            with torch.enable_grad():
                ins = tuple(v if v.requires_grad else v.detach().requires_grad_(True) for v in (xw, h0, c0))
                y, c = _lstm_plain(*ins, ctx.rt)
                g = torch.autograd.grad((y, c), ins, (gy, gc), create_graph=True, allow_unused=True)
            return g[0], g[1], g[2], None
        gx, g0, gc0 = _lstm_backward(gy, None, gc, ctx.hs, ctx.cs, ctx.saved, ctx.rt.transpose(1, 2))
        return gx, g0, gc0, None


# ------------------------------------------------------------------------------------------------------------
# LSTM on torch's whole-sequence kernel (float32 on CPU: oneDNN's LSTM forward and backward)
# ------------------------------------------------------------------------------------------------------------
# On or off (tests compare the two paths).
_NATIVE_LSTM = [True]
# weights reordered for torch, per (W, R, B) constant: id(W) -> (weakref W, weakref R, B or None, versions, flat)
_FLAT_CACHE: dict = {}
_IOFC_TO_IFGO = (0, 2, 3, 1)  # ONNX LSTM gates i, o, f, c; torch i, f, g(=c), o


def _native_lstm_ok(x) -> bool:
    """torch's ``lstm`` runs oneDNN's sequence kernel for float32 CPU inputs when oneDNN is on (measured 2-3x
    faster than the stepped path at batch 1, forward and gradient); float64 would run its per-step C++ cells,
    slower than the stepped path, so it keeps that path."""
    return _NATIVE_LSTM[0] and x.dtype is torch.float32 and x.is_cpu and torch._C._get_mkldnn_enabled() \
        and x.numel() > 0


def _native_shapes_ok(x, w, r, b, h0, c0, hs: int, num_dir: int) -> bool:
    """Every shape exactly as torch's kernel reads it: oneDNN's LSTM does not check them all (a batch-1 initial
    state with a batch-32 input, as exporters that fix the batch write it, read past the state's memory). Any
    mismatch goes to the stepped path, which raises (or broadcasts) as before."""
    T, B, I = x.shape
    want = (num_dir, B, hs)
    return tuple(w.shape) == (num_dir, 4 * hs, I) and tuple(r.shape) == (num_dir, 4 * hs, hs) \
        and (b is None or tuple(b.shape) == (num_dir, 8 * hs)) \
        and (h0 is None or tuple(h0.shape) == want) and (c0 is None or tuple(c0.shape) == want)


def _reorder(m, hs: int):
    return torch.cat([m[k * hs:(k + 1) * hs] for k in _IOFC_TO_IFGO], 0).contiguous()


def _flat_weights(w, r, b, hs: int, num_dir: int, reverse_only: bool):
    """torch's flat weight list [w_ih, w_hh, b_ih, b_hh] per direction, cached per constant (W, R, B)."""
    import weakref
    key = (id(w), id(r), id(b), hs, reverse_only)
    vers = (w._version, r._version, None if b is None else b._version)
    hit = _FLAT_CACHE.get(key)
    if hit is not None:
        wr, rr, br, v, flat = hit
        if wr() is w and rr() is r and (br is None if b is None else br() is b) and v == vers:
            return flat
    flat = []
    for d in range(num_dir):
        flat += [_reorder(w[d], hs), _reorder(r[d], hs)]
        if b is not None:
            flat += [_reorder(b[d, :4 * hs], hs), _reorder(b[d, 4 * hs:], hs)]
    flat = [t.to(torch.float32) for t in flat]
    try:
        refs = (weakref.ref(w), weakref.ref(r), None if b is None else weakref.ref(b))
    except TypeError:
        return flat
    if len(_FLAT_CACHE) > 256:
        _FLAT_CACHE.clear()
    _FLAT_CACHE[key] = (*refs, vers, flat)
    return flat


def _native_run(x, h0, c0, flat, bias: bool, num_dir: int, reverse_only: bool):
    """(Y (T, D, B, H), h_n, c_n) from torch's kernel; a reverse-only node runs it on the time-flipped input."""
    xs = torch.flip(x, dims=[0]) if reverse_only else x
    y, hn, cn = torch._VF.lstm(xs, (h0, c0), flat, bias, 1, 0.0, False, num_dir == 2, False)
    T, B = y.shape[0], y.shape[1]
    y = y.view(T, B, num_dir, -1).permute(0, 2, 1, 3)
    if reverse_only:
        y = torch.flip(y, dims=[0])
    return y, hn, cn


class _LSTMNative(torch.autograd.Function):
    """torch's kernel with its own backward for first derivatives; a backward asked to build a graph
    (create_graph, a second derivative) differentiates the stepped plain recurrence on the saved inputs instead
    (oneDNN's LSTM backward is not differentiable)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w, r, b, flat, hs, num_dir, reverse_only):
        xd, hd, cd = (v.detach().requires_grad_(True) for v in (x, h0, c0))
        with torch.enable_grad():
            y, hn, cn = _native_run(xd, hd, cd, flat, b is not None, num_dir, reverse_only)
        ctx.graph = (xd, hd, cd, y, hn, cn)
        ctx.save_for_backward(x, h0, c0)
        ctx.params = (w, r, b, hs, num_dir, reverse_only)
        return y.detach(), hn.detach(), cn.detach()

    @staticmethod
    def backward(ctx, gy, gh, gc):
        if torch.is_grad_enabled():  # create_graph: differentiate the stepped recurrence
            x, h0, c0 = ctx.saved_tensors
            w, r, b, hs, num_dir, reverse_only = ctx.params
            with torch.enable_grad():
                ins = tuple(v if v.requires_grad else v.detach().requires_grad_(True) for v in (x, h0, c0))
                bias = (b[:, :4 * hs] + b[:, 4 * hs:]).to(x.dtype) if b is not None else None
                xw = _proj(ins[0], w.to(x.dtype), bias, 4, num_dir, hs, reverse_only)
                yp, cl = _lstm_plain(xw, ins[1], ins[2], r.to(x.dtype).transpose(1, 2).contiguous())
                outs = (_unflip(yp, num_dir, reverse_only), yp[-1], cl)
                g = torch.autograd.grad(outs, ins, (gy, gh, gc), create_graph=True, allow_unused=True)
            return (*g, None, None, None, None, None, None, None)
        xd, hd, cd, y, hn, cn = ctx.graph
        # retain_graph: the outer graph may be walked again (retain_graph there); the inner one goes with ctx
        g = torch.autograd.grad((y, hn, cn), (xd, hd, cd), (gy, gh, gc), retain_graph=True, allow_unused=True)
        return (*g, None, None, None, None, None, None, None)


def lstm_fast(x, w, r, b, initial_h, initial_c, hs: int, num_dir: int, reverse_only: bool):
    """x (T, B, I) time-major -> (Y (T, D, B, H), Y_h (D, B, H), Y_c (D, B, H))."""
    dt = x.dtype
    T, B, _ = x.shape
    if _native_lstm_ok(x) and _native_shapes_ok(x, w, r, b, initial_h, initial_c, hs, num_dir):
        flat = _flat_weights(w, r, b, hs, num_dir, reverse_only)
        h0 = initial_h.to(dt) if initial_h is not None else x.new_zeros((num_dir, B, hs))
        c0 = initial_c.to(dt) if initial_c is not None else x.new_zeros((num_dir, B, hs))
        h0, c0 = h0.contiguous(), c0.contiguous()
        if torch.is_grad_enabled() and (x.requires_grad or h0.requires_grad or c0.requires_grad):
            return _LSTMNative.apply(x, h0, c0, w, r, b, flat, hs, num_dir, reverse_only)
        return _native_run(x, h0, c0, flat, b is not None, num_dir, reverse_only)
    w, r = w.to(dt), r.to(dt)
    bias = (b[:, :4 * hs] + b[:, 4 * hs:]).to(dt) if b is not None else None
    xw = _proj(x, w, bias, 4, num_dir, hs, reverse_only)
    h0 = initial_h.to(dt) if initial_h is not None else x.new_zeros((num_dir, B, hs))
    c0 = initial_c.to(dt) if initial_c is not None else x.new_zeros((num_dir, B, hs))
    if T == 0:
        return x.new_zeros((0, num_dir, B, hs)), h0, c0
    rt = r.transpose(1, 2).contiguous()  # (D, H, 4H)
    if torch.is_grad_enabled() and (xw.requires_grad or h0.requires_grad or c0.requires_grad):
        yp, cl = _LSTMFunction.apply(xw.contiguous(), h0.contiguous(), c0.contiguous(), rt)
    else:
        hs_, cs_, _ = _lstm_forward(xw.contiguous(), h0, c0, rt, save=False)
        yp, cl = hs_[1:], cs_[-1]
    return _unflip(yp, num_dir, reverse_only), yp[-1], cl
