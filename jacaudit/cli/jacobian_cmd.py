"""``jacaudit jacobian MODEL``: the full Jacobian's summary (shapes, norms, rank, largest entries), optionally
saved as .npy, with the local linear approximation's error (``--linearity``).

Also holds the option set and input loading that ``verify`` shares (model + input file or synthetic input).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import emit_json, handle_errors, info, out, setup_runtime, warn

# -- shared options (verify uses them too) ----------------------------------------------------------------
InputOpt = Annotated[Optional[str], typer.Option("--input", "-i", help="Input file: .npy, .npz (arrays by input "
                                                 "name) or an image (PNG/JPEG). Default: a seeded random input.")]
InputNameOpt = Annotated[Optional[str], typer.Option("--input-name", help="Which model input the file feeds "
                                                     "(default: the first).")]
OutputNameOpt = Annotated[Optional[str], typer.Option("--output-name", help="Which output (ONNX: any tensor) "
                                                      "to differentiate (default: the first output).")]
WrtOpt = Annotated[Optional[str], typer.Option("--wrt", help="Differentiate with respect to this tensor (an input, "
                                               "or for ONNX an internal tensor, e.g. an embedding's output).")]
LogitsOpt = Annotated[bool, typer.Option("--logits", help="Use the input of a final Softmax (the logits) as the "
                                         "output: probabilities saturate gradients.")]
SizeOpt = Annotated[Optional[str], typer.Option("--size", help="Image size: 224 or HxW.")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean, e.g. 0.485,0.456,0.406.")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Per-channel std.")]
ScaleOpt = Annotated[Optional[str], typer.Option("--scale", help="Pixel range before mean/std: 0-1 or 0-255.")]
LayoutOpt = Annotated[Optional[str], typer.Option("--layout", help="NCHW or NHWC (default: from the model).")]
ChannelsOpt = Annotated[Optional[str], typer.Option("--channels", help="RGB, BGR or L.")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Preprocessing preset (imagenet, "
                                                  "minus1to1, unit, raw, caffe).")]
ShapeOpt = Annotated[Optional[str], typer.Option("--shape", help="Shape of a synthetic input, e.g. 1,3,224,224 "
                                                 "(fills dynamic dims).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float32 or float64 (float64 casts model and "
                                                 "inputs).")]
MaxMemOpt = Annotated[Optional[str], typer.Option("--max-memory", help="Working memory per chunk, e.g. 512MB, "
                                                  "2GiB (default 1GiB).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
FormatsOpt = Annotated[str, typer.Option("--format", help="Reports to write: html,json,md (a comma-separated "
                                          "list; '' for none).")]

# as saliency: reports are written by default (html,json,md into ./jacaudit-<command>)
ReportDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for the reports.")]


@dataclass
class Loaded:
    model: Any
    feeds: dict
    input_name: str
    synthetic: bool
    source: str


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    from ..errors import InputError

    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise InputError(f"cannot read --shape {text!r}; use e.g. 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"--shape {text!r} must list positive sizes")
    return dims


def load_model_and_input(model_path: str, *, input: str | None, input_name: str | None, device: str,
                         dtype: str | None, seed: int, shape: str | None = None, size: str | None = None,
                         mean: str | None = None, std: str | None = None, scale: str | None = None,
                         layout: str | None = None, channels: str | None = None, preset: str | None = None
                         ) -> Loaded:
    """The model and one input sample (batch axis 1) for every model input; synthetic where no file is given."""
    import numpy as np
    import torch

    from .. import data as D
    from ..errors import InputError
    from .common import load_model

    model = load_model(model_path, device=device, dtype=dtype)
    spec = model.input_spec(input_name)
    full_shape = _parse_shape(shape)
    fill = None
    if full_shape is not None and spec.shape is not None:
        if len(full_shape) != len(spec.shape):
            raise InputError(f"--shape has {len(full_shape)} dims; input {spec.name!r} has {len(spec.shape)}")
        fill = {d: v for d, v in zip(spec.shape, full_shape) if not (isinstance(d, int) and d > 0)}
        fill = {k: v for k, v in fill.items() if k is not None} or full_shape[0]
    pp = None
    try:
        pp = D.Preprocess.infer(spec.shape, preset=preset, size=D.parse_size(size), mean=D.parse_floats(mean),
                                std=D.parse_floats(std), scale=scale, layout=layout, channels=channels)
    except Exception:
        if input is not None and D.is_image_path(input):
            raise
        pp = None
    synthetic = input is None
    extra: dict[str, np.ndarray] = {}
    if input is not None and spec.shape is None and input.lower().endswith((".npy", ".npz")):
        # no declared shape (TorchScript): the array is the whole input, batch axis included
        sample = D.load_arrays(input, None, [spec.name])[0]
        feeds = {spec.name: torch.from_numpy(np.ascontiguousarray(sample.array))}
        for k, v in sample.extra.items():
            feeds[k] = torch.from_numpy(np.ascontiguousarray(v))
        return Loaded(model, feeds, spec.name, False, input)
    if input is not None:
        samples = D.load_sample(input, pp, spec) if pp is not None else D.load_arrays(input, spec)
        if len(samples) > 1:
            warn(f"{input} holds {len(samples)} samples; using the first")
        s = samples[0]
        arr = s.array
        extra = dict(s.extra)
        source = input
    else:
        if spec.shape is None and full_shape is not None and len(full_shape) < 2:
            raise InputError(f"--shape includes the batch dimension: e.g. --shape 1,{full_shape[0]} for one "
                             f"sample of {full_shape[0]} values")
        if spec.shape is None and full_shape is not None:
            arr = np.random.default_rng(seed).standard_normal(full_shape[1:]).astype(np.float32)
        elif spec.shape is None:
            raise InputError(f"input {spec.name!r} has no declared shape: give --input or --shape")
        else:
            arr = D.synthetic_sample(spec, seed=seed, preprocess=pp, fill=fill).array
        source = "synthetic"
        info(f"no --input: using a seeded random input of shape {(1, *arr.shape)} (synthetic, seed {seed})")
    feeds = {spec.name: torch.from_numpy(np.ascontiguousarray(arr)[None])}
    for k, v in extra.items():
        feeds[k] = torch.from_numpy(np.ascontiguousarray(v)[None])
    for other in model.inputs:
        if other.name not in feeds:
            if other.shape is None:
                raise InputError(f"input {other.name!r} is not in {input or 'the input'} and has no declared "
                                 "shape; give it in an .npz")
            arr = D.synthetic_sample(other, seed=seed + 1).array
            feeds[other.name] = torch.from_numpy(np.ascontiguousarray(arr)[None])
            info(f"input {other.name!r}: seeded random values (synthetic)")
    if model.format == "torchscript":
        msg = model.check_stateless(feeds)  # state kept between calls makes derivatives describe one call
        if msg:
            warn(msg)
    return Loaded(model, feeds, spec.name, synthetic, source)


def _print_summary(s, lin) -> None:
    from rich.table import Table

    d = s.to_dict()
    c = d["computation"]
    out.print(f"J = d {s.output} / d {s.input}: shape {tuple(s.jacobian_shape)} "
              f"({s.output_shape} x {s.input_shape}); {c['mode']} mode, path {c['path']}, "
              f"{c['chunks']} chunk(s) of {c['chunk_size']}, {c['dtype']} on {c['device']}", markup=False)
    out.print(f"Frobenius norm   {s.frobenius:.6g}", markup=False)
    out.print(f"spectral norm    {s.spectral:.6g} ({s.spectral_method})" if s.spectral is not None
              else "spectral norm    -", markup=False)
    out.print(f"rank estimate    {s.rank} (tol {s.rank_tol:.3g})" if s.rank is not None else "rank estimate    -",
              markup=False)
    t = Table("output index", "input index", "value", box=None, title="largest entries")
    for e in s.largest:
        t.add_row(str(tuple(e["output_index"])), str(tuple(e["input_index"])), f"{e['value']:.6g}")
    out.print(t)
    if lin is not None:
        lt = Table("direction", "step ||D||/||x||", "||f(x+D)-f(x)-JD|| / ||f(x+D)-f(x)||", box=None,
                   title="local linearity")
        for r in lin.rows:
            lt.add_row(r.direction, f"{r.step:.3g}", f"{r.error:.3g}")
        out.print(lt)


def jacobian_result(s, jinfo, lin=None, *, input_name: str, requested_mode: str, source: str, synthetic: bool,
                    logits: bool, softmax_warning: str | None = None, saved: str | None = None, spectral_est=None):
    """Adapter: the engine's :class:`JacobianSummary` (+ linearity, + a spectral estimate) -> the report's
    :class:`jacaudit.results.jacobian.JacobianResult` (plain data)."""
    from ..results.jacobian import (FrobeniusNorm, JacobianComputation, JacobianEntry, JacobianLinearity,
                                    JacobianLinearityRow, JacobianResult, SpectralNorm)

    c = dict(s.info)
    comp = JacobianComputation(mode=str(c.get("mode")), path=str(c.get("path")), dtype=str(c.get("dtype")),
                               device=str(c.get("device")), chunk_size=int(c.get("chunk_size") or 0),
                               chunks=int(c.get("chunks") or 0), oom_retries=int(c.get("oom_retries") or 0),
                               bytes=int(c.get("bytes") or 0), notes=[str(n) for n in c.get("notes") or ()])
    if spectral_est is not None:
        res = list(spectral_est.residuals)
        spectral = SpectralNorm(float(spectral_est.spectral_norm), "power-iteration",
                                converged=bool(spectral_est.converged), iterations=int(spectral_est.iterations),
                                residual=float(res[0]) if res else None)
    elif s.spectral is None:
        spectral = SpectralNorm(None, "none")
    elif s.spectral_method == "svd":
        spectral = SpectralNorm(float(s.spectral), "svd", converged=True)
    else:
        spectral = SpectralNorm(float(s.spectral), str(s.spectral_method))
    linearity = None
    if lin is not None:
        rows = [JacobianLinearityRow(str(r.direction), float(r.step), float(r.error)) for r in lin.rows]
        worst: dict[float, JacobianLinearityRow] = {}
        for r in rows:
            if r.step not in worst or not (r.error <= worst[r.step].error):
                worst[r.step] = r
        linearity = JacobianLinearity(steps=[float(x) for x in lin.steps], rows=rows,
                                      worst_by_step=[worst[k] for k in sorted(worst)])
    return JacobianResult(
        input_name=str(input_name), wrt=str(s.input), output=str(s.output),
        input_shape=[int(d) for d in s.input_shape], output_shape=[int(d) for d in s.output_shape],
        jacobian_shape=[int(d) for d in s.jacobian_shape], requested_mode=str(requested_mode), computation=comp,
        frobenius=FrobeniusNorm(float(s.frobenius), "exact", stderr=0.0),
        spectral=spectral, rank=s.rank, rank_tol=s.rank_tol,
        largest=[JacobianEntry([int(i) for i in e["output_index"]], [int(i) for i in e["input_index"]],
                               float(e["value"])) for e in s.largest],
        finite=bool(s.finite), input_source=str(source), synthetic_input=bool(synthetic), logits=bool(logits),
        softmax_warning=softmax_warning, linearity=linearity, saved=saved)


def register(app: typer.Typer) -> None:
    @app.command("jacobian")
    def jacobian_cmd(
        model: Annotated[str, typer.Argument(help="ONNX (.onnx) or TorchScript (.pt) model file.")],
        input: InputOpt = None,
        input_name: InputNameOpt = None,
        output_name: OutputNameOpt = None,
        wrt: WrtOpt = None,
        logits: LogitsOpt = False,
        save: Annotated[Optional[str], typer.Option("--save", help="Save J as .npy (shape output + input).")] = None,
        mode: Annotated[str, typer.Option("--mode", help="auto, reverse or forward.")] = "auto",
        linearity: Annotated[bool, typer.Option("--linearity", help="Also report how far the first-order model "
                                                "holds along random and top-singular directions.")] = False,
        top: Annotated[int, typer.Option("--top", help="How many largest entries to list.", min=0)] = 5,
        size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, scale: ScaleOpt = None,
        layout: LayoutOpt = None, channels: ChannelsOpt = None, preset: PresetOpt = None, shape: ShapeOpt = None,
        device: DeviceOpt = "cpu", dtype: DtypeOpt = None, max_memory: MaxMemOpt = None, seed: SeedOpt = 0,
        out_dir: ReportDirOpt = Path("jacaudit-jacobian"),
        formats: FormatsOpt = "html,json,md",
        json_out: JsonOpt = False,
    ) -> None:
        """Compute the full Jacobian J (shape output + input), print its summary and write reports into --out."""
        import time

        t_start = time.perf_counter()
        with handle_errors():
            from ..report import parse_formats, write_reports
            from ..results import make_report, timed

            fmts = parse_formats(formats)
            setup_runtime()
            import dataclasses

            import numpy as np
            import torch

            from ..errors import RuntimeFailure
            from ..engine.core import full_jacobian, prepare
            from ..engine.summary import summarize

            timings: dict[str, float] = {}
            torch.manual_seed(seed)
            with timed(timings, "load"):
                ld = load_model_and_input(model, input=input, input_name=input_name, device=device, dtype=dtype,
                                          seed=seed, shape=shape, size=size, mean=mean, std=std, scale=scale,
                                          layout=layout, channels=channels, preset=preset)
                t = prepare(ld.model, ld.feeds, input=ld.input_name, output=output_name, wrt=wrt, logits=logits)
            warnings = list(t.notes)
            if ld.synthetic:
                warnings.append("the input is synthetic (seeded random values from the declared shape)")
            softmax_warning = None
            if not logits and getattr(ld.model, "softmax_input", None) and ld.model.softmax_input(t.output_name):
                softmax_warning = (f"output {t.output_name!r} comes out of a Softmax: its gradients saturate; "
                                   "--logits differentiates the pre-softmax logits")
                warnings.append(softmax_warning)
            progress = _progress()
            with timed(timings, "jacobian"), progress as p:
                task = p.add_task("Jacobian", total=None)
                J, jinfo = full_jacobian(t, mode=mode, max_memory=max_memory,
                                         progress=lambda done, total: p.update(task, completed=done, total=total))
            if not torch.isfinite(J).all():
                raise RuntimeFailure("the Jacobian holds NaN/inf entries")
            if save:
                np.save(save, J.detach().cpu().numpy())
                info(f"saved J {tuple(J.shape)} to {save}")
            settings = {"seed": seed, "mode": mode, "dtype": str(t.dtype).replace("torch.", ""),
                        "device": str(t.device), "logits": logits, "input_source": ld.source,
                        "synthetic_input": ld.synthetic}
            with timed(timings, "summary"):
                # the spectral estimate (for Jacobians too large for an SVD) is run here to keep its convergence
                s = summarize(J, jinfo, input=t.name, output=t.output_name, top=top, target=None,
                              warnings=tuple(warnings), settings=settings)
                est = None
                if s.spectral is None and s.finite:
                    from ..engine.estimators import spectral_norm
                    est = spectral_norm(t, seed=seed)
                    s = dataclasses.replace(s, spectral=est.spectral_norm, spectral_method="power-iteration")
            lin = None
            if linearity:
                from ..engine.linearity import linearity as lin_fn
                with timed(timings, "linearity"):
                    sv = None
                    if est is not None:
                        sv = est.right[:1]
                    elif min(t.m, t.n) <= 4096:
                        M = J.reshape(t.m, t.n).double()
                        _, _, Vh = torch.linalg.svd(M, full_matrices=False)
                        sv = Vh[:1].reshape(1, *t.in_shape)
                    lin = lin_fn(t, seed=seed, singular_vectors=sv)
            result = jacobian_result(s, jinfo, lin, input_name=ld.input_name, requested_mode=mode,
                                     source=ld.source, synthetic=ld.synthetic, logits=logits,
                                     softmax_warning=softmax_warning, saved=save, spectral_est=est)
            timings["total"] = round(time.perf_counter() - t_start, 4)
            rep_settings = {**settings, "max_memory": max_memory, "top": top, "linearity": linearity,
                            "input_name": ld.input_name, "wrt": wrt, "output": output_name, "shape": shape}
            report = make_report("jacobian", result, model=ld.model, settings=rep_settings, timings=timings,
                                 warnings=warnings, exit_code=0, device=str(t.device))
            written = write_reports(report, str(out_dir), fmts) if fmts else []
        for w in s.warnings:
            warn(w)
        if json_out:
            d = s.to_dict()
            if lin is not None:
                d["linearity"] = lin.to_dict()
            emit_json(d)
        else:
            _print_summary(s, lin)
        for p_ in written:
            info(f"wrote {p_}")


def _progress():
    """A transient Rich progress bar on stderr (off when stderr is not a terminal)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .common import err, state

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=True,
                    disable=state.quiet or not err.is_terminal)
