"""Elementwise ONNX ops: unary math, activations, broadcasting binary ops, variadic ops, casts.

Every function is pure torch so that vmap/jacrev/jacfwd run through it. Integer inputs keep ONNX
integer semantics (truncating Div, Mod's fmod attribute, wrapping overflow). torch has little kernel
support for uint16/uint32/uint64, so those are computed in int64 (uint16/32 converted, uint64
reinterpreted bit for bit) and converted back; the ops where unsigned 64-bit order matters
(comparisons, division, right shift, max/min) handle it explicitly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ....errors import UnsupportedError
from ..registry import onnx_to_torch_dtype, op
from ._util import clamp_closed

_WIDE_U = (torch.uint16, torch.uint32)
_U64 = torch.uint64
_I64_MIN = -(2 ** 63)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _to_signed(t: torch.Tensor) -> torch.Tensor:
    """uint16/32 -> int64 (value preserving); uint64 -> int64 (bit preserving); others unchanged."""
    if t.dtype in _WIDE_U:
        return t.to(torch.int64)
    if t.dtype == _U64:
        return t.view(torch.int64)
    return t


def _from_signed(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of _to_signed (uint16/32 wrap modulo 2**bits)."""
    if t.dtype == dtype:
        return t
    if dtype == _U64 and t.dtype == torch.int64:
        return t.view(_U64)
    return t.to(dtype)


def _u64_key(t: torch.Tensor) -> torch.Tensor:
    """An int64 tensor ordered as the uint64 bit patterns in ``t`` (an int64 view) are."""
    return torch.bitwise_xor(t, torch.tensor(_I64_MIN, dtype=torch.int64, device=t.device))


def _order_keys(a: torch.Tensor, b: torch.Tensor):
    """Tensors comparable with torch's < etc. that order as a and b do (ONNX dtype semantics)."""
    if a.dtype == _U64 or b.dtype == _U64:
        return _u64_key(_to_signed(a)), _u64_key(_to_signed(b))
    return _to_signed(a), _to_signed(b)


def _lshr64(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int64 bit patterns by s in [0, 63]."""
    mask = torch.bitwise_not(torch.bitwise_left_shift(torch.bitwise_left_shift(torch.full_like(a, -1), 63 - s), 1))
    return torch.bitwise_and(torch.bitwise_right_shift(a, s), mask)


def _u64_divmod(a: torch.Tensor, b: torch.Tensor):
    """Unsigned 64-bit quotient and remainder of int64 bit patterns a, b (b != 0)."""
    a, b = torch.broadcast_tensors(a, b)
    one = torch.ones_like(a)
    ka, kb = _u64_key(a), _u64_key(b)
    big_b = b < 0  # b >= 2**63: quotient is 0 or 1
    q_big = (ka >= kb).to(a.dtype)
    bs = torch.where(big_b, one, b)
    q = torch.bitwise_left_shift(torch.div(_lshr64(a, one), bs, rounding_mode="trunc"), one)
    r = a - q * bs
    q = q + (_u64_key(r) >= _u64_key(bs)).to(a.dtype)
    q = torch.where(big_b, q_big, q)
    r = a - q * b
    return q, r


def _unary_float(fn):
    """Wrap a float unary torch function; low-precision inputs are computed in float32."""

    def impl(ctx, x):
        if x.dtype in (torch.float16, torch.bfloat16):
            return fn(x.float()).to(x.dtype)
        return fn(x)

    return impl


def _reg_unary(name: str, fn, since: int = 1):
    op(name, since=since)(_unary_float(fn))


# ---------------------------------------------------------------------------------------------
# unary math
# ---------------------------------------------------------------------------------------------
for _name, _fn in {
    "Reciprocal": torch.reciprocal, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Erf": torch.erf, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin,
    "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh,
    "Acosh": torch.acosh, "Atanh": torch.atanh, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh,
    "Softsign": F.softsign, "Mish": F.mish,
}.items():
    _reg_unary(_name, _fn)


@op("Abs")
def abs_(ctx, x):
    if x.dtype == torch.bool or x.dtype in (torch.uint8, _U64, *_WIDE_U):
        return x
    return torch.abs(x)


@op("Neg")
def neg(ctx, x):
    if x.dtype in _WIDE_U or x.dtype == _U64:
        return _from_signed(torch.neg(_to_signed(x)), x.dtype)
    return torch.neg(x)


@op("Sign")
def sign(ctx, x):
    if x.dtype in _WIDE_U or x.dtype == _U64:
        return (x != 0).to(x.dtype)
    return torch.sign(x)


@op("Floor")
def floor(ctx, x):
    return torch.floor(x) if _is_float(x) else x


@op("Ceil")
def ceil(ctx, x):
    return torch.ceil(x) if _is_float(x) else x


@op("Round")
def round_(ctx, x):
    # torch.round rounds half to even, as ONNX requires
    return torch.round(x) if _is_float(x) else x


@op("IsNaN")
def isnan(ctx, x):
    return torch.isnan(x)


@op("IsInf")
def isinf(ctx, x):
    pos = int(ctx.attr("detect_positive", 1))
    negv = int(ctx.attr("detect_negative", 1))
    if pos and negv:
        return torch.isinf(x)
    if pos:
        return torch.isposinf(x)
    if negv:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
@op("Relu")
def relu(ctx, x):
    if not _is_float(x):
        xs = _to_signed(x)
        if x.dtype == _U64 or x.dtype in _WIDE_U or x.dtype == torch.uint8:
            return x
        return torch.clamp(xs, min=0)
    return torch.relu(x)


@op("LeakyRelu")
def leaky_relu(ctx, x):
    alpha = float(ctx.attr("alpha", 0.01))
    return torch.where(x >= 0, x, x * alpha)


@op("PRelu", since=7)
def prelu(ctx, x, slope):
    return torch.where(x < 0, x * slope, x).to(x.dtype)


@op("PRelu", since=1)
def prelu_6(ctx, x, slope):
    # before opset 7 a 1-D slope is per channel (axis 1), not numpy-broadcast from the right
    if slope.dim() == 1 and slope.numel() > 1 and x.dim() > 2 and slope.numel() == x.shape[1]:
        slope = slope.reshape([slope.numel()] + [1] * (x.dim() - 2))
    return prelu(ctx, x, slope)


def _nonpos(x):
    """min(x, 0) for the exp branch of Elu/Selu/Celu (keeps expm1 from overflowing where x > 0) with derivative 1
    at x == 0, so that at the kink those ops take the x <= 0 branch's derivative in every torch release
    (torch.clamp(x, max=0)'s derivative at 0 is 1 up to torch 2.13 and 0 from torch 2.14)."""
    return torch.where(x > 0, torch.zeros((), dtype=x.dtype, device=x.device), x)


@op("Elu")
def elu(ctx, x):
    """Derivative at the kink x == 0: the x <= 0 branch's, alpha (torch's own elu does the same)."""
    alpha = float(ctx.attr("alpha", 1.0))
    return torch.where(x > 0, x, alpha * torch.expm1(_nonpos(x)))


@op("Selu")
def selu(ctx, x):
    """Derivative at the kink x == 0: the x <= 0 branch's, gamma * alpha."""
    alpha = float(ctx.attr("alpha", 1.67326319217681884765625))
    gamma = float(ctx.attr("gamma", 1.05070102214813232421875))
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(_nonpos(x)))


@op("Celu")
def celu(ctx, x):
    """max(0, x) + min(0, alpha * (exp(x / alpha) - 1)): continuously differentiable, derivative 1 at x == 0
    (a sum of clamps would count it twice or not at all there, depending on the torch release)."""
    alpha = float(ctx.attr("alpha", 1.0))
    return torch.where(x > 0, x, alpha * torch.expm1(_nonpos(x) / alpha))


@op("Gelu")
def gelu(ctx, x):
    approx = ctx.attr("approximate", "none")
    if isinstance(approx, bytes):
        approx = approx.decode()
    return _unary_float(lambda t: F.gelu(t, approximate="tanh" if approx == "tanh" else "none"))(ctx, x)


@op("HardSigmoid")
def hard_sigmoid(ctx, x):
    """max(0, min(1, alpha * x + beta)); derivative alpha on the closed interval where 0 <= alpha x + beta <= 1
    (at the kinks too: Clip's convention, ``_util.clamp_closed``), 0 outside."""
    alpha = float(ctx.attr("alpha", 0.2))
    beta = float(ctx.attr("beta", 0.5))
    return clamp_closed(x * alpha + beta, 0.0, 1.0)


@op("HardSwish")
def hard_swish(ctx, x):
    """x * HardSigmoid(x) with alpha 1/6, beta 0.5; at the kinks x = -3 and 3 the derivative is the one from
    inside the interval, -0.5 and 1.5 (as torch's own hardswish)."""
    return x * clamp_closed(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@op("Softplus")
def softplus(ctx, x):
    # log(exp(x) + 1) = logaddexp(x, 0): stable, and its derivative is sigmoid(x) everywhere
    # (max(x, 0) + log1p(exp(-|x|)) has the right value but a wrong subgradient at exactly 0).
    return torch.logaddexp(x, torch.zeros_like(x))


@op("ThresholdedRelu")
def thresholded_relu(ctx, x):
    alpha = float(ctx.attr("alpha", 1.0))
    return torch.where(x > alpha, x, torch.zeros_like(x))


@op("Shrink")
def shrink(ctx, x):
    bias = float(ctx.attr("bias", 0.0))
    lambd = float(ctx.attr("lambd", 0.5))
    if _is_float(x):
        zero = torch.zeros_like(x)
        return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero))
    xs = _to_signed(x).to(torch.float64)
    y = torch.where(xs < -lambd, xs + bias, torch.where(xs > lambd, xs - bias, torch.zeros_like(xs)))
    return y.to(torch.int64).to(x.dtype) if x.dtype not in (_U64,) else y.to(torch.int64).view(_U64)


@op("Swish")
def swish(ctx, x):
    alpha = float(ctx.attr("alpha", 1.0))
    return x * torch.sigmoid(x * alpha)


# ---------------------------------------------------------------------------------------------
# binary arithmetic (numpy broadcasting)
# ---------------------------------------------------------------------------------------------
def _int_binary(a, b, fn):
    """Apply fn on integer tensors, going through int64 for dtypes torch lacks kernels for."""
    dt = a.dtype
    if dt in _WIDE_U or dt == _U64:
        return _from_signed(fn(_to_signed(a), _to_signed(b)), dt)
    return fn(a, b)


def _same(a, b):
    """ONNX binary ops take equal dtypes; follow a's dtype if an exporter mixed them."""
    if a.dtype != b.dtype and not (_is_float(a) and b.dtype == torch.bool):
        b = b.to(a.dtype) if b.dtype != _U64 else b.view(torch.int64).to(a.dtype)
    return a, b


@op("Add")
def add(ctx, a, b):
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return torch.logical_or(a, b)
    a, b = _same(a, b)
    return _int_binary(a, b, torch.add) if not _is_float(a) else a + b


@op("Sub")
def sub(ctx, a, b):
    a, b = _same(a, b)
    return _int_binary(a, b, torch.sub) if not _is_float(a) else a - b


@op("Mul")
def mul(ctx, a, b):
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return torch.logical_and(a, b)
    a, b = _same(a, b)
    return _int_binary(a, b, torch.mul) if not _is_float(a) else a * b


@op("Div")
def div(ctx, a, b):
    a, b = _same(a, b)
    if _is_float(a):
        return a / b
    if a.dtype == _U64:
        q, _ = _u64_divmod(_to_signed(a), _to_signed(b))
        return q.view(_U64)
    return _int_binary(a, b, lambda x, y: torch.div(x, y, rounding_mode="trunc"))


@op("Pow")
def pow_(ctx, a, b):
    if _is_float(a):
        if not _is_float(b):
            b = _to_signed(b).to(a.dtype) if b.dtype != _U64 else b.view(torch.int64).to(a.dtype)
        elif b.dtype != a.dtype:
            work = torch.promote_types(a.dtype, b.dtype)
            return torch.pow(a.to(work), b.to(work)).to(a.dtype)
        return torch.pow(a, b)
    # integer base: result has the base's type
    if _is_float(b):
        r = torch.pow(_to_signed(a).to(torch.float64), b.to(torch.float64))
        return _from_signed(r.to(torch.int64), a.dtype)
    return _from_signed(torch.pow(_to_signed(a).to(torch.int64), _to_signed(b).to(torch.int64)), a.dtype)


@op("Mod")
def mod(ctx, a, b):
    fmod = int(ctx.attr("fmod", 0))
    a, b = _same(a, b)
    if _is_float(a):
        if fmod:
            return torch.fmod(a, b)
        r = torch.remainder(a, b)
        # numpy/ONNX: an infinite divisor and finite dividend give a when signs agree, else b
        inf_b = torch.isinf(b) & torch.isfinite(a) & (a != 0)
        return torch.where(inf_b, torch.where((a > 0) == (b > 0), a, b), r)
    if a.dtype == _U64:
        _, r = _u64_divmod(_to_signed(a), _to_signed(b))
        return r.view(_U64)
    if fmod:
        return _int_binary(a, b, torch.fmod)
    return _int_binary(a, b, torch.remainder)


@op("BitShift")
def bitshift(ctx, x, y):
    direction = ctx.attr("direction", "LEFT")
    if isinstance(direction, bytes):
        direction = direction.decode()
    dt = x.dtype
    bits = torch.iinfo(dt).bits
    signed = dt.is_signed
    xs = _to_signed(x)
    ys = _to_signed(y).to(xs.dtype) if y.dtype != dt else _to_signed(y)
    if dt == _U64:
        out_of_range = (ys < 0) | (ys >= 64)  # as unsigned: >= 2**63 has the sign bit
    else:
        out_of_range = (ys < 0) | (ys >= bits)
    ys_c = torch.where(out_of_range, torch.zeros_like(ys), ys)
    if direction == "RIGHT":
        if dt == _U64:
            r = _lshr64(xs, ys_c)
        else:
            r = torch.bitwise_right_shift(xs, ys_c)
        fill = torch.where(xs < 0, torch.full_like(xs, -1), torch.zeros_like(xs)) if signed else torch.zeros_like(xs)
        r = torch.where(out_of_range, fill, r)
    else:
        if signed and dt != torch.int64:
            r = torch.bitwise_left_shift(xs.to(torch.int64), ys_c.to(torch.int64)).to(dt)
        else:
            r = torch.bitwise_left_shift(xs, ys_c)
        r = torch.where(out_of_range, torch.zeros_like(r), r)
    return _from_signed(r, dt)


# ---------------------------------------------------------------------------------------------
# bitwise / logical / comparisons
# ---------------------------------------------------------------------------------------------
@op("BitwiseAnd")
def bitwise_and(ctx, a, b):
    return _int_binary(a, b, torch.bitwise_and)


@op("BitwiseOr")
def bitwise_or(ctx, a, b):
    return _int_binary(a, b, torch.bitwise_or)


@op("BitwiseXor")
def bitwise_xor(ctx, a, b):
    return _int_binary(a, b, torch.bitwise_xor)


@op("BitwiseNot")
def bitwise_not(ctx, x):
    return _from_signed(torch.bitwise_not(_to_signed(x)), x.dtype)


@op("And")
def and_(ctx, a, b):
    return torch.logical_and(a, b)


@op("Or")
def or_(ctx, a, b):
    return torch.logical_or(a, b)


@op("Xor")
def xor(ctx, a, b):
    return torch.logical_xor(a, b)


@op("Not")
def not_(ctx, x):
    return torch.logical_not(x)


def _cmp(fn):
    def impl(ctx, a, b):
        if _is_float(a) or _is_float(b) or a.dtype == torch.bool:
            return fn(a, b)
        ka, kb = _order_keys(a, b)
        return fn(ka, kb)

    return impl


for _name, _fn in {"Equal": torch.eq, "Greater": torch.gt, "GreaterOrEqual": torch.ge, "Less": torch.lt,
                   "LessOrEqual": torch.le}.items():
    op(_name)(_cmp(_fn))


# ---------------------------------------------------------------------------------------------
# variadic
# ---------------------------------------------------------------------------------------------
def _extreme(xs, pick_max: bool):
    xs = [x for x in xs if x is not None]
    out = xs[0]
    for x in xs[1:]:
        if _is_float(out):
            out = torch.maximum(out, x) if pick_max else torch.minimum(out, x)
        else:
            ka, kb = _order_keys(out, x)
            take = (kb > ka) if pick_max else (kb < ka)
            oa, ob = torch.broadcast_tensors(_to_signed(out), _to_signed(x))
            out = _from_signed(torch.where(take, ob, oa), out.dtype)
    return out


@op("Max")
def max_(ctx, *xs):
    return _extreme(xs, True)


@op("Min")
def min_(ctx, *xs):
    return _extreme(xs, False)


@op("Sum")
def sum_(ctx, *xs):
    xs = [x for x in xs if x is not None]
    out = xs[0]
    for x in xs[1:]:
        out = add(ctx, out, x)
    return out


@op("Mean")
def mean(ctx, *xs):
    xs = [x for x in xs if x is not None]
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    if len(xs) == 1:
        return out
    return out / len(xs)


def _clip(x, lo, hi):
    if not _is_float(x) and (x.dtype in _WIDE_U or x.dtype == _U64):
        out = x
        if lo is not None:
            out = _extreme([out, lo], True)
        if hi is not None:
            out = _extreme([out, hi], False)
        return out
    if lo is None and hi is None:
        return x
    if not _is_float(x):  # min > max gives max, as numpy.clip; no derivative
        return torch.clamp(x, min=lo, max=hi)
    return clamp_closed(x, lo, hi)


@op("Clip", since=1)
def clip_6(ctx, x):
    """Clip: ``Min(max, Max(input, min))`` (onnx.reference: ``numpy.clip``; ``min > max`` gives ``max``).

    Derivative (ONNX defines none; the convention here, the same in every torch release and on the
    constant-bound fast path ``optimize._ClipConst``): 1 on the closed interval ``min <= x <= max`` -- a value
    exactly at a bound passes the gradient -- and 0 outside; see ``_util.clamp_closed``.
    """
    lo = ctx.attr("min", None)
    hi = ctx.attr("max", None)
    lo_t = torch.tensor(lo, dtype=x.dtype, device=x.device) if lo is not None else None
    hi_t = torch.tensor(hi, dtype=x.dtype, device=x.device) if hi is not None else None
    return _clip(x, lo_t, hi_t)


@op("Clip", since=11)
def clip_11(ctx, x, lo=None, hi=None):
    """Clip with ``min``/``max`` as (scalar) inputs; values and derivative as ``clip_6``: d/dx = 1 on the closed
    interval ``[min, max]``, 0 outside; d/dmin = 1 where ``x < min``, d/dmax = 1 where the result exceeds max."""
    if lo is not None:
        lo = lo.reshape(()) if lo.numel() == 1 else lo
        lo = lo.to(x.dtype) if lo.dtype != x.dtype else lo
    if hi is not None:
        hi = hi.reshape(()) if hi.numel() == 1 else hi
        hi = hi.to(x.dtype) if hi.dtype != x.dtype else hi
    return _clip(x, lo, hi)


@op("Where")
def where(ctx, cond, a, b):
    if a.dtype != b.dtype and _is_float(a) and _is_float(b):
        b = b.to(a.dtype)
    dt = a.dtype
    if dt in _WIDE_U or dt == _U64:
        return _from_signed(torch.where(cond.to(torch.bool), _to_signed(a), _to_signed(b)), dt)
    return torch.where(cond.to(torch.bool), a, b)


# ---------------------------------------------------------------------------------------------
# casts, identity, dropout
# ---------------------------------------------------------------------------------------------
def _cast_to(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    if x.dtype == dt:
        return x
    if dt == torch.bool:
        return x != 0
    if x.dtype == torch.bool:
        return x.to(dt)
    if _is_float(x) and not (dt.is_floating_point or dt.is_complex):
        # float -> integer: truncate toward zero (NaN/inf are undefined in ONNX)
        if dt == _U64:
            return x.to(torch.int64).view(_U64)
        return x.to(dt)
    if x.dtype == _U64 and (dt.is_floating_point or dt.is_complex):
        s = x.view(torch.int64)
        hi = _lshr64(s, torch.full_like(s, 32)).to(torch.float64)
        lo = torch.bitwise_and(s, 0xFFFFFFFF).to(torch.float64)
        return (hi * 4294967296.0 + lo).to(dt)  # one rounding, as a direct conversion
    if x.dtype == _U64:
        return x.view(torch.int64).to(dt)
    if dt == _U64:
        return x.to(torch.int64).view(_U64)
    return x.to(dt)


def _dtype_from_attr(ctx, to) -> torch.dtype:
    dt = onnx_to_torch_dtype(int(to))
    if dt is None:
        raise UnsupportedError(f"Cast to ONNX element type {to} is not supported (torch cannot hold it)")
    return dt


_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
           if hasattr(torch, n)}


def _cast_to_float8(x: torch.Tensor, dt: torch.dtype, saturate: bool) -> torch.Tensor:
    """ONNX Cast to a float8 type: round to nearest even; ``saturate`` clamps overflow (and inf) to the
    largest finite value, otherwise overflow is NaN (inf for float8e5m2, the one type with infinities)."""
    xf = x.to(torch.float32)
    mx = torch.finfo(dt).max
    if saturate:
        y = torch.where(torch.isinf(xf), torch.sign(xf) * mx, xf.clamp(-mx, mx))
        return y.to(dt)
    if dt == torch.float8_e4m3fn:  # torch saturates this one; ONNX wants NaN beyond the rounding range
        limit = 464.0  # values in (448, 464] round (to even) down to 448
        xf = torch.where(xf.abs() > limit, torch.full_like(xf, float("nan")), xf)
    return xf.to(dt)


def _cast_checked(ctx, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    if dt in _FLOAT8:
        return _cast_to_float8(x, dt, bool(ctx.attr("saturate", 1)))
    if x.dtype in _FLOAT8:
        return _cast_to(x.to(torch.float32), dt)
    return _cast_to(x, dt)


@op("Cast")
def cast(ctx, x):
    return _cast_checked(ctx, x, _dtype_from_attr(ctx, ctx.attr("to")))


@op("CastLike")
def cast_like(ctx, x, like):
    return _cast_checked(ctx, x, like.dtype)


@op("BitCast")
def bitcast(ctx, x):
    dt = _dtype_from_attr(ctx, ctx.attr("to"))
    if x.dtype == dt:
        return x
    if x.dtype.itemsize != dt.itemsize:
        raise ValueError(f"BitCast between types of different widths ({x.dtype} -> {dt})")
    if x.dtype == torch.bool or dt == torch.bool:
        mid = x.view(torch.uint8) if x.dtype == torch.bool else x
        return mid.view(torch.bool) if dt == torch.bool else mid.view(dt)
    return x.contiguous().view(dt)


@op("Identity")
def identity(ctx, x=None):
    return x


@op("Dropout", since=1)
def dropout_7(ctx, x, *_):
    if ctx.n_outputs > 1:
        mask = torch.ones_like(x, dtype=torch.bool) if ctx.opset >= 10 else torch.ones_like(x)
        return x, mask
    return x


@op("Dropout", since=12)
def dropout_12(ctx, x, ratio=None, training_mode=None):
    if training_mode is not None and bool(training_mode.reshape(-1)[0]):
        r = 0.5 if ratio is None else ratio
        if not (isinstance(r, torch.Tensor) and not _is_float(r)) and float(r) == 0.0:
            pass  # ratio 0: nothing is dropped even in training mode
        else:
            raise UnsupportedError("Dropout in training mode is random; training-mode dropout is unsupported")
    if ctx.n_outputs > 1:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x
