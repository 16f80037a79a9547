"""``jacaudit jacobian MODEL``: the full Jacobian's summary (shapes, norms, rank, largest entries), optionally
saved as .npy beside the report, with the local linear approximation's error (``--linearity``)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import info, load_model, out
from .options import (ChannelsOpt, DeviceOpt, DtypeOpt, InputNameOpt, InputOpt, LayoutOpt, LogitsOpt, MaxMemOpt,
                      MeanOpt, ModelArg, OutputNameOpt, PresetOpt, ScaleOpt, SeedOpt, ShapeOpt, SizeOpt, StdOpt,
                      WrtOpt)
from .runner import Outcome, audit_command


def load_point(ctx, model: str, input: list[str] | str | None, *, device: str, dtype: str | None,
               input_name: str | None, seed: int, shape: list[str] | str | None, wrt: str | None = None,
               **preprocess):
    """The model and one evaluation point (jacobian, verify): (model, Feeds); what was synthesised is said.

    ``input`` / ``shape``: the repeatable --input / --shape (``FILE`` or ``NAME=FILE``, ``1,3,H,W`` or
    ``NAME=1,3,H,W``); ``wrt`` picks the differentiated input (default: the first float input)."""
    import torch

    from ..data.feeds import load_feeds

    torch.manual_seed(seed)
    with ctx.timed("load"):
        m = load_model(model, device=device, dtype=dtype)
        feeds = load_feeds(m, input or None, input_name=input_name, wrt=wrt, seed=seed, shape=shape or None,
                           preprocess={k: v for k, v in preprocess.items() if v is not None})
    for n in feeds.notes:
        info(n)
    return m, feeds


def _summary(report) -> None:
    from rich.table import Table

    r = report.result
    c = r.computation
    out.print(f"J = d {r.output} / d {r.wrt}: shape {tuple(r.jacobian_shape)} ({r.output_shape} x {r.input_shape});"
              f" {c.mode} mode, path {c.path}, {c.chunks} chunk(s) of {c.chunk_size}, {c.dtype} on {c.device}",
              markup=False)
    fr = r.frobenius
    if fr.method == "none":
        out.print("Frobenius norm   -", markup=False)
    else:
        out.print(f"Frobenius norm   {fr.value:.6g}" + (f" ± {fr.stderr:.3g} ({fr.method}, {fr.probes} probes)"
                                                       if fr.method == "hutchinson" else f" ({fr.method})"),
                  markup=False)
    for i, sv in enumerate(getattr(r, "top_singular", None) or [], 1):
        out.print(f"sigma_{i:<9d}{sv.value:.6g} (residual {sv.residual:.2g})", markup=False)
    out.print(f"spectral norm    {r.spectral.value:.6g} ({r.spectral.method})" if r.spectral.value is not None
              else "spectral norm    -", markup=False)
    out.print(f"rank estimate    {r.rank} (tol {r.rank_tol:.3g})" if r.rank is not None else "rank estimate    -",
              markup=False)
    t = Table("output index", "input index", "value", box=None, title="largest entries")
    for e in r.largest:
        t.add_row(str(tuple(e.output_index)), str(tuple(e.input_index)), f"{e.value:.6g}")
    out.print(t)
    if r.linearity is not None:
        lt = Table("direction", "step ||D||/||x||", "||f(x+D)-f(x)-JD|| / ||f(x+D)-f(x)||", box=None,
                   title="local linearity")
        for row in r.linearity.rows:
            lt.add_row(row.direction, f"{row.step:.3g}", f"{row.error:.3g}")
        out.print(lt)


def register(app: typer.Typer) -> None:
    @audit_command(app, "jacobian")
    def jacobian_cmd(
        model: ModelArg,
        input: InputOpt = None,
        input_name: InputNameOpt = None,
        output_name: OutputNameOpt = None,
        wrt: WrtOpt = None,
        logits: LogitsOpt = False,
        save: Annotated[bool, typer.Option("--save", help="Save J (shape output + input) as OUT/jacobian.npy.")]
        = False,
        mode: Annotated[str, typer.Option("--mode", help="auto, reverse or forward.")] = "auto",
        linearity: Annotated[bool, typer.Option("--linearity", help="Also report how far the first-order model "
                                                "holds along random and top-singular directions.")] = False,
        top: Annotated[int, typer.Option("--top", help="How many largest entries to list.", min=0)] = 5,
        frobenius: Annotated[bool, typer.Option("--frobenius", help="Estimate ||J||_F by Hutchinson (random "
                                                "probes, with its standard error) without materialising J.")]
        = False,
        top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="Estimate the top K singular values "
                                                     "of J (block power iteration, with residuals) without "
                                                     "materialising J.")] = None,
        probes: Annotated[int, typer.Option("--probes", min=2, help="Hutchinson probes for --frobenius.")] = 32,
        size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, scale: ScaleOpt = None,
        layout: LayoutOpt = None, channels: ChannelsOpt = None, preset: PresetOpt = None, shape: ShapeOpt = None,
        device: DeviceOpt = "cpu", dtype: DtypeOpt = None, max_memory: MaxMemOpt = None, seed: SeedOpt = 0,
        *, ctx,
    ) -> Outcome:
        """Compute the full Jacobian J (shape output + input), print its summary and write reports into --out.

        Checks: non-finite entries fail; norms (frobenius_norm, spectral_norm, max_abs_entry, condition_number)
        and linearity errors become checks with --fail-on / --warn-on."""
        from ..analyses.jacobian import JacobianOptions, jacobian_analysis

        m, feeds = load_point(ctx, model, input, device=device, dtype=dtype, input_name=input_name, seed=seed,
                              shape=shape, wrt=wrt, size=size, mean=mean, std=std, scale=scale, layout=layout,
                              channels=channels, preset=preset)
        opts = JacobianOptions(output_name=output_name, wrt=wrt, logits=logits, mode=mode, max_memory=max_memory,
                               top=top, linearity=linearity, save=save, seed=seed, frobenius=frobenius,
                               top_k=top_k, probes=probes)
        from ..engine.core import JacobianTooLarge, human_bytes
        from ..errors import InputError
        try:
            with ctx.progress("Jacobian") as p:
                res = jacobian_analysis(m, feeds, opts, progress=p.update, timings=ctx.timings)
        except JacobianTooLarge as e:
            raise InputError(f"the full Jacobian needs {human_bytes(e.needed)}, more than the "
                             f"{human_bytes(e.budget)} allowed; estimate instead with --frobenius (Hutchinson) "
                             "and/or --top-k K (top singular values), or raise --max-memory") from None
        r = res.result
        settings = {"seed": seed, "mode": mode, "dtype": r.computation.dtype, "device": r.computation.device,
                    "logits": logits, "input_source": feeds.source, "synthetic_input": feeds.synthetic,
                    "max_memory": max_memory, "top": top, "linearity": linearity, "input_name": feeds.input_name,
                    "wrt": wrt, "output_name": output_name, "shape": feeds.shapes,
                    "input_sources": feeds.sources, "frobenius": frobenius, "top_k": top_k,
                    "probes": probes if frobenius else None}
        return Outcome(res, model=m, settings=settings, device=r.computation.device, summary=_summary)
