"""The transfer sample: a source / target data pair for the shapes CNN with a planted, provable feature shift.

``build_transfer(out_dir, seed)`` (``python -m jacaudit.samples.transfer [OUT_DIR]``) needs the shapes sample built
first (it reuses ``shapes/shapes_cnn.onnx``, no training) and writes ``transfer/``:

* ``source/``: held-out-style shape images in the shapes palette (PNG, 64x64 RGB);
* ``target/``: the same images with a blue cast, ``B' = round(0.5 B + 102)`` (R and G unchanged, no clipping);
* ``transfer.json``: the card. Its truth is exact: the first convolution's output ``conv2d`` (BatchNorm folded in,
  before the SiLU) is linear in the image, so each channel's mean, spread and input Jacobian on both datasets follow
  from the saved pixels and the ONNX weights alone (a float64 ``conv2d`` here, no jacaudit code): the
  standardised mean shift, the log std ratio and -- J being the same matrix on both datasets -- the log
  sensitivity ratio ``ln(sigma_x,t / sigma_x,s) - ln(std_t / std_s)``. A channel shifts when the largest of their
  magnitudes exceeds 0.5 (the transfer command's default rule); the card lists which. Deeper layers are measured
  by ``jacaudit transfer`` and recorded as measured, not planted; so is the shapes vs shortcut CNN comparison
  (the same four-block architecture, trained with and without the corner-marker shortcut).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

N_IMAGES = 32
SHIFT_ABOVE = 0.5


def blue_cast(images: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, 3) RGB -> the target images: blue halved in contrast and lifted (never clipped)."""
    out = images.copy()
    out[..., 2] = np.round(0.5 * images[..., 2].astype(np.float64) + 102.0).astype(np.uint8)
    return out


def _read_pngs(folder: str) -> np.ndarray:
    from PIL import Image

    files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    return np.stack([np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")) for f in files])


def first_conv_truth(onnx_path: str, src: np.ndarray, tgt: np.ndarray, shift_above: float = SHIFT_ABOVE
                     ) -> dict[str, Any]:
    """Exact per-channel statistics of the graph's first Conv output on both image sets (uint8 NHWC), float64."""
    import onnx
    import torch
    from onnx import helper, numpy_helper

    proto = onnx.load(onnx_path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.op_type == "Conv")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    W = torch.tensor(inits[node.input[1]], dtype=torch.float64)
    b = torch.tensor(inits[node.input[2]], dtype=torch.float64) if len(node.input) > 2 else None
    pad = list(attrs.get("pads", [0, 0, 0, 0]))
    assert pad[0] == pad[2] and pad[1] == pad[3] and list(attrs.get("strides", [1, 1])) == [1, 1]

    def stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        x = torch.tensor(images.transpose(0, 3, 1, 2) / 255.0, dtype=torch.float64)
        h = torch.nn.functional.conv2d(x, W, b, padding=(pad[0], pad[1]))
        hc = h.transpose(0, 1).reshape(h.shape[1], -1)
        sigma = float(x.reshape(x.shape[0], -1).var(dim=0, unbiased=True).mean().sqrt())
        return hc.mean(1).numpy(), hc.std(1, unbiased=True).numpy(), sigma

    ms, ss, sig_s = stats(src)
    mt, st, sig_t = stats(tgt)
    rows = []
    for k in range(len(ms)):
        mean_shift = float((mt[k] - ms[k]) / ss[k])
        std_lr = float(math.log(st[k] / ss[k]))
        sens_lr = float(math.log(sig_t / sig_s) - std_lr)
        rows.append({"channel": k, "mean_shift": mean_shift, "std_log_ratio": std_lr,
                     "sensitivity_log_ratio": sens_lr,
                     "shift": max(abs(mean_shift), abs(std_lr), abs(sens_lr))})
    return {"tensor": node.output[0], "input_scale_source": sig_s, "input_scale_target": sig_t, "channels": rows,
            "shifted_channels": [r["channel"] for r in rows if r["shift"] > shift_above],
            "unshifted_channels": [r["channel"] for r in rows if r["shift"] <= shift_above]}


def _measure(model_path: str, src_dir: str, tgt_dir: str | None, layers: tuple[str, ...]) -> list[dict[str, Any]]:
    from ..analyses.transfer import TransferOptions, transfer
    from ..data import Preprocess
    from ..data.collect import read_inputs
    from ..data.dataset import PREDICTIONS, LabelledData
    from ..models import load

    model = load(model_path)
    spec = model.input_spec()
    pp = Preprocess.infer(spec.shape)

    def data(folder: str) -> LabelledData:
        samples, *_ = read_inputs([folder], pp, spec, "_mask")
        return LabelledData(samples, None, PREDICTIONS, total=len(samples))

    out = transfer(model, data(src_dir), TransferOptions(layers=layers, probes=16, seed=0),
                   target=data(tgt_dir) if tgt_dir else None, preprocess=pp, image=True)
    res = []
    for lr in out.result.layers:
        d = {"tensor": lr.tensor, "features": lr.n_features,
             "source_sensitivity_median": lr.source.sensitivity_median,
             "source_overspecialised_fraction": lr.source.overspecialised_fraction}
        if lr.shift is not None:
            d.update(shifted_fraction=lr.shift.shifted_fraction, median_shift=lr.shift.median_shift,
                     suggestion=lr.suggestion)
        res.append(d)
    return res


def build_transfer(out_dir: str, seed: int = 0, log=print) -> dict[str, Any]:
    from ._common import seed_everything
    from .shapes import _save_png, make_images

    seed_everything(seed)
    model_path = os.path.join(out_dir, "shapes", "shapes_cnn.onnx")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{model_path}: build the shapes sample first (the transfer pair reuses its CNN)")
    d = os.path.join(out_dir, "transfer")
    src_dir, tgt_dir = os.path.join(d, "source"), os.path.join(d, "target")
    os.makedirs(src_dir, exist_ok=True)
    os.makedirs(tgt_dir, exist_ok=True)
    imgs = make_images(N_IMAGES, seed, "transfer")
    tgt = blue_cast(imgs["images"])
    for i in range(N_IMAGES):
        _save_png(os.path.join(src_dir, f"{i:02d}.png"), imgs["images"][i])
        _save_png(os.path.join(tgt_dir, f"{i:02d}.png"), tgt[i])
    truth = first_conv_truth(model_path, _read_pngs(src_dir), _read_pngs(tgt_dir))
    log(f"transfer: first conv {truth['tensor']!r}: channels {truth['shifted_channels']} shift (> {SHIFT_ABOVE})")
    stages = ("silu", "silu_1", "silu_2", "silu_3", "mean")
    measured = _measure(model_path, src_dir, tgt_dir, (truth["tensor"],) + stages)
    short = os.path.join(out_dir, "shortcut", "shortcut_cnn.onnx")
    comparison = None
    if os.path.isfile(short):
        relu = tuple(f"/features/features.{i}/Relu_output_0" for i in (1, 4, 7, 10)) + ("/Flatten_output_0",)
        comparison = {"data": "transfer/source (no marker)",
                      "shapes": _measure(model_path, src_dir, None, stages),
                      "shortcut": _measure(short, src_dir, None, relu)}
    card = {
        "name": "transfer",
        "description": "A source / target image pair for the shapes CNN: the target has a blue cast, which provably "
                       "shifts the first convolution's blue-sensitive channels.",
        "files": {"model": "../shapes/shapes_cnn.onnx", "source": "source/", "target": "target/"},
        "data": {"generator": "jacaudit.samples.shapes.make_images", "split": "transfer", "n": N_IMAGES,
                 "seed": seed, "target_rule": "B' = round(0.5 B + 102), R and G unchanged (never clipped)"},
        "command": "jacaudit transfer sample_models/shapes/shapes_cnn.onnx sample_models/transfer/source "
                   "--target-data sample_models/transfer/target --layer conv2d --layer all",
        "truth": (f"Exact (the first convolution is linear in the image; computed in float64 from the saved pixels "
                  f"and the ONNX weights): on {truth['tensor']!r} the channels {truth['shifted_channels']} shift by "
                  f"more than {SHIFT_ABOVE} (max of |standardised mean shift|, |ln std ratio|, |ln sensitivity "
                  f"ratio|), the channels {truth['unshifted_channels']} do not."),
        "first_conv": truth,
        "measured": {"note": "measured by jacaudit transfer (16 Hutchinson probes, seed 0), not planted",
                     "layers": measured},
        "shapes_vs_shortcut": comparison,
    }
    with open(os.path.join(d, "transfer.json"), "w", encoding="utf-8") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    return card


if __name__ == "__main__":  # pragma: no cover
    import sys

    from . import default_out_dir

    print(json.dumps(build_transfer(sys.argv[1] if len(sys.argv) > 1 else default_out_dir())["truth"]))
