"""``jacaudit verify MODEL``: the interpreter's forward against onnxruntime, and the engine's J v against
central differences (through onnxruntime for ONNX, through the model itself in float64 for TorchScript).
Exit 0 when both pass, 1 when not."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import emit_json, handle_errors, out, setup_runtime, warn
from .jacobian_cmd import (ChannelsOpt, DeviceOpt, InputNameOpt, InputOpt, JsonOpt, LayoutOpt, LogitsOpt, MeanOpt,
                           OutputNameOpt, PresetOpt, ScaleOpt, SeedOpt, ShapeOpt, SizeOpt, StdOpt, WrtOpt,
                           load_model_and_input)


def _print(r) -> None:
    from rich.table import Table

    f = r.forward
    if f.reference == "onnxruntime":
        out.print(f"forward vs onnxruntime: max abs {f.max_abs:.3g}, max rel {f.max_rel:.3g} "
                  f"(tol {f.tol:.3g}) -> {'pass' if f.passed else 'FAIL'} {f.note}".rstrip(), markup=False)
    else:
        out.print(f"forward: {f.note}", markup=False)
    t = Table("dir", "reference", "status", "rel error", "tol", "|Jv|", "FD spread", "note", box=None,
              title="J v (jvp) vs central differences (Richardson)")
    for d in r.directions:
        t.add_row(str(d.index), d.reference, d.status, f"{d.rel_error:.3g}", f"{d.tol:.3g}", f"{d.jvp_norm:.4g}",
                  f"{d.fd_spread:.2g}", d.note)
    out.print(t)
    a = r.adjoint
    out.print(f"u^T (J v) vs (u^T J) v: max rel error {a.max_rel_error:.3g} (tol {a.tol:.3g}) -> "
              f"{'pass' if a.passed else 'FAIL'}", markup=False)
    out.print(f"verdict: {r.verdict.upper()}", markup=False)


def register(app: typer.Typer) -> None:
    @app.command("verify")
    def verify_cmd(
        model: Annotated[str, typer.Argument(help="ONNX (.onnx) or TorchScript (.pt) model file.")],
        input: InputOpt = None,
        input_name: InputNameOpt = None,
        output_name: OutputNameOpt = None,
        wrt: WrtOpt = None,
        logits: LogitsOpt = False,
        directions: Annotated[int, typer.Option("--directions", "-k", help="Random directions to check.",
                                                min=1)] = 3,
        rtol: Annotated[Optional[float], typer.Option("--rtol", help="Relative tolerance of the derivative check "
                                                      "(default 2e-3 vs float32 onnxruntime, 1e-6 vs float64).")]
        = None,
        forward_tol: Annotated[float, typer.Option("--forward-tol", help="Bound on max|interp-ort|/max|ort|.")]
        = 1e-4,
        size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, scale: ScaleOpt = None,
        layout: LayoutOpt = None, channels: ChannelsOpt = None, preset: PresetOpt = None, shape: ShapeOpt = None,
        device: DeviceOpt = "cpu",
        dtype: Annotated[str, typer.Option("--dtype", help="Engine dtype (float64 for tight checks).")] = "float64",
        seed: SeedOpt = 0,
        json_out: JsonOpt = False,
    ) -> None:
        """Verify forward fidelity (vs onnxruntime) and derivatives (vs finite differences). Exit 0 pass, 1 fail."""
        from ..errors import EXIT_GATE

        with handle_errors():
            setup_runtime()
            import torch

            from ..engine.verify import verify

            torch.manual_seed(seed)
            # the model stays in its stored dtype: verify() builds the float64 copies it needs
            ld = load_model_and_input(model, input=input, input_name=input_name, device=device, dtype=None,
                                      seed=seed, shape=shape, size=size, mean=mean, std=std, scale=scale,
                                      layout=layout, channels=channels, preset=preset)
            r = verify(ld.model, ld.feeds, input=ld.input_name, output=output_name, wrt=wrt, logits=logits,
                       directions=directions, seed=seed, dtype=dtype, rtol=rtol, forward_tol=forward_tol)
        warnings = list(r.warnings)
        if ld.synthetic:
            warnings.append("the input is synthetic (seeded random values from the declared shape)")
        for w in warnings:
            warn(w)
        if json_out:
            d = r.to_dict()
            d["warnings"] = warnings
            d["settings"]["input_source"] = ld.source
            emit_json(d)
        else:
            _print(r)
        if not r.passed:
            raise typer.Exit(EXIT_GATE)
