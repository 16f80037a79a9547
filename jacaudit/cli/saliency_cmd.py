"""``jacaudit saliency MODEL [INPUTS...]``: gradient saliency maps, a ranked summary on stdout, reports in --out."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..data.collect import read_feature_names, read_inputs
from .common import labels_file, load_model, out, sharded_executor
from .options import (BatchSizeOpt, ChannelsOpt, DeviceOpt, DtypeOpt, InputNameOpt, KeepShardsOpt, LayoutOpt,
                      MeanOpt, OutputNameOpt, PresetOpt, RayOpt, RayWorkersOpt, ResizeOpt, ResumeOpt, ScaleOpt, SeedOpt,
                      SizeOpt, StdOpt, WrtOpt)
from .runner import Outcome, audit_command

MET = "Methods"


def _state_warnings(model, spec, sample) -> list[str]:
    """The internal-state check on the first input (as jacobian/verify do), and what the model itself noted."""
    import torch

    from .. import data as D

    out_ = []
    try:
        feeds = {spec.name: D.stack([sample], device=model.device, dtype=model.dtype),
                 **{k: torch.as_tensor(v[None]).to(model.device) for k, v in sample.extra.items()}}
        msg = model.check_stateless(feeds) if all(s.name in feeds for s in model.inputs) else None
    except Exception:  # the analysis itself reports a model that cannot run on this input
        msg = None
    if msg:
        out_.append(msg)
    return out_ + [w for w in getattr(model, "warnings", []) if w not in out_]


def register(app: typer.Typer) -> None:
    @audit_command(app, "saliency")
    def saliency_cmd(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="ONNX or TorchScript model.")],
        inputs: Annotated[Optional[list[Path]], typer.Argument(
            metavar="[IMAGE_OR_FOLDER]...", help="Images (PNG/JPEG/...), folders of them, preprocessed "
            ".npy/.npz arrays, or CSV tables (rows of a (batch, features) input; a header names the features, a "
            "label column is not fed). None: one seeded synthetic input (flagged).")] = None,
        method: Annotated[str, typer.Option("--method", "-m", help="grad, gradxinput, smoothgrad, ig, a "
                                            "comma-separated list, or all.", rich_help_panel=MET)] = "grad",
        target: Annotated[str, typer.Option("--target", "-t", help="What is explained. For a (batch, classes) "
                                            "output: top1 (default), a class index, or a label from --labels. "
                                            "For any output, in its coordinates after the batch axis: "
                                            "'index=I,J' (one element), 'argmax=SLICE' (the largest of a slice, "
                                            "per input) or 'sum=SLICE' (its sum); SLICE is numpy-like, e.g. "
                                            "'3,:' or '4,0:100'. Other outputs are refused without one.")] = "top1",
        wrt: WrtOpt = None,
        feature_names: Annotated[Optional[str], typer.Option("--feature-names", help="Names of a (batch, "
                                                             "features) input's features: a,b,c or a file (one "
                                                             "per line); default: the CSV header.")] = None,
        label_column: Annotated[Optional[str], typer.Option("--label-column", help="CSV column not fed to the "
                                                            "model (default: one named label/target/y/class when "
                                                            "there is one column too many).")] = None,
        labels: Annotated[Optional[Path], typer.Option("--labels", help="Class labels: one per line, or JSON "
                                                       "(default: labels.txt beside the model, if any).")] = None,
        batch_size: BatchSizeOpt = 16,
        ray: RayOpt = None,
        ray_workers: RayWorkersOpt = None,
        resume: ResumeOpt = False,
        keep_shards: KeepShardsOpt = False,
        device: DeviceOpt = "cpu",
        dtype: DtypeOpt = None,
        seed: SeedOpt = 0,
        reduce: Annotated[str, typer.Option("--reduce", help="Channel reduction for heatmaps: max-abs or l2.",
                                            rich_help_panel=MET)] = "max-abs",
        ig_steps: Annotated[int, typer.Option("--ig-steps", min=1, help="Integrated Gradients steps (trapezoid "
                                              "rule, steps+1 evaluations).", rich_help_panel=MET)] = 50,
        ig_baseline: Annotated[str, typer.Option("--ig-baseline", help="Integrated Gradients baseline: black "
                                                 "(pixel 0 through the preprocessing), blur, noise, zero.",
                                                 rich_help_panel=MET)] = "black",
        sg_samples: Annotated[int, typer.Option("--sg-samples", min=1, help="SmoothGrad samples.",
                                                rich_help_panel=MET)] = 25,
        sg_sigma: Annotated[float, typer.Option("--sg-sigma", min=0.0, help="SmoothGrad noise sigma as a "
                                                "fraction of the input range.", rich_help_panel=MET)] = 0.15,
        score: Annotated[str, typer.Option("--score", help="logit (the Softmax input when the model ends in "
                                           "a Softmax) or output.", rich_help_panel=MET)] = "logit",
        chunk: Annotated[int, typer.Option("--chunk", min=1, help="Rows per forward/backward pass (IG steps and "
                                           "SmoothGrad samples are batched up to this).", rich_help_panel=MET)] = 64,
        sanity: Annotated[bool, typer.Option("--sanity", help="Model-parameter randomisation test (Adebayo et "
                                             "al. 2018), cascading from the last layer.", rich_help_panel=MET)] =
        False,
        sanity_layers: Annotated[Optional[int], typer.Option("--sanity-layers", min=1, help="Randomise at most "
                                                             "this many layers (default all).",
                                                             rich_help_panel=MET)] = None,
        sanity_threshold: Annotated[float, typer.Option("--sanity-threshold", help="Flag (warn) a method whose "
                                                        "final Spearman |rho| is at least this; fail with "
                                                        "--fail-on 'sanity_spearman@*>=0.5'.",
                                                        rich_help_panel=MET)] = 0.5,
        input_name: InputNameOpt = None,
        output_name: OutputNameOpt = None,
        mask_suffix: Annotated[str, typer.Option("--mask-suffix", help="Object masks beside images "
                                                 "(IMAGE<suffix>.png): the saliency mass outside is checked, and "
                                                 "mask files are not inputs. '' turns it off.")] = "_mask",
        preset: PresetOpt = None, size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None,
        scale: ScaleOpt = None, layout: LayoutOpt = None, channels: ChannelsOpt = None, resize: ResizeOpt = None,
        *, ctx,
    ) -> Outcome:
        """Saliency maps (gradient, gradient x input, SmoothGrad, Integrated Gradients) for images or arrays.

        Writes per input a heatmap PNG, an overlay PNG and the raw signed attribution (.npy, the model input's
        shape) into OUT/maps/, and reports into OUT. Checks: IG completeness gap, the sanity test, and with object
        masks the share of saliency outside the object. Exit 2 when some inputs were skipped."""
        from .. import data as D
        from ..analyses.saliency import SaliencyOptions, parse_methods, read_labels, saliency
        from ..engine.gradients import TargetNeeded
        from ..errors import DataError, InputError

        methods_list = parse_methods(method)
        if score not in ("logit", "output"):
            raise InputError("--score must be logit or output")
        with ctx.timed("load"):
            model = load_model(str(model_path), device=device, dtype=dtype)
        spec = model.input_spec(input_name)
        pp = D.Preprocess.infer(spec.shape, preset=preset, size=size, mean=mean, std=std, scale=scale,
                                layout=layout, channels=channels, resize=resize)
        label_path = labels_file(model_path, labels)
        label_list = read_labels(label_path)
        paths = [str(p) for p in inputs or []]
        if paths:
            samples, failures, masks, warnings, csv_names = read_inputs(paths, pp, spec, mask_suffix, label_column)
        else:
            samples, failures, masks, csv_names = [D.synthetic_sample(spec, seed, pp)], [], {}, None
            warnings = ["no inputs given: a seeded synthetic input was used (flagged synthetic)"]
        if not samples:
            raise DataError(f"none of the {len(failures)} input(s) could be read"
                            + (f" ({failures[0][1]})" if failures else ""))
        opts = SaliencyOptions(methods=methods_list, target=target, labels=label_list, reduction=reduce,
                               steps=ig_steps, baseline=ig_baseline, samples=sg_samples, sigma=sg_sigma, seed=seed,
                               batch_size=batch_size, chunk_rows=chunk, use_logits=(score == "logit"),
                               input_name=input_name, output=output_name, wrt=wrt,
                               feature_names=read_feature_names(feature_names) or csv_names, sanity=sanity,
                               sanity_layers=sanity_layers, sanity_threshold=sanity_threshold)
        warnings += _state_warnings(model, spec, samples[0])
        from ..analyses.saliency import saliency_index

        index = saliency_index(samples)
        executor = sharded_executor(ctx, "saliency", index, model, str(model_path), batch_size, ray=ray,
                                    workers=ray_workers, resume=resume, device=device, dtype=dtype,
                                    keep_shards=keep_shards)
        try:
            res = saliency(model, index, opts, preprocess=pp, masks=masks or None, failures=failures,
                           timings=ctx.timings, executor=executor)
        except TargetNeeded as e:
            others = [s.name for s in model.outputs if s.name != e.output]
            raise InputError(f"{e}: pass --output-name NAME{' (' + ', '.join(others[:6]) + ')' if others else ''} "
                             f"or --target, e.g. --target 'index={','.join('0' for _ in e.shape)}'") from None
        res.warnings[:0] = [w for w in warnings if w not in res.warnings]
        settings = {"method": ",".join(methods_list), "target": target, "score": score, "reduction": reduce,
                    "ig_steps": ig_steps if "ig" in methods_list else None,
                    "ig_baseline": ig_baseline if "ig" in methods_list else None,
                    "sg_samples": sg_samples if "smoothgrad" in methods_list else None,
                    "sg_sigma": sg_sigma if "smoothgrad" in methods_list else None, "seed": seed,
                    "dtype": str(model.dtype or "float32").replace("torch.", ""), "device": str(model.device),
                    "batch_size": batch_size, "chunk": chunk, "sanity": sanity,
                    "sanity_threshold": sanity_threshold if sanity else None, "mask_suffix": mask_suffix or None,
                    "labels": label_path, "preprocess": pp.describe(), "wrt": wrt,
                    "target_spec": res.result.target_spec, "feature_names": opts.feature_names}
        maps = [m for i in res.result.inputs for m in i.maps]
        empty = bool(maps) and all(m.zero_fraction is not None and m.zero_fraction >= 1.0 for m in maps)
        return Outcome(res, model=model, settings=settings, summary=_summary, inconclusive=empty)


def _target_text(res, i) -> str:
    """The explained element: a class (label or index), output coordinates, or a summed slice."""
    if getattr(i, "target_region", None):
        return f"sum{i.target_region}"
    if getattr(res, "target_spec", "class") == "class":
        return i.target.label or str(i.target.index)
    return "[" + ", ".join(map(str, i.target_coords or [])) + "]"


def _summary(report) -> None:
    """Ranked summary on stdout: inputs by target score, best first; for features / sequence positions, the
    ranking of the first method per input."""
    from rich.table import Table
    from rich.text import Text

    res = report.result
    kind = getattr(res, "input_kind", "image")
    rows = sorted(res.inputs, key=lambda i: -(i.target.score if i.target.score == i.target.score else -1e30))
    what = f" at {res.target_spec}" if getattr(res, "target_spec", "class") != "class" else ""
    wrt = f", d/d {res.wrt}" if getattr(res, "wrt", None) else ""
    red = f", channels reduced by {res.reduction}" if kind in ("image", "sequence") else ""
    t = Table(title=Text(f"saliency of the {res.score} ({res.score_tensor}{what}){wrt}{red}"),
              title_justify="left", show_lines=False)
    image = kind not in ("features", "sequence")
    unit = "feature" if kind == "features" else "position"
    cols = ["#", "input", "class" if what == "" else "explained", res.score, "prob", "method"]
    cols += ["concentrates at", "top-10% mass"] if image else [f"top {unit}s (share of |attribution|)"]
    for col in cols + ["IG gap", "in mask"] * image + ["IG gap"] * (not image):
        t.add_column(col, overflow="fold")
    for rank, i in enumerate(rows, 1):
        cls = _target_text(res, i)
        for j, m in enumerate(i.maps):
            first = j == 0
            head = [str(rank) if first else "", (i.name + (" (synthetic)" if i.synthetic else "")) if first else "",
                    cls if first else "", f"{i.target.score:.4g}" if first else "",
                    (f"{i.target.probability:.3f}" if i.target.probability is not None else "") if first else "",
                    m.method]
            gap = f"{100 * m.completeness_gap:.2f}%" if m.completeness_gap is not None else ""
            if image:
                c = m.concentration
                tail = [c.region if c else "", f"{100 * c.top10_mass:.0f}%" if c else "", gap,
                        f"{100 * m.mask_fraction:.0f}%" if m.mask_fraction is not None else ""]
            else:
                top = ", ".join(f"{a.name} {100 * a.share:.0f}%" for a in (m.ranking or [])[:5])
                tail = [top, gap]
            t.add_row(*map(Text, head + tail))
    out.print(t, markup=False)
    if not image and res.inputs:
        _ranking_table(res, unit)
    for s in res.sanity:
        st = getattr(s, "status", "checked")
        if st in ("skipped", "error"):  # no final value: no verdict either way
            out.print(f"sanity {s.method}: {st.upper()} ({s.reason})", markup=False)
            continue
        out.print(f"sanity {s.method}: final Spearman {s.final_spearman:.3f} -> "
                  f"{'FLAGGED (map barely changes)' if s.flagged else 'changes'}"
                  + (f" [partial: {s.reason}]" if st == "partial" else ""), markup=False)


def _ranking_table(res, unit: str) -> None:
    """Mean |attribution| share per feature / position over the inputs, per method, largest first."""
    from rich.table import Table
    from rich.text import Text

    for k, method in enumerate(res.methods):
        share: dict[int, float] = {}
        name: dict[int, str] = {}
        n = 0
        for i in res.inputs:
            if k >= len(i.maps) or not i.maps[k].ranking:
                continue
            n += 1
            for a in i.maps[k].ranking:
                share[a.index] = share.get(a.index, 0.0) + a.share
                name.setdefault(a.index, a.name if unit == "feature" else f"position {a.index}")
        if not n:
            continue
        t = Table(title=Text(f"{method}: {unit}s by mean share of |attribution| over {n} input(s)"),
                  title_justify="left")
        for col in ("rank", unit, "mean share"):
            t.add_column(col)
        for r, (idx, v) in enumerate(sorted(share.items(), key=lambda kv: -kv[1])[:20], 1):
            t.add_row(Text(str(r)), Text(name[idx]), Text(f"{100 * v / n:.1f}%"))
        out.print(t, markup=False)
