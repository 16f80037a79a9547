"""Saliency on the sample models (skipped until ``python -m jacaudit.samples`` has built sample_models/).

shapes: most saliency mass falls inside the object masks (the measured fraction is printed and checked
against the mask's area: a map that ignored the object would put ~area of its mass there).
shortcut: with the marker in the image, the marker region lights up, and the object-mask check warns or fails.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "sample_models")


def _need(*parts):
    p = os.path.join(SAMPLES, *parts)
    if not os.path.exists(p):
        pytest.skip(f"{os.path.relpath(p, ROOT)} not built yet (python -m jacaudit.samples)")
    return p


def _model(folder):
    from jacaudit.errors import UnsupportedOpError
    from jacaudit.models import load

    d = _need(folder)
    onnx = [f for f in sorted(os.listdir(d)) if f.endswith(".onnx")]
    try:
        return load(os.path.join(d, onnx[0]))
    except UnsupportedOpError as e:
        pytest.skip(f"interpreter lacks an op yet: {e}")


def _with_masks(folder, pattern, pp, spec):
    """Samples and their object masks, read as `jacaudit saliency` reads them (masks at the preprocessing size)."""
    import glob

    from jacaudit.data import load_sample, read_pixels

    samples, masks = [], {}
    for f in sorted(glob.glob(os.path.join(_need(folder, "examples"), pattern))):
        if f.endswith("_mask.png"):
            continue
        s = load_sample(f, pp, spec)[0]
        samples.append(s)
        masks[s.name] = read_pixels(f[:-4] + "_mask.png", "L", pp.size, pp.resize)[0][:, :, 0] > 127
    return samples, masks


def test_mask_checks_flag_the_shortcut_model_and_pass_the_object_model(tmp_path, monkeypatch):
    """mask_outside@method=grad: the shortcut model's marked images warn or fail, the shapes model's pass."""
    from jacaudit.analyses.saliency import SaliencyOptions, saliency
    from jacaudit.data import Preprocess
    from jacaudit.gate import evaluate

    monkeypatch.chdir(tmp_path)
    for folder, pattern, bad in (("shortcut", "*_marker.png", True), ("shapes", "*.png", False)):
        model = _model(folder)
        pp = Preprocess.infer(model.input_spec().shape)  # as the CLI infers it
        samples, masks = _with_masks(folder, pattern, pp, model.input_spec())
        out = saliency(model, samples, SaliencyOptions(methods=["grad"]), preprocess=pp, masks=masks)
        checks = [c for c in evaluate("saliency", out.metrics) if c.check == "mask_outside@method=grad"]
        assert len(checks) == len(samples) == len(masks) > 0
        print(folder, [(c.subject, c.status, round(c.value, 3), round(c.properties["inside_density"], 2))
                       for c in checks])
        if bad:
            assert all(c.status in ("warn", "fail") for c in checks)
        else:
            assert all(c.status == "pass" for c in checks)
        assert all(m.mask_outlined for i in out.result.inputs for m in i.maps)
    assert os.listdir(tmp_path) == []  # the analysis writes nothing


def test_shapes_mass_in_mask():
    from jacaudit.analyses.saliency import SaliencyOptions, saliency
    from jacaudit.data import Preprocess, load_sample, read_pixels
    from jacaudit.gate import evaluate

    model = _model("shapes")
    ex = _need("shapes", "examples")
    pp = Preprocess.infer(model.input_spec().shape, preset="unit")
    samples, masks = [], {}
    for f in sorted(os.listdir(ex)):
        if f.endswith(".png") and not f.endswith("_mask.png"):
            s = load_sample(os.path.join(ex, f), pp, model.input_spec())[0]
            samples.append(s)
            masks[s.name] = read_pixels(os.path.join(ex, f[:-4] + "_mask.png"), "L")[0][:, :, 0] > 127
    out = saliency(model, samples[:8], SaliencyOptions(methods=["grad", "gradxinput", "ig"], steps=32),
                   preprocess=pp, masks=masks)
    res = out.result
    assert not [c.id for c in evaluate("saliency", out.metrics) if c.status in ("fail", "error")]
    frac = {m: float(np.median([i.maps[k].mask_fraction for i in res.inputs])) for k, m in enumerate(res.methods)}
    area = float(np.median([masks[i.name].mean() for i in res.inputs]))
    gaps = [i.maps[2].completeness_gap for i in res.inputs]
    print(f"shapes: median saliency mass in mask {frac} (mask area {area:.3f}); IG gap max {max(gaps):.4f}")
    # the model was trained with the RRR penalty outside the mask: most plain-gradient mass is on the object
    assert frac["grad"] > 0.5 and frac["grad"] > 4 * area
    assert frac["gradxinput"] > 0.5
    assert frac["ig"] > 1.5 * area  # IG is not constrained by the penalty: less concentrated, still on the object
    assert max(gaps) < 0.05
    # and the card reports what we measure (same examples, same method; the card's IG uses 50 steps)
    import json
    with open(os.path.join(SAMPLES, "shapes", "shapes.json")) as f:
        card = json.load(f)["saliency_check"]["jacaudit"]["examples"]
    assert len(samples) == card["n"]
    assert abs(frac["grad"] - card["grad"]) < 1e-3 and abs(frac["gradxinput"] - card["gradxinput"]) < 1e-3
    assert abs(frac["ig"] - card["ig"]) < 0.05


def test_shortcut_marker_lights_up():
    from jacaudit.data import Preprocess, load_sample

    model = _model("shortcut")
    ex = _need("shortcut", "examples")
    try:
        from jacaudit.samples.shapes import CORNERS, MARKER
    except Exception as e:
        pytest.skip(f"samples module unavailable: {e}")
    import json

    with open(os.path.join(SAMPLES, "shortcut", "shortcut.json")) as f:
        card = json.load(f)
    pp = Preprocess.infer(model.input_spec().shape, preset="unit")
    # the examples that carry the marker (the clean ones have nothing to light up), each with its marker box
    marked = [e for e in card["examples"] if e.get("marker")]
    assert marked and all(tuple(e["marker_box_xywh"][:2]) in CORNERS for e in marked)
    samples = [load_sample(os.path.join(SAMPLES, "shortcut", e["image"]), pp, model.input_spec())[0]
               for e in marked]
    from jacaudit.analyses import maps as M
    from jacaudit.analyses.saliency import attribute, make_scorer
    from jacaudit.data import stack

    fr = []
    a = attribute(make_scorer(model), stack(samples), "grad")
    for i, e in enumerate(marked):
        x0, y0, w, h = e["marker_box_xywh"]
        mk = np.zeros((64, 64), bool)
        mk[y0:y0 + h, x0:x0 + w] = True
        fr.append(M.mask_fraction(M.reduce_channels(a.attr[i].numpy()), mk))
    share = MARKER * MARKER / 64 / 64
    print(f"shortcut: median saliency mass on the marker {np.median(fr):.3f} (area {share:.4f})")
    assert np.median(fr) > 4 * share  # several times the marker's share of the pixels


def test_sanity_randomisation_reaches_an_optimized_softmax_model(tmp_path):
    """The shortcut model ends in a Softmax (saliency runs on the logits, an internal tensor) and is loaded
    with load-time folding: randomising its layers must still change the maps (Adebayo et al.'s check)."""
    import json

    from typer.testing import CliRunner

    from jacaudit.cli.main import app

    model = os.path.join(ROOT, "sample_models", "shortcut", "shortcut_cnn.onnx")
    img = os.path.join(ROOT, "sample_models", "shortcut", "examples", "02_circle_marker.png")
    if not os.path.exists(model):
        pytest.skip("sample models not built")
    out = tmp_path / "r"
    r = CliRunner().invoke(app, ["saliency", model, img, "--method", "grad", "--sanity", "--out", str(out),
                                 "--format", "json"])
    assert r.exit_code == 0, r.output
    (check,) = json.loads((out / "report.json").read_text())["result"]["sanity"]
    assert check["steps"][0]["spearman"] < 0.9  # the last layer alone already changes the map
    assert abs(check["final_spearman"]) < 0.5 and not check["flagged"]
