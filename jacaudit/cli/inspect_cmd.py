"""``jacaudit inspect MODEL``: format, opset, producer, inputs/outputs, op histogram, parameters, unsupported ops."""
from __future__ import annotations

from typing import Annotated

import typer

from .common import emit_json, handle_errors, out


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


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        model: Annotated[str, typer.Argument(help="ONNX (.onnx) or TorchScript (.pt) model file.")],
        json_out: Annotated[bool, typer.Option("--json", help="Print the description as JSON on stdout.")] = False,
    ) -> None:
        """Describe a model: format, opset, inputs/outputs, op histogram, parameters, unsupported ops (exit 2 if any)."""
        from ..errors import EXIT_INPUT

        with handle_errors():
            d = inspect_model(model)
        if json_out:
            emit_json(d)
        else:
            from rich.table import Table

            out.print(f"[bold]{model}[/bold]  format={d['format']}  opset={d.get('opset')}  "
                      f"producer={d.get('producer') or '?'}  parameters={d.get('parameters'):,}", markup=True)
            t = Table("", "name", "shape", "dtype", "differentiable", title=None, box=None)
            for kind in ("inputs", "outputs"):
                for s in d[kind]:
                    t.add_row(kind[:-1], s["name"], str(s["shape"]), str(s["dtype"]),
                              "yes" if s["differentiable"] else "no")
            out.print(t)
            hist = d.get("op_histogram") or {}
            if hist:
                out.print("ops: " + ", ".join(f"{k}×{v}" for k, v in hist.items()), markup=False)
            for s in d["inputs"]:
                if s["dtype"] is not None and not s["differentiable"]:
                    out.print(f"note: input {s['name']!r} is {s['dtype']} (not differentiable); differentiate with "
                              "respect to an internal float tensor with --wrt (e.g. an embedding output)", markup=False)
        if d["unsupported_ops"]:
            from .common import err
            for u in d["unsupported_ops"]:
                err.print(f"error: unsupported op {u['domain']}::{u['op_type']} (opset {u['opset']}) in nodes "
                          + ", ".join(u["nodes"][:5]), style="bold red", markup=False)
            raise typer.Exit(EXIT_INPUT)
