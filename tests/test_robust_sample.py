"""The ``robust`` sample (sample_models/robust/): its files, its data folder, and the robustness figures on its
card, re-measured here without jacaudit's code (onnxruntime forwards, torch autograd on the TorchScript files).

The card's figures come from the builder (jacaudit/samples/robust.py); the attacks here are written again, so a
bug in one is not hidden by the other. PGD uses another random start than the builder: its accuracies agree to a
few images, FGSM (deterministic) to one image (a sign flip of a near-zero gradient entry)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from jacaudit.samples import default_out_dir
from jacaudit.samples._common import ort_run

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")

SM = default_out_dir()
D = os.path.join(SM, "robust")


@pytest.fixture(scope="module")
def card() -> dict:
    with open(os.path.join(D, "robust.json")) as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _models(card):
    """{role: (onnx path, TorchScript module)} for the twin ('robust') and its brittle partner."""
    bp = card["brittle_partner"]
    return {"robust": (os.path.join(D, card["files"]["onnx"]),
                       torch.jit.load(os.path.join(D, card["files"]["torchscript"]))),
            "brittle": (os.path.normpath(os.path.join(D, bp["onnx"])),
                        torch.jit.load(os.path.normpath(os.path.join(D, bp["torchscript"]))))}


def _read_folder(card):
    """The data folder as the CLI sees it: labels from the sub-folder names; (x (n,3,64,64) in [0,1], y, index)."""
    from PIL import Image

    with open(os.path.join(D, card["files"]["labels"])) as f:
        classes = f.read().split("\n")[:-1]
    root = os.path.join(D, card["data"]["robustness"]["folder"])
    xs, ys, idx = [], [], []
    for k, c in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(root, c))):
            img = np.asarray(Image.open(os.path.join(root, c, name)).convert("RGB"))
            xs.append(img.transpose(2, 0, 1).astype(np.float32) / 255)
            ys.append(k)
            idx.append(int(os.path.splitext(name)[0]))
    return np.stack(xs), np.array(ys, dtype=np.int64), np.array(idx)


@pytest.fixture(scope="module")
def data(card):
    return _read_folder(card)


def test_data_folder_is_the_generators_heldout_split(card, data):
    from jacaudit.samples.shapes import CLASSES, make_images

    root = os.path.join(D, card["data"]["robustness"]["folder"])
    with open(os.path.join(D, card["files"]["labels"])) as f:
        labels = f.read().split("\n")[:-1]
    assert labels == CLASSES == card["classes"]
    assert sorted(os.listdir(root)) == sorted(labels)  # sub-folder names are exactly the labels
    for c in labels:
        names = sorted(os.listdir(os.path.join(root, c)))
        assert len(names) == 16 and all(n.endswith(".png") and len(n) == 7 for n in names), (c, names)
    x, y, idx = data
    r = card["data"]["robustness"]
    assert len(x) == r["n"] == 64 and sorted(idx) == list(range(64))
    g = make_images(r["n"], card["seed"], r["split"])
    np.testing.assert_array_equal(y, g["labels"][idx])
    np.testing.assert_array_equal((x * 255).round().astype(np.uint8), g["images"][idx].transpose(0, 3, 1, 2))
    # a split of its own: not the training images, not the shapes card's held-out images
    assert r["split"] not in ("train", "heldout", "examples")
    tr = make_images(64, card["seed"], "train")["images"]
    assert not any((tr == im).all((1, 2, 3)).any() for im in g["images"])


def test_onnx_matches_torchscript(card, data):
    x = data[0][:16]
    for role, (onnx_path, ts) in _models(card).items():
        with torch.no_grad():
            ref = ts(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ort_run(onnx_path, {"image": x})[0], ref, atol=1e-4, rtol=1e-4, err_msg=role)


def test_card_says_the_twin_is_the_robust_one(card):
    r, b = card["robustness"]["robust"], card["robustness"]["brittle"]
    assert card["robustness"]["eps"] == [0.003, 0.01, 0.03]
    assert r["clean_accuracy"] >= 0.9 and b["clean_accuracy"] >= 0.9 and card["heldout_accuracy"] >= 0.9
    assert r["jacobian_frobenius_mean"] * 3 < b["jacobian_frobenius_mean"]
    assert r["jacobian_spectral_mean"] * 3 < b["jacobian_spectral_mean"]
    for e in ("0.01", "0.03"):
        assert r["fgsm_accuracy"][e] > b["fgsm_accuracy"][e] + 0.1, e
        assert r["pgd_accuracy"][e] > b["pgd_accuracy"][e], e
    assert r["pgd_accuracy"]["0.01"] > b["pgd_accuracy"]["0.01"] + 0.2
    for f in (r, b):  # PGD is the stronger attack
        for e in f["fgsm_accuracy"]:
            assert f["pgd_accuracy"][e] <= f["fgsm_accuracy"][e] + 1 / 64


def _ce_input_grad(ts, x, y):
    xr = torch.from_numpy(x).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(ts(xr), torch.from_numpy(y), reduction="sum")
    (g,) = torch.autograd.grad(loss, xr)
    return g.numpy()


def _acc(onnx_path, x, y):
    return float((ort_run(onnx_path, {"image": x.astype(np.float32)})[0].argmax(1) == y).mean())


def test_clean_accuracy_and_fgsm_match_card(card, data):
    x, y, _ = data
    for role, (onnx_path, ts) in _models(card).items():
        f = card["robustness"][role]
        assert abs(_acc(onnx_path, x, y) - f["clean_accuracy"]) < 1e-6, role
        g = np.sign(_ce_input_grad(ts, x, y))
        for e in ("0.01", "0.03"):
            xa = np.clip(x + float(e) * g, 0, 1)
            assert abs(_acc(onnx_path, xa, y) - f["fgsm_accuracy"][e]) <= 1 / 64 + 1e-9, (role, e)


def test_pgd_matches_card_with_another_random_start(card, data):
    x, y, _ = data
    rs = np.random.default_rng(12345)
    for role, (onnx_path, ts) in _models(card).items():
        f = card["robustness"][role]
        for e in ("0.01", "0.03"):
            eps = float(e)
            xa = np.clip(x + rs.uniform(-eps, eps, x.shape).astype(np.float32), 0, 1)
            for _ in range(10):
                xa = xa + 0.25 * eps * np.sign(_ce_input_grad(ts, xa, y))
                xa = np.clip(np.clip(xa, x - eps, x + eps), 0, 1).astype(np.float32)
            assert abs(_acc(onnx_path, xa, y) - f["pgd_accuracy"][e]) <= 4 / 64 + 1e-9, (role, e)


def test_jacobian_norms_match_card(card, data):
    x = torch.from_numpy(data[0])
    for role, (_, ts) in _models(card).items():
        f = card["robustness"][role]
        xr = x.clone().requires_grad_(True)
        out = ts(xr)
        J = torch.stack([torch.autograd.grad(out[:, k].sum(), xr, retain_graph=True)[0].flatten(1)
                         for k in range(out.shape[1])], 1).double()
        fro = J.norm(dim=(1, 2))
        spec = torch.linalg.matrix_norm(J, ord=2)
        assert abs(fro.mean().item() - f["jacobian_frobenius_mean"]) < 1e-3 * f["jacobian_frobenius_mean"], role
        assert abs(np.median(fro.numpy()) - f["jacobian_frobenius_median"]) < 1e-3 * f["jacobian_frobenius_median"]
        assert abs(spec.mean().item() - f["jacobian_spectral_mean"]) < 1e-3 * f["jacobian_spectral_mean"], role
        # the Frobenius norm bounds the spectral norm, within sqrt(rank <= 4)
        assert (spec <= fro + 1e-9).all() and (fro <= 2 * spec + 1e-9).all()
