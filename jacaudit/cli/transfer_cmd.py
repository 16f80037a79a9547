"""``jacaudit transfer MODEL SOURCE_DATA [--target-data DATA2] [--layer TENSOR ...]``: per-feature Jacobian
sensitivity scores that say which learned features carry over to new data; the CI gate on them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import fixed_feeds, labels_file, load_model, out
from .options import (BatchSizeOpt, ChannelsOpt, DeviceOpt, DtypeOpt, InputNameOpt, LayoutOpt, MeanOpt,
                      OutputNameOpt, PresetOpt, ResizeOpt, ScaleOpt, SeedOpt, SizeOpt, StdOpt)
from .runner import Outcome, audit_command

LAY = "Layers"
RUL = "Verdict rule"
DAT = "Data"
ATT = "Attention maps"


def _load(path: str, pp, spec, input_names, label_column, limit, seed):
    """Samples of a dataset (labels are not used) -> LabelledData, and the CSV's feature names (or None)."""
    from ..data.collect import read_inputs
    from ..data.dataset import PREDICTIONS, LabelledData, _subsample, load_dataset
    from ..errors import DataError

    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    names = None
    if path.lower().endswith(".npz"):
        d = load_dataset(path, pp, spec, input_names=input_names, limit=None)
        samples, failures, warnings = d.samples, d.failures, d.warnings
    else:
        samples, failures, _masks, warnings, names = read_inputs([path], pp, spec, "_mask", label_column)
    if not samples:
        raise DataError(f"{path}: no sample could be read" + (f" ({failures[0][1]})" if failures else ""))
    total = len(samples)
    samples = [samples[i] for i in _subsample(total, limit, seed)]
    return LabelledData(samples, None, PREDICTIONS, list(failures), list(warnings), total), names


def register(app: typer.Typer) -> None:
    @audit_command(app, "transfer")
    def transfer_cmd(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="ONNX or TorchScript classifier.")],
        data_path: Annotated[Path, typer.Argument(
            metavar="SOURCE_DATA", help="The data the model was trained on (or like it): a folder of images, an "
            ".npz with x, an .npy, or a CSV of features (a label column is left out). Labels are not used.")],
        target_data: Annotated[Optional[Path], typer.Option(
            "--target-data", help="The data it will meet: the same scores on it, and the shift per feature.",
            rich_help_panel=DAT)] = None,
        layers: Annotated[Optional[list[str]], typer.Option(
            "--layer", help="An internal tensor whose features (channels of (N,C,H,W), units of (N,C)) are scored "
            "(ONNX tensor names; `jacaudit inspect MODEL --tensors` lists them); repeatable. 'all': the main path's "
            "stage outputs, found automatically (the scores per depth).",
            rich_help_panel=LAY)] = None,
        feature_axis: Annotated[Optional[int], typer.Option(
            "--feature-axis", help="Axis of the features in the layer tensors (batch = 0; -1 for (N, T, D) sequence "
            "tensors; default: the last axis for an NHWC image model, else 1).", rich_help_panel=LAY)] = None,
        probes: Annotated[int, typer.Option("--probes", min=2, help="Hutchinson input probes per sample for "
                                            "||dh_k/dx||_F (exact when the input has no more elements).",
                                            rich_help_panel=LAY)] = 16,
        attention_wrt: Annotated[Optional[str], typer.Option(
            "--attention-wrt", help="Jacobian attention maps: a float [batch, positions, features] tensor to "
            "differentiate with respect to (e.g. the embedding output when the inputs are token ids).",
            rich_help_panel=ATT)] = None,
        attention_out: Annotated[Optional[str], typer.Option(
            "--attention-out", help="A later [batch, positions, features] tensor: the position-to-position map "
            "A[t_out, t_in] = ||dh[t_out]/de[t_in]||_F.", rich_help_panel=ATT)] = None,
        attention_rows: Annotated[int, typer.Option("--attention-rows", min=1, help="Samples shown one by one in "
                                                    "the attention maps.", rich_help_panel=ATT)] = 8,
        overspecialised_above: Annotated[float, typer.Option(
            "--overspecialised-above", min=0.0, help="Normalised sensitivity above which a feature is "
            "over-specialised (1 = a linear feature of isotropic data).", rich_help_panel=RUL)] = 2.0,
        shift_above: Annotated[float, typer.Option("--shift-above", min=0.0, help="Per-feature shift above which "
                                                   "a feature counts as shifted.", rich_help_panel=RUL)] = 0.5,
        max_outputs: Annotated[int, typer.Option("--max-outputs", min=1, help="Input-feature scores for every "
                                                 "output up to this many outputs, else for the predicted class "
                                                 "only.", rich_help_panel=DAT)] = 16,
        feature_names: Annotated[Optional[str], typer.Option(
            "--feature-names", help="Names of a (batch, features) input's columns: a,b,c or a file (default: "
            "the CSV header).", rich_help_panel=DAT)] = None,
        score: Annotated[str, typer.Option("--score", help="logit (the Softmax input when the model ends in "
                                           "one) or output.", rich_help_panel=DAT)] = "logit",
        limit: Annotated[Optional[int], typer.Option("--limit", min=2, help="Use a seeded random subset of this "
                                                     "many samples of each dataset.", rich_help_panel=DAT)] = None,
        labels: Annotated[Optional[Path], typer.Option("--labels", help="Class names: one per line, or JSON "
                                                       "(default: labels.txt beside the model, if any).",
                                                       rich_help_panel=DAT)] = None,
        label_column: Annotated[Optional[str], typer.Option("--label-column", help="CSV column left out (default: "
                                                            "one named label/target/y/class).",
                                                            rich_help_panel=DAT)] = None,
        feeds: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="NAME=FILE (.npy): another "
                                                           "model input, fed unchanged with every sample "
                                                           "(repeatable).", rich_help_panel=DAT)] = None,
        batch_size: BatchSizeOpt = 32,
        device: DeviceOpt = "cpu",
        dtype: DtypeOpt = None,
        seed: SeedOpt = 0,
        input_name: InputNameOpt = None,
        output_name: OutputNameOpt = None,
        preset: PresetOpt = None, size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None,
        scale: ScaleOpt = None, layout: LayoutOpt = None, channels: ChannelsOpt = None, resize: ResizeOpt = None,
        *, ctx,
    ) -> Outcome:
        """Which learned features carry over to new data, from Jacobian sensitivity: per input feature (mean
        |dy/dx_j| and mean |dy/dx_j| x std(x_j), ranked), and per feature of each --layer: its normalised
        sensitivity (E||dh_k/dx|| scaled by the input's and the feature's spread; Hutchinson probes, with
        their standard error), its influence on the head (E|dy/dh_k|), a verdict (reusable / over-specialised
        / dead) and a freeze / fine-tune suggestion per layer. With --target-data: the same on the target data
        and the shift per feature, most shifted first.

        Metrics to gate on: overspecialised_fraction[LAYER], dead_fraction[LAYER], reusable_fraction[LAYER],
        sensitivity_median[LAYER], with target data target_overspecialised_fraction[LAYER], shift_fraction,
        shift_median, shift_newly_overspecialised, and input_sensitivity[FEATURE]; e.g.
        --fail-on "target_overspecialised_fraction>0.3"."""
        from .. import data as D
        from ..analyses.saliency import read_labels
        from ..analyses.transfer import TransferOptions, transfer
        from ..data.collect import read_feature_names
        from ..errors import InputError

        if score not in ("logit", "output"):
            raise InputError("--score must be logit or output")
        with ctx.timed("load"):
            model = load_model(str(model_path), device=device, dtype=dtype)
        spec = model.input_spec(input_name)
        pp = D.Preprocess.infer(spec.shape, preset=preset, size=size, mean=mean, std=std, scale=scale,
                                layout=layout, channels=channels, resize=resize)
        label_path = labels_file(model_path, labels)
        classes = read_labels(label_path)
        names_in = [s.name for s in model.inputs]
        with ctx.timed("data"):
            src, csv_names = _load(str(data_path), pp, spec, names_in, label_column, limit, seed)
            tgt = None
            if target_data is not None:
                tgt, t_names = _load(str(target_data), pp, spec, names_in, label_column, limit, seed)
                if csv_names and t_names and t_names != csv_names:
                    raise InputError(f"{target_data}: its columns differ from the source data's")
        is_image = all(s.pixels is not None for s in src.samples)
        fixed = fixed_feeds(feeds, model, spec.name)
        names = read_feature_names(feature_names) or csv_names
        opts = TransferOptions(layers=tuple(layers or ()), feature_axis=feature_axis, probes=probes,
                               batch_size=batch_size, seed=seed, max_outputs=max_outputs,
                               feature_names=tuple(names) if names else None,
                               classes=tuple(classes) if classes else None, use_logits=(score == "logit"),
                               input_name=spec.name, output=output_name,
                               overspecialised_above=overspecialised_above, shift_above=shift_above,
                               attention_wrt=attention_wrt, attention_out=attention_out,
                               attention_rows=attention_rows)
        with ctx.progress("transfer", None) as bar:
            res = transfer(model, src, opts, target=tgt, preprocess=pp if is_image else None, image=is_image,
                           fixed=fixed, source_name=str(data_path),
                           target_name=str(target_data) if target_data is not None else None,
                           progress=bar.update, timings=ctx.timings)
        res.warnings[:0] = [w for w in getattr(model, "warnings", []) if w not in res.warnings]
        r = res.result
        settings = {"layers": list(opts.layers), "feature_axis": feature_axis, "probes": probes,
                    "overspecialised_above": overspecialised_above, "shift_above": shift_above,
                    "max_outputs": max_outputs, "attention_wrt": attention_wrt, "attention_out": attention_out,
                    "score": score, "limit": limit, "seed": seed,
                    "batch_size": batch_size, "labels": label_path, "feature_names": list(names) if names else None,
                    "dtype": str(model.dtype or "float32").replace("torch.", ""), "device": str(model.device),
                    "preprocess": pp.describe() if is_image else None, "fixed_inputs": sorted(fixed) or None,
                    "data": str(data_path), "target_data": str(target_data) if target_data is not None else None}
        live = (r.inputs is not None and any(f.mean_abs_gradient > 0 for f in r.inputs.features)) or \
            (r.attention is not None and any(v > 0 for v in r.attention.influence_mean))
        return Outcome(res, model=model, settings=settings, summary=_summary, inconclusive=not live)


def _summary(report) -> None:
    from rich.table import Table
    from rich.text import Text

    r = report.result
    out.print(f"{r.n_source} source sample(s)" + (f", {r.n_target} target sample(s)" if r.n_target else "")
              + f"; differentiated: {r.score} {r.score_tensor!r} w.r.t. "
              + (repr(r.input_name) if r.inputs is not None else
                 f"{r.attention.wrt!r} (input {r.input_name!r} is not float)" if r.attention else "?"), markup=False)
    for which, ins in (("source", r.inputs), ("target", r.inputs_target)):
        if ins is None:
            continue
        t = Table(title=Text(f"input {ins.kind} by sensitivity ({which} data; outputs: {ins.outputs_rule})"),
                  title_justify="left")
        for c in ("rank", "feature", "mean|dy/dx| x std", "mean|dy/dx|", "std"):
            t.add_column(c)
        for f in ins.features[:12]:
            t.add_row(str(f.rank), f.name, f"{f.scaled:.4g}", f"{f.mean_abs_gradient:.4g}", f"{f.std:.4g}")
        out.print(t)
        if len(ins.features) > 12:
            out.print(f"... {len(ins.features) - 12} more in the report", markup=False)
    a = r.attention
    if a is not None:
        top = sorted(range(a.positions_in), key=lambda t: -a.influence_mean[t])[:4]
        out.print(f"attention w.r.t. {a.wrt!r} ({a.positions_in} positions): mean ||dy/de[t]|| largest at positions "
                  + ", ".join(f"{t} ({a.influence_mean[t]:.3g})" for t in top)
                  + (f"; position map to {a.out_tensor!r} ({a.method})" if a.out_tensor else ""), markup=False)
    if r.layers:
        t = Table(title=Text(f"layers (normalised sensitivity > {r.rule.overspecialised_above:g}: "
                             "over-specialised)"), title_justify="left")
        for c in ("layer", "features", "reusable", "over-spec.", "dead", "median sens.", "shifted", "suggestion"):
            t.add_column(c)
        for lr in r.layers:
            s = lr.target or lr.source
            t.add_row(lr.tensor, str(lr.n_features), f"{100 * s.reusable_fraction:.0f}%",
                      f"{100 * s.overspecialised_fraction:.0f}%", f"{100 * s.dead_fraction:.0f}%",
                      "n/a" if s.sensitivity_median is None else f"{s.sensitivity_median:.3g}",
                      "" if lr.shift is None else f"{100 * lr.shift.shifted_fraction:.0f}%", lr.suggestion)
        out.print(t)
        if any(lr.target is not None for lr in r.layers):
            out.print("(fractions on the target data)", markup=False)
