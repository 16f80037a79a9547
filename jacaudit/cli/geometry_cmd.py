"""``jacaudit geometry MODEL``: singular values, rank, conditioning, det / log|det|, manipulability, lost directions
and Gauss-Newton curvature of J at one input or along a trajectory (``--trajectory FILE`` or ``--line A B``);
for a normalizing flow the log-det discrepancy and the change-of-variables log-density."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import info, out
from .options import (ChannelsOpt, DeviceOpt, DtypeOpt, InputNameOpt, InputOpt, LayoutOpt, LogitsOpt, MaxMemOpt,
                      MeanOpt, ModelArg, OutputNameOpt, PresetOpt, ScaleOpt, SeedOpt, ShapeOpt, SizeOpt, StdOpt,
                      WrtOpt)
from .runner import Outcome, audit_command


def _g(v) -> str:
    from ..report.svg import compact
    return compact(v) if v is not None else "-"


def _summary(report) -> None:
    from rich.table import Table

    r = report.result
    out.print(f"J = d {r.output} / d {r.wrt}: {r.m} x {r.n}{' (square)' if r.square else ''}, {r.dtype}; "
              f"{len(r.points)} input(s) ({r.source_detail})", markup=False)
    t = Table("input", "sigma_max", "sigma_min", "rank", "cond", "det" if r.square else "manipulability",
              *(["log|det|"] if r.square else []), *(["logdet diff", "log p(x)"] if r.logdet_output else []),
              "singular", box=None, title="geometry along the inputs" if len(r.points) > 1 else "geometry")
    shown = r.points if len(r.points) <= 24 else r.points[:12] + r.points[-12:]
    for p in shown:
        t.add_row(p.label, _g(p.sigma_max), _g(p.sigma_min), "-" if p.rank is None else str(p.rank),
                  _g(p.condition_number), _g(p.det if r.square else p.manipulability),
                  *([_g(p.logdet)] if r.square else []),
                  *([_g(p.logdet_discrepancy), _g(p.log_density)] if r.logdet_output else []),
                  "?" if p.singular is None else ("YES" if p.singular else "no"))
    out.print(t)
    if len(r.points) > 24:
        out.print(f"({len(r.points) - 24} inputs not shown; see the report)", markup=False)
    for c in r.crossings:
        where = f" at t = {c.t:.12g}" if c.t is not None else f" at {c.fraction:.12g} of the segment"
        vals = f" input {[round(v, 12) for v in c.input]}" if c.input else ""
        out.print(f"singular input between {r.points[c.between[0]].label} and {r.points[c.between[1]].label}"
                  f"{where}:{vals} (sigma_min {c.sigma_min:.3g})", markup=False)


def register(app: typer.Typer) -> None:
    @audit_command(app, "geometry")
    def geometry_cmd(
        model: ModelArg,
        input: InputOpt = None,
        trajectory: Annotated[Optional[str], typer.Option(
            "--trajectory", help="An .npy (or .csv) of inputs, one per row (e.g. joint configurations over time): "
            "the geometry at each, in order.")] = None,
        line: Annotated[Optional[tuple[str, str]], typer.Option(
            "--line", metavar="A B", help="Inputs on the straight line from A to B (each an .npy file or "
            "comma-separated numbers, e.g. 0.4,-0.5,0).")] = None,
        steps: Annotated[int, typer.Option("--steps", min=2, help="Inputs on the --line, both ends included.")]
        = 21,
        threshold: Annotated[Optional[float], typer.Option(
            "--threshold", min=0.0, help="An input is singular when J's smallest singular value is at or below "
            "this (default: the numerical rank tolerance sigma_max * max(m, n) * eps).")] = None,
        logdet: Annotated[bool, typer.Option("--logdet", help="Require det / log|det J| (refused, exit 2, "
                                             "unless J is square; reported anyway for square J).")] = False,
        logdet_output: Annotated[Optional[str], typer.Option(
            "--logdet-output", help="A model output holding the model's own log|det J| (a normalizing flow): the "
            "discrepancy is checked; implies --density.")] = None,
        density: Annotated[bool, typer.Option("--density", help="The change-of-variables log-density "
                                              "log N(f(x); 0, I) + log|det J| (a standard normal base).")] = False,
        method: Annotated[str, typer.Option("--method", help="auto (SVD of J, or Lanczos past the memory "
                                            "budget), svd or lanczos (J never materialised).")] = "auto",
        lanczos_steps: Annotated[int, typer.Option("--lanczos-steps", min=1, help="Lanczos steps (each one vjp "
                                                   "+ one jvp).")] = 40,
        locate: Annotated[bool, typer.Option("--locate/--no-locate", help="Locate the singular input by "
                                             "bisection where det J changes sign between consecutive inputs.")]
        = True,
        output_name: OutputNameOpt = None, input_name: InputNameOpt = None, wrt: WrtOpt = None,
        logits: LogitsOpt = False,
        size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, scale: ScaleOpt = None,
        layout: LayoutOpt = None, channels: ChannelsOpt = None, preset: PresetOpt = None, shape: ShapeOpt = None,
        device: DeviceOpt = "cpu", dtype: DtypeOpt = None, max_memory: MaxMemOpt = None, seed: SeedOpt = 0,
        *, ctx,
    ) -> Outcome:
        """The local geometry of J = d output / d input at one input (--input) or along a trajectory
        (--trajectory FILE, or --line A B --steps N): singular values, numerical rank (tolerance stated),
        condition number, det and log|det| (square J), Yoshikawa manipulability sqrt(det(J J^T)), singular
        inputs and the directions they lose, the Gauss-Newton curvature J^T J; with --logdet-output, a flow's
        log-det discrepancy and log-density.

        Checks: non-finite J fails; singular_inputs warns above 0; logdet_discrepancy warns above 1e-4 and
        fails above 1e-2; condition_number, min_singular_value and gauss_newton_condition become checks with
        --fail-on / --warn-on (e.g. --fail-on 'condition_number>1e6')."""
        import dataclasses

        import torch

        from ..analyses.geometry import GeometryOptions, geometry_analysis
        from ..data.feeds import default_wrt, load_feeds
        from ..data.trajectory import line_trajectory, load_trajectory
        from ..engine.core import JacobianTooLarge, human_bytes
        from ..errors import InputError
        from .common import load_model

        if trajectory and line:
            raise InputError("give --trajectory or --line, not both")
        torch.manual_seed(seed)
        with ctx.timed("load"):
            m = load_model(model, device=device, dtype=dtype)
            main = input_name or default_wrt(m, wrt) or m.inputs[0].name
            traj = None
            if trajectory or line:
                spec = m.input_spec(main)
                traj = load_trajectory(trajectory, spec) if trajectory else line_trajectory(line[0], line[1], steps,
                                                                                          spec)
                plain = [i for i in input or [] if "=" not in i or i.split("=", 1)[0] not in
                         {s.name for s in m.inputs}]
                if plain:
                    raise InputError(f"--input {plain[0]} and a trajectory both give input {main!r}; give the "
                                     "other inputs as --input NAME=FILE")
                shape = [*(shape or []), f"{main}={','.join(map(str, traj.shape))}"]
            pp = dict(size=size, mean=mean, std=std, scale=scale, layout=layout, channels=channels, preset=preset)
            feeds = load_feeds(m, input or None, input_name=input_name, wrt=wrt, seed=seed, shape=shape or None,
                               preprocess={k: v for k, v in pp.items() if v is not None})
            if traj is not None:  # the trajectory replaces the main input's synthetic values
                feeds = dataclasses.replace(
                    feeds, synthetic=False, source=traj.detail,
                    warnings=[w for w in feeds.warnings if f"input {main!r} is synthetic" not in w
                              and not (f"input {main!r} is " in w and traj.points[0].dtype == torch.float64)],
                    notes=[n for n in feeds.notes if not n.startswith(f"no data for input {main!r}")] + traj.notes)
        for n in feeds.notes:
            info(n)
        opts = GeometryOptions(output_name=output_name, wrt=wrt, logits=logits, max_memory=max_memory,
                               threshold=threshold, logdet=logdet, logdet_output=logdet_output,
                               density=density or bool(logdet_output), method=method, lanczos_steps=lanczos_steps,
                               locate=locate, seed=seed)
        try:
            with ctx.progress("geometry", len(traj.points) if traj else 1) as p:
                res = geometry_analysis(m, feeds, traj.points if traj else None, opts,
                                        labels=traj.labels if traj else None, tpos=traj.tpos if traj else None,
                                        source=traj.source if traj else "point",
                                        source_detail=traj.detail if traj else "", progress=p.update,
                                        timings=ctx.timings)
        except JacobianTooLarge as e:
            raise InputError(f"the full Jacobian needs {human_bytes(e.needed)}, more than the "
                             f"{human_bytes(e.budget)} allowed; use --method lanczos (J never materialised) or "
                             "raise --max-memory") from None
        r = res.result
        settings = {"seed": seed, "dtype": r.dtype, "device": r.device, "logits": logits, "wrt": wrt,
                    "output_name": output_name, "input_name": feeds.input_name, "input_source": r.source_detail,
                    "synthetic_input": r.synthetic_input, "threshold": threshold, "method": method,
                    "lanczos_steps": lanczos_steps if method != "svd" else None, "max_memory": max_memory,
                    "logdet_output": logdet_output, "density": opts.density, "locate": locate,
                    "trajectory": trajectory, "line": list(line) if line else None,
                    "steps": steps if line else None, "shape": feeds.shapes}
        return Outcome(res, model=m, settings=settings, device=r.device, summary=_summary)
