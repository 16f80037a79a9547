"""The model object every analysis works with, whatever file format it came from.

Besides being callable, a :class:`Model` has *capabilities* that analyses use instead of asking which format
it came from (the base class gives the defaults of a format that has none of them):

``to(device, dtype)``
    a retargeted copy (self when nothing changes);
``reference(outputs, wrt)``
    an independent forward to check the interpreter against (:class:`ReferenceForward`; ONNX: onnxruntime),
    or None;
``internal_tensors()`` / ``softmax_input(output)``
    the tensors one may read or differentiate with respect to besides the inputs, and the logits feeding a
    final Softmax;
``parameter_layers()`` / ``randomised(layers, seed)``
    the parameter randomisation of the saliency sanity test, restored afterwards;
``check_stateless(feeds)`` / ``has_convolutions()``
    whether two calls agree, and whether the model convolves (a performance hint).
"""
from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from ..errors import InputError, UnsupportedError


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a model input or output.

    ``shape`` holds ints for static dims and strings (symbolic names) or None for dynamic ones.
    ``dtype`` is a torch dtype or None when unknown.
    """

    name: str
    shape: tuple[int | str | None, ...] | None
    dtype: torch.dtype | None
    #: the dtype's name where torch has no such dtype (e.g. an ONNX "string" tensor)
    dtype_name: str | None = None

    @property
    def is_float(self) -> bool:
        return self.dtype is not None and self.dtype.is_floating_point

    def dynamic_axes(self) -> list[int]:
        """Axes whose size is not declared (symbolic or unnamed)."""
        return [] if self.shape is None else [i for i, d in enumerate(self.shape) if not is_static_dim(d)]

    def concrete_shape(self, fill: dict[str, int] | int | None = None, *, batch: int | None = None
                       ) -> tuple[int, ...]:
        """The shape with dynamic dims filled, never guessed.

        ``fill`` maps a symbolic dim name to its size (only real names tie dims: placeholders such as ``?``,
        ``DynamicDimension.0``, ``unk__3`` or unnamed dims never do -- see :func:`is_placeholder_dim`), or is a
        single int for every dynamic dim. ``batch`` sizes axis 0 when it is dynamic. A dim left unknown raises
        :class:`InputError` naming the input, its dynamic axes and ``--shape``."""
        if self.shape is None:
            raise InputError(f"input {self.name!r} has no declared shape; pass --shape {self.name}=N,...")
        out: list[int | None] = []
        for i, d in enumerate(self.shape):
            if is_static_dim(d):
                out.append(int(d))  # type: ignore[arg-type]
            elif isinstance(fill, int):
                out.append(int(fill))
            elif isinstance(fill, dict) and not is_placeholder_dim(d) and d in fill:
                out.append(int(fill[d]))  # type: ignore[index]
            elif i == 0 and batch is not None:
                out.append(int(batch))
            else:
                out.append(None)
        if any(v is None for v in out):
            raise InputError(self.unknown_dims_message([i for i, v in enumerate(out) if v is None]))
        return tuple(out)  # type: ignore[return-value]

    def unknown_dims_message(self, axes: Sequence[int]) -> str:
        """One line: which dims of this input are unknown and how to give them."""
        shown = self.shown_shape()
        ax = ", ".join(f"{i} ({shown[i]})" for i in axes)
        example = ",".join(str(d) if is_static_dim(d) else ("1" if i == 0 else "N")
                           for i, d in enumerate(self.shape or ()))
        return (f"input {self.name!r} {format_shape(shown)} has dynamic axes {ax} that nothing fixes; pass "
                f"--shape {self.name}={example} (a size for every axis) or its data with --input {self.name}=FILE")

    def shown_shape(self) -> list[int | str] | None:
        return None if self.shape is None else [d if isinstance(d, int) else (d or "?") for d in self.shape]

    def describe(self) -> dict[str, Any]:
        known = self.dtype is not None or self.dtype_name is not None
        return {
            "name": self.name,
            "shape": self.shown_shape(),
            "dtype": (self.dtype_name or "unknown") if self.dtype is None else str(self.dtype).replace("torch.", ""),
            # None: not known until the model runs (TorchScript declares no dtypes)
            "differentiable": self.is_float if known else None,
        }


_PLACEHOLDER = re.compile(r"^(\?|-1|(.*[./_])?DynamicDimension[._]?\d*|unk__\d+|dim_?\d*|None|unknown)$",
                          re.IGNORECASE)


def is_placeholder_dim(d: Any) -> bool:
    """A symbolic dim whose name ties nothing: unnamed (None, ""), ``?``, ``-1``, paddle2onnx's
    ``DynamicDimension.N``, tf2onnx's ``unk__N``. Dims sharing a real name (``batch``) may be tied."""
    return d is None or (isinstance(d, str) and (not d.strip() or bool(_PLACEHOLDER.match(d.strip()))))


def is_static_dim(d: Any) -> bool:
    """A fixed, positive size (not a symbol, not -1/0)."""
    return isinstance(d, int) and not isinstance(d, bool) and d > 0


def format_shape(shape: Sequence[Any] | None) -> str:
    """``[1, 3, ?, ?]``, or ``unknown``."""
    return "unknown" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


class ParameterLayer(NamedTuple):
    """A layer whose parameters the sanity test randomises: its name and its parameter tensors' names."""

    name: str
    parameters: tuple[str, ...]


@dataclass(frozen=True)
class ReferenceForward:
    """An independent forward of the model (no code shared with the interpreter), on numpy arrays.

    ``ref(feeds)`` takes arrays by input name (the ``wrt`` tensor among them when one was cut into an input;
    each is cast to ``input_dtypes``, names the reference does not take are ignored) and returns the
    ``outputs`` in order. ``dtype`` is the float dtype it computes in (of ``wrt`` when given).
    """

    name: str
    dtype: str
    outputs: tuple[str, ...]
    input_dtypes: dict[str, str]
    fn: Callable[[dict[str, np.ndarray]], list[np.ndarray]] = field(repr=False)

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.fn(feeds)


def gaussian_like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Seeded Gaussian values with ``t``'s standard deviation (0.05 when it has none), ``t``'s dtype/device."""
    std = float(t.double().std()) if t.numel() > 1 else 1.0
    std = std if np.isfinite(std) and std > 0 else 0.05
    return (torch.randn(t.shape, generator=g, dtype=torch.float64) * std).to(t.dtype).to(t.device)


def did_you_mean(name: str, candidates: Sequence[str], n: int = 3) -> str:
    """``" (did you mean 'a', 'b'?)"`` with the closest names (difflib), or "" when none is close."""
    import difflib

    cands = list(dict.fromkeys(c for c in candidates if c))
    close = difflib.get_close_matches(name, cands, n=n, cutoff=0.6)
    if not close:  # a case-insensitive substring match (e.g. 'conv1' for '/conv1/Conv_output_0')
        low = name.lower()
        close = [c for c in cands if low and low in c.lower()][:n]
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _listed(names: Sequence[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f" ... (+{len(names) - n} more)" if len(names) > n else "")


class Model(ABC):
    """A loaded model: callable on torch tensors, with declared inputs/outputs.

    Call positionally in ``inputs`` order or by input name as keywords. Returns a tensor for a single
    output, else a tuple in ``outputs`` order. Subclasses implement :meth:`run`.
    """

    format: str = "?"

    def __init__(self, path: str | None, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 device: torch.device, dtype: torch.dtype | None):
        self.path = path
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.device = device
        self.dtype = dtype  # the working float dtype (None: as stored)
        self.metadata: dict[str, Any] = {}

    # -- calling -------------------------------------------------------------------------------
    def _bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        names = [s.name for s in self.inputs]
        if len(args) > len(names):
            raise InputError(f"model takes {len(names)} input(s) ({', '.join(names)}), got {len(args)}")
        bound = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise InputError(f"unknown input {k!r}; the model's inputs are: {', '.join(names)}")
            if k in bound:
                raise InputError(f"input {k!r} given twice")
            bound[k] = v
        return bound

    def __call__(self, *args: Any, **kwargs: Any):
        bound = self._bind(args, kwargs)
        outs = self.run(bound)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @abstractmethod
    def run(self, feeds: dict[str, torch.Tensor], outputs: Sequence[str] | None = None,
            overrides: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run the model. ``outputs`` selects output (or, where supported, internal) tensors by name;
        ``overrides`` replaces internal tensors by name (the point of differentiation for integer inputs)."""

    # -- helpers for analyses ------------------------------------------------------------------
    def input_spec(self, name: str | None = None) -> TensorSpec:
        if name is None:
            return self.inputs[0]
        for s in self.inputs:
            if s.name == name:
                return s
        raise InputError(f"no input named {name!r}{did_you_mean(name, [s.name for s in self.inputs])}; "
                         f"inputs are: {_listed([s.name for s in self.inputs])}")

    def output_spec(self, name: str | None = None) -> TensorSpec:
        if name is None:
            return self.outputs[0]
        for s in self.outputs:
            if s.name == name:
                return s
        raise InputError(f"no output named {name!r}{did_you_mean(name, [s.name for s in self.outputs])}; "
                         f"outputs are: {_listed([s.name for s in self.outputs])}")

    def function(self, feeds: dict[str, torch.Tensor], *, wrt: str | None = None, output: str | None = None
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
        """A pure function of one tensor, for torch.func: the input (or internal tensor) named ``wrt``
        varies, every other input stays at ``feeds``; returns the output named ``output``.

        ``wrt`` defaults to the first input; it may name an internal tensor where the format supports it.
        """
        wrt = wrt or self.inputs[0].name
        out_name = output or self.outputs[0].name
        input_names = {s.name for s in self.inputs}

        if wrt in input_names:
            def f(x: torch.Tensor) -> torch.Tensor:
                return self.run({**feeds, wrt: x}, outputs=[out_name])[0]
        else:
            def f(x: torch.Tensor) -> torch.Tensor:
                return self.run(feeds, outputs=[out_name], overrides={wrt: x})[0]
        return f

    # -- capabilities (defaults: a format that has none of them) --------------------------------
    def _same_target(self, device: str | torch.device | None, dtype: torch.dtype | None) -> bool:
        same_dtype = dtype is None or dtype == (self.dtype or torch.float32)
        same_device = device is None or torch.device(device) == torch.device(self.device)
        return same_dtype and same_device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Model":
        """A copy on ``device`` / computing in ``dtype`` (the original is untouched); self when nothing changes."""
        if self._same_target(device, dtype):
            return self
        raise UnsupportedError(f"a {self.format} model cannot be moved to {device or self.device} / "
                               f"{dtype or self.dtype}")

    def reference(self, outputs: Sequence[str] | None = None, wrt: str | None = None) -> ReferenceForward | None:
        """An independent forward computing ``outputs`` (default: the model's outputs) with ``wrt`` (an input
        or an internal tensor) fed in; None when the format has no reference."""
        return None

    def internal_tensors(self) -> list[str]:
        """Tensors besides the inputs/outputs that ``run(outputs=...)`` reads and ``wrt=`` differentiates."""
        return []

    def softmax_input(self, output: str | None = None) -> str | None:
        """The tensor feeding a final Softmax that produces ``output`` (the logits), when one is reachable."""
        return None

    def parameter_layers(self) -> list[ParameterLayer]:
        """The layers with parameters, from the output backwards (the cascade of the sanity test)."""
        return []

    @contextlib.contextmanager
    def randomised(self, layers: Sequence[ParameterLayer], seed: int) -> Iterator["Model"]:
        """Within the block, the parameters of ``layers`` hold seeded Gaussian values (each with the original
        tensor's standard deviation) and every call of the model computes with them; restored afterwards
        (also on error). Yields the model."""
        if layers:
            raise UnsupportedError(f"a {self.format} model has no parameters to randomise")
        yield self

    def check_stateless(self, feeds: dict[str, torch.Tensor]) -> str | None:
        """A warning when two calls on the same input disagree (state or randomness); None when they agree or
        the format cannot keep state."""
        return None

    def has_convolutions(self) -> bool | None:
        """Whether the model has convolutions (None: cannot be told)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": self.path,
            "inputs": [s.describe() for s in self.inputs],
            "outputs": [s.describe() for s in self.outputs],
            **self.metadata,
        }
