"""Linear algebra, softmax family, constants/generators, cumulative ops, windows and spectral ops.

Pure torch on float data so that vmap/jacrev/jacfwd run through. Integer shape-like inputs (sizes,
axes, lengths) are read with ``ints``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ....errors import UnsupportedError
from ..registry import onnx_to_torch_dtype, op
from ._util import axis as _axis, ints

_LOW = (torch.float16, torch.bfloat16)
_WIDE_U = (torch.uint16, torch.uint32, torch.uint64)


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _work(t: torch.Tensor) -> torch.Tensor:
    """Low-precision floats computed in float32."""
    return t.float() if t.dtype in _LOW else t


def _int_view(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint64:
        return t.view(torch.int64)
    if t.dtype in _WIDE_U:
        return t.to(torch.int64)
    return t


def _int_back(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    if t.dtype == dt:
        return t
    if dt == torch.uint64:
        return t.to(torch.int64).view(torch.uint64)
    return t.to(dt)


def _scalar_int(t, default: int = 0) -> int:
    v = ints(t)
    return v[0] if v else default


def _dtype_attr(code, default=torch.float32) -> torch.dtype:
    if code is None:
        return default
    dt = onnx_to_torch_dtype(int(code))
    if dt is None:
        raise UnsupportedError(f"ONNX element type {code} is not supported (torch cannot hold it)")
    return dt


# ---------------------------------------------------------------------------------------------
# matrix products
# ---------------------------------------------------------------------------------------------
@op("MatMul")
def matmul(ctx, a, b):
    if _is_float(a):
        if a.dtype != b.dtype:
            b = b.to(a.dtype)
        return torch.matmul(a, b)
    dt = a.dtype
    return _int_back(torch.matmul(_int_view(a).to(torch.int64), _int_view(b).to(torch.int64)), dt)


@op("Gemm")
def gemm(ctx, a, b, c=None):
    alpha = float(ctx.attr("alpha", 1.0))
    beta = float(ctx.attr("beta", 1.0))
    if int(ctx.attr("transA", 0)):
        a = a.transpose(-1, -2)
    if int(ctx.attr("transB", 0)):
        b = b.transpose(-1, -2)
    dt = a.dtype
    if not _is_float(a):
        y = torch.matmul(_int_view(a).to(torch.int64), _int_view(b).to(torch.int64))
        if alpha != 1.0:
            y = (y.to(torch.float64) * alpha)
        if c is not None and beta != 0:
            cc = _int_view(c).to(torch.int64)
            y = y + (cc * beta if beta != 1.0 else cc)
        if y.is_floating_point():
            y = y.to(torch.int64)
        return _int_back(y, dt)
    y = torch.matmul(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None and beta != 0:
        y = y + (c * beta if beta != 1.0 else c)
    return y.to(dt)


@op("Einsum")
def einsum(ctx, *xs):
    eq = ctx.attr("equation", "")
    if isinstance(eq, bytes):
        eq = eq.decode()
    eq = eq.replace(" ", "")
    dt = xs[0].dtype
    if _is_float(xs[0]):
        args = [_work(x) for x in xs]
        return torch.einsum(eq, *args).to(dt)
    args = [_int_view(x).to(torch.int64) for x in xs]
    return _int_back(torch.einsum(eq, *args), dt)


@op("Det")
def det(ctx, x):
    dt = x.dtype
    return torch.linalg.det(_work(x)).to(dt)


# ---------------------------------------------------------------------------------------------
# softmax family
# ---------------------------------------------------------------------------------------------
def _coerced(ctx, x, fn):
    """opset < 13: the input is coerced to 2-D [prod(shape[:axis]), prod(shape[axis:])]."""
    ax = _axis(int(ctx.attr("axis", 1)), x.dim())
    shape = x.shape
    if x.dim() == 0:
        return fn(x.reshape(1), -1).reshape(shape)
    y = fn(x.flatten(ax) if ax < x.dim() else x.unsqueeze(-1), -1)
    return y.reshape(shape)


def _softmax(x, dim):
    return torch.softmax(_work(x), dim).to(x.dtype)


def _log_softmax(x, dim):
    return torch.log_softmax(_work(x), dim).to(x.dtype)


def _hardmax(x, dim):
    if x.numel() == 0:
        return x
    idx = torch.argmax(x, dim=dim)
    return F.one_hot(idx, x.shape[dim]).movedim(-1, dim).to(x.dtype)


def _along(ctx, x, fn):
    if x.dim() == 0:
        return fn(x.reshape(1), 0).reshape(())
    return fn(x, _axis(int(ctx.attr("axis", -1)), x.dim()))


@op("Softmax", since=1)
def softmax_1(ctx, x):
    return _coerced(ctx, x, _softmax)


@op("Softmax", since=13)
def softmax_13(ctx, x):
    return _along(ctx, x, _softmax)


@op("LogSoftmax", since=1)
def log_softmax_1(ctx, x):
    return _coerced(ctx, x, _log_softmax)


@op("LogSoftmax", since=13)
def log_softmax_13(ctx, x):
    return _along(ctx, x, _log_softmax)


@op("Hardmax", since=1)
def hardmax_1(ctx, x):
    return _coerced(ctx, x, _hardmax)


@op("Hardmax", since=13)
def hardmax_13(ctx, x):
    return _along(ctx, x, _hardmax)


# ---------------------------------------------------------------------------------------------
# constants and generators
# ---------------------------------------------------------------------------------------------
@op("Constant")
def constant(ctx):
    a = ctx.attrs
    dev = ctx.device
    if a.get("value") is not None:
        v = a["value"]
        return v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=dev)
    if a.get("sparse_value") is not None:
        return a["sparse_value"]
    if "value_float" in a:
        return torch.tensor(float(a["value_float"]), dtype=torch.float32, device=dev)
    if "value_floats" in a:
        return torch.tensor([float(v) for v in a["value_floats"]], dtype=torch.float32, device=dev)
    if "value_int" in a:
        return torch.tensor(int(a["value_int"]), dtype=torch.int64, device=dev)
    if "value_ints" in a:
        return torch.tensor([int(v) for v in a["value_ints"]], dtype=torch.int64, device=dev)
    if "value_string" in a or "value_strings" in a:
        raise UnsupportedError("string constants are not supported")
    raise ValueError("Constant node has no value attribute")


@op("ConstantOfShape")
def constant_of_shape(ctx, shape):
    dims = ints(shape)
    v = ctx.attr("value", None)
    if v is None:
        v = torch.zeros((), dtype=torch.float32, device=ctx.device)
    v = v.reshape(())
    return v.expand(tuple(dims)).clone()


@op("EyeLike")
def eye_like(ctx, x):
    k = int(ctx.attr("k", 0))
    code = ctx.attr("dtype", None)
    dt = _dtype_attr(code, x.dtype) if code is not None else x.dtype
    if x.dim() == 1:
        n = m = x.shape[0]
    else:
        n, m = x.shape[-2], x.shape[-1]
    rows = torch.arange(n, device=x.device).unsqueeze(1)
    cols = torch.arange(m, device=x.device).unsqueeze(0)
    eye = (cols - rows) == k
    return _int_back(eye.to(torch.int64), dt) if dt in _WIDE_U else eye.to(dt)


@op("Range")
def range_(ctx, start, limit, delta):
    dt = start.dtype
    if not _is_float(start):
        s, l, d = _scalar_int(start), _scalar_int(limit), _scalar_int(delta)
        return _int_back(torch.arange(s, l, d, dtype=torch.int64, device=start.device), dt)
    # the element count is a shape: read from the values (not differentiable anyway)
    s64 = start.detach().to(torch.float64).reshape(())
    l64 = limit.detach().to(torch.float64).reshape(())
    d64 = delta.detach().to(torch.float64).reshape(())
    n = int(max(math.ceil(float((l64 - s64) / d64)), 0))
    work = torch.float64 if dt == torch.float64 else torch.float32
    i = torch.arange(n, dtype=work, device=start.device)
    return (start.reshape(()).to(work) + i * delta.reshape(()).to(work)).to(dt)


@op("Trilu")
def trilu(ctx, x, k=None):
    kk = _scalar_int(k, 0) if k is not None else 0
    upper = int(ctx.attr("upper", 1))
    if x.dtype in _WIDE_U or x.dtype == torch.bool:
        xi = _int_view(x).to(torch.int64) if x.dtype != torch.bool else x.to(torch.uint8)
        y = torch.triu(xi, kk) if upper else torch.tril(xi, kk)
        return y.to(torch.bool) if x.dtype == torch.bool else _int_back(y, x.dtype)
    return torch.triu(x, kk) if upper else torch.tril(x, kk)


def _cum(ctx, x, axis_t, fn, ident: int):
    ax = _axis(_scalar_int(axis_t), x.dim())
    exclusive = int(ctx.attr("exclusive", 0))
    reverse = int(ctx.attr("reverse", 0))
    dt = x.dtype
    xi = _int_view(x) if not _is_float(x) else x
    if reverse:
        xi = xi.flip(ax)
    if exclusive:
        n = xi.shape[ax]
        pad_shape = list(xi.shape)
        pad_shape[ax] = 1
        fill = torch.full(pad_shape, ident, dtype=xi.dtype, device=xi.device)
        xi = torch.cat([fill, xi.narrow(ax, 0, max(n - 1, 0))], dim=ax)
    y = fn(xi, ax, dtype=xi.dtype)
    if reverse:
        y = y.flip(ax)
    return y if _is_float(x) else _int_back(y, dt)


@op("CumSum")
def cumsum(ctx, x, axis_t):
    return _cum(ctx, x, axis_t, torch.cumsum, 0)


@op("CumProd")
def cumprod(ctx, x, axis_t):
    return _cum(ctx, x, axis_t, torch.cumprod, 1)


# ---------------------------------------------------------------------------------------------
# windows, mel matrix
# ---------------------------------------------------------------------------------------------
def _window(ctx, size, terms):
    n = _scalar_int(size)
    periodic = int(ctx.attr("periodic", 1))
    dt = _dtype_attr(ctx.attr("output_datatype", 1))
    denom = n if periodic else n - 1
    i = torch.arange(n, dtype=torch.float64, device=size.device if isinstance(size, torch.Tensor) else None)
    y = torch.zeros(n, dtype=torch.float64, device=i.device)
    for k, c in enumerate(terms):
        y = y + c * torch.cos(i * (2.0 * math.pi * k / denom)) if k else y + c
    return y.to(dt) if dt.is_floating_point else y.to(dt)


@op("HannWindow")
def hann_window(ctx, size):
    return _window(ctx, size, (0.5, -0.5))


@op("HammingWindow")
def hamming_window(ctx, size):
    alpha = 25.0 / 46.0
    return _window(ctx, size, (alpha, -(1.0 - alpha)))


@op("BlackmanWindow")
def blackman_window(ctx, size):
    return _window(ctx, size, (0.42, -0.5, 0.08))


@op("MelWeightMatrix")
def mel_weight_matrix(ctx, num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz):
    n_mel = _scalar_int(num_mel_bins)
    n_dft = _scalar_int(dft_length)
    dt = _dtype_attr(ctx.attr("output_datatype", 1))
    n_spec = n_dft // 2 + 1
    lo = lower_edge_hertz.detach().to(torch.float64).reshape(())
    hi = upper_edge_hertz.detach().to(torch.float64).reshape(())
    sr = sample_rate.detach().to(torch.float64).reshape(())
    ln10 = math.log(10.0)
    lo_mel = 2595.0 * torch.log1p(lo / 700.0) / ln10
    hi_mel = 2595.0 * torch.log1p(hi / 700.0) / ln10
    step = (hi_mel - lo_mel) / (n_mel + 2)
    bins = torch.arange(n_mel + 2, dtype=torch.float64) * step + lo_mel
    bins = 700.0 * torch.expm1(bins / 2595.0 * ln10)
    bins = torch.floor(((n_dft + 1) * bins) / sr).to(torch.int64).tolist()
    out = torch.zeros(n_spec, n_mel, dtype=torch.float64)
    j = torch.arange(n_spec, dtype=torch.float64)
    cols = []
    for i in range(n_mel):
        lft, ctr, rgt = bins[i], bins[i + 1], bins[i + 2]
        col = torch.zeros(n_spec, dtype=torch.float64)
        if ctr - lft == 0:
            if 0 <= ctr < n_spec:
                col = torch.where(j == ctr, torch.ones_like(col), col)
        else:
            up = (j - lft) / float(ctr - lft)
            col = torch.where((j >= lft) & (j <= ctr), up, col)
        if rgt - ctr > 0:
            down = (rgt - j) / float(rgt - ctr)
            col = torch.where((j >= ctr) & (j < rgt), down, col)
        cols.append(col)
    if cols:
        out = torch.stack(cols, dim=1)
    return out.to(dt).to(lower_edge_hertz.device)


# ---------------------------------------------------------------------------------------------
# DFT / STFT
# ---------------------------------------------------------------------------------------------
def _to_complex(x: torch.Tensor) -> torch.Tensor:
    """[..., 1] real or [..., 2] (re, im) -> complex tensor of shape [...]."""
    w = _work(x)
    if w.shape[-1] == 1:
        return torch.complex(w[..., 0], torch.zeros_like(w[..., 0]))
    return torch.complex(w[..., 0], w[..., 1])


def _from_complex(c: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return torch.stack([c.real, c.imag], dim=-1).to(dt)


def _dft(x: torch.Tensor, length, ax: int, inverse: bool, onesided: bool) -> torch.Tensor:
    dt = x.dtype
    ax = _axis(ax, x.dim())
    if ax == x.dim() - 1:
        raise ValueError("DFT axis cannot be the last (real/imaginary) dimension")
    n_in = x.shape[ax]
    if length is None:
        length = 2 * (n_in - 1) if (inverse and onesided) else n_in
    c = _to_complex(x)
    if inverse:
        if onesided:
            y = torch.fft.irfft(c, n=length, dim=ax)
            return y.unsqueeze(-1).to(dt)
        return _from_complex(torch.fft.ifft(c, n=length, dim=ax), dt)
    y = torch.fft.fft(c, n=length, dim=ax)
    if onesided:
        y = y.narrow(ax, 0, length // 2 + 1)
    return _from_complex(y, dt)


@op("DFT", since=17)
def dft_17(ctx, x, dft_length=None):
    length = _scalar_int(dft_length) if dft_length is not None else None
    return _dft(x, length, int(ctx.attr("axis", 1)), bool(ctx.attr("inverse", 0)), bool(ctx.attr("onesided", 0)))


@op("DFT", since=20)
def dft_20(ctx, x, dft_length=None, axis_t=None):
    length = _scalar_int(dft_length) if dft_length is not None and dft_length.numel() else None
    ax = _scalar_int(axis_t, -2) if axis_t is not None and axis_t.numel() else -2
    return _dft(x, length, ax, bool(ctx.attr("inverse", 0)), bool(ctx.attr("onesided", 0)))


@op("STFT")
def stft(ctx, signal, frame_step, window=None, frame_length=None):
    onesided = int(ctx.attr("onesided", 1))
    step = _scalar_int(frame_step)
    dt = signal.dtype
    if frame_length is not None and frame_length.numel():
        flen = _scalar_int(frame_length)
    elif window is not None:
        flen = window.shape[0]
    else:
        flen = signal.shape[-2]
    n_frames = 1 + (signal.shape[-2] - flen) // step
    c = _to_complex(signal)  # [batch, length]
    frames = c.unfold(-1, flen, step)[..., :n_frames, :]  # [batch, frames, flen]
    if window is not None:
        frames = frames * _work(window).to(frames.real.dtype)
    y = torch.fft.fft(frames, n=flen, dim=-1)
    if onesided:
        y = y[..., : flen // 2 + 1]
    return _from_complex(y, dt)
