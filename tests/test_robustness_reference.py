"""FGSM / PGD (issue 11) against a short hand-written torch reference, bit for bit, and flip rates against
torchattacks' FGSM / PGD and ART's FastGradientMethod on the same TorchScript module.

The reference below is plain torch on ``torch.jit.load`` of the sample CNN and shares no code with jacaudit; it
follows the recipe documented in ``jacaudit/engine/attacks.py`` (loss: cross-entropy summed over the batch;
FGSM ``clip(u + eps * sign(g))``; PGD L-inf random start ``clip(u + (2 * rand - 1) * eps)``, steps
``delta = clamp(u' + alpha * sign(g) - u, -eps, eps)``, ``u' = clip(u + delta)``; PGD L2 as torchattacks'
PGDL2; the engine's ``pgd`` draws its random start from one ``torch.Generator`` batch after batch, the analysis per
input: a generator per input seeded with BLAKE2b(seed, use, input id)). The shapes model takes
pixel / 255 unnormalised, so the attack space is the model input and the valid range is [0, 1].

Why these comparisons can fail (no vacuous test):

* every adversarial tensor is compared with ``torch.equal``: a wrong epsilon, alpha, clip, projection, step
  count, seed or generator order changes bits (``test_fgsm_*`` also checks that a 0.1% wrong epsilon is caught);
* a loss *averaged* instead of summed does not change a sign-based attack at all when the batch is a power of
  two (the gradient is scaled by 2**-k exactly, and the L2 step is normalised), so it is caught where it shows:
  the loss gradient itself (``torch.equal`` with the summed-loss reference; the mean gradient is checked to
  differ) and the per-input gradient norms of the analysis;
* sweep numbers are compared exactly (counts / n in float64, margins in float32), at epsilons whose flip rates
  differ from each other, so swapping or mis-scaling an epsilon moves them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models/shapes/shapes_cnn.pt"


# ---------------------------------------------------------------------------------------------------------
# The hand-written reference (plain torch)
# ---------------------------------------------------------------------------------------------------------
def ref_grad(net, u, y):
    """Gradient of the cross-entropy summed over the batch."""
    u = u.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(net(u), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, u)
    return g


def ref_grads(net, u, y, B):
    return torch.cat([ref_grad(net, u[s:s + B], y[s:s + B]) for s in range(0, len(u), B)])


def ref_scores(net, u, B):
    with torch.no_grad():
        return torch.cat([net(u[s:s + B]) for s in range(0, len(u), B)])


def l2(t):
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).reshape(-1, 1, 1, 1)


def ref_input_generators(seed, stream, ids):
    """The analysis' per-input random numbers (documented in jacaudit.engine.attacks): a CPU generator per input,
    seeded with the first 8 bytes (little-endian, top bit cleared) of BLAKE2b("seed\x1fstream\x1fid")."""
    import hashlib

    out = []
    for i in ids:
        h = hashlib.blake2b(f"{seed}\x1f{stream}\x1f{i}".encode(), digest_size=8).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(h, "little") & (2 ** 63 - 1)))
    return out


def ref_pgd(net, u, y, eps, alpha, steps, norm, random_start, gen):
    """One batch; ``gen`` one generator for the batch, or a list of one per input."""
    adv = u.clone()
    if random_start:
        if isinstance(gen, list) and norm == "linf":
            noise = torch.stack([torch.rand(u.shape[1:], generator=g, dtype=u.dtype) for g in gen])
        elif norm == "linf":
            noise = torch.rand(u.shape, generator=gen, dtype=u.dtype)
        elif isinstance(gen, list):
            pairs = [(torch.randn(u.shape[1:], generator=g, dtype=u.dtype),
                      torch.rand((1, 1, 1), generator=g, dtype=u.dtype)) for g in gen]
            n, r = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
        else:
            n = torch.randn(u.shape, generator=gen, dtype=u.dtype)
            r = torch.rand((u.shape[0], 1, 1, 1), generator=gen, dtype=u.dtype)
        if norm == "linf":
            adv = (adv + (2 * noise - 1) * eps).clamp(0, 1)
        else:
            # grouped as the engine computes it: n * (r / ||n||) * eps. The docstring's ``r * eps * n / ||n||``
            # rounds differently (about a third of the elements differ in the last bit).
            adv = (adv + n * (r / l2(n)) * eps).clamp(0, 1)
    for _ in range(steps):
        g = ref_grad(net, adv, y)
        if norm == "linf":
            delta = torch.clamp(adv + alpha * g.sign() - u, -eps, eps)
        else:
            delta = adv + alpha * g / (l2(g) + 1e-10) - u
            delta = delta * torch.clamp(eps / l2(delta), max=1.0)
        adv = (u + delta).clamp(0, 1)
    return adv


def ref_pgd_all(net, u, y, eps, steps, norm, B, gen, random_start=True):
    alpha = eps * (2.5 / steps)   # the default step: eps * 2.5 / steps (Madry et al.)
    return torch.cat([ref_pgd(net, u[s:s + B], y[s:s + B], eps, alpha, steps, norm, random_start,
                              gen[s:s + B] if isinstance(gen, list) else gen)
                      for s in range(0, len(u), B)])


def ref_margin(z, y):
    zy = z.gather(1, y[:, None]).squeeze(1)
    other = z.clone()
    other[torch.arange(len(y)), y] = float("-inf")
    return zy - other.max(1).values


def ref_analysis(net, u, y, eps, eps_l2, steps, B, seed, worst, ids):
    """The sweep (FGSM, PGD L-inf, PGD L2) and the adversarial examples of the most fragile inputs (``ids``: the
    inputs' stable ids, which seed their random starts). Means over inputs in float64 (numpy), in run order."""
    n = len(u)
    z0 = ref_scores(net, u, B)
    pred0, m0 = z0.argmax(1), ref_margin(z0, y)
    g0 = ref_grads(net, u, y, B)
    sweep, first, first_adv = [], {}, torch.zeros_like(u)

    def point(attack, e, adv):
        z = ref_scores(net, adv, B)
        pred = z.argmax(1)
        drop = m0 - ref_margin(z, y)
        flipped = pred != pred0
        sweep.append((attack, float(e), int((pred == y).sum()) / n, int(flipped.sum()) / n,
                      float(np.mean(drop.numpy().astype(np.float64))), float(drop.max())))
        if attack != "pgd-l2":
            for i in torch.nonzero(flipped).flatten().tolist():
                if i not in first or e < first[i][1]:
                    first[i] = (attack, e)
                    first_adv[i] = adv[i]

    for e in eps:
        point("fgsm", e, (u + e * g0.sign()).clamp(0, 1))
    for k, e in enumerate(eps):
        point("pgd-linf", e, ref_pgd_all(net, u, y, e, steps, "linf", B,
                                         ref_input_generators(seed, f"pgd-linf/{k}", ids)))
    for k, e in enumerate(eps_l2):
        point("pgd-l2", e, ref_pgd_all(net, u, y, e, steps, "l2", B, ref_input_generators(seed, f"pgd-l2/{k}", ids)))
    order = sorted(first, key=lambda i: (first[i][1], float(m0[i]), i))[:worst]
    arts = {f"adversarial/{i:04d}_{first[i][0]}_eps{first[i][1]:.6g}.npy": first_adv[i].numpy() for i in order}
    return sweep, arts, l2(g0).flatten()


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _eager_torchscript():
    """Run the reference's (and torchattacks' / ART's) TorchScript module without the profiling executor's
    optimisation, as jacaudit's TorchScript loader runs its own.

    With it on (torch's default), a scripted module's first call per input shape runs the aten kernels and later
    calls a DifferentiableGraph whose backward uses TorchScript's own derivative formulas (here SiLU's): the
    loss gradient at the *same* input changes in ~86% of its elements by up to ~2e-7 relative between call 1
    and call 2. Bits then depend on how often, and with which batch shapes, a module instance was called before,
    so PGD-L2 (which uses gradient values, not signs) differed in the last bit between two module instances with
    different histories; signs (FGSM, PGD L-inf) agreed either way. Must be active before a module's first call
    (an optimised plan, once made, stays). See test_torchscript_gradients_do_not_depend_on_call_history."""
    with torch.jit.optimized_execution(False):
        yield


def test_torchscript_gradients_do_not_depend_on_call_history(heldout):
    """jacaudit's gradient at one input is the same on every call, and equal to torch's eager (first-call)
    gradient, even with TorchScript's optimiser switched on around it; a plain torch.jit.load module's is not
    (which is what this test would see if the loader ran the optimised plan)."""
    from jacaudit import models
    from jacaudit.engine.attacks import Box, Objective, loss_and_grad
    from jacaudit.engine.gradients import make_scorer

    _, x, y = heldout
    x, y = x[:8], y[:8]
    with torch.jit.optimized_execution(True):
        m = models.load(str(MODEL))
        obj = Objective(make_scorer(m, m.input_spec(None).name), Box(torch.ones(()), torch.zeros(()), 0.0, 1.0))
        ours = [loss_and_grad(obj, x, y)[0] for _ in range(4)]
        plain = torch.jit.load(str(MODEL)).eval()
        theirs = [ref_grad(plain, x, y) for _ in range(4)]
    assert torch.equal(ours[0], theirs[0])                  # call 1: both eager aten derivatives
    assert all(torch.equal(g, ours[0]) for g in ours[1:])   # jacaudit: every call the same
    assert not all(torch.equal(g, theirs[0]) for g in theirs[1:]), (
        "torch's optimised TorchScript plan no longer changes gradient bits between calls: this test no longer "
        "shows anything (and the loader's optimized_execution(False) may be unnecessary)")


@pytest.fixture(scope="module")
def heldout():
    """64 regenerated held-out images of the model card (make_images(..., seed=0, split='heldout'))."""
    from jacaudit.samples.shapes import make_images, to_tensor

    d = make_images(64, 0, "heldout")
    return d["images"], torch.from_numpy(to_tensor(d["images"])), torch.from_numpy(d["labels"])


@pytest.fixture(scope="module")
def net():
    return torch.jit.load(str(MODEL)).eval()


@pytest.fixture(scope="module")
def ours():
    """jacaudit's objective on the model file as jacaudit loads it (TorchScript wrapper, scorer, image box)."""
    from jacaudit import data as D
    from jacaudit import models
    from jacaudit.analyses.robustness import image_box
    from jacaudit.engine.attacks import Objective
    from jacaudit.engine.gradients import make_scorer

    m = models.load(str(MODEL))
    spec = m.input_spec(None)
    box = image_box(D.Preprocess.infer(spec.shape)).to(m.device, torch.float32)
    return Objective(make_scorer(m, spec.name), box), box


def _engine_loss_grad(obj, u, y, B):
    from jacaudit.engine.attacks import loss_and_grad

    return torch.cat([loss_and_grad(obj, u[s:s + B], y[s:s + B])[0] for s in range(0, len(u), B)])


# ---------------------------------------------------------------------------------------------------------
# Bit for bit: engine functions
# ---------------------------------------------------------------------------------------------------------
def test_fgsm_and_loss_gradient_bit_identical(heldout, net, ours):
    from jacaudit.engine.attacks import fgsm

    _, x, y = heldout
    obj, box = ours
    B = 32
    u = box.attack_point(x)
    assert torch.equal(u, x)                     # pixel / 255 unnormalised: the attack space is the input
    g = _engine_loss_grad(obj, u, y, B)
    g_ref = ref_grads(net, x, y, B)
    assert torch.equal(g, g_ref)                 # the summed loss ...
    g_mean = torch.cat([_mean_grad(net, x[s:s + B], y[s:s + B]) for s in range(0, len(x), B)])
    assert not torch.equal(g, g_mean)            # ... which an averaged loss would not give
    assert torch.equal(g_mean.sign(), g.sign())  # (its signs agree: what torchattacks' equality relies on)
    for eps in (1 / 255, 0.01, 0.03):
        adv = fgsm(u, g, eps, box)
        ref = (x + eps * g_ref.sign()).clamp(0, 1)
        assert torch.equal(adv, ref), eps
        assert not torch.equal(adv, (x + eps * 1.001 * g_ref.sign()).clamp(0, 1))  # a wrong eps is caught


def _mean_grad(net, u, y):
    u = u.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(u), y), u)
    return g


@pytest.mark.parametrize("norm,eps", [("linf", 0.01), ("l2", 0.5)])
def test_pgd_random_start_bit_identical(heldout, net, ours, norm, eps):
    """Seeded random start, batches of 16, 16, 8 drawn from one generator in order."""
    from jacaudit.engine.attacks import pgd

    _, x, y = heldout
    obj, box = ours
    x, y, B, steps = x[:40], y[:40], 16, 4
    gen = torch.Generator().manual_seed(0)
    adv = torch.cat([pgd(obj, x[s:s + B], y[s:s + B], eps, box, steps=steps, alpha=eps * (2.5 / steps), norm=norm,
                         random_start=True, generator=gen) for s in range(0, len(x), B)])
    ref = ref_pgd_all(net, x, y, eps, steps, norm, B, torch.Generator().manual_seed(0))
    assert torch.equal(adv, ref)
    d = (adv - x).reshape(len(x), -1)
    if norm == "linf":
        assert float(d.abs().max()) <= eps + 1e-7 and float((d.abs() > 0.9 * eps).float().mean()) > 0.5
    else:
        assert float(d.norm(dim=1).max()) <= eps * (1 + 1e-5) and float(d.norm(dim=1).min()) > 0.5 * eps
    # the seed matters: one step from another seed's random start differs (so equality above is not vacuous)
    one = ref_pgd_all(net, x[:B], y[:B], eps, 1, norm, B, torch.Generator().manual_seed(1))
    assert not torch.equal(one, ref_pgd_all(net, x[:B], y[:B], eps, 1, norm, B, torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------------------------------------------
# Bit for bit: the whole command (images in class folders -> --json and the saved .npy artifacts)
# ---------------------------------------------------------------------------------------------------------
def test_cli_sweep_and_artifacts_equal_reference(heldout, net, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from jacaudit.cli.main import app
    from jacaudit.samples.shapes import CLASSES

    images, x, y = heldout
    N, B, steps = 24, 10, 3                       # batches of 10, 10, 4
    root = tmp_path / "imgs"
    for i in range(N):
        (root / CLASSES[int(y[i])]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(root / CLASSES[int(y[i])] / f"{i:03d}.png")
    out = tmp_path / "out"
    eps = (0.002, 0.006, 0.02)
    r = CliRunner().invoke(app, ["robustness", str(MODEL), str(root), "--json", "--out", str(out),
                                 "--eps", ",".join(map(str, eps)), "--pgd-norm", "linf,l2", "--pgd-steps", str(steps),
                                 "--bisect", "0", "--norm-limit", "0", "--batch-size", str(B), "--worst", "4",
                                 "--seed", "0", "--format", "json"])
    assert r.exit_code in (0, 1), r.output
    res = json.loads(r.stdout)["result"]
    # the samples in the order jacaudit read them (sorted class folders)
    order = [int(Path(i["source"]).stem) for i in res["inputs"]]
    assert sorted(order) == list(range(N)) and [i["label"] for i in res["inputs"]] == y[order].tolist()
    u, yy = x[order], y[order]
    eps_l2 = tuple(res["eps_l2"])
    assert eps_l2 == tuple(e * float(np.sqrt(3 * 64 * 64)) for e in eps)
    ids = [str(Path(i["source"]).relative_to(root)).replace("\\", "/") for i in res["inputs"]]
    sweep, arts, gnorm = ref_analysis(net, u, yy, eps, eps_l2, steps, B, 0, 4, ids)
    got = [(p["attack"], p["eps"], p["robust_accuracy"], p["flip_rate"], p["mean_margin_drop"],
            p["worst_margin_drop"]) for p in res["sweep"]]
    assert got == sweep
    flips = [p[3] for p in sweep]
    assert len(set(flips[:3])) == 3 and len(set(flips[3:6])) == 3     # every epsilon is told apart
    # per-input gradient norms (the summed loss: an averaged one would be 1/10 or 1/4 of these)
    assert [i["gradient_norm"] for i in res["inputs"]] == gnorm.tolist()
    # the adversarial examples saved for the most fragile inputs
    saved = {str(p.relative_to(out)): np.load(p) for p in (out / "adversarial").glob("*.npy")}
    assert sorted(saved) == sorted(arts) and len(arts) == 4
    for k in arts:
        assert saved[k].dtype == arts[k].dtype and np.array_equal(saved[k], arts[k]), k
    assert sorted(e["npy"] for e in res["examples"]) == sorted(arts)


# ---------------------------------------------------------------------------------------------------------
# Flip rates against torchattacks and ART (same TorchScript module, 64 held-out images, batches of 32)
# ---------------------------------------------------------------------------------------------------------
EPS = (1 / 255, 0.01, 0.03)
PGD_EPS, PGD_STEPS = (1 / 255, 0.01), 5


@pytest.fixture(scope="module")
def analysis64(heldout, tmp_path_factory):
    """jacaudit's analysis on the 64 images (an .npz), PGD without random start (comparable to torchattacks)."""
    from jacaudit import data as D
    from jacaudit import models
    from jacaudit.analyses.robustness import RobustnessOptions, array_box, robustness
    from jacaudit.data.dataset import load_dataset

    _, x, y = heldout
    p = tmp_path_factory.mktemp("npz") / "heldout.npz"
    np.savez(p, x=x.numpy(), y=y.numpy())
    m = models.load(str(MODEL))
    spec = m.input_spec(None)
    data = load_dataset(str(p), D.Preprocess.infer(spec.shape), spec, input_names=[s.name for s in m.inputs])
    box, _ = array_box(np.stack([s.array for s in data.samples]), None)
    opts = RobustnessOptions(eps=EPS, pgd_steps=PGD_STEPS, random_start=False, bisect_steps=0, norm_limit=0,
                             fd_inputs=0, batch_size=32, worst=0)
    res = robustness(m, data, box, opts).result
    return {(p.attack, p.eps): (p.robust_accuracy, p.flip_rate) for p in res.sweep}


def _rates(net, x, y, adv):
    p0 = ref_scores(net, x, 64).argmax(1)
    p = ref_scores(net, adv, 64).argmax(1)
    return int((p == y).sum()) / len(y), int((p != p0).sum()) / len(y)


# Tolerance: none. torchattacks and ART average the loss over the batch where we sum it; with batches of 32 the
# mean's gradient is the sum's times 2**-5 *exactly* (a power-of-two scaling commutes with every rounding, no
# gradient here is near the subnormal range), so every sign -- hence every adversarial pixel -- is identical and
# the flip rates are equal, not just close. (With a batch size that is not a power of two, a sign could only
# differ where a gradient element rounds to exactly zero in one and not the other; the tolerance would then be
# one input per such element, 1/64 -- not needed here.) Each rate is a count over 64 inputs, and the rates at the
# three epsilons differ, so a wrong epsilon or a different attack moves them.
def test_flip_rates_match_torchattacks(heldout, net, ours, analysis64):
    ta = pytest.importorskip("torchattacks")
    from jacaudit.engine.attacks import fgsm, pgd

    _, x, y = heldout
    obj, box = ours
    B = 32
    seen = []
    g = _engine_loss_grad(obj, x, y, B)
    for eps in EPS:
        atk = ta.FGSM(net, eps=eps)
        adv = torch.cat([atk(x[s:s + B], y[s:s + B]) for s in range(0, 64, B)])
        assert torch.equal(adv, fgsm(x, g, eps, box)), eps        # the examples themselves, not only the rates
        assert _rates(net, x, y, adv) == analysis64[("fgsm", eps)], eps
        seen.append(analysis64[("fgsm", eps)][1])
    for eps in PGD_EPS:
        alpha = eps * (2.5 / PGD_STEPS)
        atk = ta.PGD(net, eps=eps, alpha=alpha, steps=PGD_STEPS, random_start=False)
        adv = torch.cat([atk(x[s:s + B], y[s:s + B]) for s in range(0, 64, B)])
        mine = torch.cat([pgd(obj, x[s:s + B], y[s:s + B], eps, box, steps=PGD_STEPS, alpha=alpha,
                              random_start=False) for s in range(0, 64, B)])
        assert torch.equal(adv, mine), eps
        assert _rates(net, x, y, adv) == analysis64[("pgd-linf", eps)], eps
        seen.append(analysis64[("pgd-linf", eps)][1])
    assert len(set(seen[:3])) == 3 and 0 < min(seen) and max(seen) < 1


def test_flip_rates_match_art_fgm(heldout, net, analysis64):
    pytest.importorskip("art")
    from art.attacks.evasion import FastGradientMethod
    from art.estimators.classification import PyTorchClassifier

    _, x, y = heldout
    clf = PyTorchClassifier(model=net, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 64, 64), nb_classes=4,
                            clip_values=(0.0, 1.0))
    g = ref_grads(net, x, y, 32)
    for eps in EPS:
        adv = FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=32).generate(x.numpy(), y=y.numpy())
        assert adv.dtype == np.float32 and np.array_equal(adv, (x + eps * g.sign()).clamp(0, 1).numpy()), eps
        assert _rates(net, x, y, torch.from_numpy(adv)) == analysis64[("fgsm", eps)], eps
