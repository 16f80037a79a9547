"""``jacaudit verify MODEL``: the interpreter's forward against onnxruntime, and the engine's J v against
central differences (through onnxruntime for ONNX, through the model itself in float64 for TorchScript).
Exit 0 when every check passes, 1 when one fails, 4 when no direction gave evidence (inconclusive)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import out
from .jacobian_cmd import load_point
from .options import (ChannelsOpt, DeviceOpt, InputNameOpt, InputOpt, LayoutOpt, LogitsOpt, MeanOpt, ModelArg,
                      OutputNameOpt, PresetOpt, ScaleOpt, SeedOpt, ShapeOpt, SizeOpt, StdOpt, WrtOpt)
from .runner import Outcome, audit_command


def _summary(report) -> None:
    from rich.table import Table

    r = report.result
    f = r.forward
    if f.reference == "onnxruntime":
        floor = f" above the floor {f.atol:.3g} abs" if f.atol is not None else ""
        out.print(f"forward vs onnxruntime: max abs {f.max_abs:.3g}, max rel {f.max_rel:.3g} "
                  f"(tol {f.tol:.3g}{floor}) -> {'pass' if f.passed else 'FAIL'} {f.note}".rstrip(), markup=False)
    else:
        out.print(f"forward: {f.note}", markup=False)
    t = Table("dir", "reference", "status", "rel error", "tol", "|Jv|", "steps h", "note", box=None,
              title="J v (jvp) vs central differences (Richardson); tol shown where it judged")
    for d in r.directions:
        used = d.status in ("pass", "fail")
        label = str(d.index) + (f" (retry of {d.retry_of}{', nearby x' if d.point != 'x' else ''})"
                                if d.retry_of is not None else "")
        t.add_row(label, d.reference, d.status, f"{d.rel_error:.3g}", f"{d.tol:.3g}" if used else "-",
                  f"{d.jvp_norm:.4g}", f"{d.steps[0]:.2g}..{d.steps[-1]:.2g}" if d.steps else "", d.note)
    out.print(t)
    a = r.adjoint
    if a.status == "skipped":
        out.print(f"u^T (J v) vs (u^T J) v: skipped ({a.note})", markup=False)
    else:
        out.print(f"u^T (J v) vs (u^T J) v: max rel error {a.max_rel_error:.3g} (tol {a.tol:.3g}) -> "
                  f"{'pass' if a.passed else 'FAIL'}" + (f" ({a.note})" if a.note else ""), markup=False)
    ob = getattr(r, "ort_backward", None)
    if ob is not None:
        fig = f"max rel error {ob.max_rel_error:.3g} (tol {ob.tol:.3g})" if ob.max_rel_error is not None else \
            f"tol {ob.tol:.3g}"
        out.print(f"onnxruntime backward vs interpreter VJP: {fig} -> {ob.status.upper()}"
                  + (f" ({ob.note})" if ob.note else ""), markup=False)
    out.print(f"verdict: {r.verdict.upper()}", markup=False)


def register(app: typer.Typer) -> None:
    @audit_command(app, "verify")
    def verify_cmd(
        model: ModelArg,
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
        *, ctx,
    ) -> Outcome:
        """Verify forward fidelity (vs onnxruntime) and derivatives (vs finite differences).

        One check per derivative direction, plus the forward and adjoint checks; a direction without evidence
        (kinks, zero derivative, loose tolerance) is skipped with the reason. Reports go into --out, also when a
        check fails."""
        from ..analyses.verify import VerifyOptions, verify_analysis

        # the model stays in its stored dtype: verify builds the float64 copies it needs
        m, feeds = load_point(ctx, model, input, device=device, dtype=None, input_name=input_name, seed=seed,
                              shape=shape, wrt=wrt, size=size, mean=mean, std=std, scale=scale, layout=layout,
                              channels=channels, preset=preset)
        opts = VerifyOptions(output_name=output_name, wrt=wrt, logits=logits, directions=directions, seed=seed,
                             dtype=dtype, rtol=rtol, forward_tol=forward_tol)
        with ctx.timed("verify"), ctx.progress("verify", None) as bar:
            res = verify_analysis(m, feeds, opts, progress=bar.update)
        r = res.result
        settings = {"directions": directions, "seed": seed, "dtype": r.dtype, "device": r.device,
                    "input_name": feeds.input_name, "output_name": output_name, "wrt": wrt, "logits": logits,
                    "reference": r.reference, "rtol": rtol, "default_rtol": r.tolerances.default_rtol,
                    "forward_tol": forward_tol, "forward_atol": r.tolerances.forward_atol,
                    "adjoint_tol": r.tolerances.adjoint, "retry_budget": r.retry_budget,
                    "input_source": feeds.source, "synthetic_input": feeds.synthetic, "shape": feeds.shapes,
                    "input_sources": feeds.sources}
        return Outcome(res, model=m, settings=settings, device=r.device, summary=_summary,
                       inconclusive=r.verdict == "inconclusive")
