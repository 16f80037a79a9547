"""The numerical core: vjp/jvp, full Jacobians (chunked, memory-bounded), per-sample Jacobians over a batch.

Conventions (those of ``torch.func``): for ``y = f(x)``, ``J`` has shape ``y.shape + x.shape`` and
``J[i..., j...] = d y[i...] / d x[j...]``. Seen as a matrix it is ``m x n`` with ``m = y.numel()``,
``n = x.numel()``; a *row* is a vjp with a basis vector of the output, a *column* a jvp with a basis vector
of the input.

Every batched primitive tries three paths in order and records which one ran:

``vmap``
    ``torch.func.vmap`` over the basis/probe vectors (one batched backward or forward-mode pass).
``batched``
    for models ``vmap`` cannot go through (TorchScript, data-dependent control flow) whose leading axis is a
    batch axis of size 1 and which treat samples independently (checked numerically, once): the input is
    replicated along the batch axis and one ``autograd.grad`` (or one forward-mode pass) gives all the
    vectors at once -- e.g. one backward of a sum gives every per-sample gradient.
``loop``
    one vjp/jvp per vector, the last resort.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError, RuntimeFailure

__all__ = ["jacobian", "vjp", "jvp", "per_sample_jacobian", "prepare", "Target", "JacobianInfo",
           "JacobianTooLarge", "parse_memory", "DEFAULT_MAX_MEMORY"]

DEFAULT_MAX_MEMORY = 1 << 30  # bytes of working memory per chunk (1 GiB)


class JacobianTooLarge(InputError):
    """A full Jacobian that would not fit in the memory budget (or in memory): use the estimators instead.
    ``needed`` is the bytes it would take (J plus the working memory of one row/column), ``budget`` the limit."""

    def __init__(self, message: str, needed: int = 0, budget: int = 0):
        super().__init__(message)
        self.needed = int(needed)
        self.budget = int(budget)


def parse_memory(value: int | float | str | None) -> int:
    """``1073741824``, ``"512MB"``, ``"2GiB"``, ``"1.5G"`` -> bytes. None -> the default."""
    if value is None:
        return DEFAULT_MAX_MEMORY
    if isinstance(value, (int, float)):
        if value <= 0:
            raise InputError("max_memory must be positive")
        return int(value)
    s = str(value).strip().lower().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
             "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000 ** 4,
             "tib": 1 << 40}
    num = s.rstrip("kmgtib")
    unit = s[len(num):]
    try:
        n = float(num)
    except ValueError:
        raise InputError(f"cannot read memory size {value!r}; use e.g. 512MB or 2GiB") from None
    if unit not in units or n <= 0:
        raise InputError(f"cannot read memory size {value!r}; use e.g. 512MB or 2GiB")
    return int(n * units[unit])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes that a new tensor can take on ``device`` (MemAvailable for the CPU), None when unknown."""
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
            return int(free)
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                            or "not enough memory" in msg)


# ---------------------------------------------------------------------------------------------------------
# what is differentiated
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JacobianInfo:
    """How a Jacobian (or a batch of vjp/jvp) was computed."""

    mode: str                     # "reverse" | "forward"
    path: str                     # "vmap" | "batched" | "loop" (see the module docstring)
    output_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    dtype: str
    device: str
    chunk_size: int = 0
    chunks: int = 0
    oom_retries: int = 0
    bytes: int = 0
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "path": self.path, "output_shape": list(self.output_shape),
                "input_shape": list(self.input_shape), "dtype": self.dtype, "device": self.device,
                "chunk_size": self.chunk_size, "chunks": self.chunks, "oom_retries": self.oom_retries,
                "bytes": self.bytes, "notes": list(self.notes)}


class Target:
    """A function of one tensor and the point where it is differentiated, with batched vjp/jvp.

    Built by :func:`prepare` from a jacaudit Model, a ``torch.nn.Module`` or any callable.
    """

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, name: str = "input",
                 output_name: str = "output", model: Any = None, notes: Sequence[str] = (), evaluate: bool = True):
        self.f = f
        self.x = x.detach()
        self.name = name
        self.output_name = output_name
        self.model = model
        self.notes = list(notes)
        self._y: torch.Tensor | None = None
        self._pullback = None
        self.vjp_path: str | None = None
        self.jvp_path: str | None = None
        self._batch_ok: bool | None = None
        if evaluate:
            self.y  # noqa: B018  (checks the output now)

    @property
    def y(self) -> torch.Tensor:
        """f(x), computed on first use (a forward pass)."""
        if self._y is not None:
            return self._y
        f, output_name = self.f, self.output_name
        with torch.no_grad():
            y = f(self.x)
        if isinstance(y, (tuple, list)):
            raise InputError(f"the function returns {len(y)} outputs; choose one with output=")
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            raise InputError(f"output {output_name!r} is not a float tensor "
                             f"({getattr(y, 'dtype', type(y).__name__)}); it has no derivative")
        self._y = y.detach()
        return self._y

    # -- shapes ----------------------------------------------------------------------------------------
    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.y.shape)

    @property
    def n(self) -> int:
        return self.x.numel()

    @property
    def m(self) -> int:
        return self.y.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    # -- single primitives ------------------------------------------------------------------------------
    def pullback(self):
        if self._pullback is None:
            _, self._pullback = torch.func.vjp(self.f, self.x)
        return self._pullback

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """u^T J (u has the output's shape; the result the input's)."""
        try:
            return self.pullback()(u.reshape(self.out_shape).to(self.y))[0]
        except Exception as e:
            if _is_oom(e):
                raise
            x = self.x.clone().requires_grad_(True)
            with torch.enable_grad():
                y = self.f(x)
                (g,) = torch.autograd.grad(y, x, u.reshape(self.out_shape).to(y), allow_unused=True)
            return torch.zeros_like(self.x) if g is None else g

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """J v (v has the input's shape; the result the output's)."""
        v = v.reshape(self.in_shape).to(self.x)
        try:
            return torch.func.jvp(self.f, (self.x,), (v,))[1]
        except Exception as e:
            if _is_oom(e):
                raise
            return torch.autograd.functional.jvp(self.f, self.x, v)[1]

    # -- batch independence -----------------------------------------------------------------------------
    def batch_independent(self) -> bool:
        """True when the leading axis is a batch axis of size 1 and samples do not interact (checked)."""
        if self._batch_ok is not None:
            return self._batch_ok
        ok = False
        if self.x.ndim >= 1 and self.x.shape[0] == 1 and self.y.ndim >= 1 and self.y.shape[0] == 1:
            try:
                g = torch.Generator(device="cpu").manual_seed(1234)
                noise = torch.randn(self.in_shape, generator=g, dtype=torch.float64).to(self.x)
                noise = noise * (self.x.abs().mean() + 1e-3) * 0.5
                x2 = self.x + noise
                with torch.no_grad():
                    yb = self.f(torch.cat([self.x, x2, self.x]))
                    y2 = self.f(x2)
                if tuple(yb.shape) == (3, *self.out_shape[1:]):
                    tol = 1e-4 if self.dtype == torch.float32 else 1e-9
                    scale = float(self.y.abs().max()) + float(y2.abs().max()) + 1e-12
                    ok = all(float((a - b).abs().max()) <= tol * scale
                             for a, b in ((yb[0:1], self.y), (yb[1:2], y2), (yb[2:3], self.y)))
            except Exception as e:
                if _is_oom(e):
                    raise
                ok = False
        self._batch_ok = ok
        return ok

    # -- batched primitives -------------------------------------------------------------------------------
    def vjp_many(self, U: torch.Tensor) -> torch.Tensor:
        """Rows ``U[k]^T J`` for a stack ``U`` of shape ``(c, *out_shape)`` -> ``(c, *in_shape)``."""
        U = U.to(self.y)
        if self.vjp_path in (None, "vmap"):
            try:
                r = torch.func.vmap(self.pullback())(U)[0]
                self.vjp_path = "vmap"
                return r
            except Exception as e:
                if _is_oom(e):
                    raise
                self.vjp_path = None
        if self.vjp_path in (None, "batched") and self.batch_independent():
            c = U.shape[0]
            X = self.x.expand(c, *self.in_shape[1:]).clone().requires_grad_(True)
            with torch.enable_grad():
                Y = self.f(X)
                (g,) = torch.autograd.grad(Y, X, U.reshape(c, *self.out_shape[1:]), allow_unused=True)
            self.vjp_path = "batched"
            if g is None:
                g = torch.zeros_like(X)
            return g.reshape(c, *self.in_shape)
        self.vjp_path = "loop"
        return torch.stack([self.vjp(u) for u in U])

    def jvp_many(self, V: torch.Tensor) -> torch.Tensor:
        """Columns ``J V[k]`` for a stack ``V`` of shape ``(c, *in_shape)`` -> ``(c, *out_shape)``."""
        V = V.to(self.x)
        if self.jvp_path in (None, "vmap"):
            try:
                r = torch.func.vmap(lambda v: torch.func.jvp(self.f, (self.x,), (v,))[1])(V)
                self.jvp_path = "vmap"
                return r
            except Exception as e:
                if _is_oom(e):
                    raise
                self.jvp_path = None
        if self.jvp_path in (None, "batched") and self.batch_independent():
            c = V.shape[0]
            X = self.x.expand(c, *self.in_shape[1:]).contiguous()
            Vb = V.reshape(c, *self.in_shape[1:])
            try:
                _, t = torch.func.jvp(self.f, (X,), (Vb,))
            except Exception as e:
                if _is_oom(e):
                    raise
                _, t = torch.autograd.functional.jvp(self.f, X, Vb)
            self.jvp_path = "batched"
            return t.reshape(c, *self.out_shape)
        self.jvp_path = "loop"
        return torch.stack([self.jvp(v) for v in V])


def _as_tensor(x: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            import numpy as np
            if isinstance(x, np.ndarray):
                t = torch.from_numpy(np.ascontiguousarray(x))
            else:
                return x
        except ImportError:  # pragma: no cover
            return x
    if device is not None and t.device != device:
        t = t.to(device)
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t


def prepare(model: Any, x: Any, *, input: str | None = None, output: str | None = None, wrt: str | None = None,
            dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
            logits: bool = False, evaluate: bool = True) -> Target:
    """Turn (model, input) into a :class:`Target`: a function of one tensor and its point.

    ``model`` is a jacaudit Model (``x`` a tensor for ``input`` -- default the first input -- or a dict of
    tensors by input name), a ``torch.nn.Module`` or a plain callable of one tensor. ``wrt`` names the
    tensor to differentiate with respect to (an input or, for ONNX, an internal tensor); ``output`` the
    output (for ONNX any internal tensor); ``logits=True`` takes the input of a final Softmax instead.
    ``dtype`` float64 casts the model and the inputs.
    """
    from ..models import resolve_device, resolve_dtype
    from ..models.base import Model, did_you_mean

    dt = resolve_dtype(dtype)
    dev = resolve_device(device) if device is not None else None
    notes: list[str] = []
    if isinstance(model, Model):
        model = model.to(dev, dt)
        dev = model.device
        dt = dt or model.dtype
        if isinstance(x, dict):
            feeds = {k: _as_tensor(v, dev, dt) for k, v in x.items()}
        else:
            name = input or (wrt if wrt in {s.name for s in model.inputs} else None) or model.inputs[0].name
            model.input_spec(name)
            feeds = {name: _as_tensor(x, dev, dt)}
        missing = [s.name for s in model.inputs if s.name not in feeds]
        if missing:
            raise InputError(f"missing input(s) {', '.join(missing)}: pass a dict of tensors by input name")
        out_name = output or model.outputs[0].name
        out_names = [s.name for s in model.outputs]
        if out_name not in out_names:
            internal = list(model.internal_tensors())
            if not internal:
                model.output_spec(out_name)  # one line naming the outputs, with the closest matches
            elif out_name not in set(internal):
                raise InputError(f"no tensor named {out_name!r} in the graph"
                                 f"{did_you_mean(out_name, out_names + internal)}; outputs are: "
                                 f"{', '.join(out_names[:8])} (inspect --tensors lists the internal tensors)")
        if output is None and len(model.outputs) > 1:
            notes.append(f"the model has {len(model.outputs)} outputs; using the first, {out_name!r}")
        if logits:
            li = model.softmax_input(out_name)
            if li is None:
                raise InputError(f"--logits: output {out_name!r} is not produced by a Softmax")
            out_name = li
        wrt_name = wrt or input or model.inputs[0].name
        if wrt_name in feeds:
            x0 = feeds[wrt_name]
        else:
            internal = list(model.internal_tensors())
            names = set(internal)
            in_names = [s.name for s in model.inputs]
            if not names:
                raise InputError(f"wrt={wrt_name!r} is not an input{did_you_mean(wrt_name, in_names)}, and this "
                                 f"{model.format} model exposes no internal tensors (an ONNX graph does)")
            if wrt_name not in names:
                raise InputError(f"no tensor named {wrt_name!r} in the graph{did_you_mean(wrt_name, in_names + internal)}"
                                 "; inspect --tensors lists the internal tensors")
            with torch.no_grad():
                x0 = model.run(feeds, outputs=[wrt_name])[0]
        if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
            raise InputError(f"{wrt_name!r} is {getattr(x0, 'dtype', type(x0).__name__)}, not a float tensor: "
                             "it has no derivative; choose a float internal tensor with --wrt "
                             "(e.g. an embedding's output)")
        f = model.function(feeds, wrt=wrt_name, output=out_name)
        return Target(f, x0, name=wrt_name, output_name=out_name, model=model, notes=notes, evaluate=evaluate)

    # a torch module or callable
    if logits:
        raise InputError("logits=True needs a jacaudit Model (ONNX); pass the pre-softmax function instead")
    if isinstance(model, torch.nn.Module):
        params = list(model.parameters())
        p_dtype = params[0].dtype if params else None
        p_device = params[0].device if params else None
        if (dt is not None and p_dtype is not None and p_dtype != dt) or \
                (dev is not None and p_device is not None and p_device != dev):
            model = copy.deepcopy(model)
            if dt is not None:
                model = model.to(dt)
            if dev is not None:
                model = model.to(dev)
        for p in model.parameters():
            p.requires_grad_(False)
        if dt is None and p_dtype is not None and p_dtype.is_floating_point:
            dt = p_dtype
    if isinstance(x, dict):
        raise InputError("a dict of inputs needs a jacaudit Model; pass one tensor to a callable")
    x0 = _as_tensor(x, dev, dt)
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise InputError("the input must be a float tensor")
    return Target(model, x0, name=input or "input", output_name=output or "output", model=model, notes=notes,
                  evaluate=evaluate)


# ---------------------------------------------------------------------------------------------------------
# full Jacobian
# ---------------------------------------------------------------------------------------------------------
def _chunk_size(bytes_per_vector: int, total: int, max_memory: int) -> int:
    return int(max(1, min(total, max_memory // max(1, bytes_per_vector))))


def _run_chunked(total: int, chunk: int, fn: Callable[[int, int], torch.Tensor], out: torch.Tensor,
                 progress: Callable[[int, int], None] | None = None) -> tuple[int, int, int]:
    """Fill ``out[start:stop]`` with ``fn(start, stop)`` over chunks; halve the chunk on out-of-memory."""
    i = 0
    retries = 0
    chunks = 0
    while i < total:
        c = min(chunk, total - i)
        try:
            r = fn(i, i + c)
        except Exception as e:
            if not _is_oom(e):
                raise
            if c <= 1:
                raise RuntimeFailure(f"out of memory even with one row/column at a time "
                                     f"({type(e).__name__}); use the estimators or a smaller input") from None
            chunk = max(1, c // 2)
            retries += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        out[i:i + c] = r.reshape(c, -1).to(out.device)
        i += c
        chunks += 1
        if progress is not None:
            progress(i, total)
    return chunk, chunks, retries


def activation_bytes(t: Target) -> int:
    """Bytes of the tensors autograd saves in one forward of ``t`` that depend on the input (the activations
    the backward reads; constant weights are not counted): a batched vjp/jvp materialises buffers of about this
    size for every vector it carries, so it sizes the per-vector working memory of a chunk (measured on a
    two-conv model with a 295k input: 15.6 MB saved, 25.6 MB per vmapped row; 227 rows per chunk took 5.8 GB)."""
    seen: dict[int, int] = {}

    def pack(x):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            try:
                key = x.untyped_storage().data_ptr()
                seen[key] = max(seen.get(key, 0), x.untyped_storage().nbytes())
            except Exception:
                seen[id(x)] = x.numel() * x.element_size()
        return x

    x = t.x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            y = t.f(x)
        del y
    except Exception as e:
        if _is_oom(e):
            raise
        return 0
    return int(sum(seen.values()))


def _basis(start: int, stop: int, size: int, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    c = stop - start
    E = torch.zeros(c, size, dtype=like.dtype, device=like.device)
    E[torch.arange(c, device=like.device), torch.arange(start, stop, device=like.device)] = 1
    return E.reshape(c, *shape)


def full_jacobian(t: Target, *, mode: str = "auto", max_memory: int | str | None = None,
                  limit_bytes: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, JacobianInfo]:
    """The full Jacobian of a :class:`Target` and how it was computed."""
    if mode not in ("auto", "reverse", "forward"):
        raise InputError(f"mode must be auto, reverse or forward, not {mode!r}")
    budget = parse_memory(max_memory)
    m, n = t.m, t.n
    item = t.x.element_size()
    size = m * n * item
    if mode == "auto":
        mode = "reverse" if m < n else "forward"
    # the budget holds J and the working memory of a chunk: per vector, the basis vector, its result and the
    # activation-sized buffers the batched vjp/jvp materialises (measured from one forward's saved tensors)
    acts = 2 * activation_bytes(t)  # measured: a vmapped vjp row took 1.6x the saved activations
    per = acts + (2 * n + m) * item if mode == "reverse" else acts + (2 * m + n) * item
    needed = size + per
    avail = available_memory(t.device)
    cap = limit_bytes if limit_bytes is not None else (int(avail * 0.8) if avail else None)
    limit = min(budget, cap) if cap is not None else budget
    if needed > limit:
        which = "the memory budget" if cap is None or budget <= cap else "the memory available"
        raise JacobianTooLarge(
            f"the full Jacobian ({m} x {n} = {m * n:,} entries) would need {human_bytes(needed)} "
            f"({human_bytes(size)} for J + {human_bytes(per)} working memory per row/column), more than "
            f"{which} ({human_bytes(limit)}); use the estimators instead (Frobenius norm by Hutchinson, "
            "spectral norm / top singular values by power iteration: jacaudit.frobenius_norm, "
            "jacaudit.top_singular), raise the memory budget, or differentiate a smaller output/input",
            needed=needed, budget=limit)
    J = torch.empty((m, n) if mode == "reverse" else (n, m), dtype=t.dtype, device=t.device)
    work = limit - size  # >= per (checked above)
    if mode == "reverse":
        chunk = _chunk_size(per, m, work)
        chunk, chunks, retries = _run_chunked(
            m, chunk, lambda a, b: t.vjp_many(_basis(a, b, m, t.out_shape, t.y)), J, progress)
        path = t.vjp_path or "vmap"
        J = J.reshape(*t.out_shape, *t.in_shape)
    else:
        chunk = _chunk_size(per, n, work)
        chunk, chunks, retries = _run_chunked(
            n, chunk, lambda a, b: t.jvp_many(_basis(a, b, n, t.in_shape, t.x)), J, progress)
        path = t.jvp_path or "vmap"
        # J is (n, m): column k of the matrix is J[k]; transpose to (m, n)
        J = J.t().contiguous().reshape(*t.out_shape, *t.in_shape)
    info = JacobianInfo(mode=mode, path=path, output_shape=t.out_shape, input_shape=t.in_shape,
                        dtype=str(t.dtype).replace("torch.", ""), device=str(t.device), chunk_size=chunk,
                        chunks=chunks, oom_retries=retries, bytes=size, notes=tuple(t.notes))
    return J, info


def jacobian(model: Any, x: Any, *, input: str | None = None, output: str | None = None, wrt: str | None = None,
             mode: str = "auto", max_memory: int | str | None = None, dtype: str | torch.dtype | None = None,
             device: str | torch.device | None = None, logits: bool = False, return_info: bool = False):
    """The full Jacobian ``J`` with shape ``output.shape + input.shape``.

    ``mode="auto"`` runs reverse mode (rows, vjp) when the output has fewer elements than the input,
    forward mode (columns, jvp) otherwise. Rows/columns are computed in chunks sized to ``max_memory``
    (bytes or ``"512MB"``); on out-of-memory the chunk halves and the work retries. A Jacobian larger than
    the available memory is refused (:class:`JacobianTooLarge`) with the size it would need.
    With ``return_info=True`` returns ``(J, JacobianInfo)`` saying which path ran.
    """
    t = prepare(model, x, input=input, output=output, wrt=wrt, dtype=dtype, device=device, logits=logits)
    J, info = full_jacobian(t, mode=mode, max_memory=max_memory)
    return (J, info) if return_info else J


def vjp(model: Any, x: Any, v: Any, *, input: str | None = None, output: str | None = None,
        wrt: str | None = None, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
        logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(x), v^T J)``: ``v`` has the output's shape, the gradient the input's."""
    t = prepare(model, x, input=input, output=output, wrt=wrt, dtype=dtype, device=device, logits=logits)
    v = _as_tensor(v, t.device, t.dtype)
    if tuple(v.shape) != t.out_shape:
        raise InputError(f"v has shape {tuple(v.shape)}; the output has shape {t.out_shape}")
    return t.y, t.vjp(v)


def jvp(model: Any, x: Any, v: Any, *, input: str | None = None, output: str | None = None,
        wrt: str | None = None, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
        logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(x), J v)``: ``v`` has the input's shape, the result the output's."""
    t = prepare(model, x, input=input, output=output, wrt=wrt, dtype=dtype, device=device, logits=logits)
    v = _as_tensor(v, t.device, t.dtype)
    if tuple(v.shape) != t.in_shape:
        raise InputError(f"v has shape {tuple(v.shape)}; the input has shape {t.in_shape}")
    return t.y, t.jvp(v)


# ---------------------------------------------------------------------------------------------------------
# per-sample Jacobians over a batch
# ---------------------------------------------------------------------------------------------------------
def per_sample_jacobian(model: Any, X: Any, *, input: str | None = None, output: str | None = None,
                        mode: str = "auto", dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, max_memory: int | str | None = None,
                        return_info: bool = False):
    """``J[b] = d out[b] / d X[b]`` for every sample of a batch: shape ``(B, *out.shape[1:], *X.shape[1:])``.

    Paths, in order: ``rows`` (CPU, reverse mode, at most 64 outputs per sample, a model with convolutions
    that treats samples independently: one batch forward, reverse passes per output
    element, see ``_per_sample_rows``); ``vmap`` of ``jacrev``/``jacfwd``
    over the batch; ``batched`` (the batch replicated
    once per output element, one ``autograd.grad`` for all of them -- valid when samples are independent,
    which is checked); ``loop`` over samples.
    """
    t = prepare(model, X, input=input, output=output, dtype=dtype, device=device, evaluate=False)
    Xb = t.x
    if Xb.ndim < 1:
        raise InputError("per-sample Jacobians need a leading batch axis")
    with torch.no_grad():
        y1 = t.f(Xb[:1])  # one sample's forward gives the output shape
    if not isinstance(y1, torch.Tensor) or y1.ndim < 1 or y1.shape[0] != 1:
        raise InputError(f"per-sample Jacobians need a leading batch axis on input and output "
                         f"(input {tuple(Xb.shape)}, output of one sample {tuple(getattr(y1, 'shape', ()))})")
    B = Xb.shape[0]
    in_s, out_s = tuple(Xb.shape[1:]), tuple(y1.shape[1:])
    m1, n1 = math.prod(out_s), math.prod(in_s)
    if mode == "auto":
        mode = "reverse" if m1 < n1 else "forward"
    f = t.f
    item = Xb.element_size()
    budget = parse_memory(max_memory)

    def f1(xi: torch.Tensor) -> torch.Tensor:
        return f(xi.unsqueeze(0)).squeeze(0)

    notes = list(t.notes)
    path = "vmap"
    J = None
    jac = torch.func.jacrev if mode == "reverse" else torch.func.jacfwd
    per_sample_bytes = m1 * n1 * item * 4 + (n1 + m1) * item * 8
    bchunk = _chunk_size(per_sample_bytes, B, budget)
    if mode == "reverse" and m1 <= _ROWS_MAX and Xb.device.type == "cpu" and _has_conv(model):
        try:
            J = _per_sample_rows(f, Xb, out_s, m1, n1, bchunk, notes)
        except Exception as e:
            if _is_oom(e):
                raise
            J = None
        if J is not None:
            path = "rows"
    if J is None:
        try:
            parts = [torch.func.vmap(jac(f1))(Xb[i:i + bchunk]) for i in range(0, B, bchunk)]
            J = torch.cat(parts) if len(parts) > 1 else parts[0]
        except Exception as e:
            if _is_oom(e):
                raise
            notes.append(f"vmap could not run the model ({type(e).__name__}); fell back")
            J = None
    if J is None and mode == "reverse" and _samples_independent(f, Xb, t.y):  # (t.y: one batch forward)
        path = "batched"
        J = torch.empty(B, m1, n1, dtype=Xb.dtype, device=Xb.device)
        per = B * (n1 * 4 + m1) * item
        chunk = _chunk_size(per, m1, budget)
        i = 0
        while i < m1:
            c = min(chunk, m1 - i)
            Xr = Xb.repeat(c, *([1] * (Xb.ndim - 1))).requires_grad_(True)  # (c*B, ...) block k = row i+k
            G = torch.zeros(c, B, m1, dtype=Xb.dtype, device=Xb.device)
            G[torch.arange(c), :, torch.arange(i, i + c)] = 1
            with torch.enable_grad():
                Y = f(Xr)
                (g,) = torch.autograd.grad(Y, Xr, G.reshape(c * B, *out_s), allow_unused=True)
            if g is None:
                g = torch.zeros_like(Xr)
            J[:, i:i + c, :] = g.reshape(c, B, n1).transpose(0, 1)
            i += c
        J = J.reshape(B, *out_s, *in_s)
    if J is None:
        path = "loop"
        rows = []
        for b in range(B):
            tb = Target(f1, Xb[b])
            Jb, _ = full_jacobian(tb, mode=mode, max_memory=budget)
            rows.append(Jb)
        J = torch.stack(rows)
    info = JacobianInfo(mode=mode, path=path, output_shape=(B, *out_s), input_shape=tuple(Xb.shape),
                        dtype=str(Xb.dtype).replace("torch.", ""), device=str(Xb.device),
                        bytes=J.numel() * item, notes=tuple(notes))
    return (J, info) if return_info else J


_ROWS_MAX = 64  # outputs per sample up to which the "rows" path (one reverse pass per output) is used


_CONV_NAMES = {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"}


def _has_conv(model: Any) -> bool | None:
    """Whether the model has convolutions (a jacaudit Model says so itself, a torch module is searched); None
    when it cannot be told (a plain callable)."""
    from ..models.base import Model

    if isinstance(model, Model):
        return model.has_convolutions()
    if isinstance(model, torch.nn.Module):
        return any(isinstance(m, torch.nn.modules.conv._ConvNd)
                   or getattr(m, "original_name", None) in _CONV_NAMES for m in model.modules())
    return None


def _per_sample_rows(f: Callable, Xb: torch.Tensor, out_s: tuple, m1: int, n1: int, bchunk: int,
                     notes: list) -> torch.Tensor | None:
    """Per-sample Jacobians from one forward of the batch and one plain reverse pass per output element
    ``i`` (cotangent 1 at ``out[b, i]`` for every sample ``b``: row ``i`` of every sample's Jacobian), for
    models that treat samples independently (checked on the first chunk; None otherwise).

    Used on CPU for models with convolutions, where vmap(jacrev) is slow: torch has no batching rule for
    the CPU convolution backward and loops over the vmapped rows. Also on CPU, whether torch's oneDNN
    (mkldnn) convolution backward runs is chosen by measurement: it is several times slower than the native
    kernel for layers with few input channels (an image model's first convolution), faster for wide ones;
    the first two rows run with it on and off, and the faster setting runs the rest (every row is needed,
    so the trial costs nothing).
    """
    B = Xb.shape[0]
    J = torch.empty(B, m1, n1, dtype=Xb.dtype, device=Xb.device)
    tune = (Xb.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and bool(torch.backends.mkldnn.enabled) and m1 >= 3)
    timings: dict[bool, float] = {}
    for s in range(0, B, bchunk):
        Xc = Xb[s:s + bchunk].detach().requires_grad_(True)
        b = Xc.shape[0]
        with torch.enable_grad():
            Y = f(Xc)
        if not isinstance(Y, torch.Tensor) or tuple(Y.shape) != (b, *out_s) or not Y.requires_grad:
            return None
        if s == 0 and not _samples_independent(f, Xc.detach(), Y.detach(), subset=4):
            return None
        G = torch.zeros(Y.shape, dtype=Y.dtype, device=Y.device)  # contiguous whatever Y's layout
        Gf = G.view(b, m1)
        for i in range(m1):
            if tune and len(timings) < 2:
                setting = len(timings) == 0  # first row: oneDNN on; second: off
            else:
                setting = timings.get(True, 0.0) <= timings.get(False, float("inf"))
            Gf[:, i] = 1
            t0 = time.perf_counter()
            with _mkldnn_enabled(setting) if tune else contextlib.nullcontext():
                (g,) = torch.autograd.grad(Y, Xc, G, retain_graph=i < m1 - 1, allow_unused=True)
            if tune and len(timings) < 2:
                timings[setting] = time.perf_counter() - t0
            Gf[:, i] = 0
            if g is None:
                J[s:s + b, i].zero_()
            else:
                J[s:s + b, i] = g.reshape(b, n1)
    if tune and timings.get(False, float("inf")) < timings.get(True, 0.0):
        notes.append("CPU convolution backward: native kernels (measured faster than oneDNN here)")
    return J.reshape(B, *out_s, *Xb.shape[1:])


class _mkldnn_enabled:
    """Context: torch.backends.mkldnn.enabled set to ``on`` (restored after); no-op when already so."""

    def __init__(self, on: bool):
        self.on = on
        self.prev = None

    def __enter__(self):
        if torch.backends.mkldnn.enabled != self.on:
            self.prev = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = self.on

    def __exit__(self, *exc):
        if self.prev is not None:
            torch.backends.mkldnn.enabled = self.prev
        return False


def _samples_independent(f: Callable, X: torch.Tensor, Y: torch.Tensor, subset: int | None = None) -> bool:
    """The model treats the samples of a batch independently (checked on a permuted batch: the whole batch,
    or the first ``subset`` samples reversed -- a smaller batch than Y's, in another order -- and sample 0
    alone)."""
    B = X.shape[0]
    if B == 1:
        return True
    try:
        perm = torch.arange((B if subset is None else min(B, subset)) - 1, -1, -1, device=X.device)
        with torch.no_grad():
            Yp = f(X[perm])
            Y1 = f(X[:1])
        tol = 1e-4 if X.dtype == torch.float32 else 1e-9
        scale = float(Y.abs().max()) + 1e-12
        return tuple(Yp.shape) == (len(perm), *Y.shape[1:]) and tuple(Y1.shape) == (1, *Y.shape[1:]) and \
            float((Yp - Y[perm]).abs().max()) <= tol * scale and float((Y1 - Y[:1]).abs().max()) <= tol * scale
    except Exception as e:
        if _is_oom(e):
            raise
        return False
