"""``jacaudit inspect MODEL``: format, opset, producer, inputs/outputs, op histogram, parameters, unsupported ops."""
from __future__ import annotations

import typer

from typing import Annotated

from .options import InputOpt, ModelArg, ShapeOpt
from .runner import Outcome, audit_command
from .common import out


def _summary(report) -> None:
    from rich.table import Table
    from rich.text import Text

    r = report.result
    params = r.parameters
    opset = ", ".join(f"{k} {v}" for k, v in (r.opset or {}).items()) or "?"
    out.print(Text.assemble((str(r.path), "bold"), f"  format={r.format}  opset={opset}  producer="
                            f"{r.producer or '?'}  parameters={format(params, ',') if params is not None else '?'}"))
    t = Table("", "name", "shape", "dtype", "differentiable", title=None, box=None)
    for kind, ts in (("input", r.inputs), ("output", r.outputs)):
        for s in ts:
            t.add_row(*map(Text, (kind, s.name, "?" if s.shape is None else "x".join(map(str, s.shape)),
                                  str(s.dtype), {True: "yes", False: "no"}.get(s.differentiable, "unknown"))))
    out.print(t)
    if r.op_histogram:
        out.print("ops: " + ", ".join(f"{o.op_type}×{o.count}" for o in r.op_histogram), markup=False)
    if getattr(r, "input_gradients", None):
        out.print(f"input gradients: {r.input_gradients}", markup=False)
    for n in r.notes:
        out.print(f"note: {n}", markup=False)
    tensors = getattr(r, "tensors", None)
    if tensors is not None:
        tt = Table("tensor", "shape", "dtype", title=f"{len(tensors)} internal float tensor(s) (for --wrt / "
                   "--output-name)", box=None, title_justify="left")
        for s in tensors:
            tt.add_row(*map(Text, (s.name, "?" if s.shape is None else "x".join(map(str, s.shape)),
                                   str(s.dtype))))
        out.print(tt)
    if getattr(r, "tensors_note", None):
        out.print(f"note: {r.tensors_note}", markup=False)


def register(app: typer.Typer) -> None:
    @audit_command(app, "inspect", computes=False)
    def inspect_cmd(model: ModelArg,
                    tensors: Annotated[bool, typer.Option(
                        "--tensors", help="Also list the graph's internal float tensors with their shapes (ONNX "
                        "shape inference): the names --wrt and --output-name take.")] = False,
                    input: InputOpt = None, shape: ShapeOpt = None,
                    *, ctx) -> Outcome:
        """Describe a model: format, opset, inputs/outputs, op histogram, parameters, unsupported ops.

        One check: unsupported_ops fails (exit 1) when the interpreter lacks an operator the graph uses; the
        report is written either way. --input/--shape give the example input with which it says which path
        computes the input gradients (needed for a model with dynamic axes)."""
        from ..analyses.inspect import inspect_analysis
        from .common import state

        with ctx.timed("inspect"):
            res, ident = inspect_analysis(model, tensors=tensors, runtime=state.runtime, input=input or None,
                                          shape=shape or None)
        return Outcome(res, model=ident, settings={"tensors": tensors, "input": input or None,
                                                   "shape": shape or None}, summary=_summary)
