"""Engine benchmarks, side by side in one process, ratios printed (not timed tests).

    python benchmarks/bench_engine.py [--device cpu|cuda] [--reps 3] [--quick] [--only saliency,perSample,...]
                                      [--compile]

1. saliency: input gradient and interpreter forward vs onnxruntime's forward on a ResNet-class and a
   MobileNet-class ONNX graph (exported here from torch modules), for the interpreter as loaded and after each
   optimize step (constant folding, BN folding, channels_last); ResNet-50-class forward vs native torch eager.
   --compile adds torch.compile rows (one-time compile cost, calls to amortise it, agreement with eager).
2. per-sample: full per-sample Jacobians for a batch of 32 (MLP 784-512-512-10, a small CNN) vs a hand-written
   vmap(jacrev) and a per-sample loop of torch.autograd.functional.jacobian.
3. spectral: top-k singular values/vectors by the estimator vs jacrev + SVD (time and error).
Times are the minimum over --reps runs after one warm-up; torch and onnxruntime both use --threads threads.
The saliency variants and onnxruntime are timed round-robin (one of each per rep) so that bursts of load on a
shared machine hit them alike; the per-sample timings likewise.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore")


def timeit(fn, reps: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- architectures (no torchvision) -------------------------------------------------------------------
class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); self.b2 = nn.BatchNorm2d(cout)
        self.sc = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.sc is None else self.sc(x)))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, stride):
        super().__init__()
        cout = mid * 4
        self.c1 = nn.Conv2d(cin, mid, 1, bias=False); self.b1 = nn.BatchNorm2d(mid)
        self.c2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False); self.b2 = nn.BatchNorm2d(mid)
        self.c3 = nn.Conv2d(mid, cout, 1, bias=False); self.b3 = nn.BatchNorm2d(cout)
        self.sc = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        y = self.b3(self.c3(y))
        return torch.relu(y + (x if self.sc is None else self.sc(x)))


def resnet(kind="18", classes=1000):
    layers = []
    if kind == "18":
        cfg, block, width = [2, 2, 2, 2], Basic, [64, 128, 256, 512]
    else:
        cfg, block, width = [3, 4, 6, 3], Bottleneck, [64, 128, 256, 512]
    cin = 64
    for i, (n, w) in enumerate(zip(cfg, width)):
        for j in range(n):
            stride = 2 if j == 0 and i > 0 else 1
            layers.append(block(cin, w, stride))
            cin = w if kind == "18" else w * 4
    # classifier as a 1x1 conv (no Gemm needed)
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *layers, nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, classes, 1), nn.Flatten())


class InvRes(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        mid = cin * t
        self.use_res = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.body(x)
        return x + y if self.use_res else y


def mobilenet(classes=1000):
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers, cin = [], 32
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(InvRes(cin, c, s if i == 0 else 1, t))
            cin = c
    return nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(), *layers,
                         nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(),
                         nn.AdaptiveAvgPool2d(1), nn.Conv2d(1280, classes, 1), nn.Flatten())


def randomize_bn(m):
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return m


def export(m, x) -> bytes:
    f = io.BytesIO()
    # keep BatchNormalization nodes in the graph (the exporter would otherwise fold them itself)
    torch.onnx.export(m, (x,), f, input_names=["x"], output_names=["y"], dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return f.getvalue()


# ---- 1. saliency ---------------------------------------------------------------------------------------
def bench_saliency(args, name, module, size):
    import onnx
    import onnxruntime as ort

    from jacaudit.models.onnx.model import OnnxModel
    from jacaudit.models.onnx.optimize import optimize

    module = randomize_bn(module).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 3, size, size)
    data = export(module, x)
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    ops = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    dev = torch.device(args.device)
    xd = x.to(dev)
    print(f"\n[{name}] {size}x{size}, ops {dict(sorted(ops.items(), key=lambda kv: -kv[1]))}")
    import jacaudit.models.onnx.ops.nn as nn_ops
    # (label, optimize steps, specialize_ops after constant folding, interpreter Conv fast paths on CPU)
    fc, bn = "fold_constants", "fold_batchnorm"
    all_fast = ("depthwise_nhwc",)
    steps_list = [("as loaded", (), False, ()),
                  ("fold_constants", (fc,), False, ()),
                  ("+fold_batchnorm (previous default)", (fc, bn), False, ()),
                  ("+specialize Clip", (fc, bn), True, ()),
                  ("+depthwise NHWC (default load)", (fc, bn), True, all_fast),
                  ("+channels_last weights", (fc, bn, "channels_last"), True, all_fast)]

    def variant(steps, spec, fast):
        model = OnnxModel(proto, device=dev, optimize=False)
        done = optimize(model.graph, keep=["y"], steps=steps, specialize=spec) if steps else {}

        def fwd():
            nn_ops.FAST_CONV = set(fast)
            with torch.no_grad():
                return model.run({"x": xd})[0]

        def grad():
            nn_ops.FAST_CONV = set(fast)
            xr = xd.clone().requires_grad_(True)
            y = model.run({"x": xr})[0]
            c = int(y.detach().argmax())
            (g,) = torch.autograd.grad(y[0, c], xr)
            return g

        return done, fwd, grad

    variants = [variant(steps, spec, fast) for _, steps, spec, fast in steps_list]
    compile_cost = {}
    if getattr(args, "compile", False):
        # Opt-in (--compile): torch.compile (inductor, dynamic=False) over the default-load interpreter.
        # "dynamo": torch.compile of the interpreter's forward function itself (dynamo traces model.run; it
        # breaks the graph at the conv fast path's functorch check and at Python shape arithmetic).
        # "make_fx": the interpreter traced once to an aten graph (real tensors, shapes fixed), that graph
        # compiled. One-time cost = wall time of the first forward (no_grad) and first gradient call.
        # "make_fx, simdlen 0": the same with inductor's scalar C++ (cpp.simdlen=0): its vectorized stores of
        # the bool masks saved for Clip's backward are ~15x slower than scalar code here (torch 2.13, avx512).
        for label, how in (("+torch.compile (dynamo on run)", "dynamo"),
                           ("+torch.compile (make_fx graph)", "make_fx"),
                           ("+torch.compile (make_fx, simdlen 0)", "make_fx_scalar")):
            steps_list.append((label, (fc, bn), True, all_fast))
            variants.append(compiled_variant(proto, dev, xd, how, compile_cost, label, nn_ops, all_fast))
    # Round-robin: every rep times ORT and each variant once, so a burst of load on the shared machine
    # hits them alike; each figure is the minimum over the reps (after one warm-up round).
    t_ort = float("inf")
    best = [[float("inf"), float("inf")] for _ in variants]
    for r in range(args.reps + 1):
        t0 = time.perf_counter()
        sess.run(None, {"x": xn})
        t_ort = min(t_ort, time.perf_counter() - t0) if r else t_ort
        for k, (_, fwd, grad) in enumerate(variants):
            for j, fn in enumerate((fwd, grad)):
                t0 = time.perf_counter()
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if r:
                    best[k][j] = min(best[k][j], time.perf_counter() - t0)
    nn_ops.FAST_CONV = set(all_fast)
    print(f"  onnxruntime forward                  {t_ort * 1e3:8.1f} ms   (1.00x)")
    rows = []
    y_ref = None
    outs = []
    for (label, *_), (done, fwd, grad), (t_f, t_g) in zip(steps_list, variants, best):
        y, g = fwd().cpu(), grad().cpu()
        outs.append((y, g))
        if y_ref is None:
            y_ref, g_ref = y, g
        drift = float((y - y_ref).abs().max() / y_ref.abs().max())
        gdrift = float((g - g_ref).abs().max() / g_ref.abs().max())
        print(f"  interp forward  [{label:36s}] {t_f * 1e3:8.1f} ms   ({t_f / t_ort:.2f}x ort)  changes {done}")
        print(f"  input gradient  [{label:36s}] {t_g * 1e3:8.1f} ms   ({t_g / t_ort:.2f}x ort; target <= 3.0x)"
              f"  output drift {drift:.1e}, gradient drift {gdrift:.1e}")
        rows.append((label, t_f, t_g))
    if compile_cost:  # compiled rows vs the eager default-load row (index 4)
        (y_d, g_d), (_, t_fd, t_gd) = outs[4], rows[4]
        for k, (label, t_f, t_g) in enumerate(rows):
            if label not in compile_cost:
                continue
            c_f, c_g = compile_cost[label]
            y, g = outs[k]
            rel_y = float((y - y_d).abs().max() / y_d.abs().max())
            rel_g = float((g - g_d).abs().max() / g_d.abs().max())

            def amort(c, te, tc):
                return f"{c / (te - tc):.0f} calls" if tc < te else "never (not faster)"
            print(f"  {label}: first call (compile) forward {c_f:.1f} s, gradient {c_g:.1f} s; amortised vs "
                  f"eager default after forward {amort(c_f, t_fd, t_f)}, gradient {amort(c_g, t_gd, t_g)}; "
                  f"max rel diff vs eager default: output {rel_y:.1e}, gradient {rel_g:.1e}")
    nn_ops.FAST_CONV = set(all_fast)
    return t_ort, rows, module, x


def compiled_variant(proto, dev, xd, how, cost, label, nn_ops, fast):
    """A timed variant: the default-load interpreter under torch.compile (see bench_saliency)."""
    from jacaudit.models.onnx.model import OnnxModel

    model = OnnxModel(proto, device=dev)  # default load-time optimization
    nn_ops.FAST_CONV = set(fast)
    if how == "dynamo":
        fn = torch.compile(lambda t: model.run({"x": t})[0], dynamic=False)
    else:
        from torch.fx.experimental.proxy_tensor import make_fx
        with torch.no_grad():
            gm = make_fx(lambda t: model.run({"x": t})[0])(xd)
        fn = torch.compile(gm, dynamic=False)

    def fwd():
        nn_ops.FAST_CONV = set(fast)
        with torch.no_grad():
            return fn(xd)

    def grad():
        nn_ops.FAST_CONV = set(fast)
        xr = xd.clone().requires_grad_(True)
        y = fn(xr)
        c = int(y.detach().argmax())
        (g,) = torch.autograd.grad(y[0, c], xr)
        return g

    import contextlib

    import torch._inductor.config as ic
    patch = ic.patch({"cpp.simdlen": 0}) if how == "make_fx_scalar" else contextlib.nullcontext()
    with patch:  # inductor compiles at the first call (forward graph) and the first backward
        t0 = time.perf_counter()
        fwd()
        c_f = time.perf_counter() - t0
        t0 = time.perf_counter()
        grad()
        c_g = time.perf_counter() - t0
    cost[label] = (c_f, c_g)
    return f"{how} + inductor", fwd, grad


def bench_eager(args, module, x, t_ort, interp_best):
    module = module.to(args.device)
    xd = x.to(args.device)
    with torch.no_grad():
        t_e = timeit(lambda: module(xd), args.reps)
    print(f"  native torch eager forward           {t_e * 1e3:8.1f} ms   ({t_e / t_ort:.2f}x ort); "
          f"interpreter (optimized) / eager = {interp_best / t_e:.2f}x (target <= 1.1x)")


# ---- 2. per-sample Jacobians ---------------------------------------------------------------------------
def bench_per_sample(args):
    from jacaudit.engine import per_sample_jacobian

    torch.manual_seed(0)
    dev = torch.device(args.device)
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).to(dev)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 7 * 7, 10)).to(dev)
    for name, net, X in (("MLP 784-512-512-10", mlp, torch.randn(32, 784, device=dev)),
                         ("small CNN 1x28x28", cnn, torch.randn(32, 1, 28, 28, device=dev))):
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        f1 = lambda xi: net(xi.unsqueeze(0)).squeeze(0)  # noqa: E731
        hand = lambda: torch.func.vmap(torch.func.jacrev(f1))(X)  # noqa: E731
        ours = lambda: per_sample_jacobian(net, X)  # noqa: E731
        loop = lambda: torch.stack([torch.autograd.functional.jacobian(f1, X[b]) for b in range(len(X))])  # noqa
        times = []
        for r in range(args.reps + 1):  # round-robin; min and median over the reps after a warm-up
            row = []
            for fn in (hand, ours, loop):
                t0 = time.perf_counter()
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                row.append(time.perf_counter() - t0)
            if r:
                times.append(row)
        t_h, t_o, t_l = (min(c) for c in zip(*times))
        m_h, m_o, m_l = (float(np.median(c)) for c in zip(*times))
        J, info = per_sample_jacobian(net, X, return_info=True)
        err = float((J - hand()).abs().max())
        print(f"\n[per-sample J, batch 32, {name}]   min / median of {args.reps}\n"
              f"  hand vmap(jacrev) {t_h * 1e3:8.1f} / {m_h * 1e3:6.1f} ms\n"
              f"  jacaudit          {t_o * 1e3:8.1f} / {m_o * 1e3:6.1f} ms   ({t_o / t_h:.2f}x / {m_o / m_h:.2f}x hand; "
              f"target <= 1.0x)  max diff {err:.1e}  path {info.path}"
              f"{'; ' + '; '.join(info.notes) if info.notes else ''}\n"
              f"  loop of autograd.functional.jacobian {t_l * 1e3:8.1f} / {m_l * 1e3:6.1f} ms   (jacaudit "
              f"{t_l / t_o:.1f}x / {m_l / m_o:.1f}x faster; target >= 2.5x)")


# ---- 3. spectral ----------------------------------------------------------------------------------------
def bench_spectral(args):
    from jacaudit.engine import top_singular

    torch.manual_seed(0)
    dev = torch.device(args.device)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                        nn.Tanh(), nn.Conv2d(16, 16, 3, stride=2, padding=1)).to(dev).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 3, 32, 32, device=dev)

    def ref():
        J = torch.func.jacrev(net)(x).reshape(-1, x.numel())
        return torch.linalg.svd(J, full_matrices=False)

    t_r = timeit(ref, 1)
    U, S, Vh = ref()
    k = 3
    est = top_singular(net, x, k=k, tol=1e-4)
    t_e = timeit(lambda: top_singular(net, x, k=k, tol=1e-4), 1)
    rel = [abs(a - float(b)) / float(b) for a, b in zip(est.values, S[:k])]
    cos = [abs(float((est.right[i].reshape(-1) * Vh[i]).sum())) for i in range(k)]
    print(f"\n[top-{k} singular values, J {S.numel()}x{x.numel()} (conv net output 16x8x8, input 3x32x32)]\n"
          f"  jacrev + SVD      {t_r * 1e3:8.1f} ms\n"
          f"  estimator         {t_e * 1e3:8.1f} ms   ({t_r / t_e:.1f}x faster; {est.iterations} iterations, "
          f"{est.matvecs} jvp+vjp, converged={est.converged})\n"
          f"  relative error of sigma_1..{k}: {', '.join(f'{r:.1e}' for r in rel)};  |cos| right vectors: "
          f"{', '.join(f'{c:.6f}' for c in cos)}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="saliency,resnet50,persample,spectral",
                    help="comma list of saliency (ResNet-18 + MobileNet), mobilenet (MobileNet only), resnet50, "
                         "persample, spectral")
    ap.add_argument("--quick", action="store_true", help="smaller images (for a smoke run)")
    ap.add_argument("--compile", action="store_true",
                    help="saliency: add torch.compile rows (dynamo on the interpreter; make_fx graph + inductor)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)
        libc.mallopt(-1, 1 << 31)
    except Exception:
        pass
    only = set(args.only.split(","))
    size = 112 if args.quick else 224
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, reps {args.reps}")
    if "saliency" in only:
        bench_saliency(args, "ResNet-18-class", resnet("18"), size)
    if "saliency" in only or "mobilenet" in only:
        bench_saliency(args, "MobileNetV2-class", mobilenet(), size)
    if "resnet50" in only:
        t_ort, rows, module, x = bench_saliency(args, "ResNet-50-class", resnet("50"), size)
        bench_eager(args, module, x, t_ort, min(r[1] for r in rows))
    if "persample" in only:
        bench_per_sample(args)
    if "spectral" in only:
        bench_spectral(args)


if __name__ == "__main__":
    main()
