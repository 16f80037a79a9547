"""TorchScript models: ``torch.jit.load`` with a clear refusal of every other kind of .pt file.

We look inside the file before handing it to torch, so a state_dict, a pickled nn.Module or a torch.package
archive gets a message saying what it is, and nothing is ever unpickled by us.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import zipfile
from typing import Any, Iterator, Sequence

import torch

import re

from ..errors import InputError, ModelLoadError, UnsupportedError

#: torch's messages for a computation mixing float32 and float64 tensors
_DTYPE_CLASH = re.compile(r"same dtype|should be the same|expected scalar type|Expected .*(Double|Float)|"
                          r"found (Double|Float)|dtype.*(Float|Double).*(Double|Float)")
from .base import Model, ParameterLayer, TensorSpec, gaussian_like

#: TorchScript's message for a forward argument that got no value
_MISSING_ARG = re.compile(r"forward\(\) is missing value for argument '([^']+)'")


def _missing_arg_message(module, name: str, given: int) -> str:
    """The non-tensor arguments of ``forward`` (name: type), pointing to --model-arg."""
    try:
        args = [a for a in module.forward.schema.arguments if a.name != "self"]
        extra = [f"{a.name}: {a.type}" for a in args if not str(a.type).startswith("Tensor")]
    except Exception:
        extra = [name]
    return (f"the model's forward needs argument {name!r} after its tensor input(s) (non-tensor arguments: "
            f"{', '.join(extra)}; {given} given): pass each with --model-arg VALUE, in order, e.g. "
            f"jacaudit --model-arg 16000 <command> ...")

_CONV_NAMES = {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"}


def sniff_torch_file(path: str) -> str:
    """'torchscript', 'state_dict-or-pickle' (a torch.save zip), 'torch.package', 'legacy-pickle', or 'unknown'."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return "legacy-pickle"
    if head[:4] != b"PK\x03\x04":
        return "unknown"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, UnicodeDecodeError, NotImplementedError, ValueError, EOFError, OSError):
        return "truncated"  # a corrupt directory: undecodable names, an unknown zip version, short records
    parts = [n.split("/", 1)[1] if "/" in n else n for n in names]
    if any(p.startswith(".data/extern_modules") for p in parts) or any(p == ".data/version" for p in parts):
        return "torch.package"
    if any(p.startswith("code/") for p in parts) and any(p in ("constants.pkl", "data.pkl") for p in parts):
        return "torchscript"
    if any(p == "data.pkl" for p in parts):
        return "state_dict-or-pickle"
    return "unknown"


_ADVICE = {
    "state_dict-or-pickle": "is a torch.save() checkpoint (a state_dict or a pickled nn.Module), not TorchScript; "
                            "export it with torch.jit.script(model).save(path) or torch.jit.trace, or to ONNX "
                            "with torch.onnx.export",
    "legacy-pickle": "is a legacy (non-zip) torch pickle, not TorchScript; re-export it with torch.jit.save",
    "torch.package": "is a torch.package archive; jacaudit does not import packaged code. Export the model with "
                     "torch.jit.save or torch.onnx.export",
    "truncated": "looks like a zip archive but cannot be read (truncated or corrupt)",
    "unknown": "is neither TorchScript nor ONNX",
}


class TorchScriptModel(Model):
    format = "torchscript"

    def __init__(self, module, path: str | None, device: torch.device, dtype: torch.dtype | None,
                 extra_args: Sequence[Any] = (), sha256: str | None = None):
        self.module = module
        self.extra_args = tuple(extra_args)
        inputs, outputs = self._signature(module)
        super().__init__(path, inputs, outputs, device, dtype)
        n_params = sum(p.numel() for p in module.parameters())
        self.metadata = {"parameters": int(n_params), "sha256": sha256,
                         "op_histogram": {}, "opset": None, "producer": "torch.jit"}
        #: what the model did to its inputs that a report should say (e.g. a dtype cast); read by data.feeds
        self.warnings: list[str] = []
        self.parameter_dtype = _parameter_dtype(module)

    @staticmethod
    def _signature(module) -> tuple[list[TensorSpec], list[TensorSpec]]:
        try:
            schema = module.forward.schema
            args = [a for a in schema.arguments if a.name != "self"]
        except Exception:
            args = []
        inputs = []
        for a in args:
            t = str(a.type)
            if t.startswith("Tensor"):
                inputs.append(TensorSpec(a.name, None, None))
        if not inputs:
            inputs = [TensorSpec("input", None, None)]
        return inputs, [TensorSpec("output", None, None)]

    def run(self, feeds: dict[str, torch.Tensor], outputs: Sequence[str] | None = None,
            overrides: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        if overrides:
            raise InputError("TorchScript models cannot be differentiated with respect to internal tensors; "
                             "export to ONNX to use --wrt on an intermediate tensor")
        args = []
        for s in self.inputs:
            if s.name not in feeds:
                raise InputError(f"missing input {s.name!r}")
            x = feeds[s.name]
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                want = self.dtype or self.parameter_dtype
                if want is not None and x.dtype != want:
                    if self.dtype is None:
                        msg = (f"input {s.name!r} is {str(x.dtype).replace('torch.', '')}; it was cast to the "
                               f"model's parameter dtype {str(want).replace('torch.', '')}")
                        if msg not in self.warnings:
                            self.warnings.append(msg)
                    x = x.to(want)
            args.append(x)
        try:
            # the profiling executor's optimised plan (after a call or two per shape) differentiates with
            # TorchScript's own derivative formulas: gradients at the same input then change in their last bits
            # with the call history. Eager aten kernels keep every derivative reproducible (and the same as torch's).
            with torch.jit.optimized_execution(False):
                out = self.module(*args, *self.extra_args)
        except RuntimeError as e:
            missing = _MISSING_ARG.search(str(e))
            if missing:
                raise InputError(_missing_arg_message(self.module, missing.group(1), len(self.extra_args))) \
                    from None
            if self.dtype is not None and _DTYPE_CLASH.search(str(e)):
                raise UnsupportedError(
                    f"this TorchScript model cannot run in {str(self.dtype).replace('torch.', '')}: its code makes "
                    "tensors of its own dtype (e.g. a traced initial state or a buffer cast inside forward), which "
                    "casting its parameters does not reach (torch: "
                    f"{str(e).strip().splitlines()[-1][:120]}); use it in its stored dtype (e.g. --dtype float32; "
                    "verify needs float64 for its differences and cannot check this model)") from None
            raise
        if isinstance(out, dict):
            out = tuple(out.values())
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if len(self.outputs) != len(outs):
            self.outputs = [TensorSpec(f"output_{i}" if len(outs) > 1 else "output", None, None)
                            for i in range(len(outs))]
        if outputs is not None:
            names = [s.name for s in self.outputs]
            try:
                outs = [outs[names.index(o)] for o in outputs]
            except ValueError:
                raise InputError(f"no output named one of {list(outputs)}; outputs are: {', '.join(names)}") \
                    from None
        return outs

    # -- capabilities ----------------------------------------------------------------------------
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "TorchScriptModel":
        if self._same_target(device, dtype):
            return self
        same_device = device is None or torch.device(device) == torch.device(self.device)
        same_dtype = dtype is None or dtype == (self.dtype or torch.float32)
        new = copy.copy(self)
        new_device = torch.device(device) if device is not None else self.device
        new_dtype = dtype if dtype is not None else self.dtype
        module = self.module
        if not same_device:
            module = module.to(new_device)  # a ScriptModule's .to() copies when the device changes
        if new_dtype is not None and not same_dtype:
            module = copy.deepcopy(module).to(new_dtype) if same_device else module.to(new_dtype)
        new.module = module
        new.device = new_device
        new.dtype = new_dtype
        new.outputs = list(self.outputs)
        new.warnings = list(self.warnings)
        new.parameter_dtype = _parameter_dtype(module)
        return new

    def has_convolutions(self) -> bool:
        return any(isinstance(m, torch.nn.modules.conv._ConvNd) or getattr(m, "original_name", None) in _CONV_NAMES
                   for m in self.module.modules())

    def parameter_layers(self) -> list[ParameterLayer]:
        """Float parameters with more than one element, grouped by their module (the name before the last
        dot), from the output backwards (the reverse of registration order)."""
        groups: dict[str, list[str]] = {}
        for name, p in self.module.named_parameters():
            if p.is_floating_point() and p.numel() > 1:
                groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
        return [ParameterLayer(k, tuple(v)) for k, v in groups.items()][::-1]

    @contextlib.contextmanager
    def randomised(self, layers: Sequence[ParameterLayer], seed: int) -> Iterator["TorchScriptModel"]:
        """Overwrite the parameters in place (the module computes with them), restoring them afterwards."""
        params = dict(self.module.named_parameters())
        gen = torch.Generator().manual_seed(int(seed))
        saved: list[tuple[str, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for layer in layers:
                    for name in layer.parameters:
                        if name not in params:
                            raise InputError(f"layer {layer.name!r}: no parameter {name!r} in the module")
                        t = params[name]
                        new = gaussian_like(t, gen)
                        saved.append((name, t.detach().clone()))
                        t.copy_(new)
            yield self
        finally:
            with torch.no_grad():
                for name, old in reversed(saved):
                    params[name].copy_(old)

    def check_stateless(self, feeds: dict[str, torch.Tensor]) -> str | None:
        """Calls the model twice on the same input; returns a warning when the outputs disagree
        (internal state kept between calls, or randomness)."""
        with torch.no_grad():
            a = _flat(self.run(feeds))
            b = _flat(self.run(feeds))
        if len(a) != len(b):
            return ("two calls with the same input returned different numbers of outputs: the model keeps "
                    "internal state; derivatives describe one call only")
        for x, y in zip(a, b):
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape:
                if not torch.equal(x, y) and not torch.allclose(x, y, rtol=1e-6, atol=1e-7, equal_nan=True):
                    diff = (x.double() - y.double()).abs().max().item()
                    return (f"two calls with the same input disagree (max abs difference {diff:.3g}): the model "
                            "keeps internal state or is random; derivatives describe one call only")
        return None


def _parameter_dtype(module) -> torch.dtype | None:
    """The float dtype holding most of the module's parameter and buffer elements (None: no float tensors)."""
    count: dict[torch.dtype, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=lambda k: count[k]) if count else None


def _flat(x: Any) -> list[Any]:
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flat(v)]
    return [x]


def load_torchscript(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     extra_args: Sequence[Any] = ()) -> TorchScriptModel:
    kind = sniff_torch_file(path)
    if kind != "torchscript":
        raise ModelLoadError(f"{path} {_ADVICE.get(kind, _ADVICE['unknown'])}")
    device = torch.device(device)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(path, map_location=device)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load TorchScript model {path}: {first}") from None
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if dtype is not None:
        module = module.to(dtype)
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return TorchScriptModel(module, path, device, dtype, extra_args=extra_args, sha256=sha)
