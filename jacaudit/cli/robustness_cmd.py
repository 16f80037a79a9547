"""``jacaudit robustness MODEL DATA``: FGSM/PGD probes over an epsilon sweep, minimal flipping epsilons, Jacobian
norms and sensitivity directions, gradient-masking checks; the CI gate on all of them."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import fixed_feeds, labels_file, load_model, out, sharded_executor
from .options import (BatchSizeOpt, ChannelsOpt, DeviceOpt, DtypeOpt, InputNameOpt, KeepShardsOpt, LayoutOpt,
                      MeanOpt, OutputNameOpt, PresetOpt, RayOpt, RayWorkersOpt, ResizeOpt, ResumeOpt, ScaleOpt, SeedOpt,
                      SizeOpt, StdOpt)
from .runner import Outcome, audit_command

ATK = "Attacks"
NRM = "Norms and directions"
DAT = "Data"


def register(app: typer.Typer) -> None:
    @audit_command(app, "robustness")
    def robustness_cmd(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="ONNX or TorchScript classifier.")],
        data_path: Annotated[Path, typer.Argument(
            metavar="DATA", help="A folder of images (labels from sub-folder names or a labels.csv of file,label; "
            "none: the model's own predictions), an .npz with x (and y), an .npy, or a CSV of features with a "
            "label column.")],
        eps: Annotated[str, typer.Option("--eps", help="L-inf epsilons, comma-separated (fractions like 8/255 "
                                         "allowed), in the data's original units: image pixels as a fraction of "
                                         "the pixel range (0-1), raw values for arrays.", rich_help_panel=ATK)] =
        "0.001,0.003,0.01,0.03",
        pgd_norm: Annotated[str, typer.Option("--pgd-norm", help="PGD norms: linf, l2, or linf,l2; '' for no "
                                              "PGD.", rich_help_panel=ATK)] = "linf",
        eps_l2: Annotated[Optional[str], typer.Option("--eps-l2", help="L2 radii for PGD-L2 (default: each "
                                                      "epsilon x sqrt(input size), the L2 length of an L-inf step "
                                                      "of that size).", rich_help_panel=ATK)] = None,
        pgd_steps: Annotated[int, typer.Option("--pgd-steps", min=1, help="PGD iterations.",
                                               rich_help_panel=ATK)] = 10,
        pgd_step: Annotated[Optional[float], typer.Option("--pgd-step", min=0.0, help="PGD step size as a "
                                                          "fraction of epsilon (default 2.5 / steps).",
                                                          rich_help_panel=ATK)] = None,
        random_start: Annotated[bool, typer.Option("--random-start/--no-random-start", help="PGD starts at a "
                                                   "seeded random point of the epsilon-ball.",
                                                   rich_help_panel=ATK)] = True,
        bisect: Annotated[int, typer.Option("--bisect", min=0, help="Bisection steps for the minimal flipping "
                                            "epsilon (PGD L-inf) between sweep points; 0: off.",
                                            rich_help_panel=ATK)] = 4,
        score: Annotated[str, typer.Option("--score", help="logit (the Softmax input when the model ends in "
                                           "one) or output.", rich_help_panel=ATK)] = "logit",
        directions: Annotated[int, typer.Option("--directions", min=1, help="Sensitivity directions (top right "
                                                "singular vectors of J) per input.", rich_help_panel=NRM)] = 3,
        norm_limit: Annotated[int, typer.Option("--norm-limit", min=0, help="Jacobian norms and directions on at "
                                                "most this many inputs (the first ones).",
                                                rich_help_panel=NRM)] = 64,
        probes: Annotated[int, typer.Option("--probes", min=2, help="Hutchinson probes for ||J||_F (exact when "
                                            "the model has no more outputs than this).", rich_help_panel=NRM)] = 32,
        worst: Annotated[int, typer.Option("--worst", min=0, help="Adversarial examples shown for the most "
                                           "fragile inputs.", rich_help_panel=NRM)] = 4,
        limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Use a seeded random subset of this "
                                                     "many samples.", rich_help_panel=DAT)] = None,
        value_range: Annotated[Optional[str], typer.Option("--range", help="Valid range LO,HI of array / table "
                                                           "values (default: [0,1] when the data lies in it, else "
                                                           "the data's min/max). Images: the pixel range.",
                                                           rich_help_panel=DAT)] = None,
        labels: Annotated[Optional[Path], typer.Option("--labels", help="Class labels: one per line, or JSON "
                                                       "(default: labels.txt beside the model, if any).",
                                                       rich_help_panel=DAT)] = None,
        label_column: Annotated[Optional[str], typer.Option("--label-column", help="CSV column holding the "
                                                            "label (default: one named label/target/y/class).",
                                                            rich_help_panel=DAT)] = None,
        feeds: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="NAME=FILE (.npy): another "
                                                           "model input, fed unchanged with every sample "
                                                           "(repeatable).", rich_help_panel=DAT)] = None,
        batch_size: BatchSizeOpt = 32,
        ray: RayOpt = None,
        ray_workers: RayWorkersOpt = None,
        resume: ResumeOpt = False,
        keep_shards: KeepShardsOpt = False,
        device: DeviceOpt = "cpu",
        dtype: DtypeOpt = None,
        seed: SeedOpt = 0,
        input_name: InputNameOpt = None,
        output_name: OutputNameOpt = None,
        preset: PresetOpt = None, size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None,
        scale: ScaleOpt = None, layout: LayoutOpt = None, channels: ChannelsOpt = None, resize: ResizeOpt = None,
        *, ctx,
    ) -> Outcome:
        """Adversarial robustness of a classifier over a dataset: FGSM and PGD over an epsilon sweep, the minimal
        flipping epsilon per input, Jacobian norms (Frobenius, spectral: the local Lipschitz estimate) and the
        input directions the scores are most sensitive to, with gradient-masking checks.

        Metrics to gate on: robust_accuracy@eps=E, flip_rate@eps=E (the strongest L-inf attack), fgsm_* / pgd_*
        per attack, min_flip_eps_median, lipschitz_p95, jacobian_frobenius_mean, ...; e.g.
        --fail-on "robust_accuracy@eps=0.01<0.8". Exit 1 when a check fails, 4 when no input has a usable
        gradient."""
        from .. import data as D
        from ..analyses.robustness import RobustnessOptions, array_box, image_box, parse_eps, robustness
        from ..analyses.saliency import read_labels
        from ..data.dataset import index_dataset
        from ..errors import InputError

        eps_list = parse_eps(eps)
        norms = tuple(p.strip().lower() for p in pgd_norm.split(",") if p.strip())
        bad = [p for p in norms if p not in ("linf", "l2")]
        if bad:
            raise InputError(f"--pgd-norm: {', '.join(bad)} is not linf or l2")
        l2 = parse_eps(eps_l2) if eps_l2 else None  # its own sweep: any number of radii
        if score not in ("logit", "output"):
            raise InputError("--score must be logit or output")
        rng = None
        if value_range:
            try:
                lo_s, hi_s = value_range.split(",")
                rng = (float(lo_s), float(hi_s))
            except ValueError:
                raise InputError(f"--range {value_range!r}: give LO,HI, e.g. 0,1") from None
            if not (math.isfinite(rng[0]) and math.isfinite(rng[1]) and rng[1] > rng[0]):
                raise InputError(f"--range {value_range!r}: HI must be greater than LO")
        with ctx.timed("load"):
            model = load_model(str(model_path), device=device, dtype=dtype)
        spec = model.input_spec(input_name)
        pp = D.Preprocess.infer(spec.shape, preset=preset, size=size, mean=mean, std=std, scale=scale,
                                layout=layout, channels=channels, resize=resize)
        label_path = labels_file(model_path, labels)
        classes = read_labels(label_path)
        with ctx.timed("data"):
            data = index_dataset(str(data_path), pp, spec, classes=classes,
                                input_names=[s.name for s in model.inputs], label_column=label_column,
                                limit=limit, seed=seed)
        is_image = data.image
        if is_image:
            if value_range:
                raise InputError("--range is for arrays and tables; image pixels are clipped to their range")
            box, range_src = image_box(pp), "the pixel range"
        else:
            box, range_src = array_box(data.value_range() if rng is None else None, rng)
        fixed = fixed_feeds(feeds, model, spec.name)
        opts = RobustnessOptions(eps=eps_list, eps_l2=l2, pgd_norms=norms, pgd_steps=pgd_steps,
                                 pgd_alpha=pgd_step, random_start=random_start, bisect_steps=bisect,
                                 directions=directions, norm_limit=norm_limit, probes=probes,
                                 batch_size=batch_size, seed=seed, classes=tuple(classes) if classes else None,
                                 use_logits=(score == "logit"), input_name=spec.name, output=output_name,
                                 worst=worst)
        executor = sharded_executor(ctx, "robustness", data, model, str(model_path), batch_size, ray=ray,
                                    workers=ray_workers, resume=resume, device=device, dtype=dtype,
                                    keep_shards=keep_shards)
        res = robustness(model, data, box, opts, preprocess=pp if is_image else None, image=is_image,
                         fixed=fixed, range_source=range_src, timings=ctx.timings, executor=executor)
        warnings = [w for w in getattr(model, "warnings", []) if w not in res.warnings]
        res.warnings[:0] = warnings
        r = res.result
        settings = {"eps": list(eps_list), "eps_l2": r.eps_l2, "pgd_norm": list(norms), "pgd_steps": pgd_steps,
                    "pgd_step": pgd_step, "random_start": random_start, "bisect": bisect, "score": score,
                    "directions": directions, "norm_limit": norm_limit, "probes": probes, "limit": limit,
                    "range": r.range, "range_source": range_src, "labels": label_path,
                    "labels_source": data.source, "seed": seed, "batch_size": batch_size,
                    "dtype": str(model.dtype or "float32").replace("torch.", ""), "device": str(model.device),
                    "preprocess": pp.describe() if is_image else None, "fixed_inputs": sorted(fixed) or None,
                    "data": str(data_path)}
        usable = [i for i in r.inputs if i.gradient_norm == i.gradient_norm and i.gradient_norm > 0]
        return Outcome(res, model=model, settings=settings, summary=_summary, inconclusive=not usable)


def _summary(report) -> None:
    from rich.table import Table
    from rich.text import Text

    r = report.result
    lab = "labels: " + r.labels_source
    out.print(f"{r.n_inputs} input(s){f' of {r.n_total}' if r.n_total != r.n_inputs else ''}; clean accuracy "
              f"{r.clean_accuracy:.3f} ({lab}); attacked: {r.score} {r.score_tensor!r}; epsilon in {r.units}, "
              f"clipped to [{r.range[0]:g}, {r.range[1]:g}]", markup=False)
    t = Table(title=Text("robust accuracy by attack and epsilon"), title_justify="left")
    for c in ("attack", "eps", "robust acc", "flip rate", "mean margin drop", "worst drop", "1st-order pred.",
              "actual"):
        t.add_column(c)
    for p in r.sweep:
        t.add_row(p.attack, f"{p.eps:.4g}", f"{p.robust_accuracy:.3f}", f"{p.flip_rate:.3f}",
                  f"{p.mean_margin_drop:.4g}", f"{p.worst_margin_drop:.4g}",
                  "" if p.predicted_margin_change is None else f"{p.predicted_margin_change:.4g}",
                  "" if p.actual_margin_change is None else f"{p.actual_margin_change:.4g}")
    out.print(t)
    if r.flip_eps is not None:
        fe = r.flip_eps
        out.print(f"minimal flipping epsilon (PGD L-inf): median "
                  f"{'n/a' if fe.median is None else f'{fe.median:.4g}'}; {fe.never_flipped} input(s) never "
                  f"flipped within eps {max(r.eps):.4g}, {fe.misclassified} misclassified clean", markup=False)
    if r.norms is not None:
        nm = r.norms
        out.print(f"||J||_F mean {nm.frobenius.get('mean', float('nan')):.4g} ({nm.frobenius_method}); "
                  f"||J||_2 (local Lipschitz) median {nm.spectral.get('median', float('nan')):.4g}, p95 "
                  f"{nm.spectral.get('p95', float('nan')):.4g}; observed max ||df||/||dx|| "
                  f"{(nm.observed_ratio_max or float('nan')):.4g}  [{nm.inputs_measured} input(s)]", markup=False)
    for f in r.masking:
        if f.flagged:
            out.print(f"gradient masking? {f.name}: {f.evidence}", style="yellow", markup=False)
