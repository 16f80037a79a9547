"""A visuomotor sample policy with a known answer: image -> action, steering towards the bright dot (no training).

The image (1, 1, 32, 32), values in [0, 1], is turned into a spatial softmax p = softmax(beta * I) over the pixels,
and the action is the expected pixel position, u = (sum_p p_p x_p, sum_p p_p y_p), x and y in [-1, 1] (x: columns
left to right, y: rows top to bottom): the steering command towards the brightest spot (a soft-argmax; the
keypoint layer of visuomotor policies, Levine et al. 2016).

Closed-form Jacobian: du_k / dI_p = beta * p_p * (c_pk - u_k), with c_p = (x_p, y_p). So the sensitivity map of
each action is concentrated on the dot (where p lives), signed across it (brightening the dot's right side moves
u_x right), J has rank 2, and the two maps are the dot's x and y gradients. Where two pixels tie for the maximum
(a dot centred between pixels, ``dot_lower``) the policy is far more sensitive along the tie (sigma_max 0.44 vs
0.015): the decision between them is a knife edge.

Build: ``python -c "from jacaudit.samples.policy import build_policy; build_policy('sample_models')"``.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from ._common import export_onnx, onnx_io, rng, write_card

H = W = 32
BETA = 20.0
#: example dots: (row, column) centres in pixels
DOTS = {"dot_right": (16.0, 25.0), "dot_upper_left": (6.0, 7.0), "dot_lower": (26.0, 14.5)}


def grid() -> tuple[np.ndarray, np.ndarray]:
    """x (columns) and y (rows) coordinates of the pixels in [-1, 1], flattened row-major."""
    xs = np.linspace(-1.0, 1.0, W)
    ys = np.linspace(-1.0, 1.0, H)
    X, Y = np.meshgrid(xs, ys)
    return X.ravel(), Y.ravel()


class SoftArgmaxPolicy(torch.nn.Module):
    def __init__(self, beta: float = BETA):
        super().__init__()
        x, y = grid()
        self.beta = beta
        self.register_buffer("coords", torch.tensor(np.stack([x, y], 1), dtype=torch.float32))  # (H*W, 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.beta * image.reshape(image.shape[0], -1)
        p = torch.softmax(logits, dim=1)
        return p @ self.coords


def action_closed_form(image: np.ndarray, beta: float = BETA) -> np.ndarray:
    x, y = grid()
    z = beta * image.reshape(-1).astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    return np.array([p @ x, p @ y])


def jacobian_closed_form(image: np.ndarray, beta: float = BETA) -> np.ndarray:
    """du/dI as (2, H*W): beta * p_p * (c_pk - u_k)."""
    x, y = grid()
    z = beta * image.reshape(-1).astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    u = np.array([p @ x, p @ y])
    C = np.stack([x, y])
    return beta * p[None, :] * (C - u[:, None])


def make_image(row: float, col: float, seed: int, name: str) -> np.ndarray:
    """A dark, slightly noisy image with one bright Gaussian dot (sigma 1.2 px) at (row, col)."""
    g = rng(seed, f"policy/{name}")
    r, c = np.mgrid[0:H, 0:W]
    dot = np.exp(-((r - row) ** 2 + (c - col) ** 2) / (2 * 1.2 ** 2))
    img = np.clip(0.05 + 0.02 * g.standard_normal((H, W)) + 0.95 * dot, 0.0, 1.0)
    return img.astype(np.float32).reshape(1, 1, H, W)


def dot_position(row: float, col: float) -> list[float]:
    """The dot's centre in the action's coordinates ([-1, 1], x = column, y = row)."""
    return [-1.0 + 2.0 * col / (W - 1), -1.0 + 2.0 * row / (H - 1)]


def build_policy(out_dir: str, seed: int = 0, log=print) -> dict[str, Any]:
    t0 = time.time()
    d = os.path.join(out_dir, "policy")
    os.makedirs(os.path.join(d, "examples"), exist_ok=True)
    model = SoftArgmaxPolicy().eval()
    path = os.path.join(d, "policy.onnx")
    dots = {}
    for name, (row, col) in DOTS.items():
        img = make_image(row, col, seed, name)
        np.save(os.path.join(d, "examples", f"{name}.npy"), img)
        J = jacobian_closed_form(img)
        a = action_closed_form(img)
        Jm = np.abs(J).sum(0).reshape(H, W)
        r, c = np.mgrid[0:H, 0:W]
        near = (r - row) ** 2 + (c - col) ** 2 <= 3.0 ** 2
        s = np.linalg.svd(J, compute_uv=False)
        dots[name] = {"file": f"examples/{name}.npy", "dot_rc": [row, col], "dot_xy": dot_position(row, col),
                          "action": [float(v) for v in a], "singular_values": [float(v) for v in s],
                          "rank": 2, "jacobian_mass_within_3px": float(Jm[near].sum() / Jm.sum())}
    ex = export_onnx(model, (torch.from_numpy(make_image(*DOTS["dot_right"], seed, "dot_right")),), path,
                     dynamo=False, input_names=["image"], output_names=["action"])
    card = {
        "name": "policy",
        "description": "Visuomotor sample policy (no training): a 32x32 grey image -> a 2-D steering action "
                       "towards the bright dot (spatial soft-argmax).",
        "files": {"onnx": "policy.onnx"},
        "format": ["onnx"],
        "exporter": {"policy.onnx": ex["exporter"]},
        "opset": ex["opset"],
        **onnx_io(path),
        "output_kind": "action (x, y) in [-1, 1]: the softmax-weighted pixel position (x: column, y: row)",
        "preprocessing": {"layout": "[batch, 1, 32, 32] float32 in [0, 1] (the examples are .npy)"},
        "classes": None,
        "beta": BETA,
        "train_accuracy": None,
        "heldout_accuracy": None,
        "seed": seed,
        "closed_form": {"action": "u_k = sum_p p_p c_pk, p = softmax(beta * I)",
                        "jacobian": "du_k/dI_p = beta * p_p * (c_pk - u_k)",
                        "code": "jacaudit.samples.policy.jacobian_closed_form"},
        "dots": dots,
        "truth": "The action points at the bright dot (within 0.02 of its position); J = du/dpixels equals the "
                 "closed form beta * p * (c - u), has rank 2, and its sensitivity maps sit on the dot (over 95% of "
                 "sum |J| within 3 px of its centre).",
    }
    write_card(os.path.join(d, "policy.json"), card)
    log(f"  policy: done in {time.time() - t0:.1f}s")
    return card
