"""``jacaudit saliency MODEL [INPUTS...]``: gradient saliency maps, a ranked summary on stdout, reports in --out."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import err, handle_errors, info, out, setup_runtime, state, warn

PP = "Preprocessing (images)"
MET = "Methods"


def register(app: typer.Typer) -> None:
    @app.command("saliency")
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
        out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for reports and maps/.")] =
        Path("jacaudit-saliency"),
        formats: Annotated[str, typer.Option("--format", help="Reports to write: html,json,md.")] = "html,json,md",
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Inputs per batch.")] = 16,
        device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
        dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32 or float64.")] = None,
        seed: Annotated[int, typer.Option("--seed", help="Seed for noise, baselines and synthetic inputs.")] = 0,
        reduce: Annotated[str, typer.Option("--reduce", help="Channel reduction for heatmaps: max-abs or l2.",
                                            rich_help_panel=MET)] = "max-abs",
        steps: Annotated[int, typer.Option("--steps", min=1, help="IG steps (trapezoid rule, steps+1 "
                                           "evaluations).", rich_help_panel=MET)] = 50,
        baseline: Annotated[str, typer.Option("--baseline", help="IG baseline: black (pixel 0 through the "
                                              "preprocessing), blur, noise, zero.", rich_help_panel=MET)] = "black",
        n_samples: Annotated[int, typer.Option("--samples", min=1, help="SmoothGrad samples.",
                                             rich_help_panel=MET)] = 25,
        sigma: Annotated[float, typer.Option("--sigma", min=0.0, help="SmoothGrad noise sigma as a fraction of "
                                             "the input range.", rich_help_panel=MET)] = 0.15,
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
        sanity_threshold: Annotated[float, typer.Option("--sanity-threshold", help="Flag a method whose final "
                                                        "Spearman |rho| is at least this.",
                                                        rich_help_panel=MET)] = 0.5,
        fail_on_sanity: Annotated[bool, typer.Option("--fail-on-sanity", help="Exit 1 when a method is "
                                                     "flagged.", rich_help_panel=MET)] = False,
        input_name: Annotated[Optional[str], typer.Option("--input", help="Model input to attribute to.")] = None,
        output_name: Annotated[Optional[str], typer.Option("--output", help="Model output to explain.")] = None,
        mask_suffix: Annotated[str, typer.Option("--mask-suffix", help="Object masks beside images "
                                                 "(IMAGE<suffix>.png): the saliency mass inside is reported, and "
                                                 "mask files are not inputs. '' turns it off.")] = "_mask",
        json_out: Annotated[bool, typer.Option("--json", help="Summary on stdout as JSON.")] = False,
        preset: Annotated[Optional[str], typer.Option("--preset", help="imagenet, minus1to1, unit, raw, caffe.",
                                                      rich_help_panel=PP)] = None,
        size: Annotated[Optional[str], typer.Option("--size", help="N or HxW (default: the model's declared "
                                                    "size).", rich_help_panel=PP)] = None,
        mean: Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean, e.g. 0.485,0.456,0.406.",
                                                    rich_help_panel=PP)] = None,
        std: Annotated[Optional[str], typer.Option("--std", help="Per-channel std.", rich_help_panel=PP)] = None,
        scale: Annotated[Optional[str], typer.Option("--scale", help="0-1 (pixels/255) or 0-255.",
                                                     rich_help_panel=PP)] = None,
        layout: Annotated[Optional[str], typer.Option("--layout", help="NCHW or NHWC (default: inferred).",
                                                      rich_help_panel=PP)] = None,
        channels: Annotated[Optional[str], typer.Option("--channels", help="RGB, BGR or L (default: inferred).",
                                                        rich_help_panel=PP)] = None,
        resize: Annotated[Optional[str], typer.Option("--resize", help="stretch or crop (shorter side, then "
                                                      "centre crop).", rich_help_panel=PP)] = None,
    ) -> None:
        """Saliency maps (gradient, gradient x input, SmoothGrad, Integrated Gradients) for images or arrays.

        Writes per input a heatmap PNG, an overlay PNG and the raw signed attribution (.npy, the model input's
        shape) into OUT/maps/, and reports (HTML/JSON/Markdown) into OUT. Exit 2 when some inputs were skipped.
        """
        import time

        t_start = time.perf_counter()
        with handle_errors():
            from ..errors import DataError, InputError, EXIT_GATE, EXIT_INPUT
            from ..report import parse_formats, write_reports
            from ..results import make_report

            fmts = parse_formats(formats)
            methods_list = None
            setup_runtime()
            import numpy as np
            import torch

            from .. import data as D
            from ..analyses.saliency import SaliencyOptions, parse_methods, read_labels, saliency
            from .common import load_model

            methods_list = parse_methods(method)
            if score not in ("logit", "output"):
                raise InputError("--score must be logit or output")
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            model = load_model(str(model_path), device=device, dtype=dtype)
            timings["load"] = round(time.perf_counter() - t0, 4)
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

            warnings: list[str] = []
            samples, failures, masks = [], [], {}
            paths = [str(p) for p in inputs or []]
            if paths:
                expanded = D.expand_paths(paths)
                if mask_suffix:
                    expanded = [p for p in expanded if not os.path.splitext(p)[0].endswith(mask_suffix)]
                for p, item in D.iter_inputs(expanded, pp, spec):
                    if isinstance(item, DataError):
                        failures.append((p, str(item)))
                        warn(str(item))
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
            else:
                samples.append(D.synthetic_sample(spec, seed, pp))
                warnings.append("no inputs given: a seeded synthetic input was used (flagged synthetic)")
            if not samples:
                raise DataError(f"none of the {len(failures)} input(s) could be read")

            opts = SaliencyOptions(methods=methods_list, target=target, labels=label_list, reduction=reduce,
                                   steps=steps, baseline=baseline, samples=n_samples, sigma=sigma, seed=seed,
                                   batch_size=batch_size, chunk_rows=chunk, use_logits=(score == "logit"),
                                   input_name=input_name, output=output_name, sanity=sanity,
                                   sanity_layers=sanity_layers, sanity_threshold=sanity_threshold)
            os.makedirs(out_dir, exist_ok=True)
            progress = _progress(len(samples))
            with progress as bar:
                task = bar.add_task("saliency", total=len(samples)) if bar else None
                res, w2 = saliency(model, samples, opts, preprocess=pp, out_dir=str(out_dir), masks=masks or None,
                                   failures=failures,
                                   progress=(lambda k: bar.advance(task, k)) if bar else None, timings=timings)
            warnings.extend(w2)
            flagged = [s.method for s in res.sanity if s.flagged]
            code = 0
            if failures:
                code = EXIT_INPUT
            elif fail_on_sanity and flagged:
                code = EXIT_GATE
            timings["total"] = round(time.perf_counter() - t_start, 4)
            settings = {"method": ",".join(methods_list), "target": target, "score": score, "reduction": reduce,
                        "steps": steps if "ig" in methods_list else None,
                        "baseline": baseline if "ig" in methods_list else None,
                        "samples": n_samples if "smoothgrad" in methods_list else None,
                        "sigma": sigma if "smoothgrad" in methods_list else None, "seed": seed,
                        "dtype": str(model.dtype or "float32").replace("torch.", ""), "device": str(model.device),
                        "batch_size": batch_size, "chunk": chunk, "sanity": sanity,
                        "sanity_threshold": sanity_threshold if sanity else None,
                        "labels": label_path, "preprocess": pp.describe()}
            report = make_report("saliency", res, model=model, settings=settings, timings=timings,
                                 warnings=warnings, exit_code=code,
                                 status=("partial" if failures else ("fail" if code == EXIT_GATE else "pass")))
            written = write_reports(report, str(out_dir), fmts) if fmts else []
            _summary(res, json_out)
            for p in written:
                info(f"wrote {p}")
            if failures:
                err.print(f"{len(failures)} input(s) skipped (see the report); exit {EXIT_INPUT}", style="yellow",
                          markup=False)
            if code:
                raise typer.Exit(code)


def _progress(total: int):
    """A transient Rich progress bar on stderr (off when stderr is not a terminal, or with --quiet)."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if state.quiet or not err.is_terminal or total <= 1:
        return contextlib.nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, transient=True)


def _summary(res, as_json: bool) -> None:
    """Ranked summary on stdout: inputs by target score, best first."""
    rows = sorted(res.inputs, key=lambda i: -(i.target.score if i.target.score == i.target.score else -1e30))
    if as_json:
        from .common import emit_json
        emit_json([{"input": i.name, "source": i.source, "synthetic": i.synthetic,
                    "class": i.target.index, "label": i.target.label, "score": i.target.score,
                    "probability": i.target.probability,
                    "top": [{"class": c.index, "label": c.label, "score": c.score} for c in i.top],
                    "maps": [{"method": m.method, "region": m.concentration.region,
                              "centroid": [m.concentration.centroid_x, m.concentration.centroid_y],
                              "top10_mass": m.concentration.top10_mass, "completeness_gap": m.completeness_gap,
                              "mask_fraction": m.mask_fraction, "npy": m.npy} for m in i.maps]}
                   for i in rows])
        return
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(f"saliency of the {res.score} ({res.score_tensor}), channels reduced by {res.reduction}"),
              title_justify="left", show_lines=False)
    for col in ("#", "input", "class", res.score, "prob", "method", "concentrates at", "top-10% mass",
                "IG gap", "in mask"):
        t.add_column(col, overflow="fold")
    for rank, i in enumerate(rows, 1):
        cls = i.target.label or str(i.target.index)
        for j, m in enumerate(i.maps):
            first = j == 0
            t.add_row(*map(Text, (str(rank) if first else "", (i.name + (" (synthetic)" if i.synthetic else "")) if first else "",
                      cls if first else "", f"{i.target.score:.4g}" if first else "",
                      (f"{i.target.probability:.3f}" if i.target.probability is not None else "") if first else "",
                      m.method, m.concentration.region, f"{100 * m.concentration.top10_mass:.0f}%",
                      f"{100 * m.completeness_gap:.2f}%" if m.completeness_gap is not None else "",
                      f"{100 * m.mask_fraction:.0f}%" if m.mask_fraction is not None else "")))
    out.print(t, markup=False)
    for s in res.sanity:
        out.print(f"sanity {s.method}: final Spearman {s.final_spearman:.3f} -> "
                  f"{'FLAGGED (map barely changes)' if s.flagged else 'changes'}", markup=False)
