"""``jacaudit gradflow MODEL``: ||dy/dh_l|| along the main path of the graph, the spectral norms of the per-block
Jacobians dh_{l+1}/dh_l and their running product: vanishing or exploding sensitivity through depth."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import out
from .options import (ChannelsOpt, DeviceOpt, DtypeOpt, InputNameOpt, InputOpt, LayoutOpt, LogitsOpt, MeanOpt,
                      ModelArg, OutputNameOpt, PresetOpt, ScaleOpt, SeedOpt, ShapeOpt, SizeOpt, StdOpt)
from .runner import Outcome, audit_command


def _summary(report) -> None:
    from rich.table import Table

    from ..report.svg import compact

    r = report.result
    out.print(f"y = {r.output} {tuple(r.output_shape)}; main path: {r.layer_selection}", markup=False)
    t = Table("depth", "tensor", "shape", "||dy/dh||", "ratio to last", "block ||dh'/dh||_2", "running product",
              box=None, title="sensitivity through depth")
    for d, b in zip(r.depths, r.blocks):
        t.add_row(str(d.depth), d.tensor[:40], "x".join(map(str, d.shape)), compact(d.grad_norm), compact(d.ratio),
                  compact(b.spectral_norm) + ("" if b.converged else "?"), compact(b.running_product))
    out.print(t)
    out.print(f"vanishing ratio {compact(r.vanishing_ratio)}, exploding ratio {compact(r.exploding_ratio)} "
              "(min / max of ||dy/dh_l|| / ||dy/dh_L||)", markup=False)


def register(app: typer.Typer) -> None:
    @audit_command(app, "gradflow")
    def gradflow_cmd(
        model: ModelArg,
        input: InputOpt = None,
        layers: Annotated[Optional[list[str]], typer.Option(
            "--layers", help="Main-path tensors to use, in order (comma-separated or repeated; default: found "
            "automatically, the tensors every input-to-output path passes through).")] = None,
        max_layers: Annotated[int, typer.Option("--max-layers", min=2, help="At most this many automatically "
                                                "found tensors (evenly spaced).")] = 24,
        probes: Annotated[int, typer.Option("--probes", min=2, help="Hutchinson probes for ||dy/dh|| when the "
                                            "output has more elements (else exact).")] = 16,
        power_iters: Annotated[int, typer.Option("--power-iters", min=1, help="Power iterations per block.")] = 60,
        output_name: OutputNameOpt = None, input_name: InputNameOpt = None, logits: LogitsOpt = False,
        size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, scale: ScaleOpt = None,
        layout: LayoutOpt = None, channels: ChannelsOpt = None, preset: PresetOpt = None, shape: ShapeOpt = None,
        device: DeviceOpt = "cpu", dtype: DtypeOpt = None, seed: SeedOpt = 0,
        *, ctx,
    ) -> Outcome:
        """Sensitivity through depth along the main path of an ONNX graph: the norm of dy/dh_l at each depth,
        the spectral norms of the per-block Jacobians dh_{l+1}/dh_l (power iteration through jvp/vjp) and their
        running product.

        Checks: vanishing_ratio (min over depths of ||dy/dh_l|| / ||dy/dh_L||) warns below 1e-2 and fails below
        1e-4; exploding_ratio (the max) warns above 1e2 and fails above 1e4; non-finite derivatives fail;
        block_spectral_norm becomes a check with --fail-on / --warn-on."""
        from ..analyses.gradflow import GradflowOptions, gradflow_analysis
        from .jacobian_cmd import load_point

        m, feeds = load_point(ctx, model, input, device=device, dtype=dtype, input_name=input_name, seed=seed,
                              shape=shape, size=size, mean=mean, std=std, scale=scale, layout=layout,
                              channels=channels, preset=preset)
        names = tuple(p.strip() for item in layers or [] for p in item.split(",") if p.strip())
        opts = GradflowOptions(output_name=output_name, logits=logits, layers=names, max_layers=max_layers,
                               probes=probes, power_iters=power_iters, seed=seed)
        with ctx.progress("gradflow") as p:
            res = gradflow_analysis(m, feeds, opts, progress=p.update, timings=ctx.timings)
        r = res.result
        settings = {"seed": seed, "dtype": r.dtype, "device": r.device, "logits": logits, "output_name": output_name,
                    "input_name": feeds.input_name, "input_source": feeds.source, "synthetic_input": feeds.synthetic,
                    "layers": list(names) or None, "max_layers": max_layers, "probes": probes,
                    "power_iters": power_iters, "shape": feeds.shapes}
        return Outcome(res, model=m, settings=settings, device=r.device, summary=_summary)
