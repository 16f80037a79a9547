"""Writes sample_models/README.md from the cards, so the numbers in it always match them."""
from __future__ import annotations

import json
import os

ORDER = ["shapes", "shortcut", "robust", "transfer", "tabular", "arm", "flow", "sequence", "policy"]

HEADER = """# Sample models

Small models with known truths, for trying and testing jacaudit. Every file here is rebuilt from scratch,
with the same seed, by

    python -m jacaudit.samples            # all models (CPU, one thread, a few minutes)
    python -m jacaudit.samples --only arm flow --seed 0 --out /tmp/samples

(the dynamo ONNX exporter needs the `onnxscript` package). Training data is generated at build time and not
stored, except the example PNGs, the robust sample's image folder and the tabular held-out CSV. Each folder
holds the model file(s) and a JSON card: inputs, outputs, preprocessing, classes, accuracies, the seed and the
truth the model lets you check.
`tests/test_samples.py` checks that the files load, match their cards and that the truths hold.

Image preprocessing (shapes, shortcut, robust): RGB, pixel / 255 (range 0-1), no mean/std, layout NCHW, 64x64.
"""


def _fmt(v):
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def write_readme(out_dir: str) -> str:
    text = render_readme(out_dir)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(text)
    return text


def render_readme(out_dir: str) -> str:
    """The README text for the cards found in ``out_dir``."""
    cards = {}
    for name in ORDER:
        p = os.path.join(out_dir, name, f"{name}.json")
        if os.path.exists(p):
            with open(p) as f:
                cards[name] = json.load(f)
    lines = [HEADER, "| model | files | exporter | inputs -> outputs | train acc | held-out acc |",
             "|---|---|---|---|---|---|"]
    for name, c in cards.items():
        if "inputs" not in c:  # a data sample (e.g. transfer's source/target pair for the shapes CNN): no model row
            continue
        files = ", ".join(f"`{name}/{v}`" for k, v in c["files"].items() if k not in ("labels", "data"))
        ex = "; ".join(f"{k}: {v}" for k, v in c.get("exporter", {}).items())
        io = ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in c["inputs"]) + " -> " + \
            ", ".join(f"{o['name']} {o['shape']}" for o in c["outputs"])
        ho = _fmt(c.get("heldout_accuracy"))
        if name == "shortcut":
            ho = (f"{_fmt(c['heldout_accuracy_without_marker'])} without marker, "
                  f"{_fmt(c['heldout_accuracy_with_marker'])} with")
        if name == "flow":
            ho = f"NLL {_fmt(c['heldout_nll'])} (train {_fmt(c['train_nll'])})"
        lines.append(f"| **{name}** | {files} | {ex} | {io} | {_fmt(c.get('train_accuracy'))} | {ho} |")
    lines.append("")
    for name, c in cards.items():
        lines += [f"## {name}", "", c.get("description", ""), "", f"**Truth.** {c['truth']}", ""]
        if name == "shapes":
            s = c["saliency_check"]
            lines += [f"Classes: {', '.join(c['classes'])} (`shapes/labels.txt`); output: raw logits. "
                      f"Examples with their object masks: `shapes/examples/*.png`, `*_mask.png`. "
                      f"Measured at build: {s['method']}; {_saliency_line(s)}.", ""]
            if "training" in c:
                t = c["training"]
                lines += [f"**Training.** {t['method']}. Loss: {t['loss']}; lambda {t['lambda']:g} "
                          f"({t['lambda_schedule']}), {t['epochs']} epochs, {t['optimizer']}. Architecture: "
                          f"{c['architecture']}. Why the penalty is normalised: {t['why_normalised']}. Why SiLU: "
                          f"{t['why_silu']}.", ""]
            if "jacaudit" in s:
                j = s["jacaudit"]
                lines += [f"**Saliency mass inside the object mask, per method** ({j['how']}):", "",
                          "| images | mask area | grad | gradxinput | smoothgrad | ig |", "|---|---|---|---|---|---|"]
                for key, label in (("examples", f"the {j['examples']['n']} shipped examples"),
                                   ("heldout", f"held-out, first {j['heldout']['first_n']} (regenerated)")):
                    r = j[key]
                    lines.append(f"| {label} | {_fmt(r['median_mask_area_fraction'])} | "
                                 + " | ".join(_fmt(r[m]) for m in ("grad", "gradxinput", "smoothgrad", "ig")) + " |")
                lines.append("")
        elif name == "shortcut":
            s = c["saliency_check"]
            lines += [f"Output: probabilities (a final Softmax). Marker: {c['marker']['description']}; "
                      f"training rule: {c['marker']['training_rule']}. Held-out accuracy with the marker "
                      f"{_fmt(c['heldout_accuracy_with_marker'])}, without {_fmt(c['heldout_accuracy_without_marker'])}, "
                      f"marker in a random corner {_fmt(c['heldout_accuracy_random_corner_marker'])} "
                      f"(the prediction follows a misplaced marker in {_fmt(c['random_corner_follows_marker'])} "
                      f"of those images). Saliency mass on the 6x6 marker (0.9% of the pixels): median "
                      f"{_fmt(s['median_mass_on_marker'])}; on the object: {_fmt(s['median_mass_on_object'])}. "
                      "Examples with and without the marker: `shortcut/examples/`.", ""]
        elif name == "robust":
            r = c["robustness"]
            t = c["training"]
            lines += [f"Training: {t['method']}. Loss: {t['loss']}; lambda_JR {t['jr_lambda']:g}, "
                      f"{t['schedule']}; {t['epochs']} epochs, {t['optimizer']}. Brittle partner: "
                      f"`shapes/shapes_cnn.onnx` ({c['brittle_partner']['note']}). Labelled images: "
                      f"`robust/{c['data']['robustness']['folder']}/<class>/NNN.png`, {r['images']['n']} images, "
                      f"{', '.join(f'{v} {k}' for k, v in c['data']['robustness']['per_class'].items())} "
                      f"(split `{r['images']['split']}` of the generator, not used in training).", "",
                      f"**Measured at build** ({r['how']}; Jacobian {r['jacobian']}; FGSM: {r['fgsm']}; "
                      f"PGD: {r['pgd']}):", "",
                      "| model | clean acc | mean ‖J‖_F | median ‖J‖_F | mean ‖J‖_2 | "
                      + " | ".join(f"{a} eps {e}" for a in ("FGSM", "PGD-10") for e in r["eps"]) + " |",
                      "|---|" + "---|" * (4 + 2 * len(r["eps"]))]
            for role, label in (("robust", "robust twin `robust/robust_cnn.onnx`"),
                                ("brittle", "brittle `shapes/shapes_cnn.onnx`")):
                f = r[role]
                lines.append(f"| {label} | {_fmt(f['clean_accuracy'])} | {_fmt(f['jacobian_frobenius_mean'])} | "
                             f"{_fmt(f['jacobian_frobenius_median'])} | {_fmt(f['jacobian_spectral_mean'])} | "
                             + " | ".join(_fmt(f[k][f"{e:g}"]) for k in ("fgsm_accuracy", "pgd_accuracy")
                                          for e in r["eps"]) + " |")
            lines += ["", "Intended use: the same command on the pair, e.g. `jacaudit robustness "
                      "sample_models/shapes/shapes_cnn.onnx sample_models/robust/data/` against `jacaudit "
                      "robustness sample_models/robust/robust_cnn.onnx sample_models/robust/data/`: the robust twin "
                      "should come out with the smaller Jacobian and the higher robust accuracy, and a gate "
                      "threshold between the two models' figures passes the twin and fails the shapes CNN."]
            st = r.get("gap", {}).get("separating_thresholds")
            if st:
                lines[-1] += (f" Half-way thresholds from the card (`robustness.gap.separating_thresholds`): mean "
                              f"‖J‖_F above {_fmt(st['jacobian_frobenius_mean_fail_above'])}, FGSM accuracy at eps "
                              f"0.01 below {_fmt(st['fgsm_accuracy_fail_below']['0.01'])}, PGD-10 accuracy at eps "
                              f"0.01 below {_fmt(st['pgd_accuracy_fail_below']['0.01'])} fail.")
            lines.append("")
        elif name == "tabular":
            lines += [f"Features (column order): {', '.join(c['features'])}. Label rule: {c['label_rule']}. "
                      f"Held-out rows: `tabular/{c['files']['data']}` (last column: label). The same weights are "
                      f"exported twice: `{c['files']['onnx']}` (dynamo exporter, opset "
                      f"{c['opset'][c['files']['onnx']]}) and `{c['files']['onnx_legacy_exporter']}` "
                      f"(TorchScript-based exporter, opset {c['opset'][c['files']['onnx_legacy_exporter']]}). "
                      f"Measured sensitivity ranking: {', '.join(c['sensitivity']['ranking'][:5])}, ...", ""]
        elif name == "arm":
            cf = c["closed_form"]
            lines += [f"Link lengths {c['link_lengths']}; float64 TorchScript, input q of shape (..., 3). "
                      f"Closed form: {'; '.join(cf['forward'])}; det J = {cf['det']}; singular when "
                      f"{cf['singular_when']}. Named configurations with their Jacobians are in the card.", ""]
        elif name == "flow":
            g = c["grid_check"]
            lines += [f"Outputs `z` and `{c['log_det_output']}`; {c['density']}. Grid check: integral of p(x) "
                      f"over x in {g['x']}, y in {g['y']} ({g['n']}x{g['n']} points) = {_fmt(g['integral_of_p'])}.",
                      ""]
        elif name == "sequence":
            s = c["position_map_check"]
            lines += [f"Input: int64 token ids [batch, 12] (1 = A, 2 = B, 3..9 fillers). Differentiate with "
                      f"respect to the tensor **`{c['wrt_tensor']}`**, shape {c['wrt_tensor_shape']}: "
                      f"{c['wrt_tensor_note']}. Classes: "
                      f"{c['classes']}. Measured: the two largest positions of the map are exactly A and B in "
                      f"{_fmt(s['top2_positions_are_A_and_B'])} of held-out sequences; median share of A+B "
                      f"{_fmt(s['median_share_of_A_and_B'])} (2 of 12 positions).", ""]
    return "\n".join(lines).rstrip() + "\n"


def _saliency_line(s: dict) -> str:
    parts = [f"median mass inside the mask {_fmt(s['median_mass_in_mask'])}"]
    if "median_mass_in_mask_dilated_2px" in s:
        parts.append(f"inside the mask grown by 2 px {_fmt(s['median_mass_in_mask_dilated_2px'])}")
    parts.append(f"the mask's median share of the pixels {_fmt(s['median_mask_area_fraction'])}")
    if "median_energy_in_mask" in s:
        parts.append(f"with the squared map (energy): {_fmt(s['median_energy_in_mask'])} inside the mask, "
                     f"{_fmt(s['median_energy_in_mask_dilated_2px'])} inside the grown mask")
    return ", ".join(parts)
