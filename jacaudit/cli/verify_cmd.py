"""``jacaudit verify MODEL``: the interpreter's forward against onnxruntime, and the engine's J v against
central differences (through onnxruntime for ONNX, through the model itself in float64 for TorchScript).
Exit 0 when both pass, 1 when not."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import emit_json, handle_errors, info, out, setup_runtime, warn
from .jacobian_cmd import (ChannelsOpt, DeviceOpt, FormatsOpt, InputNameOpt, InputOpt, JsonOpt, LayoutOpt,
                           LogitsOpt, MeanOpt, OutputNameOpt, PresetOpt, ReportDirOpt, ScaleOpt, SeedOpt, ShapeOpt,
                           SizeOpt, StdOpt, WrtOpt, load_model_and_input)


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


def verify_result(r, *, input_name: str, source: str, synthetic: bool, logits: bool):
    """Adapter: the engine's :class:`jacaudit.engine.verify.VerifyResult` -> the report's plain
    :class:`jacaudit.results.verify.VerifyResult`."""
    from ..results.verify import VerifyAdjoint, VerifyDirection, VerifyForward, VerifyResult, VerifyTolerances

    st = dict(r.settings)
    f = r.forward
    fwd = VerifyForward(reference=str(f.reference), max_abs=_opt_float(f.max_abs), max_rel=_opt_float(f.max_rel),
                        tol=_opt_float(f.tol), passed=bool(f.passed), note=str(f.note or ""))
    dirs = [VerifyDirection(index=int(d.index), reference=str(d.reference), status=str(d.status),
                            non_differentiable=d.status == "non-differentiable", rel_error=float(d.rel_error),
                            tol=float(d.tol), jvp_norm=float(d.jvp_norm), fd_norm=float(d.fd_norm),
                            fd_spread=float(d.fd_spread), steps=[float(h) for h in d.steps],
                            slope_norms=[float(v) for v in d.slope_norms], note=str(d.note or ""))
            for d in r.directions]
    a = r.adjoint
    adj = VerifyAdjoint(float(a.max_rel_error), float(a.tol), bool(a.passed))
    rtol = st.get("rtol")
    tols = VerifyTolerances(forward=_opt_float(st.get("forward_tol")),
                            rtol=None if isinstance(rtol, dict) else _opt_float(rtol),
                            default_rtol={str(k): float(v) for k, v in rtol.items()} if isinstance(rtol, dict)
                            else {}, adjoint=float(st.get("adjoint_tol", a.tol)),
                            float32_engine_rtol=_opt_float(st.get("float32_engine_rtol")),
                            nondiff_spread=_opt_float(st.get("nondiff_spread")),
                            nondiff_ratio=_opt_float(st.get("nondiff_ratio")))
    softmax = next((w for w in r.warnings if "Softmax" in w), None)
    return VerifyResult(verdict="pass" if r.passed else "fail", input_name=str(input_name),
                        wrt=str(st.get("input", input_name)), output=str(st.get("output", "")),
                        reference=str(st.get("reference", f.reference)), dtype=str(st.get("dtype", "")),
                        device=str(st.get("device", "")), directions_requested=int(st.get("directions",
                                                                                         len(dirs))),
                        forward=fwd, directions=dirs, adjoint=adj, tolerances=tols,
                        non_differentiable=int(r.non_differentiable), fd_steps=int(st.get("steps", 0) or 0),
                        input_source=str(source), synthetic_input=bool(synthetic), logits=bool(logits),
                        softmax_warning=softmax)


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


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
        out_dir: ReportDirOpt = Path("jacaudit-verify"),
        formats: FormatsOpt = "html,json,md",
        json_out: JsonOpt = False,
    ) -> None:
        """Verify forward fidelity (vs onnxruntime) and derivatives (vs finite differences). Exit 0 pass, 1 fail.

        Reports (HTML/JSON/Markdown) go into --out, also when the check fails (status fail)."""
        import time

        from ..errors import EXIT_GATE

        t_start = time.perf_counter()
        with handle_errors():
            from ..report import parse_formats, write_reports
            from ..results import make_report, timed

            fmts = parse_formats(formats)
            setup_runtime()
            import torch

            from ..engine.verify import verify

            timings: dict[str, float] = {}
            torch.manual_seed(seed)
            # the model stays in its stored dtype: verify() builds the float64 copies it needs
            with timed(timings, "load"):
                ld = load_model_and_input(model, input=input, input_name=input_name, device=device, dtype=None,
                                          seed=seed, shape=shape, size=size, mean=mean, std=std, scale=scale,
                                          layout=layout, channels=channels, preset=preset)
            with timed(timings, "verify"):
                r = verify(ld.model, ld.feeds, input=ld.input_name, output=output_name, wrt=wrt, logits=logits,
                           directions=directions, seed=seed, dtype=dtype, rtol=rtol, forward_tol=forward_tol)
            warnings = list(r.warnings)
            if ld.synthetic:
                warnings.append("the input is synthetic (seeded random values from the declared shape)")
            result = verify_result(r, input_name=ld.input_name, source=ld.source, synthetic=ld.synthetic,
                                   logits=logits)
            timings["total"] = round(time.perf_counter() - t_start, 4)
            settings = {**r.settings, "rtol": rtol, "default_rtol": result.tolerances.default_rtol,
                        "forward_tol": forward_tol, "input_source": ld.source, "synthetic_input": ld.synthetic,
                        "wrt": wrt, "shape": shape}
            code = 0 if r.passed else EXIT_GATE
            report = make_report("verify", result, model=ld.model, settings=settings, timings=timings,
                                 warnings=warnings, exit_code=code, status="pass" if r.passed else "fail",
                                 device=str(settings.get("device") or device))
            written = write_reports(report, str(out_dir), fmts) if fmts else []
        for w in warnings:
            warn(w)
        if json_out:
            d = r.to_dict()
            d["warnings"] = warnings
            d["settings"]["input_source"] = ld.source
            emit_json(d)
        else:
            _print(r)
        for p_ in written:
            info(f"wrote {p_}")
        if not r.passed:
            raise typer.Exit(EXIT_GATE)
