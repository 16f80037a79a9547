"""The committed sample models (sample_models/) load, match their cards, and their truths hold.

Forward/accuracy checks run on onnxruntime; derivative truths go through jacaudit's own loader and
torch.func. Data is regenerated from the seeded generators in jacaudit.samples (small subsets only).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from jacaudit.models import load
from jacaudit.samples import NAMES, default_out_dir
from jacaudit.samples._common import onnx_io, ort_run

SM = default_out_dir()
REQUIRED = ["name", "files", "format", "inputs", "outputs", "preprocessing", "classes", "train_accuracy",
            "heldout_accuracy", "seed", "truth"]


def card(name: str) -> dict:
    with open(os.path.join(SM, name, f"{name}.json")) as f:
        return json.load(f)


#: samples that hold a model (a data-only sample, e.g. transfer's image pair, has no inputs/outputs/exporter)
MODELS = [n for n in NAMES if "inputs" in card(n)]


def path(name: str, key: str = "onnx") -> str:
    return os.path.join(SM, name, card(name)["files"][key])


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ cards
@pytest.mark.parametrize("name", NAMES)
def test_card_complete_and_files_exist(name):
    c = card(name)
    for k in (REQUIRED if name in MODELS else ("name", "description", "files", "truth")):
        assert k in c, f"{name}: card lacks {k!r}"
    assert c["name"] == name
    for f in c["files"].values():
        exists = os.path.isdir if f.endswith("/") else os.path.isfile  # a data sample names folders
        assert exists(os.path.join(SM, name, f)), f
    for e in c.get("examples", []):
        assert os.path.isfile(os.path.join(SM, name, e["image"]))
        assert os.path.isfile(os.path.join(SM, name, e["mask"]))
    if c.get("classes") and "labels" in c["files"]:
        with open(os.path.join(SM, name, c["files"]["labels"])) as f:
            assert f.read().split("\n")[:-1] == c["classes"]


@pytest.mark.parametrize("name", [n for n in MODELS if n != "arm"])
def test_onnx_files_match_card_io_and_opset(name):
    import onnx

    c = card(name)
    for key, f in c["files"].items():
        if not f.endswith(".onnx"):
            continue
        p = os.path.join(SM, name, f)
        io = onnx_io(p)
        assert io["inputs"] == c["inputs"], f
        assert io["outputs"] == c["outputs"], f
        opset = {i.domain or "": i.version for i in onnx.load(p).opset_import}[""]
        assert opset in (17, 18)
        want = c["opset"][f] if isinstance(c["opset"], dict) else c["opset"]
        assert opset == want


def test_both_exporters_are_exercised():
    exporters = set()
    for n in MODELS:
        for f, e in card(n)["exporter"].items():
            if f.endswith(".onnx"):
                exporters.add(e)
    assert exporters == {"torch.onnx.export(dynamo=True)", "torch.onnx.export(dynamo=False)"}


def test_folder_is_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SM) for f in fs)
    assert total < 5e6, total


def test_readme_mentions_every_model_and_is_current():
    from jacaudit.samples.readme import render_readme

    with open(os.path.join(SM, "README.md")) as f:
        text = f.read()
    for n in NAMES:
        assert f"## {n}" in text
    assert text == render_readme(SM), "sample_models/README.md is stale: rebuild or call write_readme"


# ------------------------------------------------------------------------------------------------ shapes
def test_shapes_generator_is_deterministic_and_prefix_stable():
    from jacaudit.samples.shapes import make_images

    a = make_images(6, 0, "heldout")
    b = make_images(3, 0, "heldout", marker="label-only")
    assert np.array_equal(a["labels"][:3], b["labels"])
    assert np.array_equal(make_images(3, 0, "heldout")["images"], a["images"][:3])
    # the marker modes share the underlying image: only the 6x6 marker patch differs
    diff = (a["images"][:3] != b["images"]).any(-1)
    for i in range(3):
        ys, xs = np.nonzero(diff[i])
        assert ys.max() - ys.min() < 6 and xs.max() - xs.min() < 6


def test_shapes_examples_match_generator():
    from PIL import Image

    from jacaudit.samples.shapes import make_images

    c = card("shapes")
    ex = make_images(len(c["examples"]), c["seed"], "examples")
    for i, e in enumerate(c["examples"]):
        img = np.asarray(Image.open(os.path.join(SM, "shapes", e["image"])).convert("RGB"))
        mask = np.asarray(Image.open(os.path.join(SM, "shapes", e["mask"]))) > 127
        assert np.array_equal(img, ex["images"][i]) and np.array_equal(mask, ex["masks"][i])
        assert e["class_index"] == ex["labels"][i]


def _heldout_images(seed, n, marker="none"):
    from jacaudit.samples.shapes import make_images, to_tensor

    d = make_images(n, seed, "heldout", marker=marker)
    return to_tensor(d["images"]), d


N_IMG = 240  # a subset of the held-out set: accuracy tolerance covers the sampling difference


def test_shapes_accuracy_matches_card_onnx_and_torchscript():
    c = card("shapes")
    x, d = _heldout_images(c["seed"], N_IMG)
    acc = (ort_run(path("shapes"), {"image": x})[0].argmax(1) == d["labels"]).mean()
    assert abs(acc - c["heldout_accuracy"]) < 0.03
    assert c["heldout_accuracy"] > 0.95
    ts = load(path("shapes", "torchscript"))
    with torch.no_grad():
        out = ts(torch.from_numpy(x[:32])).numpy()
    np.testing.assert_allclose(out, ort_run(path("shapes"), {"image": x[:32]})[0], atol=1e-4, rtol=1e-4)


def _saliency(model, x, wrt, out):
    """|d score[pred] / d x| summed over channels, with our loader (one vjp per image through torch.func)."""
    maps = []
    for i in range(len(x)):
        f = model.function({wrt: torch.from_numpy(x[i:i + 1])}, wrt=wrt, output=out)
        xi = torch.from_numpy(x[i:i + 1])
        y, vjp = torch.func.vjp(f, xi)
        t = int(y.argmax(1))
        (g,) = vjp(torch.nn.functional.one_hot(torch.tensor([t]), y.shape[1]).to(y.dtype))
        maps.append(g.abs().sum(1)[0].numpy())
    return np.stack(maps)


def test_shapes_saliency_concentrates_in_object_mask():
    c = card("shapes")
    s = c["saliency_check"]
    x, d = _heldout_images(c["seed"], 40)
    m = load(path("shapes"))
    sal = _saliency(m, x, "image", "logits")
    from jacaudit.samples.shapes import _dilate

    mass = (sal * d["masks"]).sum((1, 2)) / sal.sum((1, 2))
    area = d["masks"].mean((1, 2))
    assert np.median(mass) > 0.5  # most of the plain gradient's mass lies on the object (RRR-trained) ...
    assert np.median(mass / area) > 4  # ... far beyond the object's share of the pixels
    assert abs(np.median(mass) - s["median_mass_in_mask"]) < 0.06
    grown = _dilate(d["masks"], 2)
    energy = (sal ** 2 * grown).sum((1, 2)) / (sal ** 2).sum((1, 2))
    assert np.median(energy) > 2 * np.median(grown.mean((1, 2)))
    assert abs(np.median(energy) - s["median_energy_in_mask_dilated_2px"]) < 0.1


def test_shapes_card_documents_rrr_training_and_per_method_figures():
    c = card("shapes")
    t = c["training"]
    assert "Right for the Right Reasons" in t["method"] and t["lambda"] > 0
    assert "Right-for-the-Right-Reasons" in c["truth"]
    assert "SiLU" in c["architecture"] and "ReLU" not in c["architecture"]
    j = c["saliency_check"]["jacaudit"]
    for key in ("examples", "heldout"):
        r = j[key]
        for m in ("grad", "gradxinput", "smoothgrad", "ig"):
            assert 0 <= r[m] <= 1
        assert r["grad"] > 0.5 and r["grad"] > 4 * r["median_mask_area_fraction"]
    assert j["examples"]["ig_completeness_gap_max"] < 0.05  # 50 IG steps are enough (warns above 0.1)
    assert j["heldout"]["ig_completeness_gap_max"] < 0.1


# ------------------------------------------------------------------------------------------------ shortcut
def test_shortcut_accuracy_drops_without_marker():
    c = card("shortcut")
    x_clean, d = _heldout_images(c["seed"], N_IMG)
    x_mark, dm = _heldout_images(c["seed"], N_IMG, marker="label-only")
    p_clean = ort_run(path("shortcut"), {"image": x_clean})[0]
    p_mark = ort_run(path("shortcut"), {"image": x_mark})[0]
    np.testing.assert_allclose(p_clean.sum(1), 1, atol=1e-5)  # a Softmax output
    acc_clean = (p_clean.argmax(1) == d["labels"]).mean()
    acc_mark = (p_mark.argmax(1) == dm["labels"]).mean()
    assert abs(acc_clean - c["heldout_accuracy_without_marker"]) < 0.05
    assert abs(acc_mark - c["heldout_accuracy_with_marker"]) < 0.03
    assert acc_mark - acc_clean > 0.2


def test_shortcut_graph_ends_in_softmax():
    m = load(path("shortcut"))
    assert m.softmax_input() is not None


def test_shortcut_saliency_shows_the_marker():
    from jacaudit.samples.shapes import MARKER, SIZE, marker_mask

    c = card("shortcut")
    x, d = _heldout_images(c["seed"], 24, marker="label-only")
    m = load(path("shortcut"))
    sal = _saliency(m, x, "image", "probabilities")
    mk = np.stack([marker_mask(int(k)) for k in d["corners"]])
    mass = (sal * mk).sum((1, 2)) / sal.sum((1, 2))
    share = MARKER * MARKER / SIZE / SIZE
    assert np.median(mass) > 4 * share  # the marker's saliency density: several times the average pixel's
    obj = (sal * d["masks"]).sum((1, 2)) / sal.sum((1, 2)) / d["masks"].mean((1, 2))
    assert np.median(mass) / share > np.median(obj)  # denser on the marker than on the object
    assert abs(np.median(mass) - c["saliency_check"]["median_mass_on_marker"]) < 0.03


# ------------------------------------------------------------------------------------------------ tabular
def test_tabular_csv_and_accuracy():
    from jacaudit.samples.tabular import FEATURES, make_table, read_csv

    c = card("tabular")
    x, y = read_csv(path("tabular", "data"))
    xg, yg = make_table(len(x), c["seed"], "heldout")
    np.testing.assert_allclose(x, xg, atol=1e-5)
    assert np.array_equal(y, yg)
    assert c["features"] == FEATURES and len(FEATURES) == 12
    for key in ("onnx", "onnx_legacy_exporter"):
        acc = (ort_run(path("tabular", key), {"features": x})[0].argmax(1) == y).mean()
        assert abs(acc - c["heldout_accuracy"]) < 1e-3


@pytest.mark.parametrize("key", ["onnx", "onnx_legacy_exporter"])
def test_tabular_sensitivity_ranks_relevant_features_first(key):
    from jacaudit.samples.tabular import read_csv

    c = card("tabular")
    x, _ = read_csv(path("tabular", "data"))
    x = torch.from_numpy(x[:200])
    m = load(path("tabular", key), dtype="float64")
    f = m.function({"features": x}, wrt="features", output="logits")
    J = torch.func.vmap(torch.func.jacrev(lambda r: f(r[None])[0]))(x.double())  # (n, 2, 12)
    sens = (J[:, 1] - J[:, 0]).abs().mean(0).numpy()
    ranking = [c["features"][i] for i in np.argsort(-sens)]
    assert ranking[:3] == c["relevant_features"]
    assert sens[np.argsort(-sens)[2]] > 3 * sens[np.argsort(-sens)[3]]


# ------------------------------------------------------------------------------------------------ arm
def test_arm_jacobian_equals_closed_form():
    from jacaudit.samples.arm import det_closed_form, forward_kinematics, jacobian_closed_form

    c = card("arm")
    m = load(path("arm", "torchscript"), dtype="float64")
    g = np.random.default_rng(0)
    qs = np.concatenate([g.uniform(-np.pi, np.pi, (20, 3)), [v["q"] for v in c["configurations"].values()]])
    q = torch.tensor(qs, dtype=torch.float64)
    f = m.function({"q": q[:1]}, wrt="q")
    with torch.no_grad():
        np.testing.assert_allclose(f(q).numpy(), forward_kinematics(qs), atol=1e-12)
    J = torch.func.vmap(torch.func.jacrev(f))(q).numpy()
    assert J.dtype == np.float64
    err = np.abs(J - jacobian_closed_form(qs)).max()
    assert err < 1e-10, err
    np.testing.assert_allclose(np.linalg.det(J), det_closed_form(qs), atol=1e-10)
    for name, v in c["configurations"].items():
        np.testing.assert_allclose(J[20 + list(c["configurations"]).index(name)], v["jacobian"], atol=1e-10)


def test_arm_singular_when_stretched_or_folded():
    from jacaudit.samples.arm import jacobian_closed_form

    c = card("arm")
    m = load(path("arm", "torchscript"), dtype="float64")
    for name, v in c["configurations"].items():
        q = torch.tensor(v["q"], dtype=torch.float64)
        J = torch.func.jacrev(m.function({"q": q}, wrt="q"))(q).numpy()
        sv_pos = np.linalg.svd(J[:2], compute_uv=False)
        if name in ("stretched", "folded"):
            assert sv_pos[-1] < 1e-12 and abs(np.linalg.det(J)) < 1e-12
        elif name == "elbow_aligned_only":  # det J = l1 l2 sin q2 = 0, position block still rank 2
            assert abs(np.linalg.det(J)) < 1e-12 and sv_pos[-1] > 1e-3
        else:
            assert sv_pos[-1] > 1e-3 and abs(np.linalg.det(J)) > 1e-3
        np.testing.assert_allclose(J, jacobian_closed_form(np.array(v["q"])), atol=1e-10)


# ------------------------------------------------------------------------------------------------ flow
def test_flow_log_det_matches_jacobian():
    from jacaudit.samples.flow import make_moons

    c = card("flow")
    x = torch.from_numpy(make_moons(64, c["seed"], "heldout")).double()
    m = load(path("flow"), dtype="float64")
    fz = m.function({"x": x}, wrt="x", output="z")
    J = torch.func.vmap(torch.func.jacrev(lambda p: fz(p[None])[0]))(x)  # (n, 2, 2)
    sign, logabs = torch.linalg.slogdet(J)
    with torch.no_grad():
        ld = m.run({"x": x}, outputs=["log_det_jacobian"])[0]
    err = (logabs - ld).abs().max().item()
    assert err < 1e-5, err
    assert (sign > 0).all()
    # and the float32 onnxruntime forward agrees with our float64 one
    _, ld_ort = ort_run(path("flow"), {"x": x.float().numpy()})
    np.testing.assert_allclose(ld_ort, ld.numpy(), atol=1e-4)


def test_flow_density_integrates_to_one_and_nll_matches_card():
    from jacaudit.samples.flow import grid_integral, log_density, make_moons

    c = card("flow")
    g = c["grid_check"]
    integral = grid_integral(lambda pts: tuple(ort_run(path("flow"), {"x": pts}, batch=1 << 16)),
                             {"x": g["x"], "y": g["y"], "n": 201})
    assert abs(integral - 1) < 0.02, integral
    x = make_moons(2000, c["seed"], "heldout")
    z, ld = ort_run(path("flow"), {"x": x})
    nll = float(-log_density(z.astype(np.float64), ld.astype(np.float64)).mean())
    assert abs(nll - c["heldout_nll"]) < 1e-3


# ------------------------------------------------------------------------------------------------ sequence
def test_sequence_accuracy_and_wrt_tensor():
    import onnx

    from jacaudit.samples.sequence import make_sequences

    c = card("sequence")
    proto = onnx.load(path("sequence"))
    gathers = [n for n in proto.graph.node if c["wrt_tensor"] in n.output]
    assert len(gathers) == 1 and gathers[0].op_type == "Gather"
    d = make_sequences(1000, c["seed"], "heldout")
    acc = (ort_run(path("sequence"), {"tokens": d["tokens"]})[0].argmax(1) == d["labels"]).mean()
    assert abs(acc - c["heldout_accuracy"]) < 1e-3
    assert c["heldout_accuracy"] > 0.95


def test_sequence_position_map_highlights_a_and_b():
    from jacaudit.samples.sequence import make_sequences, top2_hits

    c = card("sequence")
    d = make_sequences(60, c["seed"], "heldout")
    m = load(path("sequence"))
    maps = []
    for i in range(len(d["tokens"])):
        tok = torch.from_numpy(d["tokens"][i:i + 1])
        with torch.no_grad():
            e = m.run({"tokens": tok}, outputs=[c["wrt_tensor"]])[0]
        f = m.function({"tokens": tok}, wrt=c["wrt_tensor"], output="logits")
        J = torch.func.jacrev(f)(e)  # (1, classes, 1, L, D)
        maps.append(J[0, :, 0].norm(dim=-1).numpy())
    maps = np.stack(maps)  # (n, classes, L)
    hits = top2_hits(maps, d["pos_a"], d["pos_b"])
    assert hits > 0.6
    assert abs(hits - c["position_map_check"]["top2_positions_are_A_and_B"]) < 0.15
    # on average, A and B are the two largest positions
    s = maps.sum(1)
    rank = np.argsort(np.argsort(-s, 1), 1)
    rows = np.arange(len(s))
    assert rank[rows, d["pos_a"]].mean() < 1.5 and rank[rows, d["pos_b"]].mean() < 1.5


# ------------------------------------------------------------------------------------------------ rebuild
def _card_diffs(a, b, rtol: float, atol: float, where: str = "") -> list[str]:
    """Where two cards differ: floats beyond rtol*|b| + atol, anything else (keys, strings, ints, None,
    list lengths) when not equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in _card_diffs(a[k], b[k], rtol, atol, f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _card_diffs(x, y, rtol, atol, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and not isinstance(a, bool):
        return [] if abs(a - b) <= rtol * abs(b) + atol else [f"{where}: {a!r} != {b!r}"]
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} != {b!r}"]


def test_rebuild_arm_reproduces_card(tmp_path):
    """The script rebuilds from scratch with the same seed: the cheapest model, compared with the committed
    card and file (the full rebuild is the slow test below). Not bit for bit: the card's figures are float64
    closed forms and a LAPACK SVD, whose last bits depend on the numpy/BLAS build (the singular values that
    are 0 in exact arithmetic come out as ~1e-16 noise), so floats agree to 1e-12 relative and 1e-12 absolute
    (the Jacobian's entries are O(1)); everything else (shapes, ranks, q, strings) exactly."""
    from jacaudit.samples import build
    from jacaudit.samples.arm import LENGTHS, forward_kinematics, jacobian_closed_form

    shipped_card = card("arm")
    cards = build(["arm"], out_dir=str(tmp_path), seed=shipped_card["seed"], log=lambda *_: None)
    assert _card_diffs(cards["arm"], shipped_card, rtol=1e-12, atol=1e-12) == []
    # the shipped configurations are the closed form (a card with a wrong arm fails here and above)
    for name, cfg in shipped_card["configurations"].items():
        q = np.array(cfg["q"])
        np.testing.assert_allclose(cfg["output"], forward_kinematics(q, LENGTHS), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cfg["jacobian"], jacobian_closed_form(q, LENGTHS), rtol=1e-12, atol=1e-12)
    # TorchScript archives are not byte-stable across processes (torch writes some constants in hash
    # order), and the shipped file was scripted by another torch release: compare what the files compute,
    # with each other and with the float64 closed form, to float64 rounding.
    import jacaudit

    rebuilt = jacaudit.load(str(tmp_path / "arm" / "arm.pt"))
    shipped = jacaudit.load(path("arm", "torchscript"))
    q = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.0, 0.0], [1.0, 3.14159, -0.5]], dtype=torch.float64)
    y_cf = torch.from_numpy(forward_kinematics(q.numpy(), LENGTHS))
    J_cf = torch.from_numpy(jacobian_closed_form(q.numpy(), LENGTHS))
    for m in (rebuilt, shipped):
        y = m(q)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, y_cf, rtol=1e-12, atol=1e-12)
        J = torch.func.jacrev(lambda t: m(t))(q)  # (3, 3, 3, 3): block diagonal over the batch
        torch.testing.assert_close(torch.stack([J[i, :, i] for i in range(len(q))]), J_cf, rtol=1e-12, atol=1e-12)
        assert J.abs().sum() - sum(J[i, :, i].abs().sum() for i in range(len(q))) == 0
    torch.testing.assert_close(rebuilt(q), shipped(q), rtol=1e-13, atol=1e-13)


@pytest.mark.slow
def test_full_rebuild_reproduces_cards(tmp_path):
    from jacaudit.samples import build

    cards = build(None, out_dir=str(tmp_path), seed=0, log=lambda *_: None)
    for n in MODELS:
        a, b = cards[n], card(n)
        for k in ("inputs", "outputs", "classes"):
            assert a[k] == b[k], (n, k)
        # retrained with the same seed: the same accuracies with the torch release that built the files; another
        # release rounds differently in training, so allow the card's figures to move by 0.01 (a few examples)
        for k in ("train_accuracy", "heldout_accuracy"):
            assert (a[k] is None) == (b[k] is None), (n, k)
            assert a[k] is None or abs(a[k] - b[k]) <= 0.01, (n, k, a[k], b[k])
        for f in b["files"].values():
            new, old = str(tmp_path / n / f), os.path.join(SM, n, f)
            if f.endswith(".pt"):  # scripted code lists constants in hash order: compare the weights instead
                sa, sb = torch.jit.load(new).state_dict(), torch.jit.load(old).state_dict()
                assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f
                continue
            with open(new, "rb") as x, open(old, "rb") as y:  # byte-identical with the same library versions
                if x.read() != y.read():
                    pytest.xfail(f"{n}/{f} differs from the committed file (other torch/onnx version?)")
