"""``jacaudit jacobian MODEL``: the full Jacobian's summary (shapes, norms, rank, largest entries), optionally
saved as .npy, with the local linear approximation's error (``--linearity``).

Also holds the option set and input loading that ``verify`` shares (model + input file or synthetic input).
"""
from __future__ import annotations

from dataclasses import dataclass
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
OutDirOpt = Annotated[Optional[str], typer.Option("--out", help="Write a report (JSON) into this folder.")]


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
    from ..models import load

    model = load(model_path, device=device, dtype=dtype)
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
        json_out: JsonOpt = False,
    ) -> None:
        """Compute the full Jacobian J (shape output + input) and print its summary."""
        with handle_errors():
            setup_runtime()
            import numpy as np
            import torch

            from ..errors import RuntimeFailure
            from ..engine.core import full_jacobian, prepare
            from ..engine.summary import summarize

            torch.manual_seed(seed)
            ld = load_model_and_input(model, input=input, input_name=input_name, device=device, dtype=dtype,
                                      seed=seed, shape=shape, size=size, mean=mean, std=std, scale=scale,
                                      layout=layout, channels=channels, preset=preset)
            t = prepare(ld.model, ld.feeds, input=ld.input_name, output=output_name, wrt=wrt, logits=logits)
            warnings = list(t.notes)
            if ld.synthetic:
                warnings.append("the input is synthetic (seeded random values from the declared shape)")
            if not logits and getattr(ld.model, "softmax_input", None) and ld.model.softmax_input(t.output_name):
                warnings.append(f"output {t.output_name!r} comes out of a Softmax: its gradients saturate; "
                                "--logits differentiates the pre-softmax logits")
            progress = _progress()
            with progress as p:
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
            s = summarize(J, jinfo, input=t.name, output=t.output_name, top=top, target=t,
                          warnings=tuple(warnings), settings=settings)
            lin = None
            if linearity:
                from ..engine.linearity import linearity as lin_fn
                sv = None
                if min(t.m, t.n) <= 4096:
                    M = J.reshape(t.m, t.n).double()
                    _, _, Vh = torch.linalg.svd(M, full_matrices=False)
                    sv = Vh[:1].reshape(1, *t.in_shape)
                lin = lin_fn(t, seed=seed, singular_vectors=sv)
        for w in s.warnings:
            warn(w)
        if json_out:
            d = s.to_dict()
            if lin is not None:
                d["linearity"] = lin.to_dict()
            emit_json(d)
        else:
            _print_summary(s, lin)


def _progress():
    """A transient Rich progress bar on stderr (off when stderr is not a terminal)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .common import err, state

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=True,
                    disable=state.quiet or not err.is_terminal)
