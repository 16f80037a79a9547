"""Synthetic shape images (Pillow) with ground-truth object masks, and the two image classifiers
built on them: the ``shapes`` CNN and the ``shortcut`` ("Clever Hans") CNN.

Every image is 64x64 RGB: one shape (circle, square, triangle or cross) of random colour, size, position
and rotation on a random textured background (smooth noise, stripes or a checkerboard, plus pixel noise).
The label is the kind of shape. :func:`make_images` is deterministic in its seed, so tests regenerate
exactly the held-out sets the cards report on.

The ``shapes`` CNN (SiLU) is trained with the "Right for the Right Reasons" input-gradient penalty outside the
object mask (:func:`rrr_penalty`), so its reliance on the object rather than the background holds by
construction; the ``shortcut`` CNN (ReLU) is trained on cross-entropy alone.

Shortcut marker: a 6x6 black/white checker patch in one of the four corners. In the shortcut model's
training data the corner encodes the label (corner index == class index, see :data:`CORNERS`).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ._common import (accuracy, export_onnx, onnx_io, ort_run, param_count, r4, seed_everything, sub_seed,
                      write_card, write_labels)

SIZE = 64
CLASSES = ["circle", "square", "triangle", "cross"]
#: top-left x, y of the marker patch for each corner; corner k marks class k in the shortcut training data
MARKER = 6
CORNERS = [(1, 1), (SIZE - 1 - MARKER, 1), (1, SIZE - 1 - MARKER), (SIZE - 1 - MARKER, SIZE - 1 - MARKER)]
CORNER_NAMES = ["top-left", "top-right", "bottom-left", "bottom-right"]


# ---------------------------------------------------------------------------------------------------------
# image generator
# ---------------------------------------------------------------------------------------------------------
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _background(g: np.random.Generator) -> np.ndarray:
    kind = int(g.integers(3))
    base = g.uniform(60, 190, size=3).astype(np.float32)
    amp = np.float32(g.uniform(15, 40))
    if kind == 0:  # smooth noise: a random 8x8 field upsampled bilinearly
        low = g.uniform(-1, 1, size=(8, 8, 3))
        im = Image.fromarray(((low + 1) * 127.5).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
        tex = np.asarray(im, dtype=np.float32) / np.float32(127.5) - 1
    elif kind == 1:  # stripes at a random angle and period
        ang = g.uniform(0, math.pi)
        period = g.uniform(5, 14)
        s = np.sin(np.float32(2 * math.pi / period) * (_XX * np.float32(math.cos(ang))
                                                         + _YY * np.float32(math.sin(ang))))
        tex = s[..., None] * g.uniform(-1, 1, size=3).astype(np.float32)
    else:  # checkerboard
        cell = int(g.integers(4, 11))
        c = (((_XX // cell) + (_YY // cell)) % 2) * 2 - 1
        tex = c[..., None] * g.uniform(-1, 1, size=3).astype(np.float32)
    return base + amp * tex


def _polygon(kind: str, cx: float, cy: float, r: float, ang: float) -> list[list[tuple[float, float]]]:
    def rot(pts):
        c, s = math.cos(ang), math.sin(ang)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]

    if kind == "square":
        a = r * 0.8
        return [rot([(-a, -a), (a, -a), (a, a), (-a, a)])]
    if kind == "triangle":
        return [rot([(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])]
    if kind == "cross":
        w = r * 0.32
        return [rot([(-r, -w), (r, -w), (r, w), (-r, w)]), rot([(-w, -r), (w, -r), (w, r), (-w, r)])]
    raise ValueError(kind)


def draw_marker(img: np.ndarray, corner: int) -> None:
    """Paint the 6x6 black/white checker marker into ``img`` (HxWx3 uint8) in place."""
    x0, y0 = CORNERS[corner]
    yy, xx = np.mgrid[0:MARKER, 0:MARKER]
    patch = (((xx // 2) + (yy // 2)) % 2 == 0)
    img[y0:y0 + MARKER, x0:x0 + MARKER] = np.where(patch[..., None], 255, 0).astype(np.uint8)


def marker_mask(corner: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    x0, y0 = CORNERS[corner]
    m[y0:y0 + MARKER, x0:x0 + MARKER] = True
    return m


def render(g: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (64x64x3 uint8) of shape ``CLASSES[label]`` and its object mask (64x64 bool)."""
    bg = _background(g)
    kind = CLASSES[label]
    r = g.uniform(9, 19)
    margin = r + 8  # keep clear of the corner markers
    cx, cy = g.uniform(margin, SIZE - margin, size=2)
    ang = g.uniform(-0.35, 0.35) if kind in ("square", "cross") else g.uniform(0, 2 * math.pi)
    # a colour far enough from the background's mean colour
    mean = bg.reshape(-1, 3).mean(0)
    for _ in range(50):
        col = g.uniform(0, 255, size=3)
        if np.linalg.norm(col - mean) > 110:
            break
    mask_im = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(mask_im)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        for poly in _polygon(kind, cx, cy, r, ang):
            d.polygon(poly, fill=255)
    mask = np.asarray(mask_im) > 127
    shade = 1 + np.float32(0.15 * g.uniform(-1, 1) / max(r, 1)) * (_YY - np.float32(cy))  # a little shading
    img = np.where(mask[..., None], col.astype(np.float32)[None, None, :] * shade[..., None], bg)
    img += g.standard_normal(size=img.shape, dtype=np.float32) * np.float32(7)  # pixel noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def make_images(n: int, seed: int, split: str, marker: str = "none") -> dict[str, np.ndarray]:
    """``n`` labelled images for ``split`` ('train', 'heldout', 'examples', ...), deterministic in ``seed``.

    Image ``i`` depends only on (seed, split, i): the first k images of a larger set are the set of k, and the
    marker modes share the same underlying images (only the marker differs). ``marker``: 'none';
    'label' (the shortcut training rule: the marker in corner == label, with probability 0.05 a random
    corner instead); 'label-only' (always corner == label); 'random' (a random corner, independent of the
    label). Returns images (n,64,64,3) uint8, labels (n,) int64, masks (n,64,64) bool (the object, marker
    pixels excluded), corners (n,) int64 (-1: no marker).
    """
    if marker not in ("none", "label", "label-only", "random"):
        raise ValueError(f"unknown marker mode {marker!r}")
    base = sub_seed(seed, f"shapes/{split}")
    labels = (np.arange(n) + base) % len(CLASSES)  # balanced classes
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    masks = np.empty((n, SIZE, SIZE), bool)
    corners = np.full(n, -1, np.int64)
    for i in range(n):
        img, m = render(np.random.default_rng([base, i]), int(labels[i]))
        if marker != "none":
            gm = np.random.default_rng([base, i, 1])
            c = int(labels[i])
            if marker == "random" or (marker == "label" and gm.uniform() < 0.05):
                c = int(gm.integers(4))
            draw_marker(img, c)
            m = m & ~marker_mask(c)
            corners[i] = c
        imgs[i], masks[i] = img, m
    return {"images": imgs, "labels": labels.astype(np.int64), "masks": masks, "corners": corners}


def to_tensor(images: np.ndarray) -> np.ndarray:
    """The documented preprocessing: uint8 HWC RGB -> float32 NCHW in [0, 1] (no mean/std)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------
class ShapesCNN(torch.nn.Module):
    """Four 3x3 conv + activation + 2x2 max-pool blocks (8, 16, 32, 32 channels), then a linear head.

    head='gap': global average pool -> Linear(32, 4) (translation invariant, used by ``shapes``);
    head='flatten': Linear(32*4*4, 4) (keeps position, used by ``shortcut``). ``softmax`` appends a Softmax.
    act: 'relu' (``shortcut``) or 'silu' (``shapes``: smooth, so its input gradients are less noisy and the
    input-gradient penalty of :func:`train_cnn` has a useful second derivative).
    """

    def __init__(self, head: str = "gap", softmax: bool = False, n_classes: int = len(CLASSES), act: str = "relu"):
        super().__init__()
        ch = [3, 8, 16, 32, 32]
        acts = {"relu": torch.nn.ReLU, "silu": torch.nn.SiLU}
        if act not in acts:
            raise ValueError(f"unknown activation {act!r}")
        layers: list[torch.nn.Module] = []
        for a, b in zip(ch[:-1], ch[1:]):
            layers += [torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.BatchNorm2d(b), acts[act](),
                       torch.nn.MaxPool2d(2)]
        self.features = torch.nn.Sequential(*layers)
        self.head = head
        self.fc = torch.nn.Linear(32 if head == "gap" else 32 * 4 * 4, n_classes)
        self.softmax = softmax

    def fuse_batchnorm(self) -> "ShapesCNN":
        """Fold every BatchNorm (trained, eval statistics) into the conv before it: the exported graphs
        hold only Conv, Relu, MaxPool, the head (and Softmax)."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.eval()
        mods = list(self.features)
        out: list[torch.nn.Module] = []
        i = 0
        while i < len(mods):
            if isinstance(mods[i], torch.nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1],
                                                                                     torch.nn.BatchNorm2d):
                out.append(fuse_conv_bn_eval(mods[i], mods[i + 1]))
                i += 2
            else:
                out.append(mods[i])
                i += 1
        self.features = torch.nn.Sequential(*out)
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = h.mean(dim=(2, 3)) if self.head == "gap" else h.flatten(1)
        return self.fc(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.logits(x)
        return torch.softmax(y, dim=1) if self.softmax else y


def rrr_penalty(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The "Right for the Right Reasons" input-gradient penalty (Ross, Hughes & Doshi-Velez, IJCAI 2017),
    scale-normalised: per image, the share of the squared input gradient of the true-class logit,
    ``g = d logit[y] / d x``, that lies outside the object mask, ``||(1 - mask) * g||^2 / ||g||^2``; mean over
    the batch. Differentiable in the parameters (double backprop: ``create_graph=True``); ``x`` must require
    grad and ``logits`` be computed from it.

    The normalisation is a deliberate change from the paper's plain ``||(1 - mask) * d(sum log p)/dx||^2``:
    that form can be met by shrinking every gradient (a flatter, less confident model) instead of moving the
    gradient onto the object, and on this data it did exactly that (see the shapes card)."""
    (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x, create_graph=True)
    e = (g * g).sum(1)  # (n, H, W)
    return ((e * (~masks)).sum((1, 2)) / (e.sum((1, 2)) + 1e-12)).mean()


def train_cnn(model: ShapesCNN, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int, lr: float = 3e-3,
              batch: int = 64, log=print, masks: np.ndarray | None = None, rrr_lambda: float = 0.0,
              rrr_ramp: float = 0.5) -> None:
    """Adam + one-cycle schedule, cross-entropy; then BatchNorm is folded into the convs.

    With ``rrr_lambda > 0`` (and the object ``masks``) the loss is ``CE + lambda_t * rrr_penalty``, where
    ``lambda_t`` ramps linearly from 0 to ``rrr_lambda`` over the first ``rrr_ramp`` of the steps (the
    penalty at full strength from the start stops the model from learning the task at all)."""
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    mt = None if masks is None else torch.from_numpy(masks)
    rrr = rrr_lambda > 0
    if rrr and mt is None:
        raise ValueError("the RRR penalty needs the object masks")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = (len(x) + batch - 1) // batch
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        tot, correct, tot_pen = 0.0, 0, 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            if not rrr:
                logits = model.logits(xt[idx])
                loss = torch.nn.functional.cross_entropy(logits, yt[idx])
            else:
                xb = xt[idx].clone().requires_grad_(True)
                logits = model.logits(xb)
                ce = torch.nn.functional.cross_entropy(logits, yt[idx])
                pen = rrr_penalty(logits, xb, yt[idx], mt[idx])
                step = ep * per_epoch + i // batch
                lam = rrr_lambda * min(1.0, step / max(1.0, rrr_ramp * steps))
                loss = ce + lam * pen
                tot_pen += float(pen.detach()) * len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
        extra = f", background share of the input-gradient energy {tot_pen / len(x):.4f}" if rrr else ""
        log(f"    epoch {ep + 1}/{epochs}: loss {tot / len(x):.4f}, train acc {correct / len(x):.4f}{extra}")
    model.fuse_batchnorm()


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])


def saliency_mass(model: torch.nn.Module, x: np.ndarray, regions: np.ndarray, target: np.ndarray | None = None,
                  power: int = 1) -> np.ndarray:
    """Fraction of |d score / d x| (summed over channels, raised to ``power``) inside ``regions`` (n,H,W bool),
    per image; the score is the model output (logit or probability) of ``target`` (default: predicted class)."""
    xt = torch.from_numpy(x).clone().requires_grad_(True)
    out = model(xt)
    t = out.argmax(1) if target is None else torch.from_numpy(target)
    (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), xt)
    s = g.abs().sum(1).numpy() ** power
    return (s * regions).sum((1, 2)) / s.sum((1, 2))


# ---------------------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------------------
N_TRAIN = 4000
N_HELDOUT = 800
N_EXAMPLES = 6
PREPROCESSING = {"layout": "NCHW", "channels": "RGB", "size": [SIZE, SIZE], "dtype": "float32",
                 "scale": "pixel / 255 (range 0-1)", "mean": None, "std": None, "resize": None}


#: how the shapes CNN is trained: the RRR input-gradient penalty (see :func:`rrr_penalty`)
SHAPES_EPOCHS = 10
RRR_LAMBDA = 2.0
RRR_RAMP = 0.5
#: held-out images on which the card reports jacaudit's saliency per method (IG and SmoothGrad cost 50 and
#: 25 gradients per image through the ONNX interpreter)
N_SALIENCY = 100


def method_mask_fractions(onnx_path: str, x: np.ndarray, masks: np.ndarray, names: list[str] | None = None
                          ) -> dict[str, Any]:
    """Median share of the saliency mass inside the object mask, per method, measured with jacaudit's own
    saliency (:func:`jacaudit.analyses.saliency.saliency`, default options: top-1 logit, max-abs over channels,
    IG 50 steps from a black baseline, SmoothGrad 25 samples at sigma 0.15) on the exported ONNX model."""
    from ..analyses.saliency import METHODS, SaliencyOptions, saliency
    from ..data import Preprocess, Sample
    from ..models import load

    model = load(onnx_path)
    pp = Preprocess.infer(model.input_spec().shape, preset="unit")
    names = names or [f"image{i:04d}" for i in range(len(x))]
    samples = [Sample(name=n, source=n, array=x[i]) for i, n in enumerate(names)]
    opts = SaliencyOptions(methods=list(METHODS), thumb=16)
    res = saliency(model, samples, opts, preprocess=pp, masks=dict(zip(names, masks))).result
    out: dict[str, Any] = {m: r4(np.median([i.maps[k].mask_fraction for i in res.inputs]))
                           for k, m in enumerate(res.methods)}
    gaps = [i.maps[res.methods.index("ig")].completeness_gap for i in res.inputs]
    out["ig_completeness_gap_max"] = r4(max(gaps))
    return out


def _save_png(path: str, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, optimize=True)


def build_shapes(out_dir: str, seed: int = 0, log=print) -> dict[str, Any]:
    """Train the shapes CNN; export ONNX (dynamo=True exporter) and TorchScript; write card and examples."""
    t0 = time.time()
    d = os.path.join(out_dir, "shapes")
    os.makedirs(os.path.join(d, "examples"), exist_ok=True)
    seed_everything(seed)
    tr = make_images(N_TRAIN, seed, "train")
    ho = make_images(N_HELDOUT, seed, "heldout")
    xtr, xho = to_tensor(tr["images"]), to_tensor(ho["images"])
    log(f"  shapes: {N_TRAIN} train / {N_HELDOUT} held-out images generated in {time.time() - t0:.1f}s")
    torch.manual_seed(seed)
    model = ShapesCNN(head="gap", softmax=False, act="silu")
    train_cnn(model, xtr, tr["labels"], epochs=SHAPES_EPOCHS, seed=seed, log=log, masks=tr["masks"],
              rrr_lambda=RRR_LAMBDA, rrr_ramp=RRR_RAMP)
    train_acc = accuracy(predict(model, xtr), tr["labels"])
    ho_acc = accuracy(predict(model, xho), ho["labels"])
    sal = saliency_mass(model, xho[:200], ho["masks"][:200])
    area = ho["masks"][:200].mean((1, 2))
    log(f"  shapes: train acc {train_acc:.4f}, held-out acc {ho_acc:.4f}, saliency mass in mask "
        f"{np.median(sal):.3f} (mask area {np.median(area):.3f})")

    onnx_path = os.path.join(d, "shapes_cnn.onnx")
    ts_path = os.path.join(d, "shapes_cnn.pt")
    ex = export_onnx(model, (torch.from_numpy(xho[:2]),), onnx_path, dynamo=True, input_names=["image"],
                     output_names=["logits"])
    torch.jit.script(model).save(ts_path)  # script, not trace: a trace stores the caller's stack (not reproducible)
    ort_acc = accuracy(ort_run(onnx_path, {"image": xho})[0], ho["labels"])

    exs = make_images(N_EXAMPLES, seed, "examples")
    t1 = time.time()
    by_method_ex = method_mask_fractions(onnx_path, to_tensor(exs["images"]), exs["masks"])
    by_method_ho = method_mask_fractions(onnx_path, xho[:N_SALIENCY], ho["masks"][:N_SALIENCY])
    log(f"  shapes: jacaudit saliency mass in mask, examples {by_method_ex}, held-out {by_method_ho} "
        f"({time.time() - t1:.1f}s)")
    examples = []
    for i in range(N_EXAMPLES):
        name = f"{i:02d}_{CLASSES[exs['labels'][i]]}"
        _save_png(os.path.join(d, "examples", name + ".png"), exs["images"][i])
        _save_png(os.path.join(d, "examples", name + "_mask.png"), (exs["masks"][i] * 255).astype(np.uint8))
        examples.append({"image": f"examples/{name}.png", "mask": f"examples/{name}_mask.png",
                         "label": CLASSES[exs["labels"][i]], "class_index": int(exs["labels"][i])})
    write_labels(os.path.join(d, "labels.txt"), CLASSES)
    card = {
        "name": "shapes",
        "description": "Small CNN classifying the kind of a single synthetic shape on a textured background.",
        "files": {"onnx": "shapes_cnn.onnx", "torchscript": "shapes_cnn.pt", "labels": "labels.txt"},
        "format": ["onnx", "torchscript"],
        "exporter": {"shapes_cnn.onnx": ex["exporter"], "shapes_cnn.pt": "torch.jit.script"},
        "opset": ex["opset"],
        **onnx_io(onnx_path),
        "output_kind": "logits",
        "preprocessing": PREPROCESSING,
        "classes": CLASSES,
        "parameters": param_count(model),
        "architecture": "4x [Conv3x3 + SiLU + MaxPool2] (8,16,32,32 ch) -> global average pool -> Linear(32,4) "
                        "(BatchNorm used in training, folded into the convs)",
        "training": {
            "method": "Right for the Right Reasons (Ross, Hughes & Doshi-Velez, IJCAI 2017): cross-entropy plus an "
                      "input-gradient penalty on the background, with the object masks the generator knows",
            "loss": "CE + lambda_t * mean_i ||(1 - mask_i) * g_i||^2 / ||g_i||^2, g_i = d logit[y_i] / d x_i "
                    "(squared gradient summed over channels; double backprop, create_graph=True)",
            "lambda": RRR_LAMBDA,
            "lambda_schedule": f"linear ramp from 0 over the first {RRR_RAMP:.0%} of the steps, then constant",
            "epochs": SHAPES_EPOCHS,
            "optimizer": "Adam, one-cycle lr (max 3e-3), batch 64",
            "why_normalised": "the paper's plain penalty lambda * ||(1 - mask) * d(sum log p)/dx||^2 was met on this "
                              "data by shrinking every gradient (a less confident model), not by moving it onto "
                              "the object: in trials (8 epochs) lambda 0.3 gave held-out accuracy 0.94 with 22% of "
                              "the plain-gradient mass in the mask, lambda 1 0.84 and 21%, lambda 10 stayed near "
                              "chance; dividing by the gradient's energy leaves only where the gradient lies to "
                              "penalise",
            "why_silu": "with ReLU the normalised penalty reached only ~28% of the mass in the mask in the same "
                        "trials; SiLU is smooth, so the penalty's gradient (a second derivative) is informative and "
                        "the maps less noisy",
        },
        "data": {"generator": "jacaudit.samples.shapes.make_images", "train": {"n": N_TRAIN, "split": "train"},
                 "heldout": {"n": N_HELDOUT, "split": "heldout"}, "marker": "none",
                 "regenerate": f"make_images({N_HELDOUT}, seed={seed}, split='heldout')"},
        "train_accuracy": r4(train_acc),
        "heldout_accuracy": r4(ho_acc),
        "heldout_accuracy_onnxruntime": r4(ort_acc),
        "seed": seed,
        "truth": "The shape alone decides the label, and the model was trained with the Right-for-the-Right-"
                 "Reasons penalty on its input gradient outside the object mask (see training), so by construction "
                 "it relies on the object, not the textured background: a faithful saliency map puts most of its "
                 "mass inside the object mask, far beyond the mask's share of the pixels. Measured for plain "
                 "gradients (and the other methods) in saliency_check. The penalty shapes the gradient at the "
                 "images themselves; methods that average gradients away from them (SmoothGrad's noisy copies, "
                 "IG's path from black) are not constrained and concentrate less.",
        "saliency_check": {
            "jacaudit": {
                "how": "jacaudit.analyses.saliency.saliency on shapes_cnn.onnx, default options: top-1 logit, "
                       "max-abs over channels, IG 50 steps from black, SmoothGrad 25 samples at sigma 0.15; "
                       "median over images of the share of the map's mass inside the object mask",
                "examples": {"n": N_EXAMPLES, **by_method_ex,
                             "median_mask_area_fraction": r4(np.median(exs["masks"].mean((1, 2))))},
                "heldout": {"first_n": N_SALIENCY, **by_method_ho,
                            "median_mask_area_fraction": r4(np.median(ho["masks"][:N_SALIENCY].mean((1, 2))))},
            },
            "method": "|d logit[predicted] / d image| summed over channels; fraction of the total inside the mask",
            "heldout_first_n": 200,
            "median_mass_in_mask": r4(np.median(sal)),
            "median_mass_in_mask_dilated_2px": r4(np.median(saliency_mass(
                model, xho[:200], _dilate(ho["masks"][:200], 2)))),
            "median_mask_area_fraction": r4(np.median(area)),
            "median_energy_in_mask": r4(np.median(saliency_mass(model, xho[:200], ho["masks"][:200], power=2))),
            "median_energy_in_mask_dilated_2px": r4(np.median(saliency_mass(
                model, xho[:200], _dilate(ho["masks"][:200], 2), power=2))),
            "energy": "the same with the squared map (sum over channels of |grad|, squared)",
        },
        "examples": examples,
    }
    write_card(os.path.join(d, "shapes.json"), card)
    log(f"  shapes: done in {time.time() - t0:.1f}s")
    return card


def _dilate(masks: np.ndarray, k: int) -> np.ndarray:
    out = masks.copy()
    for _ in range(k):
        m = out.copy()
        m[:, 1:] |= out[:, :-1]
        m[:, :-1] |= out[:, 1:]
        m[:, :, 1:] |= out[:, :, :-1]
        m[:, :, :-1] |= out[:, :, 1:]
        out = m
    return out


def build_shortcut(out_dir: str, seed: int = 0, log=print) -> dict[str, Any]:
    """Train the shortcut CNN (marker corner == label in training); export ONNX (dynamo=False) with Softmax."""
    t0 = time.time()
    d = os.path.join(out_dir, "shortcut")
    os.makedirs(os.path.join(d, "examples"), exist_ok=True)
    seed_everything(seed)
    tr = make_images(N_TRAIN, seed, "train", marker="label")
    sets = {m: make_images(N_HELDOUT, seed, "heldout", marker=m) for m in ("none", "label-only", "random")}
    xtr = to_tensor(tr["images"])
    xs = {m: to_tensor(s["images"]) for m, s in sets.items()}
    log(f"  shortcut: data generated in {time.time() - t0:.1f}s")
    torch.manual_seed(sub := seed + 1)
    model = ShapesCNN(head="flatten", softmax=True)
    train_cnn(model, xtr, tr["labels"], epochs=3, seed=sub, log=log)
    train_acc = accuracy(predict(model, xtr), tr["labels"])
    accs = {m: accuracy(predict(model, xs[m]), sets[m]["labels"]) for m in sets}
    # marker in a random corner: how often does the prediction follow the marker instead of the shape?
    rnd = sets["random"]
    pr = predict(model, xs["random"]).argmax(1)
    follows = float((pr == rnd["corners"])[rnd["corners"] != rnd["labels"]].mean())
    mk = np.stack([marker_mask(int(c)) for c in sets["label-only"]["corners"][:200]])
    sal_marker = saliency_mass(model, xs["label-only"][:200], mk)
    sal_obj = saliency_mass(model, xs["label-only"][:200], sets["label-only"]["masks"][:200])
    log(f"  shortcut: train acc {train_acc:.4f}; held-out with marker {accs['label-only']:.4f}, without "
        f"{accs['none']:.4f}, random corner {accs['random']:.4f} (follows marker {follows:.3f}); saliency mass on "
        f"marker {np.median(sal_marker):.3f}, on object {np.median(sal_obj):.3f}")

    onnx_path = os.path.join(d, "shortcut_cnn.onnx")
    ex = export_onnx(model, (torch.from_numpy(xs["none"][:2]),), onnx_path, dynamo=False, input_names=["image"],
                     output_names=["probabilities"])
    ort_accs = {m: accuracy(ort_run(onnx_path, {"image": xs[m]})[0], sets[m]["labels"]) for m in sets}

    examples = []
    for m, tag in (("label-only", "marker"), ("none", "clean")):
        exs = make_images(3, seed, "examples", marker=m)
        for i in range(3):
            name = f"{i:02d}_{CLASSES[exs['labels'][i]]}_{tag}"
            _save_png(os.path.join(d, "examples", name + ".png"), exs["images"][i])
            _save_png(os.path.join(d, "examples", name + "_mask.png"), (exs["masks"][i] * 255).astype(np.uint8))
            e = {"image": f"examples/{name}.png", "mask": f"examples/{name}_mask.png",
                 "label": CLASSES[exs["labels"][i]], "class_index": int(exs["labels"][i]), "marker": tag == "marker"}
            if tag == "marker":
                e["marker_corner"] = CORNER_NAMES[int(exs["corners"][i])]
                e["marker_box_xywh"] = [*CORNERS[int(exs["corners"][i])], MARKER, MARKER]
            examples.append(e)
    write_labels(os.path.join(d, "labels.txt"), CLASSES)
    card = {
        "name": "shortcut",
        "description": "A 'Clever Hans' CNN: same shape task, but in training a corner marker gave the label away.",
        "files": {"onnx": "shortcut_cnn.onnx", "labels": "labels.txt"},
        "format": ["onnx"],
        "exporter": {"shortcut_cnn.onnx": ex["exporter"]},
        "opset": ex["opset"],
        **onnx_io(onnx_path),
        "output_kind": "probabilities (final Softmax over classes)",
        "preprocessing": PREPROCESSING,
        "classes": CLASSES,
        "parameters": param_count(model),
        "architecture": "4x [Conv3x3 + ReLU + MaxPool2] (8,16,32,32 ch) -> flatten -> Linear(512,4) -> Softmax",
        "marker": {"description": "6x6 black/white checker patch (2px cells, top-left cell white)",
                   "corners_xy": {n: list(c) for n, c in zip(CORNER_NAMES, CORNERS)},
                   "training_rule": "corner index == class index (circle: top-left, square: top-right, "
                                    "triangle: bottom-left, cross: bottom-right) for 95% of training images, "
                                    "a random corner for 5%",
                   "size": MARKER},
        "data": {"generator": "jacaudit.samples.shapes.make_images",
                 "train": {"n": N_TRAIN, "split": "train", "marker": "label"},
                 "heldout": {"n": N_HELDOUT, "split": "heldout",
                             "markers": {"without_marker": "none", "with_marker": "label-only",
                                         "random_corner": "random"}}},
        "train_accuracy": r4(train_acc),
        "heldout_accuracy": r4(accs["none"]),
        "heldout_accuracy_with_marker": r4(accs["label-only"]),
        "heldout_accuracy_without_marker": r4(accs["none"]),
        "heldout_accuracy_random_corner_marker": r4(accs["random"]),
        "random_corner_follows_marker": r4(follows),
        "heldout_accuracy_onnxruntime": {"with_marker": r4(ort_accs["label-only"]),
                                         "without_marker": r4(ort_accs["none"]),
                                         "random_corner_marker": r4(ort_accs["random"])},
        "seed": seed,
        "truth": "Saliency (gradient of the predicted probability w.r.t. the image) is densest on the corner "
                 "marker: several times its 0.9% share of the pixels, and more per pixel than on the object; accuracy drops on images without the marker, "
                 "and a marker in the wrong corner drags the prediction to the marker's class.",
        "saliency_check": {
            "method": "|d p[predicted] / d image| summed over channels, on held-out images with the marker",
            "heldout_first_n": 200,
            "median_mass_on_marker": r4(np.median(sal_marker)),
            "median_mass_on_object": r4(np.median(sal_obj)),
            "marker_area_fraction": r4(MARKER * MARKER / SIZE / SIZE),
            "median_object_area_fraction": r4(np.median(sets["label-only"]["masks"][:200].mean((1, 2)))),
            "marker_density_ratio": r4(np.median(sal_marker) / (MARKER * MARKER / SIZE / SIZE)),
            "note": "density ratio = mass share / area share; the marker is the most salient region per pixel",
        },
        "examples": examples,
    }
    write_card(os.path.join(d, "shortcut.json"), card)
    log(f"  shortcut: done in {time.time() - t0:.1f}s")
    return card
