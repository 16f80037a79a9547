"""Robustness benchmark (issue 11), side by side in one process; ratios printed (lower is better for ours).

1. FGSM and PGD-10 (L-inf) over 64 held-out sample images, jacaudit vs torchattacks on the same torch module:
   jacaudit loads ``sample_models/shapes/shapes_cnn.pt`` with its own loader and runs the engine functions the
   analysis runs, with the analysis's batching (``loss_and_grad`` + ``fgsm`` per batch; ``pgd`` per batch from
   one seeded generator); torchattacks gets ``torch.jit.load`` of the same file. Extra rows: FGSM as the analysis
   computes its clean gradient (``with_margin=True``: a second backward for the margin's gradient, used by the
   linearisation columns), jacaudit on the ONNX twin ``shapes_cnn.onnx`` (our interpreter), and torchattacks on a
   module run with TorchScript's profiling-executor optimisation off (``torch.jit.optimized_execution(False)``,
   as jacaudit's TorchScript loader runs every module so that gradients do not depend on the call history; the
   ``torchattacks`` row itself is torch's default, optimised after the first calls). ``fgsm-sweep``: the
   analysis's FGSM sweep over its default 4 epsilons (clean loss + margin gradients once, then per epsilon fgsm and
   a scoring forward for the flip rate) vs torchattacks' FGSM at each epsilon + the same scoring forward.
   Batch 32 and 64,
   1 thread and the default threads; variants run round-robin in every round (rotating order), median of rounds.
   Target: jacaudit <= 1.1x torchattacks.
2. The spectral-norm estimator (``top_singular`` on a ``Target``, as the analysis builds it): iterations, batched
   jvp/vjp passes, jvp+vjp vector products and wall time vs ``torch.func.jacrev`` + ``torch.linalg.svdvals`` of
   the full J at the same input, with the estimate's relative error: the shapes CNN (J 4 x 12288) and a random
   MLP 3072-512-1000 (J 1000 x 3072).

    python benchmarks/bench_robustness.py [--rounds 5] [--only attacks,spectral] [--batches 32,64]
        [--threads 1,0]   (0: torch's default)
    python benchmarks/bench_robustness.py --only profile   (torch.profiler of one batch: where the time goes)

torchattacks is optional (``pip install torchattacks`` into the benchmark environment, without torchvision); without
it part 1 prints jacaudit's times only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", category=DeprecationWarning)

PT = os.path.join(ROOT, "sample_models/shapes/shapes_cnn.pt")
ONNX = os.path.join(ROOT, "sample_models/shapes/shapes_cnn.onnx")
EPS = 8 / 255
STEPS = 10
SWEEP = (0.001, 0.003, 0.01, 0.03)   # the analysis's default epsilons


def _objective(path: str):
    """jacaudit's objective on a model file, as the analysis builds it (loader, scorer, image box)."""
    from jacaudit import data as D
    from jacaudit import models
    from jacaudit.analyses.robustness import image_box
    from jacaudit.engine.attacks import Objective
    from jacaudit.engine.gradients import make_scorer

    m = models.load(path)
    spec = m.input_spec(None)
    box = image_box(D.Preprocess.infer(spec.shape)).to(m.device, torch.float32)
    return Objective(make_scorer(m, spec.name), box), box


def _batches(n, b):
    return [(s, min(n, s + b)) for s in range(0, n, b)]


def _data(n=64):
    from jacaudit.samples.shapes import make_images, to_tensor

    d = make_images(n, 0, "heldout")
    return torch.from_numpy(to_tensor(d["images"])), torch.from_numpy(d["labels"])


# ---- 1. attacks ----------------------------------------------------------------------------------------
def attack_variants(x, y, B, ta):
    from jacaudit.engine.attacks import fgsm, loss_and_grad, pgd

    obj, box = _objective(PT)
    obj_onnx, box_onnx = _objective(ONNX)
    u = box.attack_point(x)
    v = {}

    def our_fgsm(o, bx, with_margin=False):
        def run():
            return torch.cat([fgsm(u[s:e], loss_and_grad(o, u[s:e], y[s:e], with_margin=with_margin)[0], EPS, bx)
                              for s, e in _batches(len(u), B)])
        return run

    def our_pgd(o, bx):
        def run():
            gen = torch.Generator().manual_seed(0)
            return torch.cat([pgd(o, u[s:e], y[s:e], EPS, bx, steps=STEPS, alpha=EPS * (2.5 / STEPS),
                                  random_start=True, generator=gen) for s, e in _batches(len(u), B)])
        return run

    def unoptimised(fn):
        def run():
            with torch.jit.optimized_execution(False):
                return fn()
        return run

    def our_sweep(o, bx):
        """The analysis's FGSM sweep: the clean loss and margin gradients once, then per eps fgsm + a scoring
        forward (the flip rate)."""
        def run():
            g = torch.cat([loss_and_grad(o, u[s:e], y[s:e], with_margin=True)[0] for s, e in _batches(len(u), B)])
            with torch.no_grad():
                return [torch.cat([o(fgsm(u[s:e], g[s:e], eps, bx)).argmax(1) for s, e in _batches(len(u), B)])
                        for eps in SWEEP]
        return run

    v["fgsm", "jacaudit .pt"] = our_fgsm(obj, box)
    v["fgsm", "jacaudit .pt, analysis (with margin grad)"] = our_fgsm(obj, box, True)
    v["fgsm", "jacaudit .onnx"] = our_fgsm(obj_onnx, box_onnx)
    v["fgsm-sweep", "jacaudit .pt, as the analysis"] = our_sweep(obj, box)
    v["pgd10", "jacaudit .pt"] = our_pgd(obj, box)
    v["pgd10", "jacaudit .onnx"] = our_pgd(obj_onnx, box_onnx)
    if ta is not None:
        net = torch.jit.load(PT).eval()
        f = ta.FGSM(net, eps=EPS)
        p = ta.PGD(net, eps=EPS, alpha=EPS * (2.5 / STEPS), steps=STEPS, random_start=True)
        v["fgsm", "torchattacks"] = lambda: torch.cat([f(x[s:e], y[s:e]) for s, e in _batches(len(x), B)])
        v["pgd10", "torchattacks"] = lambda: torch.cat([p(x[s:e], y[s:e]) for s, e in _batches(len(x), B)])
        scorer = torch.jit.load(PT).eval()   # its own module for the no-grad forwards (no plan thrash with net's)

        def their_sweep():
            out = []
            for eps in SWEEP:
                a = ta.FGSM(net, eps=eps)
                preds = []
                for s, e in _batches(len(x), B):
                    adv = a(x[s:e], y[s:e])
                    with torch.no_grad():
                        preds.append(scorer(adv).argmax(1))
                out.append(torch.cat(preds))
            return out

        v["fgsm-sweep", "torchattacks"] = their_sweep
        net2 = torch.jit.load(PT).eval()   # a second module, only ever run with TorchScript's optimiser off
        f2 = ta.FGSM(net2, eps=EPS)
        p2 = ta.PGD(net2, eps=EPS, alpha=EPS * (2.5 / STEPS), steps=STEPS, random_start=True)
        v["fgsm", "torchattacks, TorchScript unoptimised"] = unoptimised(
            lambda: torch.cat([f2(x[s:e], y[s:e]) for s, e in _batches(len(x), B)]))
        v["pgd10", "torchattacks, TorchScript unoptimised"] = unoptimised(
            lambda: torch.cat([p2(x[s:e], y[s:e]) for s, e in _batches(len(x), B)]))
    return v


def bench_attacks(args, ta):
    x, y = _data(64)
    default_threads = torch.get_num_threads()
    settings = [(int(b), int(t) or default_threads) for t in args.threads.split(",") for b in args.batches.split(",")]
    variants = {}
    for B, T in settings:
        torch.set_num_threads(T)
        vs = attack_variants(x, y, B, ta)
        for fn in vs.values():       # warm-up: TorchScript's profiling executor optimises on the 2nd call per shape
            fn(), fn()
        variants[B, T] = vs
    times = {(B, T, k): [] for (B, T), vs in variants.items() for k in vs}
    for r in range(args.rounds):
        for (B, T), vs in variants.items():
            torch.set_num_threads(T)
            keys = list(vs)
            keys = keys[r % len(keys):] + keys[:r % len(keys)]       # rotate the order every round
            for k in keys:
                t0 = time.perf_counter()
                vs[k]()
                times[B, T, k].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)
    torch.set_num_threads(default_threads)
    print(f"\n[FGSM and PGD-{STEPS} (L-inf, eps 8/255, random start) over 64 shapes images; median of {args.rounds} "
          f"interleaved rounds, ms; ratio vs torchattacks]")
    print("| attack | batch | threads | variant | ms (median) | ms (min) | x torchattacks (median) | (min) |")
    print("|---|---|---|---|---|---|---|---|")
    for (B, T), vs in variants.items():
        for atk in ("fgsm", "fgsm-sweep", "pgd10"):
            base = times.get((B, T, (atk, "torchattacks")))
            for (a, name) in vs:
                if a != atk:
                    continue
                ts = times[B, T, (a, name)]
                med = statistics.median(ts)
                r1 = f"{med / statistics.median(base):.2f}x" if base else "n/a"
                r2 = f"{min(ts) / min(base):.2f}x" if base else "n/a"
                print(f"| {atk} | {B} | {T} | {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {r1} | {r2} |")


def profile(args, ta):
    """torch.profiler on one batch of 32, 1 thread: FGSM (ours, ours as the analysis, torchattacks) and PGD-10
    (ours, torchattacks with TorchScript optimised / unoptimised); top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as prof

    x, y = _data(32)
    torch.set_num_threads(1)
    vs = attack_variants(x, y, 32, ta)
    for key in [("fgsm", "jacaudit .pt"), ("fgsm", "jacaudit .pt, analysis (with margin grad)"),
                ("fgsm", "torchattacks"), ("pgd10", "jacaudit .pt"), ("pgd10", "torchattacks"),
                ("pgd10", "torchattacks, TorchScript unoptimised")]:
        fn = vs.get(key)
        if fn is None:
            continue
        fn(), fn()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            fn()
        print(f"\n[profile: {key[0]}, batch 32, 1 thread, {key[1]}]")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


# ---- 2. spectral norm ----------------------------------------------------------------------------------
def _median_time(fns, rounds):
    ts = {k: [] for k in fns}
    for r in range(rounds):
        keys = list(fns)
        keys = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in keys:
            t0 = time.perf_counter()
            fns[k]()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def bench_spectral(args):
    from jacaudit.engine.core import Target
    from jacaudit.engine.estimators import top_singular

    torch.set_num_threads(1)
    x, _ = _data(1)
    obj, box = _objective(PT)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 512), torch.nn.Tanh(),
                              torch.nn.Linear(512, 1000)).eval()
    for p in mlp.parameters():
        p.requires_grad_(False)
    cases = [("shapes CNN (.pt via jacaudit), J 4 x 12288", lambda v: obj(v), box.attack_point(x)),
             ("random MLP 3072-512-1000, J 1000 x 3072", mlp, torch.rand(1, 3, 32, 32))]
    print(f"\n[spectral norm: top_singular (subspace iteration, jvp + vjp) vs jacrev + svdvals; 1 thread; median of "
          f"{args.rounds} interleaved rounds]")
    print("| model | method | iterations | batched jvp / vjp passes | jvp+vjp vector products | ms | x full | "
          "rel. error of sigma_1..k |")
    print("|---|---|---|---|---|---|---|---|")
    for name, f, x0 in cases:
        def full():
            return torch.linalg.svdvals(torch.func.jacrev(f)(x0).reshape(-1, x0.numel()))
        S = full()
        fns = {"full": full}
        ests = {}
        for k in (1, 3):
            def est(k=k):
                t = Target(f, x0, name="x")
                return top_singular(t, k=k, seed=0)
            fns[f"k={k}"] = est
            ests[k] = est()
        med = _median_time(fns, args.rounds)
        print(f"| {name} | jacrev + svdvals (full J) | | 0 / 1 (vmapped over {S.numel()} rows) | {S.numel()} vjp "
              f"| {med['full'] * 1e3:.1f} | 1.00x | (reference) |")
        for k, se in ests.items():
            rel = [abs(a - float(b)) / float(b) for a, b in zip(se.values, S[:k])]
            print(f"| {name} | top_singular k={k} (tol 1e-4, converged={se.converged}) | {se.iterations} | "
                  f"{se.iterations} / {se.iterations} | {se.matvecs} | {med[f'k={k}'] * 1e3:.1f} | "
                  f"{med[f'k={k}'] / med['full']:.2f}x | {', '.join(f'{r:.1e}' for r in rel)} |")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="attacks,spectral")
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--threads", default="1,0")
    ap.add_argument("--profile-rows", type=int, default=12)
    args = ap.parse_args(argv)
    try:
        import torchattacks as ta
    except Exception as e:  # noqa: BLE001
        print(f"torchattacks does not import ({type(e).__name__}: {e}); jacaudit's times only")
        ta = None
    print(f"torch {torch.__version__}, default threads {torch.get_num_threads()}, "
          f"torchattacks {getattr(ta, '__version__', 'absent')}")
    only = set(args.only.split(","))
    if "attacks" in only:
        bench_attacks(args, ta)
    if "spectral" in only:
        bench_spectral(args)
    if "profile" in only:
        profile(args, ta)


if __name__ == "__main__":
    main()
