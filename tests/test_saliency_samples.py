"""Saliency on the sample models (skipped until ``python -m jacaudit.samples`` has built sample_models/).

shapes: most saliency mass falls inside the object masks (the measured fraction is printed and checked
against the mask's area: a map that ignored the object would put ~area of its mass there).
shortcut: with the marker in the image, the marker region lights up.
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


def test_shapes_mass_in_mask():
    from jacaudit.analyses.saliency import SaliencyOptions, saliency
    from jacaudit.data import Preprocess, load_sample, read_pixels

    model = _model("shapes")
    ex = _need("shapes", "examples")
    pp = Preprocess.infer(model.input_spec().shape, preset="unit")
    samples, masks = [], {}
    for f in sorted(os.listdir(ex)):
        if f.endswith(".png") and not f.endswith("_mask.png"):
            s = load_sample(os.path.join(ex, f), pp, model.input_spec())[0]
            samples.append(s)
            masks[s.name] = read_pixels(os.path.join(ex, f[:-4] + "_mask.png"), "L")[0][:, :, 0] > 127
    res, _ = saliency(model, samples[:8], SaliencyOptions(methods=["grad", "ig"], steps=32), preprocess=pp,
                      masks=masks)
    frac = {m: float(np.median([i.maps[k].mask_fraction for i in res.inputs])) for k, m in enumerate(res.methods)}
    area = float(np.median([masks[i.name].mean() for i in res.inputs]))
    gaps = [i.maps[1].completeness_gap for i in res.inputs]
    print(f"shapes: median saliency mass in mask {frac} (mask area {area:.3f}); IG gap max {max(gaps):.4f}")
    assert frac["grad"] > 0.5 and frac["grad"] > 2 * area
    assert max(gaps) < 0.05


def test_shortcut_marker_lights_up():
    from jacaudit.data import Preprocess, load_sample

    model = _model("shortcut")
    ex = _need("shortcut", "examples")
    try:
        from jacaudit.samples.shapes import CORNERS, MARKER
    except Exception as e:
        pytest.skip(f"samples module unavailable: {e}")
    pp = Preprocess.infer(model.input_spec().shape, preset="unit")
    files = [f for f in sorted(os.listdir(ex)) if f.endswith(".png") and not f.endswith("_mask.png")]
    samples = [load_sample(os.path.join(ex, f), pp, model.input_spec())[0] for f in files[:8]]
    # the marker patches (all four corners): their share of the map vs their share of the area
    mk = np.zeros((64, 64), bool)
    for x0, y0 in CORNERS:
        mk[y0:y0 + MARKER, x0:x0 + MARKER] = True
    from jacaudit.analyses import maps as M
    from jacaudit.analyses.saliency import attribute, make_scorer
    from jacaudit.data import stack

    fr = []
    a = attribute(make_scorer(model), stack(samples), "grad")
    for i in range(len(samples)):
        fr.append(M.mask_fraction(M.reduce_channels(a.attr[i].numpy()), mk))
    print(f"shortcut: median saliency mass on the marker corners {np.median(fr):.3f} (area {mk.mean():.3f})")
    assert np.median(fr) > 3 * mk.mean()
