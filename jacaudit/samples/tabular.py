"""A synthetic table with 12 named features, of which three decide the label, and an MLP trained on it.

The features are z-scores (mean 0, std 1), independent. The label is

    positive  iff  2.0 * income - 1.5 * debt_ratio - 1.0 * late_payments + 0.3 * noise > 0

so ``income``, ``debt_ratio`` and ``late_payments`` (in that order of weight) are the relevant features and
the other nine are pure noise. The held-out split ships as ``tabular_heldout.csv``; the training split is
regenerated from the seed by :func:`make_table`.
"""
from __future__ import annotations

import csv
import os
import time
from typing import Any

import numpy as np
import torch

from ._common import (accuracy, export_onnx, onnx_io, ort_run, param_count, r4, rng, seed_everything, write_card)

FEATURES = ["age", "income", "debt_ratio", "credit_years", "num_accounts", "late_payments", "employment_years",
            "savings", "household_size", "region_code", "account_age_days", "num_inquiries"]
WEIGHTS = {"income": 2.0, "debt_ratio": -1.5, "late_payments": -1.0}
RELEVANT = list(WEIGHTS)  # in decreasing order of |weight|
CLASSES = ["negative", "positive"]
NOISE = 0.3
N_TRAIN, N_HELDOUT = 4000, 1000


def make_table(n: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, 12) float32 in :data:`FEATURES` order, labels (n,) int64), deterministic in seed/split."""
    g = rng(seed, f"tabular/{split}")
    x = g.standard_normal((n, len(FEATURES))).astype(np.float32)
    score = sum(w * x[:, FEATURES.index(f)].astype(np.float64) for f, w in WEIGHTS.items())
    score = score + NOISE * g.standard_normal(n)
    return x, (score > 0).astype(np.int64)


def write_csv(path: str, x: np.ndarray, y: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FEATURES + ["label"])
        for row, lab in zip(x, y):
            w.writerow([f"{v:.5f}" for v in row] + [int(lab)])


def read_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = next(r)
        rows = list(r)
    assert header == FEATURES + ["label"], header
    x = np.array([[float(v) for v in row[:-1]] for row in rows], dtype=np.float32)
    return x, np.array([int(row[-1]) for row in rows], dtype=np.int64)


class TabularMLP(torch.nn.Module):
    """12 -> 32 -> 32 -> 2 with ReLU; outputs logits."""

    def __init__(self, n_in: int = len(FEATURES), hidden: int = 32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, len(CLASSES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sensitivity(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Mean over rows of |d (logit_positive - logit_negative) / d feature|."""
    xt = torch.from_numpy(x).clone().requires_grad_(True)
    out = model(xt)
    (g,) = torch.autograd.grad((out[:, 1] - out[:, 0]).sum(), xt)
    return g.abs().mean(0).numpy()


def build_tabular(out_dir: str, seed: int = 0, log=print) -> dict[str, Any]:
    """Train the MLP; export it with both ONNX exporters (two files, same weights); write CSV and card."""
    t0 = time.time()
    d = os.path.join(out_dir, "tabular")
    os.makedirs(d, exist_ok=True)
    seed_everything(seed)
    xtr, ytr = make_table(N_TRAIN, seed, "train")
    xho, yho = make_table(N_HELDOUT, seed, "heldout")
    # the CSV holds rounded values; evaluate on exactly what ships
    csv_path = os.path.join(d, "tabular_heldout.csv")
    write_csv(csv_path, xho, yho)
    xho, yho = read_csv(csv_path)
    torch.manual_seed(seed)
    model = TabularMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for ep in range(40):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 128):
            idx = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        train_acc = accuracy(model(xt).numpy(), ytr)
        ho_acc = accuracy(model(torch.from_numpy(xho)).numpy(), yho)
    sens = sensitivity(model, xho)
    ranking = [FEATURES[i] for i in np.argsort(-sens)]
    log(f"  tabular: train acc {train_acc:.4f}, held-out acc {ho_acc:.4f}, ranking {ranking[:5]}")

    files = {"tabular_mlp.onnx": True, "tabular_mlp_legacy.onnx": False}
    exporters = {}
    for fname, dyn in files.items():
        ex = export_onnx(model, (torch.from_numpy(xho[:2]),), os.path.join(d, fname), dynamo=dyn,
                         input_names=["features"], output_names=["logits"])
        exporters[fname] = {"exporter": ex["exporter"], "opset": ex["opset"]}
    ort_acc = {f: r4(accuracy(ort_run(os.path.join(d, f), {"features": xho})[0], yho)) for f in files}
    card = {
        "name": "tabular",
        "description": "MLP on a synthetic 12-feature table where only income, debt_ratio and late_payments matter.",
        "files": {"onnx": "tabular_mlp.onnx", "onnx_legacy_exporter": "tabular_mlp_legacy.onnx",
                  "data": "tabular_heldout.csv"},
        "format": ["onnx"],
        "exporter": {f: v["exporter"] for f, v in exporters.items()},
        "opset": {f: v["opset"] for f, v in exporters.items()},
        **onnx_io(os.path.join(d, "tabular_mlp.onnx")),
        "output_kind": "logits",
        "preprocessing": {"layout": "[batch, 12] float32, columns in 'features' order",
                          "scale": "none: the features are already z-scores (mean 0, std 1)"},
        "features": FEATURES,
        "classes": CLASSES,
        "label_rule": "positive iff 2.0*income - 1.5*debt_ratio - 1.0*late_payments + 0.3*N(0,1) > 0",
        "relevant_features": RELEVANT,
        "irrelevant_features": [f for f in FEATURES if f not in RELEVANT],
        "parameters": param_count(model),
        "architecture": "Linear(12,32) -> ReLU -> Linear(32,32) -> ReLU -> Linear(32,2)",
        "data": {"generator": "jacaudit.samples.tabular.make_table", "train": {"n": N_TRAIN, "split": "train"},
                 "heldout": {"n": N_HELDOUT, "split": "heldout", "csv": "tabular_heldout.csv",
                             "columns": FEATURES + ["label"]}},
        "train_accuracy": r4(train_acc),
        "heldout_accuracy": r4(ho_acc),
        "heldout_accuracy_onnxruntime": ort_acc,
        "seed": seed,
        "truth": "Per-feature sensitivity (mean |d logit-difference / d feature| over the held-out rows) ranks "
                 "income, debt_ratio, late_payments first, in that order, far above the nine noise features.",
        "sensitivity": {"method": "mean over held-out rows of |d (logit[positive] - logit[negative]) / d x_i|",
                        "values": {f: r4(s) for f, s in zip(FEATURES, sens)}, "ranking": ranking},
    }
    write_card(os.path.join(d, "tabular.json"), card)
    log(f"  tabular: done in {time.time() - t0:.1f}s")
    return card
