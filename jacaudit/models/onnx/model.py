"""Loading an ONNX file into an :class:`OnnxModel` (differentiable, callable on torch tensors)."""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Iterator, Sequence

import torch

from ...errors import InputError, ModelLoadError, UnsupportedError
from ..base import Model, ParameterLayer, ReferenceForward, TensorSpec, gaussian_like
from .registry import onnx_to_torch_dtype

#: ops whose weight initializers the sanity test randomises (a layer = one such node)
_WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "LSTM", "GRU", "RNN",
               "InstanceNormalization", "LayerNormalization", "Einsum"}
_NORM_OPS = ("BatchNormalization", "LayerNormalization", "InstanceNormalization")
#: ops a weight passes through unchanged in value (but for layout/type) between its Constant and its layer
_PASS_THROUGH = {"Identity", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}


def elem_type_name(elem_type: int) -> str:
    """An ONNX element type code -> its name in numpy/torch style ("float32", "int64", "string", ...)."""
    dt = onnx_to_torch_dtype(elem_type)
    if dt is not None:
        return str(dt).replace("torch.", "")
    try:
        from onnx import TensorProto
        return TensorProto.DataType.Name(elem_type).lower()
    except Exception:
        return f"onnx-type-{elem_type}"


def _value_info_spec(vi) -> TensorSpec:
    t = vi.type
    if not t.HasField("tensor_type"):
        kind = t.WhichOneof("value")
        raise UnsupportedError(f"graph input/output {vi.name!r} has type {kind}; only tensors are supported")
    tt = t.tensor_type
    shape = None
    if tt.HasField("shape"):
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shape = tuple(dims)
    dt = onnx_to_torch_dtype(tt.elem_type)
    return TensorSpec(vi.name, shape, dt, None if dt is not None or not tt.elem_type else elem_type_name(tt.elem_type))


_FLOAT_TYPES = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def constant_float_tensors(graph) -> dict[str, int]:
    """Outputs of the graph's Constant nodes that hold float tensors (``value`` or ``value_floats``; the
    weights of many tf2onnx/paddle2onnx exports) -> their number of elements."""
    found: dict[str, int] = {}
    for n in graph.node:
        if n.op_type != "Constant" or n.domain not in ("", "ai.onnx") or not n.output:
            continue
        for a in n.attribute:
            if a.name == "value" and a.HasField("t") and a.t.data_type in _FLOAT_TYPES:
                k = 1
                for d in a.t.dims:
                    k *= int(d)
                found[n.output[0]] = k
            elif a.name == "value_floats":
                found[n.output[0]] = len(a.floats)
            elif a.name == "value_float":
                found[n.output[0]] = 1
    return found


def float_parameter_count(proto) -> int:
    """Float parameter elements of the top-level graph: float initializers (dense and sparse) and the float
    tensors of Constant nodes."""
    g = proto.graph
    n_params = 0
    for t in g.initializer:
        if t.data_type in _FLOAT_TYPES:
            k = 1
            for d in t.dims:
                k *= int(d)
            n_params += k
    for st in g.sparse_initializer:
        if st.values.data_type in _FLOAT_TYPES:
            k = 1
            for d in st.dims:
                k *= int(d)
            n_params += k
    return n_params + sum(constant_float_tensors(g).values())


def _check_external_data(proto, base_dir: str) -> None:
    """Refuse external-data paths that leave the model's folder, before reading any of them."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    base = os.path.realpath(base_dir)
    for t in _get_all_tensors(proto):
        if not uses_external_data(t):
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), None)
        if loc is None:
            raise ModelLoadError(f"tensor {t.name!r} uses external data without a location")
        target = os.path.realpath(os.path.join(base, loc))
        if os.path.isabs(loc) or os.path.commonpath([base, target]) != base:
            raise ModelLoadError(f"tensor {t.name!r} points at external data {loc!r} outside the model's folder; "
                                 "refusing to read it")
        if not os.path.isfile(target):
            raise ModelLoadError(f"external data file {loc!r} for tensor {t.name!r} is missing "
                                 f"(looked in {base_dir})")


def read_onnx(path: str):
    """Parse an ONNX file (with its external data), turning every failure into one clear line."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    if not data:
        raise ModelLoadError(f"{path} is empty")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{path} is not a valid ONNX model (truncated or not ONNX: {e})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise ModelLoadError(f"{path} is not an ONNX model (no graph / IR version / opset)")
    base = os.path.dirname(os.path.abspath(path))
    _check_external_data(proto, base)
    from onnx.external_data_helper import load_external_data_for_model
    try:
        load_external_data_for_model(proto, base)
    except Exception as e:
        raise ModelLoadError(f"cannot load external data of {path}: {e}") from None
    return proto, data


class OnnxModel(Model):
    format = "onnx"

    def __init__(self, proto, path: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, sha256: str | None = None, optimize: bool = True,
                 runtime: str = "torch"):
        from .interpreter import compile_model
        from .ortgrad import RUNTIMES

        device = torch.device(device)
        self._optimize = optimize
        self.proto = proto
        graph = proto.graph
        init_names = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
        inputs = [_value_info_spec(vi) for vi in graph.input if vi.name not in init_names]
        outputs = [_value_info_spec(vi) for vi in graph.output]
        super().__init__(path, inputs, outputs, device, dtype)
        self.graph = compile_model(proto, device, dtype)
        self.graph.input_names = [s.name for s in inputs] + [n for n in self.graph.input_names
                                                             if n in init_names]
        self._plain_graph = None  # the graph as written, compiled on demand (internal tensors by name)
        # Initializers listed as graph inputs (old IR): they are constants unless the caller feeds them.
        from collections import Counter
        ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in graph.node)
        self.metadata = {
            "opset": {(imp.domain or "ai.onnx"): imp.version for imp in proto.opset_import},
            "ir_version": proto.ir_version,
            "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            "op_histogram": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
            "parameters": float_parameter_count(proto),
            "sha256": sha256,
        }
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        self.runtime = runtime
        self._siblings: dict[str, "OnnxModel"] = {}
        # onnxruntime for values and input gradients (ortgrad.Runtime): float32 CPU graphs only
        self._ort = None
        if runtime != "torch" and device.type == "cpu" and dtype in (None, torch.float32):
            from .ortgrad import Runtime
            self._ort = Runtime(self, runtime)
        self._kept_graphs: dict[frozenset[str], object] = {}  # optimized graphs keeping internal outputs
        self._randomised = 0  # inside randomised(): every call runs the graph as written
        if optimize:
            # Load-time graph work (constant folding, BatchNormalization folded into Conv): the function and
            # its input derivatives are unchanged. Internal tensors stay reachable (see run()).
            self.metadata["optimizations"] = self._optimized(self.graph, [s.name for s in outputs])

    def _optimized(self, graph, keep):
        from .optimize import optimize as _optimize
        steps = ("fold_constants", "fold_batchnorm") + (("channels_last",) if self.device.type == "cuda" else ())
        done = _optimize(graph, keep=keep, steps=steps)
        graph.static_cache = True  # shape arithmetic computed once per input signature (interpreter.run)
        return done

    @property
    def opset(self) -> int:
        return self.graph.opsets.get("", 1)

    def run(self, feeds: dict[str, torch.Tensor], outputs: Sequence[str] | None = None,
            overrides: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if missing:
            raise InputError(f"missing input(s): {', '.join(missing)}")
        out_names = [s.name for s in self.outputs]
        graph = self.graph
        internal = [o for o in outputs or () if o not in out_names]
        if self._ort is not None and not overrides and not self._randomised:
            res = self._ort.run(feeds, list(outputs or out_names), out_names)
            if res is not None:
                return res
        if overrides or self._randomised:
            # a replaced tensor (or a randomised weight) must reach every consumer exactly as written
            graph = self.plain_graph
        elif internal and self._optimize:
            # e.g. the logits before a final Softmax: an optimized graph that keeps those tensors
            key = frozenset(internal)
            graph = self._kept_graphs.get(key)
            if graph is None:
                if len(self._kept_graphs) >= 8:
                    self._kept_graphs.clear()
                graph = self._compile_again(keep=out_names + internal)
                self._kept_graphs[key] = graph
        return graph.run(feeds, outputs=outputs or out_names, overrides=overrides)

    @property
    def plain_graph(self):
        """The graph exactly as written (no folding), where every internal tensor exists by its name."""
        if not self._optimize:
            return self.graph
        if self._plain_graph is None:
            self._plain_graph = self._compile_again(keep=None)
        return self._plain_graph

    def _compile_again(self, keep: list[str] | None):
        """Another compiled copy of the graph: as written (``keep=None``) or optimized keeping ``keep``."""
        from .interpreter import compile_model

        g = compile_model(self.proto, self.device, self.dtype)
        g.input_names = list(self.graph.input_names)
        if keep is not None:
            self._optimized(g, keep)
        return g

    def tensor_names(self) -> list[str]:
        """Every tensor name the graph produces (candidates for ``wrt=`` / ``output=``)."""
        return [o for n in self.plain_graph.nodes for o in n.outputs if o]

    # -- capabilities ----------------------------------------------------------------------------
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "OnnxModel":
        if self._same_target(device, dtype):
            return self
        return OnnxModel(self.proto, path=self.path, device=torch.device(device) if device is not None else self.device,
                         dtype=dtype if dtype is not None else self.dtype, sha256=self.metadata.get("sha256"),
                         optimize=self._optimize, runtime=self.runtime)

    def with_runtime(self, runtime: str) -> "OnnxModel":
        """This model with another ``runtime`` (itself when it has that one already). ``verify`` checks the
        torch interpreter through the ``"torch"`` one: under another runtime a values-only call is
        onnxruntime's own forward, which compared with onnxruntime proves nothing."""
        if runtime == self.runtime:
            return self
        other = self._siblings.get(runtime)
        if other is None:
            # a view sharing the compiled graphs (no second compile): only the runtime differs
            import copy
            from .ortgrad import Runtime
            other = copy.copy(self)
            other.runtime, other._siblings = runtime, {}
            usable = self.device.type == "cpu" and self.dtype in (None, torch.float32)
            other._ort = Runtime(other, runtime) if runtime != "torch" and usable else None
            self._siblings[runtime] = other
        return other

    def reference(self, outputs: Sequence[str] | None = None, wrt: str | None = None) -> ReferenceForward:
        """onnxruntime on a copy of the graph with ``outputs`` added as graph outputs and an internal ``wrt``
        tensor cut into a graph input."""
        from .reference import onnxruntime_reference

        outs = list(outputs) if outputs else [s.name for s in self.outputs]
        return onnxruntime_reference(self.proto, outs, wrt, [s.name for s in self.inputs])

    def internal_tensors(self) -> list[str]:
        return self.tensor_names()

    def has_convolutions(self) -> bool:
        return any(n.ctx.op_type in ("Conv", "ConvTranspose", "FusedConvAct") for n in self.graph.nodes)

    def _weight_sources(self):
        """(tensor of a weight name, name -> its source) for the graph as written: a weight is a float
        initializer or the output of a Constant node, possibly through Identity/Cast/Transpose/Reshape-like
        nodes (how tf2onnx and paddle2onnx write weights)."""
        g = self.plain_graph
        inits = g.initializers
        producer = {o: n for n in g.nodes for o in n.outputs if o}

        def source(name: str | None) -> str | None:
            for _ in range(16):
                if name is None:
                    return None
                if name in inits:
                    return name
                node = producer.get(name)
                if node is None:
                    return None
                op = node.ctx.op_type
                if op == "Constant":
                    return name
                if op not in _PASS_THROUGH or not node.inputs or node.inputs[0] is None:
                    return None
                name = node.inputs[0]
            return None

        def tensor(name: str) -> torch.Tensor | None:
            if name in inits:
                return inits[name]
            node = producer.get(name)
            if node is None or node.ctx.op_type != "Constant":
                return None
            try:
                with torch.no_grad():
                    v = node.fn(node.ctx)
            except Exception:
                return None
            return v if isinstance(v, torch.Tensor) else None

        return source, tensor, producer

    def parameter_layers(self) -> list[ParameterLayer]:
        """Nodes of the graph as written with float weights (a weight matrix/kernel of rank >= 2, or a
        normalisation's scale and bias), from the output backwards. A weight is an initializer or the output
        of a Constant node (seen through Identity/Cast/Transpose/Reshape-like nodes). Folding (BatchNormalization
        into Conv, constants into initializers) does not merge layers here: the sanity test randomises the graph
        as written."""
        g = self.plain_graph
        source, tensor, _ = self._weight_sources()
        layers: list[ParameterLayer] = []
        seen: set[str] = set()
        for i, node in enumerate(g.nodes):
            op = node.ctx.op_type
            if op not in _WEIGHT_OPS:
                continue
            names: list[str] = []
            tensors: dict[str, torch.Tensor] = {}
            for inp in node.inputs:
                src = source(inp)
                if src is None or src in seen or src in names:
                    continue
                t = tensor(src)
                if t is None or not t.is_floating_point() or t.numel() <= 1:
                    continue
                names.append(src)
                tensors[src] = t
            if not names:
                continue
            if not any(tensors[n].dim() >= 2 for n in names) and op not in _NORM_OPS:
                continue
            seen.update(names)
            layers.append(ParameterLayer(node.ctx.name or f"{op}_{i}", tuple(names)))
        return layers[::-1]

    @contextlib.contextmanager
    def randomised(self, layers: Sequence[ParameterLayer], seed: int) -> Iterator["OnnxModel"]:
        """Randomise the weights of the graph as written (initializers, and the values of Constant nodes),
        and run that graph for every call inside the block: an optimized model computes with folded copies of
        its weights (and, for internal outputs such as the logits, other compiled graphs) that its weights do
        not reach."""
        g = self.plain_graph
        _, tensor, producer = self._weight_sources()
        gen = torch.Generator().manual_seed(int(seed))
        saved: list[tuple[str, torch.Tensor]] = []
        saved_attrs: list[tuple[Any, bool, Any]] = []  # (Constant node ctx, had "value", old value)
        self._randomised += 1
        try:
            with torch.no_grad():
                for layer in layers:
                    for name in layer.parameters:
                        if name in g.initializers:
                            t = g.initializers[name]
                            saved.append((name, t))
                            g.initializers[name] = gaussian_like(t, gen)
                            continue
                        t = tensor(name)
                        if t is None:
                            raise InputError(f"layer {layer.name!r}: no parameter {name!r} in the graph")
                        ctx = producer[name].ctx
                        saved_attrs.append((ctx, "value" in ctx.attrs, ctx.attrs.get("value")))
                        ctx.attrs["value"] = gaussian_like(t, gen)
            yield self
        finally:
            for name, old in reversed(saved):
                g.initializers[name] = old
            for ctx, had, old in reversed(saved_attrs):
                if had:
                    ctx.attrs["value"] = old
                else:
                    ctx.attrs.pop("value", None)
            self._randomised -= 1

    def softmax_input(self, output: str | None = None) -> str | None:
        """If ``output`` is produced by a Softmax, the name of that Softmax's input (the logits)."""
        out = output or self.outputs[0].name
        for n in self.plain_graph.nodes:
            if out in n.outputs:
                if n.ctx.op_type in ("Softmax",):
                    return n.inputs[0]
                # look through an Identity after the softmax
                if n.ctx.op_type == "Identity" and n.inputs[0]:
                    return self.softmax_input(n.inputs[0])
        return None


def load_onnx(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> OnnxModel:
    proto, data = read_onnx(path)
    return OnnxModel(proto, path=path, device=device, dtype=dtype, sha256=hashlib.sha256(data).hexdigest())
