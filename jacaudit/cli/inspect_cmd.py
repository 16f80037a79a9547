"""``jacaudit inspect MODEL``: format, opset, producer, inputs/outputs, op histogram, parameters, unsupported ops."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import emit_json, handle_errors, info, out


def inspect_model(path: str) -> dict:
    """Describe a model without running it. Unsupported ONNX ops are listed (not raised)."""
    from ..errors import UnsupportedOpError
    from ..models import detect_format

    fmt = detect_format(path)
    if fmt == "torchscript":
        from ..models.torchscript import load_torchscript
        m = load_torchscript(path)
        d = m.describe()
        d["unsupported_ops"] = []
        return d
    import torch
    from ..models.onnx.model import OnnxModel, read_onnx
    import hashlib
    from collections import Counter

    proto, data = read_onnx(path)
    try:
        m = OnnxModel(proto, path=path, sha256=hashlib.sha256(data).hexdigest())
        d = m.describe()
        d["unsupported_ops"] = []
        return d
    except UnsupportedOpError as e:
        ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                      for n in proto.graph.node)
        from ..models.onnx.model import _value_info_spec
        init = {t.name for t in proto.graph.initializer}
        return {
            "format": "onnx", "path": path,
            "inputs": [_value_info_spec(v).describe() for v in proto.graph.input if v.name not in init],
            "outputs": [_value_info_spec(v).describe() for v in proto.graph.output],
            "opset": {(i.domain or "ai.onnx"): i.version for i in proto.opset_import},
            "ir_version": proto.ir_version,
            "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            "op_histogram": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
            "parameters": int(sum(int(torch.Size(t.dims).numel()) for t in proto.graph.initializer
                                  if t.data_type in (1, 10, 11, 16))),
            "sha256": hashlib.sha256(data).hexdigest(),
            "unsupported_ops": [{"op_type": op, "domain": dom or "ai.onnx", "opset": ver, "nodes": names}
                                for op, dom, ver, names in e.missing],
        }


def _tensor(d: dict):
    from ..results.inspect import InspectTensor

    shape = d.get("shape")
    return InspectTensor(name=str(d.get("name")),
                         shape=None if shape is None else [x if isinstance(x, int) else str(x) for x in shape],
                         dtype=None if d.get("dtype") is None else str(d.get("dtype")),
                         differentiable=bool(d.get("differentiable")))


def _notes(d: dict) -> list[str]:
    return [f"input {s['name']!r} is {s['dtype']} (not differentiable); differentiate with respect to an internal "
            "float tensor with --wrt (e.g. an embedding output)"
            for s in d.get("inputs", []) if s.get("dtype") is not None and not s.get("differentiable")]


def inspect_result(d: dict):
    """Adapter: :func:`inspect_model`'s dict -> the report's :class:`jacaudit.results.inspect.InspectResult`."""
    from ..results.inspect import InspectOpCount, InspectResult, InspectUnsupportedOp

    hist = d.get("op_histogram") or {}
    opset = d.get("opset")
    opt = d.get("optimizations")
    ir = d.get("ir_version")
    return InspectResult(
        format=str(d.get("format")), path=str(d.get("path")), sha256=d.get("sha256"),
        opset={str(k): int(v) for k, v in opset.items()} if isinstance(opset, dict) else None,
        ir_version=int(ir) if isinstance(ir, int) else None, producer=d.get("producer") or None,
        inputs=[_tensor(x) for x in d.get("inputs", [])], outputs=[_tensor(x) for x in d.get("outputs", [])],
        op_histogram=[InspectOpCount(str(k), int(v)) for k, v in hist.items()],
        nodes=int(sum(int(v) for v in hist.values())),
        parameters=None if d.get("parameters") is None else int(d["parameters"]),
        optimizations={str(k): int(v) for k, v in opt.items()} if isinstance(opt, dict) else None,
        unsupported_ops=[InspectUnsupportedOp(str(u["op_type"]), str(u["domain"]),
                                              None if u.get("opset") is None else int(u["opset"]),
                                              [str(n) for n in u.get("nodes", [])])
                         for u in d.get("unsupported_ops", [])],
        supported=not d.get("unsupported_ops"), notes=_notes(d))


def _identity(d: dict):
    """The report envelope's model identity, from the description (no loaded model is needed)."""
    import os

    from ..results import ModelIdentity, TensorInfo

    opset = d.get("opset")
    return ModelIdentity(path=str(d.get("path")), name=os.path.basename(str(d.get("path"))),
                         format=str(d.get("format")), sha256=d.get("sha256"),
                         opset={str(k): int(v) for k, v in opset.items()} if isinstance(opset, dict) else None,
                         producer=d.get("producer") or None, parameters=d.get("parameters"),
                         inputs=[TensorInfo(str(x["name"]), x.get("shape"), x.get("dtype")) for x in d["inputs"]],
                         outputs=[TensorInfo(str(x["name"]), x.get("shape"), x.get("dtype"))
                                  for x in d["outputs"]])


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        model: Annotated[str, typer.Argument(help="ONNX (.onnx) or TorchScript (.pt) model file.")],
        out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the reports.")] =
        Path("jacaudit-inspect"),
        formats: Annotated[str, typer.Option("--format", help="Reports to write: html,json,md (a comma-separated "
                                             "list; '' for none).")] = "html,json,md",
        json_out: Annotated[bool, typer.Option("--json", help="Print the description as JSON on stdout.")] = False,
    ) -> None:
        """Describe a model: format, opset, inputs/outputs, op histogram, parameters, unsupported ops (exit 2 if any).

        Reports (HTML/JSON/Markdown) go into --out, also when ops are unsupported (status fail, exit 2)."""
        import time

        from ..errors import EXIT_INPUT

        t_start = time.perf_counter()
        with handle_errors():
            from ..report import parse_formats, write_reports
            from ..results import make_report

            fmts = parse_formats(formats)
            d = inspect_model(model)
            result = inspect_result(d)
            code = 0 if result.supported else EXIT_INPUT
            warnings = [f"unsupported op {u.domain}::{u.op_type} (opset {u.opset}) in {len(u.nodes)} node(s)"
                        for u in result.unsupported_ops]
            report = make_report("inspect", result, model=_identity(d), settings={}, warnings=warnings,
                                 timings={"total": round(time.perf_counter() - t_start, 4)}, exit_code=code,
                                 status="pass" if result.supported else "fail")
            written = write_reports(report, str(out_dir), fmts) if fmts else []
        if json_out:
            emit_json(d)
        else:
            from rich.table import Table
            from rich.text import Text

            params = d.get("parameters")
            out.print(Text.assemble((str(model), "bold"), f"  format={d['format']}  opset={d.get('opset')}  "
                                    f"producer={d.get('producer') or '?'}  parameters="
                                    f"{format(params, ',') if isinstance(params, int) else '?'}"))
            t = Table("", "name", "shape", "dtype", "differentiable", title=None, box=None)
            for kind in ("inputs", "outputs"):
                for s in d[kind]:
                    t.add_row(*map(Text, (kind[:-1], str(s["name"]), str(s["shape"]), str(s["dtype"]),
                                          "yes" if s["differentiable"] else "no")))
            out.print(t)
            hist = d.get("op_histogram") or {}
            if hist:
                out.print("ops: " + ", ".join(f"{k}×{v}" for k, v in hist.items()), markup=False)
            for n in result.notes:
                out.print(f"note: {n}", markup=False)
        for p_ in written:
            info(f"wrote {p_}")
        if d["unsupported_ops"]:
            from .common import err
            for u in d["unsupported_ops"]:
                err.print(f"error: unsupported op {u['domain']}::{u['op_type']} (opset {u['opset']}) in nodes "
                          + ", ".join(u["nodes"][:5]), style="bold red", markup=False)
            raise typer.Exit(EXIT_INPUT)
