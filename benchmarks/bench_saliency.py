"""Saliency benchmark, side by side in one process (ratios printed; lower is better).

1. ours vs Captum on the same torch module: Saliency (vanilla gradient) and IntegratedGradients (50 steps).
   Target: ours <= 1.0x Captum. Captum gets its target precomputed (not timed); ours picks the top-1 class
   inside the same forward. Captum is optional (``pip install captum`` into the venv for the benchmark only);
   without it that part is skipped with a message.
2. IG(50) vs 50 batched forward+backward passes of the raw module (the floor any IG pays). Target <= 1.3x.
3. our gradient on the ONNX export (through the interpreter) vs onnxruntime's forward. Target <= 3x.

    python benchmarks/bench_saliency.py [--batch 8] [--repeats 7] [--threads 1] [--model PATH.pt|.onnx]

By default a 64x64 CNN the size of the shapes sample model (random weights, seeded) is used; ``--model`` takes
the shapes sample model's TorchScript file instead (its ONNX twin is looked up beside it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jacaudit.analyses.saliency import Scorer, attribute  # noqa: E402
from jacaudit.models.base import Model, TensorSpec  # noqa: E402


class CNN(torch.nn.Module):
    def __init__(self, k: int = 4):
        super().__init__()
        self.f = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(64, k)

    def forward(self, x):
        return self.fc(self.f(x).mean((2, 3)))


class ModuleModel(Model):
    """A plain torch module behind the Model interface (what the TorchScript loader gives, minus the file)."""

    format = "torch"

    def __init__(self, module):
        super().__init__(None, [TensorSpec("x", None, None)], [TensorSpec("y", None, None)], torch.device("cpu"),
                         None)
        self.module = module

    def run(self, feeds, outputs=None, overrides=None):
        return [self.module(feeds["x"])]


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, run in turn (so load drifts hit all alike)."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--model", default=None, help="TorchScript .pt (default: a built-in 64x64 CNN)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model:
        module = torch.jit.load(a.model).eval()
        onnx_path = os.path.splitext(a.model)[0] + ".onnx"
        name = os.path.basename(a.model)
    else:
        module = CNN().eval()
        onnx_path = None
        name = "built-in CNN 3x64x64 -> 4"
    for p in module.parameters():
        p.requires_grad_(False)
    x = torch.rand(a.batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = module(x).argmax(1)
    model = ModuleModel(module)
    scorer = Scorer(model, "x", "y", "output", None)
    n, steps = a.batch, a.steps
    print(f"model: {name}; batch {n}; torch {torch.__version__}; threads {a.threads}; median of {a.repeats}")
    rows = []

    def ours_grad():
        attribute(scorer, x, "grad", chunk_rows=n)

    def ours_ig():
        attribute(scorer, x, "ig", steps=steps, baseline="zero", chunk_rows=n * (steps + 1))

    try:
        import captum  # noqa: F401
        from captum.attr import IntegratedGradients, Saliency
    except ImportError:
        print("captum not installed: skipping the Captum comparison (pip install captum into the venv to run it)")
        captum_ok = False
    else:
        captum_ok = True
        sal, ig = Saliency(module), IntegratedGradients(module)

        def captum_grad():
            sal.attribute(x, target=target, abs=False)

        def captum_ig():
            ig.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=steps)

        t = interleaved({"ours": ours_grad, "captum": captum_grad}, a.repeats)
        rows.append(("grad: ours / Captum Saliency", t["ours"], t["captum"], 1.0))
        t = interleaved({"ours": ours_ig, "captum": captum_ig}, a.repeats)
        rows.append((f"IG({steps}): ours / Captum IntegratedGradients", t["ours"], t["captum"], 1.0))

    # IG vs raw batched forward+backward over steps x batch rows
    xb = x.repeat_interleave(steps, 0)
    tb = target.repeat_interleave(steps)

    def raw_fb():
        xr = xb.detach().requires_grad_(True)
        out = module(xr)
        torch.autograd.grad(out.gather(1, tb[:, None]).sum(), xr)

    t = interleaved({"ours": ours_ig, "raw": raw_fb}, a.repeats)
    rows.append((f"IG({steps}) / {steps} batched fwd+bwd passes", t["ours"], t["raw"], 1.3))

    # ONNX: our gradient through the interpreter vs onnxruntime forward
    tmp = tempfile.mkdtemp()
    if onnx_path is None or not os.path.exists(onnx_path):
        onnx_path = os.path.join(tmp, "m.onnx")
        kw = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
        torch.onnx.export(module, (x[:1],), onnx_path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17, **kw)
    import onnxruntime as ort

    from jacaudit.analyses.saliency import make_scorer
    from jacaudit.models import load

    om = load(onnx_path)
    osc = make_scorer(om)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name
    xn = x.numpy()

    def ours_onnx():
        attribute(osc, x, "grad", chunk_rows=n)

    def ort_fwd():
        sess.run(None, {iname: xn})

    t = interleaved({"ours": ours_onnx, "ort": ort_fwd}, a.repeats)
    rows.append(("grad on ONNX (interpreter) / onnxruntime forward", t["ours"], t["ort"], 3.0))

    print(f"{'comparison':52s} {'ours ms':>9s} {'base ms':>9s} {'ratio':>7s} {'target':>7s}")
    ok = True
    for label, ours, base, tgt in rows:
        r = ours / base
        ok &= r <= tgt
        print(f"{label:52s} {1e3 * ours:9.2f} {1e3 * base:9.2f} {r:7.2f} {'<=' + str(tgt):>7s}"
              f"{'' if r <= tgt else '  MISSED'}")
    if not captum_ok:
        print("(Captum rows skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
