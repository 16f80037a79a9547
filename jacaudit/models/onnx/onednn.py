"""oneDNN kernels for the two products torch does not send to oneDNN on CPU: matrix products with a constant
weight (torch's ``mm`` is MKL's sgemm, which on the AMD EPYC machines measured runs at half of oneDNN's rate:
0.13 ms vs 0.07 ms for a 65x192 @ 192x576 product, 1 thread), and the convolutions torch's backend selection
leaves to its native ``_slow_conv2d`` kernels (1x1 unstrided convolutions below batch 16 on one thread, and
small batch-1 inputs of up to 3x3 kernels: ~2x slower than oneDNN forward and backward in the measurements).

Both are autograd Functions whose forward and first-order backward (the input's gradient only: the weights
are graph constants) run oneDNN; a backward asked to build a graph (``create_graph``) runs torch's plain
differentiable products instead. Linear weights are prepacked once (``LinearWeights``). A convolution's input
gradient is one oneDNN convolution with the flipped kernel at stride 1, a 1x1 convolution scattered onto the
strided positions for strided 1x1 layers, one product for patch (kernel == stride) layers, and torch's own
otherwise (``grad_mode``): the strided 1x1 and patch forms also run where torch would use oneDNN itself, since
torch's own input gradient of those is 2-7x their forward. They are used only on plain float32 CPU tensors, with grad mode or no grad,
outside torch.func transforms and forward-mode AD, and when the weight (and bias) do not require grad; the
callers fall back to the plain ops otherwise (``usable``). Values change by rounding only.

``ENABLED`` is decided at import by a probe against the plain ops (absent or wrong kernels: everything plain).
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

__all__ = ["ENABLED", "usable", "linear", "linear_wanted", "LinearWeights", "conv2d", "conv2d_wanted",
           "conv2d_routed", "grad_mode", "torch_uses_onednn"]

# A product runs oneDNN from this many rows (oneDNN has ~10 us more fixed cost a call than MKL's gemv/small
# gemm) and this many multiply-adds.
LINEAR_MIN_ROWS = 16
LINEAR_MIN_MACS = 1 << 18
# A convolution runs oneDNN from this many multiply-adds, with a multiple of 8 output channels and,
# channels_last, this many output positions (N * H_out * W_out): below them (or with e.g. 84 output channels)
# torch's native kernel was as fast or faster, forward + input gradient, in place in the corpus graphs at
# batch 1 (oneDNN costs ~25-60 us a call more: e.g. a 576 -> 96 1x1 layer on 5x5, channels_last: native 90 us
# vs oneDNN 140 us; a 144 -> 24 1x1 layer on 40x40: 301 vs 211 us; a 256 -> 256 1x1 layer on 10x10, NCHW:
# 304 vs 240 us; a 64 -> 84 1x1 layer on 40x40: 371 vs 406 us).
CONV_MIN_MACS = 3_000_000
CONV_MIN_POSITIONS_CL = 100


_peek = torch._C._functorch.peek_interpreter_stack
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def usable(x: torch.Tensor, *params) -> bool:
    """x and the constant params are plain float32 CPU tensors, no transform or forward-mode AD is active, and
    no param requires grad."""
    if not ENABLED or x.dtype is not torch.float32 or not x.is_cpu or _forward_ad._current_level >= 0 \
            or _peek() is not None or x.layout is not torch.strided or _wrapped(x):
        return False
    for p in params:
        if p is not None and (p.requires_grad or p.dtype is not torch.float32 or not p.is_cpu):
            return False
    return True


# ------------------------------------------------------------------------------------------------------------
# linear: y = x @ W + b, W constant (K, N)
# ------------------------------------------------------------------------------------------------------------
def _lp(x, w, b):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class LinearWeights:
    """A constant weight W (K, N) for ``linear``: oneDNN's prepacked (blocked) forms of W^T (N, K) for the
    forward and, made on the first gradient, of W (K, N) for the input's gradient (~10% faster a call than
    plain weights at 65 rows, measured); ``dense`` is W itself (the create_graph path reads it)."""

    __slots__ = ("dense", "fwd", "_bwd", "pack")

    def __init__(self, w: torch.Tensor, pack: bool = True):
        self.dense = w.detach()
        self.pack = pack  # False: plain weights (made per call, e.g. the RNN path's; packing costs a copy)
        wt = self.dense.t().contiguous()
        self.fwd = _pack(wt) if pack else wt
        self._bwd = None

    @property
    def bwd(self) -> torch.Tensor:
        if self._bwd is None:
            w = self.dense.contiguous()
            self._bwd = _pack(w) if self.pack else w
        return self._bwd


def _pack(w_out_in: torch.Tensor) -> torch.Tensor:
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w_out_in, None)
    except Exception:  # noqa: BLE001 -- no packing in this build: the plain weight (same kernel, same values)
        return w_out_in


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, b):
        ctx.weights = weights  # constants, not saved tensors
        return _lp(x, weights.fwd, b)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph: a differentiable product
            return torch.matmul(g, ctx.weights.dense.t()), None, None
        if not g.is_contiguous():
            g = g.contiguous()
        return _lp(g, ctx.weights.bwd, None), None, None


def linear_wanted(x: torch.Tensor, n_out: int) -> bool:
    if x.dim() < 2:
        return False
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    return rows >= LINEAR_MIN_ROWS and rows * k * n_out >= LINEAR_MIN_MACS


def linear(x: torch.Tensor, weights: "LinearWeights", b: torch.Tensor | None) -> torch.Tensor:
    """x @ W + b for ``weights`` = LinearWeights(W); callers check ``usable`` and ``linear_wanted``."""
    if not torch.is_grad_enabled() or not x.requires_grad:
        return _lp(x, weights.fwd, b)
    return _Linear.apply(x, weights, b)


# ------------------------------------------------------------------------------------------------------------
# conv2d, groups 1, where torch would run its native kernel
# ------------------------------------------------------------------------------------------------------------
def torch_uses_onednn(x: torch.Tensor, w: torch.Tensor, strides, dil, group: int) -> bool:
    """torch 2.x's ``use_mkldnn`` rule for a float32 CPU 2-D convolution (x already padded)."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2], w.shape[3]
    strided = any(s != 1 for s in strides)
    dilated = any(d != 1 for d in dil)
    return ((strided or dilated or n >= 16 or kh != 1 or kw != 1 or torch.get_num_threads() > 1)
            and (group > 1 or (kh > 3 and kw > 3) or n > 1 or n * c * h * wd > 20480))


def conv2d_wanted(x: torch.Tensor, w: torch.Tensor, strides, padding: int | list, dil, group: int,
                  assume_one_thread: bool = False) -> bool:
    """torch 2.x's ``use_mkldnn`` rule says no (so ``F.conv2d`` would run ``_slow_conv2d``) and the output is
    large enough that oneDNN is faster. ``padding`` is the symmetric padding (an int or per-dim list)."""
    if group != 1 or x.dim() != 4 or w.dim() != 4:
        return False
    n, c, h, wd = x.shape
    kh, kw = w.shape[2], w.shape[3]
    strided = any(s != 1 for s in strides)
    dilated = any(d != 1 for d in dil)
    one_thread = assume_one_thread or torch.get_num_threads() == 1
    torch_onednn = ((strided or dilated or n >= 16 or kh != 1 or kw != 1 or not one_thread)
                    and ((kh > 3 and kw > 3) or n > 1 or n * c * h * wd > 20480))
    if torch_onednn:
        return False
    pads = [padding] * 2 if isinstance(padding, int) else list(padding)
    ho = (h + 2 * pads[0] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (wd + 2 * pads[1] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    if n * ho * wo * c * w.shape[0] * kh * kw < CONV_MIN_MACS or w.shape[0] % 8:
        return False
    if x.is_meta:  # layout unknown: either
        return True
    return n * ho * wo >= CONV_MIN_POSITIONS_CL or not x.is_contiguous(memory_format=torch.channels_last) \
        or x.is_contiguous()


def _mk(x, w, b, padding, stride, dil):
    return torch.ops.aten.mkldnn_convolution(x, w, b, padding, stride, dil, 1)


def grad_mode(x_shape, w_shape, padding, stride, dil) -> str:
    """How the input's gradient of a groups-1 2-D convolution is computed (``padding`` symmetric, per dim):

    * ``flip``: stride 1 -- the convolution of g with the spatially flipped, channel-transposed kernel;
    * ``s1x1``: a strided 1x1 convolution without padding -- a 1x1 convolution of g with the transposed
      kernel, scattered onto every stride-th position of zeros (torch's own: 2.3-4.4x slower, measured);
    * ``patch``: kernel == stride, no padding, the input an exact multiple (ViT patch embeddings) -- one
      matrix product of g with the kernel, the patches laid back (torch's: 2.4 ms for a 16x16/16 layer on
      128x128 where its forward takes 0.3 ms);
    * ``torch``: anything else, ``torch.nn.grad.conv2d_input``.
    """
    kh, kw = w_shape[2], w_shape[3]
    if all(v == 1 for v in stride) and all(d * (k - 1) - p >= 0 for d, k, p in zip(dil, (kh, kw), padding)):
        return "flip"
    if kh == kw == 1 and all(p == 0 for p in padding):
        return "s1x1"
    if (list(stride) == [kh, kw] and all(p == 0 for p in padding) and all(d == 1 for d in dil)
            and x_shape[2] % kh == 0 and x_shape[3] % kw == 0):
        return "patch"
    return "torch"


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, padding, stride, dil, mode, wg):
        ctx.geo = (padding, stride, dil, mode)
        ctx.w, ctx.wg = w, wg
        ctx.x_shape = x.shape
        return _mk(x, w, b, padding, stride, dil)

    @staticmethod
    def backward(ctx, g):
        padding, stride, dil, mode = ctx.geo
        w, wg = ctx.w, ctx.wg
        if torch.is_grad_enabled():  # create_graph: torch's differentiable form
            mode = "torch"
        kh, kw = w.shape[2], w.shape[3]
        if mode == "flip":
            p = [dil[0] * (kh - 1) - padding[0], dil[1] * (kw - 1) - padding[1]]
            gx = _mk(g, wg, None, p, [1, 1], dil)
        elif mode == "s1x1":
            gx = g.new_zeros(ctx.x_shape)
            gx[:, :, ::stride[0], ::stride[1]] = _mk(g, wg, None, [0, 0], [1, 1], [1, 1])
        elif mode == "patch":
            n, _, ph, pw = g.shape
            c = w.shape[1]
            cols = _lp(g.permute(0, 2, 3, 1), wg, None)  # (N, Ph, Pw, C*kh*kw)
            gx = cols.reshape(n, ph, pw, c, kh, kw).permute(0, 3, 1, 4, 2, 5).reshape(ctx.x_shape)
        else:
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, w, g, stride, padding, dil, 1)
        return gx, None, None, None, None, None, None, None


def _grad_weight(memo: dict, w: torch.Tensor, mode: str) -> torch.Tensor | None:
    """The gradient's kernel for ``mode``, cached per weight tensor (the node's memo)."""
    if mode == "torch":
        return None
    hit = memo.get("onednn_wgrad")  # (w, its key, mode, kernel); holding w keeps its storage (and address)
    key = (w.data_ptr(), w.shape, w.stride(), w._version)
    if hit is not None and hit[1] == key and hit[2] == mode:
        return hit[3]
    fmt = torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() \
        else torch.contiguous_format
    wd = w.detach()
    if mode == "flip":
        wg = wd.flip(2, 3).transpose(0, 1).contiguous(memory_format=fmt)
    elif mode == "s1x1":
        wg = wd.transpose(0, 1).contiguous(memory_format=fmt)
    else:  # patch: a linear weight (out = C*kh*kw, in = K)
        wg = wd.reshape(wd.shape[0], -1).t().contiguous()
    memo["onednn_wgrad"] = (w, key, mode, wg)
    return wg


def conv2d(memo: dict, x, w, b, padding, strides, dil) -> torch.Tensor:
    """F.conv2d(x, w, b, strides, padding, dil) through oneDNN (groups 1); callers check ``usable`` and
    ``conv2d_wanted`` (or ``grad_mode``). ``memo`` caches the gradient's kernel (the node's memo)."""
    pad = [padding] * 2 if isinstance(padding, int) else list(padding)
    stride, dl = list(strides), list(dil)
    if not torch.is_grad_enabled() or not x.requires_grad:
        return _mk(x, w, b, pad, stride, dl)
    mode = grad_mode(x.shape, w.shape, pad, stride, dl)
    return _Conv2d.apply(x, w, b, pad, stride, dl, mode, _grad_weight(memo, w, mode))


def conv2d_routed(x, w, strides, padding, dil, group) -> bool:
    """Run this convolution through ``conv2d``: torch would use its native kernel and oneDNN is faster
    (``conv2d_wanted``), or an input gradient is to be taken and ``grad_mode`` has a faster form than
    torch's for it (strided 1x1, patch)."""
    if group != 1 or x.dim() != 4 or w.dim() != 4:
        return False
    if conv2d_wanted(x, w, strides, padding, dil, group):
        return True
    if not (torch.is_grad_enabled() and x.requires_grad):
        return False
    pad = [padding] * 2 if isinstance(padding, int) else list(padding)
    return grad_mode(x.shape, w.shape, pad, list(strides), list(dil)) in ("s1x1", "patch")


# ------------------------------------------------------------------------------------------------------------
def _probe() -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(20, 3, 24, generator=g)
        w = torch.randn(24, 40, generator=g)
        b = torch.randn(40, generator=g)
        y = _lp(x, w.t().contiguous(), b)
        if not torch.allclose(y, x @ w + b, rtol=1e-4, atol=1e-4):
            return False
        lw = LinearWeights(w)
        if not torch.allclose(_lp(x, lw.fwd, b), x @ w + b, rtol=1e-4, atol=1e-4):
            return False
        gy = torch.randn(20, 3, 40, generator=g)
        if not torch.allclose(_lp(gy, lw.bwd, None), gy @ w.t(), rtol=1e-4, atol=1e-4):
            return False
        if not torch.allclose(_lp(gy, w.contiguous(), None), gy @ w.t(), rtol=1e-4, atol=1e-4):
            return False
        xc = torch.randn(1, 5, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
        wc = torch.randn(7, 5, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
        bc = torch.randn(7, generator=g)
        yc = _mk(xc, wc, bc, [1, 1], [1, 1], [1, 1])
        if not torch.allclose(yc, F.conv2d(xc, wc, bc, 1, 1), rtol=1e-4, atol=1e-4):
            return False
        return True
    except Exception:  # noqa: BLE001 -- no oneDNN (or another signature): the plain ops
        return False


ENABLED = _probe()
