"""Planar 3-link robot arm: forward kinematics q in R^3 -> (x, y, phi), float64, no training.

    x   = l1 cos q1 + l2 cos(q1+q2) + l3 cos(q1+q2+q3)
    y   = l1 sin q1 + l2 sin(q1+q2) + l3 sin(q1+q2+q3)
    phi = q1 + q2 + q3

Closed-form Jacobian (rows x, y, phi; columns q1, q2, q3), with s1 = sin q1, s12 = sin(q1+q2), ...:

    [[-l1 s1 - l2 s12 - l3 s123,  -l2 s12 - l3 s123,  -l3 s123],
     [ l1 c1 + l2 c12 + l3 c123,   l2 c12 + l3 c123,   l3 c123],
     [ 1,                          1,                  1       ]]

det J = l1 l2 sin q2: the full map is singular iff q2 = 0 or pi (links 1 and 2 aligned). The position block
(rows x, y) drops to rank 1 iff sin q2 = sin q3 = 0: the arm stretched straight or folded back.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from ._common import write_card

LENGTHS = (1.0, 0.8, 0.5)


class PlanarArm(torch.nn.Module):
    """Forward kinematics of a planar 3R arm. Input q: (..., 3) float64 joint angles (rad);
    output (..., 3): end-effector x, y and orientation phi."""

    def __init__(self, lengths: tuple[float, float, float] = LENGTHS):
        super().__init__()
        self.register_buffer("lengths", torch.tensor(lengths, dtype=torch.float64))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        a1 = q[..., 0]
        a12 = a1 + q[..., 1]
        a123 = a12 + q[..., 2]
        l1, l2, l3 = self.lengths[0], self.lengths[1], self.lengths[2]
        x = l1 * torch.cos(a1) + l2 * torch.cos(a12) + l3 * torch.cos(a123)
        y = l1 * torch.sin(a1) + l2 * torch.sin(a12) + l3 * torch.sin(a123)
        return torch.stack([x, y, a123], dim=-1)


def forward_kinematics(q: np.ndarray, lengths=LENGTHS) -> np.ndarray:
    l1, l2, l3 = lengths
    a1, a12 = q[..., 0], q[..., 0] + q[..., 1]
    a123 = a12 + q[..., 2]
    return np.stack([l1 * np.cos(a1) + l2 * np.cos(a12) + l3 * np.cos(a123),
                     l1 * np.sin(a1) + l2 * np.sin(a12) + l3 * np.sin(a123), a123], -1)


def jacobian_closed_form(q: np.ndarray, lengths=LENGTHS) -> np.ndarray:
    """The 3x3 Jacobian d(x, y, phi)/d(q1, q2, q3) for q of shape (..., 3); returns (..., 3, 3)."""
    l1, l2, l3 = lengths
    a1, a12 = q[..., 0], q[..., 0] + q[..., 1]
    a123 = a12 + q[..., 2]
    s1, s12, s123 = np.sin(a1), np.sin(a12), np.sin(a123)
    c1, c12, c123 = np.cos(a1), np.cos(a12), np.cos(a123)
    one = np.ones_like(a1)
    return np.stack([
        np.stack([-l1 * s1 - l2 * s12 - l3 * s123, -l2 * s12 - l3 * s123, -l3 * s123], -1),
        np.stack([l1 * c1 + l2 * c12 + l3 * c123, l2 * c12 + l3 * c123, l3 * c123], -1),
        np.stack([one, one, one], -1)], -2)


def det_closed_form(q: np.ndarray, lengths=LENGTHS) -> np.ndarray:
    return lengths[0] * lengths[1] * np.sin(q[..., 1])


#: named configurations shipped in the card (radians)
CONFIGS = {
    "generic": [0.3, -0.7, 1.1],
    "stretched": [0.4, 0.0, 0.0],
    "folded": [0.2, np.pi, 0.0],
    "elbow_aligned_only": [0.5, 0.0, 0.9],
    "wrist_aligned_only": [0.5, 0.9, 0.0],
}


def build_arm(out_dir: str, seed: int = 0, log=print) -> dict[str, Any]:
    t0 = time.time()
    d = os.path.join(out_dir, "arm")
    os.makedirs(d, exist_ok=True)
    model = PlanarArm().eval()
    scripted = torch.jit.script(model)
    path = os.path.join(d, "arm.pt")
    scripted.save(path)
    configs = {}
    for name, q in CONFIGS.items():
        qa = np.array(q, dtype=np.float64)
        J = jacobian_closed_form(qa)
        configs[name] = {
            "q": [float(v) for v in qa],
            "output": [float(v) for v in forward_kinematics(qa)],
            "jacobian": [[float(v) for v in row] for row in J],
            "det": float(det_closed_form(qa)),
            "singular_values": [float(v) for v in np.linalg.svd(J, compute_uv=False)],
            "position_rank": int(np.linalg.matrix_rank(J[:2], tol=1e-12)),
            "full_rank": int(np.linalg.matrix_rank(J, tol=1e-12)),
        }
    card = {
        "name": "arm",
        "description": "Forward kinematics of a planar 3-link robot arm (no training): q -> (x, y, phi).",
        "files": {"torchscript": "arm.pt"},
        "format": ["torchscript"],
        "exporter": {"arm.pt": "torch.jit.script"},
        "inputs": [{"name": "q", "shape": ["...", 3], "dtype": "float64",
                    "meaning": "joint angles q1, q2, q3 in radians (relative angles)"}],
        "outputs": [{"name": "output", "shape": ["...", 3], "dtype": "float64",
                     "meaning": "end-effector x, y (same units as the link lengths) and orientation phi (rad)"}],
        "preprocessing": None,
        "classes": None,
        "link_lengths": list(LENGTHS),
        "train_accuracy": None,
        "heldout_accuracy": None,
        "seed": seed,
        "truth": "The Jacobian equals the closed form (to 1e-10 in float64); det J = l1*l2*sin(q2), so J is "
                 "singular when q2 = 0 or pi; the position rows lose rank when the arm is stretched or folded "
                 "(q2 and q3 both 0 or pi).",
        "closed_form": {
            "forward": ["x = l1 cos q1 + l2 cos(q1+q2) + l3 cos(q1+q2+q3)",
                        "y = l1 sin q1 + l2 sin(q1+q2) + l3 sin(q1+q2+q3)", "phi = q1 + q2 + q3"],
            "jacobian": [["-l1 s1 - l2 s12 - l3 s123", "-l2 s12 - l3 s123", "-l3 s123"],
                         ["l1 c1 + l2 c12 + l3 c123", "l2 c12 + l3 c123", "l3 c123"],
                         ["1", "1", "1"]],
            "notation": "s12 = sin(q1+q2), c123 = cos(q1+q2+q3), ...",
            "det": "l1 * l2 * sin(q2)",
            "singular_when": "full J: sin(q2) = 0; position rows (x, y): sin(q2) = 0 and sin(q3) = 0",
            "code": "jacaudit.samples.arm.jacobian_closed_form",
        },
        "configurations": configs,
    }
    write_card(os.path.join(d, "arm.json"), card)
    log(f"  arm: done in {time.time() - t0:.1f}s")
    return card
