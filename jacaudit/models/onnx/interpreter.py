"""The ONNX -> torch interpreter: walks a graph in topological order, one pure torch function per node.

Because every node is a plain torch function, ``torch.func.vmap``, ``jacrev`` and ``jacfwd`` run through
the whole graph. Unsupported ops are found when the graph is compiled, before anything runs.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ...errors import JacauditError, RuntimeFailure, UnsupportedError, UnsupportedOpError
from . import registry
from .registry import onnx_to_torch_dtype

# Importing the op modules registers them.
from . import ops as _ops  # noqa: F401


def tensor_from_proto(t, device: torch.device | None = None) -> torch.Tensor:
    """TensorProto -> torch tensor (copying; handles every numeric type torch has)."""
    from onnx import numpy_helper, TensorProto

    f8 = onnx_to_torch_dtype(t.data_type)
    if t.data_type == TensorProto.BFLOAT16 or (f8 is not None and f8.is_floating_point and f8.itemsize == 1):
        arr = numpy_helper.to_array(t).astype(np.float32)  # exact: these types are subsets of float32
        out = torch.from_numpy(np.ascontiguousarray(arr)).to(f8)
    else:
        arr = numpy_helper.to_array(t)
        if arr.dtype == object or arr.dtype.kind in "USO":
            raise UnsupportedOpError([("string tensor " + repr(t.name), "", 0, [t.name])])
        if arr.dtype.kind == "V" or str(arr.dtype).startswith(("float8", "int4", "uint4", "float4")):
            raise JacauditError(f"tensor {t.name!r} has a low-precision type ({arr.dtype}) that torch cannot hold")
        out = torch.from_numpy(np.array(arr, copy=True))
    return out.to(device) if device is not None else out


class NodeContext:
    """What an op function may know about its node besides its inputs."""

    __slots__ = ("node", "attrs", "opset", "n_outputs", "graph", "values", "op_type", "name", "output_names",
                 "memo")

    def __init__(self, node, attrs: dict[str, Any], opset: int, graph: "CompiledGraph"):
        self.node = node
        self.op_type = node.op_type
        self.name = node.name or f"{node.op_type}:{','.join(node.output)}"
        self.attrs = attrs
        self.opset = opset
        self.n_outputs = len(node.output)
        self.output_names = list(node.output)
        self.graph = graph
        self.values: dict[str, Any] | None = None  # the current value scope (for subgraphs)
        self.memo: dict[Any, Any] = {}  # what an op derives from its attributes and input shapes (e.g. pads)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The working float dtype when the model was loaded with ``dtype=`` (else None)."""
        return self.graph.float_dtype

    @property
    def device(self) -> torch.device:
        return self.graph.device

    def run_subgraph(self, graph: "CompiledGraph", inputs: Sequence[Any]) -> list[Any]:
        """Run a subgraph attribute (If/Loop/Scan body) with positional inputs; outer scope is visible."""
        feeds = dict(zip(graph.input_names, inputs))
        return graph.run(feeds, outer=self.values)


def _parse_attrs(node, graph: "CompiledGraph", fn_attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    from onnx import AttributeProto as A

    attrs: dict[str, Any] = {}
    for a in node.attribute:
        if a.ref_attr_name:
            # inside a function body: the value comes from the calling node's attributes
            if fn_attrs is not None and a.ref_attr_name in fn_attrs:
                attrs[a.name] = fn_attrs[a.ref_attr_name]
            continue
        t = a.type
        if t == A.FLOAT:
            v: Any = float(a.f)
        elif t == A.INT:
            v = int(a.i)
        elif t == A.STRING:
            v = a.s.decode("utf-8", "replace")
        elif t == A.TENSOR:
            v = tensor_from_proto(a.t, graph.device)
        elif t == A.GRAPH:
            v = CompiledGraph(a.g, graph.opsets, graph.device, graph.float_dtype, parent=graph)
        elif t == A.FLOATS:
            v = [float(x) for x in a.floats]
        elif t == A.INTS:
            v = [int(x) for x in a.ints]
        elif t == A.STRINGS:
            v = [s.decode("utf-8", "replace") for s in a.strings]
        elif t == A.TENSORS:
            v = [tensor_from_proto(x, graph.device) for x in a.tensors]
        elif t == A.GRAPHS:
            v = [CompiledGraph(g, graph.opsets, graph.device, graph.float_dtype, parent=graph) for g in a.graphs]
        elif t == A.SPARSE_TENSOR:
            from onnx import numpy_helper
            dense = numpy_helper.to_array(a.sparse_tensor.values)
            idx = numpy_helper.to_array(a.sparse_tensor.indices)
            shape = tuple(a.sparse_tensor.dims)
            full = np.zeros(shape, dtype=dense.dtype)
            if idx.ndim == 1:
                full.reshape(-1)[idx] = dense
            else:
                full[tuple(idx.T)] = dense
            v = torch.from_numpy(full).to(graph.device)
        elif t == A.TYPE_PROTO:
            v = a.tp
        else:
            v = None
        attrs[a.name] = v
    return attrs


class _Node:
    __slots__ = ("fn", "ctx", "inputs", "outputs", "implicit")

    def __init__(self, fn, ctx, inputs, outputs, implicit):
        self.fn = fn
        self.ctx = ctx
        self.inputs = inputs
        self.outputs = outputs
        self.implicit = implicit  # outer-scope names used by subgraphs


class _FunctionOp:
    """Runs an ONNX function (a model-local FunctionProto, or a standard op's function body)."""

    def __init__(self, graph: "CompiledGraph", fn_inputs, fn_outputs):
        self.graph = graph
        self.fn_inputs = list(fn_inputs)
        self.fn_outputs = list(fn_outputs)

    def __call__(self, ctx: NodeContext, *inputs):
        feeds = {n: v for n, v in zip(self.fn_inputs, inputs) if n and v is not None}
        outs = self.graph.run(feeds, outer=None)
        return tuple(outs)


class CompiledGraph:
    """A GraphProto (or function body) compiled to a list of (fn, ctx, input names, output names)."""

    def __init__(self, graph, opsets: dict[str, int], device: torch.device, float_dtype: torch.dtype | None,
                 parent: "CompiledGraph | None" = None, functions: dict | None = None,
                 nodes=None, input_names=None, output_names=None, fn_attrs: dict | None = None):
        self.opsets = opsets
        self.device = device
        self.float_dtype = float_dtype
        self.parent = parent
        self.functions = functions if functions is not None else (parent.functions if parent else {})
        self.initializers: dict[str, torch.Tensor] = {}
        if graph is not None:
            for t in graph.initializer:
                self.initializers[t.name] = self._cast(tensor_from_proto(t, device))
            for st in graph.sparse_initializer:
                from onnx import numpy_helper
                vals = numpy_helper.to_array(st.values)
                idx = numpy_helper.to_array(st.indices)
                full = np.zeros(tuple(st.dims), dtype=vals.dtype)
                if idx.ndim == 1:
                    full.reshape(-1)[idx] = vals
                else:
                    full[tuple(idx.T)] = vals
                self.initializers[st.values.name] = self._cast(torch.from_numpy(full).to(device))
            nodes = graph.node
            input_names = [i.name for i in graph.input]
            output_names = [o.name for o in graph.output]
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.missing: dict[tuple[str, str, int], list[str]] = {}
        self.nodes: list[_Node] = []
        defined = set(self.input_names) | set(self.initializers)
        for node in nodes:
            domain = registry._norm_domain(node.domain)
            opset = opsets.get(domain, opsets.get("", 1))
            fn = self._resolve(node, domain, opset)
            attrs = _parse_attrs(node, self, fn_attrs)
            if float_dtype == torch.float64 and node.op_type == "Cast" and attrs.get("to") == 1:
                attrs["to"] = 11  # float64 mode: a cast to float32 stays in float64 (tight derivative checks)
            ctx = NodeContext(node, attrs, opset, self)
            implicit: set[str] = set()
            for v in attrs.values():
                subs = v if isinstance(v, list) else [v]
                for g in subs:
                    if isinstance(g, CompiledGraph):
                        implicit |= g.free_names()
                        for k, names in g.missing.items():
                            self.missing.setdefault(k, []).extend(names)
            if fn is None:
                self.missing.setdefault((node.op_type, node.domain, opset), []).append(ctx.name)
            self.nodes.append(_Node(fn, ctx, [n if n else None for n in node.input], list(node.output),
                                    sorted(implicit)))
            defined.update(node.output)
        self._plans: dict[Any, Any] = {}
        # Cache the nodes fixed by the input signature (shape arithmetic) per signature: set on the graphs
        # OnnxModel optimizes (never on the graph as written, whose weights randomised() replaces in place).
        self.static_cache = False

    # ------------------------------------------------------------------------------------------
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        if self.float_dtype is not None and t.is_floating_point() and t.dtype != self.float_dtype:
            return t.to(self.float_dtype)
        return t

    def _resolve(self, node, domain: str, opset: int):
        if node.op_type in registry.OUT_OF_SCOPE and domain == "":
            return None
        fn = registry.lookup(node.op_type, domain, opset)
        if fn is not None:
            return fn
        # A model-local function
        key = (node.domain, node.op_type)
        if key in self.functions:
            return self._function_op(self.functions[key], node)
        # A standard op defined by a function body in the ONNX schema
        if domain == "":
            return self._schema_function(node, opset)
        return None

    def _function_op(self, fproto, node):
        opsets = dict(self.opsets)
        for imp in fproto.opset_import:
            opsets[registry._norm_domain(imp.domain)] = imp.version
        call_attrs = _parse_attrs(node, self)
        for a in fproto.attribute_proto:  # defaults
            if a.name not in call_attrs:
                from onnx import helper
                call_attrs[a.name] = helper.get_attribute_value(a)
        body = CompiledGraph(None, opsets, self.device, self.float_dtype, functions=self.functions,
                             nodes=fproto.node, input_names=fproto.input, output_names=fproto.output,
                             fn_attrs=call_attrs)
        if body.missing:
            for k, names in body.missing.items():
                self.missing.setdefault(k, []).extend(names)
        return _FunctionOp(body, fproto.input, fproto.output)

    def _schema_function(self, node, opset: int):
        from onnx import defs, helper, onnx_pb

        try:
            schema = defs.get_schema(node.op_type, opset, "")
        except Exception:
            return None
        fproto = None
        if schema.has_function:
            fproto = onnx_pb.FunctionProto()
            fproto.ParseFromString(schema.function_body.SerializeToString())
        elif getattr(schema, "has_context_dependent_function", False):
            return None  # needs input types; not expanded
        if fproto is None or not fproto.node:
            return None
        if not fproto.opset_import:
            fproto.opset_import.append(helper.make_opsetid("", opset))
        call_attrs = _parse_attrs(node, self)
        for name, a in schema.attributes.items():
            if name not in call_attrs and a.default_value is not None and a.default_value.name:
                call_attrs[name] = helper.get_attribute_value(a.default_value)
        opsets = dict(self.opsets)
        for imp in fproto.opset_import:
            opsets[registry._norm_domain(imp.domain)] = imp.version
        try:
            body = CompiledGraph(None, opsets, self.device, self.float_dtype, functions=self.functions,
                                 nodes=fproto.node, input_names=fproto.input, output_names=fproto.output,
                                 fn_attrs=call_attrs)
        except Exception:
            return None
        if body.missing:
            return None
        return _FunctionOp(body, fproto.input, fproto.output)

    def free_names(self) -> set[str]:
        """Names this graph reads from an enclosing scope."""
        defined = set(self.input_names) | set(self.initializers)
        free: set[str] = set()
        for n in self.nodes:
            for i in list(n.inputs) + list(n.implicit):
                if i and i not in defined:
                    free.add(i)
            defined.update(n.outputs)
        return free

    def _plan(self, outputs: tuple[str, ...], overridden: frozenset[str]) -> list[_Node]:
        key = (outputs, overridden)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        need = set(outputs)
        keep: list[_Node] = []
        for n in reversed(self.nodes):
            if any(o in need for o in n.outputs):
                keep.append(n)
                if all(o in overridden for o in n.outputs if o):
                    continue
                need.update(i for i in n.inputs if i)
                need.update(n.implicit)
        plan = list(reversed(keep))
        self._plans[key] = plan
        return plan

    def run(self, feeds: dict[str, Any], outputs: Sequence[str] | None = None,
            overrides: dict[str, Any] | None = None, outer: dict[str, Any] | None = None) -> list[Any]:
        values: dict[str, Any] = dict(outer) if outer else {}
        values.update(self.initializers)
        fd = self.float_dtype
        for k, v in feeds.items():
            if fd is not None and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != fd:
                v = v.to(fd)
            values[k] = v
        outs = tuple(outputs) if outputs is not None else tuple(self.output_names)
        if overrides:
            values.update(overrides)
            plan = self._plan(outs, frozenset(overrides))
            self._exec([n for n in plan if not (n.outputs and all(o in overrides for o in n.outputs if o))],
                       values, overrides)
        elif self.static_cache and outer is None:
            self._run_specialised(outs, feeds, values)
        else:
            self._exec(self._plan(outs, frozenset()), values, None)
        try:
            return [values[o] for o in outs]
        except KeyError as e:
            raise JacauditError(f"tensor {e.args[0]!r} is not produced by this graph") from None

    # -- the plan specialised to the input signature ------------------------------------------------------
    def _run_specialised(self, outs: tuple[str, ...], feeds: dict[str, Any], values: dict[str, Any]) -> None:
        """Run ``outs``' plan with the nodes whose outputs follow from the input signature alone (shape
        arithmetic: Shape/Size of tensors whose shapes the signature fixes, and what is computed from those and
        the initializers) taken from a cache filled by the first run with that signature."""
        try:
            sig = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in feeds.items())
        except AttributeError:  # a non-tensor feed
            self._exec(self._plan(outs, frozenset()), values, None)
            return
        plans = self._plans
        entry = plans.get(("static", outs, sig))
        if entry is not None:
            cached, dynamic = entry
            values.update(cached)
            self._exec(dynamic, values, None)
            return
        plan = self._plan(outs, frozenset())
        split = plans.get(("split", outs, frozenset(feeds)))
        if split is None:
            split = plans[("split", outs, frozenset(feeds))] = _static_split(plan, feeds, self.initializers)
        self._exec(plan, values, None)
        static_ids, _ = split
        if not static_ids or torch._C._functorch.peek_interpreter_stack() is not None:
            return
        # a requested output is computed afresh every call (the caller gets its own tensor, never the cache's)
        wanted = set(outs)
        dynamic = [n for n in plan if id(n) not in static_ids or any(o in wanted for o in n.outputs)]
        need = set(outs)
        for n in dynamic:
            need.update(i for i in n.inputs if i)
            need.update(n.implicit)
        cached = {}
        dyn_ids = {id(n) for n in dynamic}
        for n in plan:
            if id(n) in static_ids and id(n) not in dyn_ids:
                for o in n.outputs:
                    if o and o in need:
                        v = values.get(o)
                        if not isinstance(v, torch.Tensor) or v.requires_grad or v.is_inference() or \
                                torch._C._functorch.is_functorch_wrapped_tensor(v):
                            return  # not a plain constant (or an inference-mode tensor): not cached
                        cached[o] = v
        n_static = sum(1 for k in plans if k[0] == "static")
        if n_static >= 16:  # many signatures: start again
            for k in [k for k in plans if k[0] == "static"]:
                del plans[k]
        plans[("static", outs, sig)] = (cached, dynamic)

    def _exec(self, plan: list[_Node], values: dict[str, Any], overrides: dict[str, Any] | None) -> None:
        fd = self.float_dtype
        for n in plan:
            try:
                args = [values[i] if i is not None else None for i in n.inputs]
            except KeyError as e:
                raise JacauditError(f"node {n.ctx.name!r} ({n.ctx.op_type}) reads {e.args[0]!r}, which no "
                                    f"input, initializer or earlier node provides") from None
            ctx = n.ctx
            ctx.values = values
            try:
                res = n.fn(ctx, *args)
            except (UnsupportedError, NotImplementedError) as e:  # an op variant we deliberately do not support
                if isinstance(e, UnsupportedError) and str(e).startswith("node "):
                    raise  # already names its node (a nested subgraph or function)
                raise UnsupportedError(f"node {ctx.name!r} ({ctx.op_type}, opset {ctx.opset}): {e}") from e
            except JacauditError:
                raise
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # annotate with the node; keep the original as the cause
                raise OpError(ctx, e) from e
            if fd is None and overrides is None:
                if isinstance(res, torch.Tensor):
                    values[n.outputs[0]] = res
                    continue
                if not isinstance(res, (tuple, list)):
                    res = (res,)
                for name, val in zip(n.outputs, res):
                    if name:
                        values[name] = val
                continue
            if not isinstance(res, (tuple, list)):
                res = (res,)
            for name, val in zip(n.outputs, res):
                if name:
                    if fd is not None and isinstance(val, torch.Tensor) and val.is_floating_point() \
                            and val.dtype != fd:
                        val = val.to(fd)
                    values[name] = overrides.get(name, val) if overrides else val


# Ops whose output shapes follow from their input shapes and attributes alone (not from input values).
_SHAPE_FROM_SHAPES = frozenset("""
Abs Acos Acosh Add And Asin Asinh Atan Atanh BatchNormalization BitShift BitwiseAnd BitwiseNot BitwiseOr
BitwiseXor Cast CastLike Ceil Celu Clip Concat Conv ConvTranspose Cos Cosh CumSum DepthToSpace Div Einsum Elu
Equal Erf Exp Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual HardSigmoid HardSwish Hardmax Identity InstanceNormalization IsInf IsNaN
LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization MatMul Max MaxPool Mean
Min Mish Mod Mul Neg Not Or PRelu Pow RNN Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin Sinh Softmax
Softplus Softsign SpaceToDepth Sqrt Sub Sum Tan Tanh ThresholdedRelu Transpose Trilu Where Xor AveragePool
LpPool ArgMax ArgMin ScatterElements ScatterND Scatter GroupNormalization RMSNormalization
FusedHardSwish FusedHardSigmoid FusedSiLU FusedMish FusedGelu FusedLayerNorm FusedLinear FusedConvAct
""".split())
# Ops whose output shapes also follow from the values of inputs 1, 2, ... (shape, axes, pads, k, ...): static
# when those are.
_SHAPE_FROM_PARAMS = frozenset("""
Reshape Expand Tile Slice Pad Squeeze Unsqueeze Split Resize Upsample TopK OneHot ReduceMean ReduceSum
ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare
""".split())
# Never computed once for all calls: randomness, control flow with bodies, training-mode ops.
_NEVER_STATIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                           "Multinomial", "Bernoulli", "Dropout", "If", "Loop", "Scan"})


def _static_split(plan: list[_Node], feeds, initializers) -> tuple[set[int], set[str]]:
    """The nodes of ``plan`` whose outputs are fixed by the input signature (the feeds' shapes, dtypes and
    devices) and the initializers, not by the feeds' values: Shape/Size of a tensor whose shape is fixed, and
    nodes all of whose inputs are such values. A tensor's shape is fixed when it is a feed, or comes from an
    op whose output shapes follow from its inputs' shapes (and, for Reshape/Slice/..., the values of its
    parameter inputs, themselves fixed). Ops outside the default domain, with subgraphs or random are never
    in. Returns (ids of those nodes, the names of the fixed values)."""
    fixed_val = set(initializers)
    fixed_shape = set(fixed_val) | set(feeds)
    ids: set[int] = set()
    for n in plan:
        ctx = n.ctx
        op = ctx.op_type
        if n.implicit or op in _NEVER_STATIC or n.fn is None or \
                (ctx.node.domain not in ("", "ai.onnx") and not op.startswith("Fused")):
            continue
        ins = [i for i in n.inputs if i]
        outs = [o for o in n.outputs if o]
        if op in ("Shape", "Size"):
            if ins and ins[0] in fixed_shape:
                fixed_val.update(outs)
                fixed_shape.update(outs)
                ids.add(id(n))
            continue
        if all(i in fixed_val for i in ins):
            fixed_val.update(outs)
            fixed_shape.update(outs)
            ids.add(id(n))
            continue
        if all(i in fixed_shape for i in ins) and (
                op in _SHAPE_FROM_SHAPES
                or (op in _SHAPE_FROM_PARAMS and all(i in fixed_val for i in n.inputs[1:] if i))):
            fixed_shape.update(outs)
    return ids, fixed_val - set(initializers)


class OpError(RuntimeFailure):
    """An op failed while running; names the node."""

    def __init__(self, ctx: NodeContext, err: Exception):
        self.ctx = ctx
        self.err = err
        super().__init__(f"node {ctx.name!r} ({ctx.op_type}, opset {ctx.opset}) failed: "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def compile_model(model_proto, device: torch.device, float_dtype: torch.dtype | None) -> CompiledGraph:
    opsets = {}
    for imp in model_proto.opset_import:
        opsets[registry._norm_domain(imp.domain)] = imp.version
    if "" not in opsets:
        opsets[""] = 1
    functions = {(f.domain, f.name): f for f in model_proto.functions}
    g = CompiledGraph(model_proto.graph, opsets, device, float_dtype, functions=functions)
    if g.missing:
        raise UnsupportedOpError([(op, dom, ver, names) for (op, dom, ver), names in sorted(g.missing.items())])
    return g
