"""``jacaudit saliency MODEL [INPUTS...]``: gradient saliency maps, a ranked summary on stdout, reports in --out."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import info, load_model, out
from .options import (BatchSizeOpt, ChannelsOpt, DeviceOpt, DtypeOpt, InputNameOpt, LayoutOpt, MeanOpt,
                      OutputNameOpt, PresetOpt, ResizeOpt, ScaleOpt, SeedOpt, SizeOpt, StdOpt)
from .runner import Outcome, audit_command

MET = "Methods"


def read_inputs(paths: list[str], pp, spec, mask_suffix: str) -> tuple[list, list, dict, list[str]]:
    """Samples from files/folders; (samples, failures, masks by sample name, warnings). Mask files are no inputs."""
    from .. import data as D
    from ..errors import DataError

    samples, failures, masks, warnings = [], [], {}, []
    expanded = D.expand_paths(paths)
    if mask_suffix:
        expanded = [p for p in expanded if not os.path.splitext(p)[0].endswith(mask_suffix)]
    for p, item in D.iter_inputs(expanded, pp, spec):
        if isinstance(item, DataError):
            failures.append((p, str(item)))
            warnings.append(str(item))
            continue
        samples.append(item)
        if mask_suffix and item.pixels is not None:
            stem, _ = os.path.splitext(p)
            for ext in (".png", os.path.splitext(p)[1]):
                mp = stem + mask_suffix + ext
                if os.path.isfile(mp):
                    try:
                        mpx, _ = D.read_pixels(mp, "L", pp.size, pp.resize)
                        masks[item.name] = mpx[:, :, 0] > 127
                    except DataError as e:
                        warnings.append(f"mask {mp}: {e}")
                    break
    return samples, failures, masks, warnings


def register(app: typer.Typer) -> None:
    @audit_command(app, "saliency")
    def saliency_cmd(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="ONNX or TorchScript model.")],
        inputs: Annotated[Optional[list[Path]], typer.Argument(
            metavar="[IMAGE_OR_FOLDER]...", help="Images (PNG/JPEG/...), folders of them, or preprocessed "
            ".npy/.npz arrays. None: one seeded synthetic input (flagged).")] = None,
        method: Annotated[str, typer.Option("--method", "-m", help="grad, gradxinput, smoothgrad, ig, a "
                                            "comma-separated list, or all.", rich_help_panel=MET)] = "grad",
        target: Annotated[str, typer.Option("--target", "-t", help="top1 (default), a class index, or a label "
                                            "from --labels.")] = "top1",
        labels: Annotated[Optional[Path], typer.Option("--labels", help="Class labels: one per line, or JSON "
                                                       "(default: labels.txt beside the model, if any).")] = None,
        batch_size: BatchSizeOpt = 16,
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
        from ..errors import DataError, InputError

        methods_list = parse_methods(method)
        if score not in ("logit", "output"):
            raise InputError("--score must be logit or output")
        with ctx.timed("load"):
            model = load_model(str(model_path), device=device, dtype=dtype)
        spec = model.input_spec(input_name)
        pp = D.Preprocess.infer(spec.shape, preset=preset, size=size, mean=mean, std=std, scale=scale,
                                layout=layout, channels=channels, resize=resize)
        label_path = str(labels) if labels else None
        if label_path is None:
            cand = os.path.join(os.path.dirname(os.path.abspath(str(model_path))), "labels.txt")
            if os.path.isfile(cand):
                label_path = cand
                info(f"labels: {cand}")
        label_list = read_labels(label_path)
        paths = [str(p) for p in inputs or []]
        if paths:
            samples, failures, masks, warnings = read_inputs(paths, pp, spec, mask_suffix)
        else:
            samples, failures, masks = [D.synthetic_sample(spec, seed, pp)], [], {}
            warnings = ["no inputs given: a seeded synthetic input was used (flagged synthetic)"]
        if not samples:
            raise DataError(f"none of the {len(failures)} input(s) could be read")
        opts = SaliencyOptions(methods=methods_list, target=target, labels=label_list, reduction=reduce,
                               steps=ig_steps, baseline=ig_baseline, samples=sg_samples, sigma=sg_sigma, seed=seed,
                               batch_size=batch_size, chunk_rows=chunk, use_logits=(score == "logit"),
                               input_name=input_name, output=output_name, sanity=sanity,
                               sanity_layers=sanity_layers, sanity_threshold=sanity_threshold)
        with ctx.progress("saliency", len(samples)) as bar:
            res = saliency(model, samples, opts, preprocess=pp, masks=masks or None, failures=failures,
                           progress=bar.advance, timings=ctx.timings)
        res.warnings[:0] = [w for w in warnings if w not in res.warnings]
        settings = {"method": ",".join(methods_list), "target": target, "score": score, "reduction": reduce,
                    "ig_steps": ig_steps if "ig" in methods_list else None,
                    "ig_baseline": ig_baseline if "ig" in methods_list else None,
                    "sg_samples": sg_samples if "smoothgrad" in methods_list else None,
                    "sg_sigma": sg_sigma if "smoothgrad" in methods_list else None, "seed": seed,
                    "dtype": str(model.dtype or "float32").replace("torch.", ""), "device": str(model.device),
                    "batch_size": batch_size, "chunk": chunk, "sanity": sanity,
                    "sanity_threshold": sanity_threshold if sanity else None, "mask_suffix": mask_suffix or None,
                    "labels": label_path, "preprocess": pp.describe()}
        return Outcome(res, model=model, settings=settings, summary=_summary)


def _summary(report) -> None:
    """Ranked summary on stdout: inputs by target score, best first."""
    from rich.table import Table
    from rich.text import Text

    res = report.result
    rows = sorted(res.inputs, key=lambda i: -(i.target.score if i.target.score == i.target.score else -1e30))
    t = Table(title=Text(f"saliency of the {res.score} ({res.score_tensor}), channels reduced by {res.reduction}"),
              title_justify="left", show_lines=False)
    for col in ("#", "input", "class", res.score, "prob", "method", "concentrates at", "top-10% mass",
                "IG gap", "in mask"):
        t.add_column(col, overflow="fold")
    for rank, i in enumerate(rows, 1):
        cls = i.target.label or str(i.target.index)
        for j, m in enumerate(i.maps):
            first = j == 0
            t.add_row(*map(Text, (
                str(rank) if first else "", (i.name + (" (synthetic)" if i.synthetic else "")) if first else "",
                cls if first else "", f"{i.target.score:.4g}" if first else "",
                (f"{i.target.probability:.3f}" if i.target.probability is not None else "") if first else "",
                m.method, m.concentration.region, f"{100 * m.concentration.top10_mass:.0f}%",
                f"{100 * m.completeness_gap:.2f}%" if m.completeness_gap is not None else "",
                f"{100 * m.mask_fraction:.0f}%" if m.mask_fraction is not None else "")))
    out.print(t, markup=False)
    for s in res.sanity:
        st = getattr(s, "status", "checked")
        if st in ("skipped", "error"):  # no final value: no verdict either way
            out.print(f"sanity {s.method}: {st.upper()} ({s.reason})", markup=False)
            continue
        out.print(f"sanity {s.method}: final Spearman {s.final_spearman:.3f} -> "
                  f"{'FLAGGED (map barely changes)' if s.flagged else 'changes'}"
                  + (f" [partial: {s.reason}]" if st == "partial" else ""), markup=False)
