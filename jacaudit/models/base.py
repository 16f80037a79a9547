"""The model object every analysis works with, whatever file format it came from."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a model input or output.

    ``shape`` holds ints for static dims and strings (symbolic names) or None for dynamic ones.
    ``dtype`` is a torch dtype or None when unknown.
    """

    name: str
    shape: tuple[int | str | None, ...] | None
    dtype: torch.dtype | None

    @property
    def is_float(self) -> bool:
        return self.dtype is not None and self.dtype.is_floating_point

    def concrete_shape(self, fill: dict[str, int] | int | None = None) -> tuple[int, ...]:
        """The shape with dynamic dims filled (``fill`` maps symbol -> size, or a single int for all)."""
        if self.shape is None:
            raise InputError(f"input {self.name!r} has no declared shape; pass --shape")
        out = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int) and d > 0:
                out.append(d)
            elif isinstance(fill, dict) and d in fill:
                out.append(int(fill[d]))
            elif isinstance(fill, int):
                out.append(fill)
            else:
                out.append(1)
        return tuple(out)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": None if self.shape is None else [d if isinstance(d, int) else (d or "?") for d in self.shape],
            "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "differentiable": self.is_float,
        }


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
        raise InputError(f"no input named {name!r}; inputs are: {', '.join(s.name for s in self.inputs)}")

    def output_spec(self, name: str | None = None) -> TensorSpec:
        if name is None:
            return self.outputs[0]
        for s in self.outputs:
            if s.name == name:
                return s
        raise InputError(f"no output named {name!r}; outputs are: {', '.join(s.name for s in self.outputs)}")

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

    def describe(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": self.path,
            "inputs": [s.describe() for s in self.inputs],
            "outputs": [s.describe() for s in self.outputs],
            **self.metadata,
        }
