"""Corpus benchmark (issue 10): forward and input gradient through the jacaudit interpreter vs onnxruntime's
forward of the same file, over architectures people ship, side by side in one process.

    python benchmarks/bench_corpus.py [--only NAME[,NAME]] [--quick] [--json FILE] [--batches 1,32]
                                      [--no-real] [--cache DIR] [--rounds N] [--rounds32 N]
                                      [--baseline DIR]

Corpus: the families in benchmarks/corpus/models.py (torch modules with random weights), each exported with
both torch exporters (``ts``: ``torch.onnx.export(dynamo=False)``; ``dynamo``: ``dynamo=True``), cached under
--cache; plus the real files of the project's corpus cache (~/.cache/jacaudit-realmodels) when present.

Per model and batch size, interleaved rounds (one of each per round, the first round a warm-up, min over the
rest): onnxruntime forward (CPUExecutionProvider, 1 intra/inter-op thread), jacaudit forward
(``jacaudit.load(path).run`` under no_grad), jacaudit input gradient (``torch.autograd.grad`` w.r.t. the first
float input, parameters frozen as the product does: the top-1 logit per sample, picked in the same forward,
when the first output is (batch, classes); else the sum of the first output weighted by a fixed random
cotangent (a plain sum of a softmax's outputs has a zero gradient but the same cost)). torch uses 1 thread.
Ratios are to onnxruntime's forward at the same batch size. ``err`` is max over float outputs of
max|jacaudit - ort| / max|ort|. A model that fails is a row with the error.

The same file is also timed with ``runtime="onnxruntime"`` (``rt_*``: values in onnxruntime, input gradients
through the backward graph jacaudit writes, models/onnx/ortgrad.py; ``--no-runtime`` skips it); the "default"
columns are what the commands run (``--runtime auto``): onnxruntime's values, and its gradients where auto
sends them there (up to ``AUTO_GRAD_MAX_BATCH`` inputs, or any batch for graphs without grouped convolutions,
when the backward graph exists), else the interpreter's, from the same rounds. ``rt_grad_diff``: max|g_rt -
g_interp| / max|g_interp| (and the median over samples of each sample's max: a kink rounded to the other side
in one sample moves the max, not the median).

``--baseline DIR``: also time another copy of the interpreter (DIR is the ``jacaudit/models/onnx`` folder of
another commit, e.g. of a ``git worktree``), loaded under another module name in the same process and timed in
the same interleaved rounds (``base_fwd_ms``, ``base_grad_ms``; odd rounds time the baseline before jacaudit,
which removes the order bias an A/A run showed); the rest of jacaudit is shared, so only changes under
``models/onnx`` are compared.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.environ.get("JACAUDIT_SRC", ROOT))
sys.path.insert(0, HERE)
warnings.filterwarnings("ignore")

REAL_DIR = os.path.expanduser("~/.cache/jacaudit-realmodels/models")
# real files: name -> (glob under REAL_DIR, family, feeds(batch) -> dict of numpy arrays, batch dynamic)
REAL = {
    "ppocr_cls": ("rapidocr-onnxruntime/*/*/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                  "real: PaddleOCR direction cls (paddle2onnx), 48x192",
                  lambda b: {"x": np.random.rand(b, 3, 48, 192).astype(np.float32)}, True),
    "ppocr_det": ("rapidocr-onnxruntime/*/*/models/ch_PP-OCRv4_det_infer.onnx",
                  "real: PP-OCRv4 DB text detector (paddle2onnx), 320²",
                  lambda b: {"x": np.random.rand(b, 3, 320, 320).astype(np.float32)}, True),
    "ppocr_rec": ("rapidocr-onnxruntime/*/*/models/ch_PP-OCRv4_rec_infer.onnx",
                  "real: PP-OCRv4 CRNN-class recogniser (paddle2onnx), 48x320",
                  lambda b: {"x": np.random.rand(b, 3, 48, 320).astype(np.float32)}, True),
    "silero_vad": ("silero-vad/*/silero_vad/data/silero_vad_16k_op15.onnx",
                   "real: silero-vad 16k (conv + LSTM, If), 512 samples",
                   lambda b: {"input": (np.random.rand(b, 512).astype(np.float32) - 0.5) * 0.2,
                              "state": np.zeros((2, b, 128), np.float32), "sr": np.array(16000, np.int64)}, True),
    "ddddocr_old": ("ddddocr/*/ddddocr/common_old.onnx", "real: ddddocr common_old (CRNN-class), 64x160",
                    lambda b: {"input1": np.random.rand(b, 1, 64, 160).astype(np.float32)}, False),
}


def git_info(src: str) -> dict:
    def g(*a):
        try:
            return subprocess.run(["git", "-C", src, *a], capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""
    info = {"commit": g("rev-parse", "HEAD"), "dirty_jacaudit": g("status", "--porcelain", "--", "jacaudit")}
    cf = os.path.join(src, "COMMIT")
    if os.path.exists(cf):  # an exported tree (git archive) names its commit here
        info = {"commit": open(cf).read().strip(), "dirty_jacaudit": ""}
    return info


def corpus_feeds(example, names, b):
    g = torch.Generator().manual_seed(1)
    out = {}
    for n, t in zip(names, example):
        shape = (b,) + tuple(t.shape[1:])
        if n == "mask":
            out[n] = np.ones(shape, np.float32)
        else:
            out[n] = torch.randn(shape, generator=g).numpy()
    return out


def load_baseline(onnx_dir: str):
    """The ``load_onnx`` of another copy of ``jacaudit/models/onnx`` (a namespace package under another name)."""
    import importlib
    import importlib.machinery
    import importlib.util

    import jacaudit.models  # noqa: F401 -- the parent package the copy's relative imports reach
    name = "jacaudit.models._onnx_baseline"
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [os.path.abspath(onnx_dir)]
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    return importlib.import_module(name + ".model").load_onnx


def bench_one(path, feeds_fn, dynamic, batches, rounds, rounds32, b32_budget, ort_threads=1, base_load=None,
              with_rt=True):
    import onnx
    import onnxruntime as ort

    import jacaudit

    row = {"nodes": len(onnx.load(path, load_external_data=False).graph.node), "batches": {}}
    so = ort.SessionOptions()
    so.intra_op_num_threads = ort_threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    model = jacaudit.load(path)
    row["load_s"] = time.perf_counter() - t0
    base_model = base_load(path) if base_load is not None else None
    # the same file with runtime="onnxruntime": values in onnxruntime, gradients through its backward graph
    rt_model = jacaudit.load(path, runtime="onnxruntime") if with_rt else None
    float_in = [i.name for i in sess.get_inputs() if i.type == "tensor(float)"][0]
    for b in batches:
        res = {}
        row["batches"][b] = res
        if b != 1 and not dynamic:
            res["skip"] = "fixed batch dim"
            continue
        if b != 1 and 1 in row["batches"] and "grad_ms" in row["batches"][1]:
            est = (row["batches"][1]["ort_ms"] + row["batches"][1]["fwd_ms"] + row["batches"][1]["grad_ms"]) \
                * b * (rounds32 + 1) / 1e3
            if est > b32_budget:
                res["skip"] = f"too slow (~{est:.0f} s estimated > {b32_budget:.0f} s budget)"
                continue
        try:
            np.random.seed(b)
            feeds_np = feeds_fn(b)
            feeds_t = {k: torch.from_numpy(v.copy()) for k, v in feeds_np.items()}
            x0 = feeds_t[float_in]
            g = torch.Generator().manual_seed(2)
            state = {}

            def f_ort():
                return sess.run(None, feeds_np)

            def f_fwd(model=model):
                with torch.no_grad():
                    return model.run(feeds_t)

            def f_grad(model=model):
                xr = x0.clone().requires_grad_(True)
                ys = model.run({**feeds_t, float_in: xr})
                y = ys[0]
                if not y.is_floating_point():
                    raise RuntimeError(f"first output is {y.dtype}: no gradient")
                if y.dim() == 2 and y.shape[1] > 1 and y.shape[0] == b:
                    s = y.gather(1, y.detach().argmax(1, keepdim=True)).sum()
                else:
                    if "w" not in state or state["w"].shape != y.shape:
                        state["w"] = torch.randn(y.shape, generator=g, dtype=y.dtype)
                    s = (y * state["w"]).sum()
                (gx,) = torch.autograd.grad(s, xr)
                return gx

            fns = [("ort_ms", f_ort), ("fwd_ms", f_fwd), ("grad_ms", f_grad)]
            if rt_model is not None:
                fns += [("rt_fwd_ms", lambda: f_fwd(rt_model)), ("rt_grad_ms", lambda: f_grad(rt_model))]
            if base_model is not None:
                fns += [("base_fwd_ms", lambda: f_fwd(base_model)), ("base_grad_ms", lambda: f_grad(base_model))]
            best = {k: float("inf") for k, _ in fns}
            errors = {}
            R = rounds if b == 1 else rounds32
            # with a baseline, odd rounds run it before jacaudit (onnxruntime first in every round): an A/A run
            # (the baseline a copy of the same code) measured the second-timed model of a round 4-8% faster
            # forward on the small graphs with a fixed order
            swapped = fns[:1] + fns[5:] + fns[3:5] + fns[1:3] if rt_model is not None else \
                fns[:1] + fns[3:] + fns[1:3]
            for r in range(R + 1):
                for k, fn in (swapped if (base_model is not None or rt_model is not None) and r % 2 else fns):
                    if k in errors:
                        continue
                    try:
                        t0 = time.perf_counter()
                        fn()
                        dt = time.perf_counter() - t0
                    except Exception as e:  # noqa: BLE001
                        errors[k] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                        continue
                    if r:
                        best[k] = min(best[k], dt)
            if b != 1 and "ort_ms" in errors:
                res.clear()
                res["skip"] = "the export fixed the batch (onnxruntime refuses batch %d: %s)" % (b, errors["ort_ms"][:90])
                continue
            for k, _ in fns:
                if k in errors:
                    res[k.replace("_ms", "_error")] = errors[k]
                else:
                    res[k] = best[k] * 1e3
            if "fwd_ms" in res:
                yo, yj = f_ort(), f_fwd()
                err = 0.0
                for a, t in zip(yo, yj):
                    if np.issubdtype(np.asarray(a).dtype, np.floating):
                        t = t.detach().numpy().astype(np.float64)
                        a = np.asarray(a, np.float64)
                        if a.shape != t.shape:
                            err = float("inf")
                            res["shape_mismatch"] = f"{a.shape} vs {t.shape}"
                            break
                        den = max(np.abs(a).max(), 1e-30) if a.size else 1.0
                        err = max(err, float(np.abs(a - t).max() / den) if a.size else 0.0)
                res["err"] = err
            if rt_model is not None and "rt_grad_ms" in res:
                g_rt = f_grad(rt_model)
                res["rt_path"] = rt_model._ort.last
                if rt_model._ort.last == "onnxruntime" and rt_model._ort.grad.last_islands:
                    from jacaudit.models.onnx.ortgrad import island_summary
                    res["rt_islands"] = island_summary(rt_model._ort.grad.last_islands)
                g_t = f_grad(model)
                den = max(float(g_t.abs().max()), 1e-30)
                res["rt_grad_diff"] = float((g_rt - g_t).abs().max()) / den
                # the median over samples of each sample's max difference: a kink that rounding flips in one
                # sample (a ReLU input or a max-pool near-tie) moves the max, not the median
                per = ((g_rt - g_t).abs().flatten(1).max(1).values / den) if g_t.dim() > 1 else None
                res["rt_grad_diff_median"] = float(per.median()) if per is not None else res["rt_grad_diff"]
            if "ort_ms" in res:
                from jacaudit.models.onnx.ortgrad import (AUTO_GRAD_MAX_BATCH, AUTO_LARGE_BATCH_INTERPRETER,
                                                          has_grouped_conv)
                if rt_model is not None and "rt_fwd_ms" in res:
                    # what the commands run (runtime "auto"): forward in onnxruntime; the gradient through it
                    # (where its plan exists) up to AUTO_GRAD_MAX_BATCH inputs, and above for graphs without
                    # grouped convolutions; else the interpreter's
                    res["auto_fwd_ms"] = res["rt_fwd_ms"]
                    big_ok = not has_grouped_conv(rt_model.proto.graph) and \
                        not (set(rt_model._ort.grad.last_islands) & AUTO_LARGE_BATCH_INTERPRETER)
                    use_rt = (b <= AUTO_GRAD_MAX_BATCH or big_ok) and res.get("rt_path") == "onnxruntime"
                    if "rt_grad_ms" in res and "grad_ms" in res:
                        res["auto_grad_ms"] = res["rt_grad_ms"] if use_rt else res["grad_ms"]
                for k in ("fwd_ms", "grad_ms", "base_fwd_ms", "base_grad_ms", "rt_fwd_ms", "rt_grad_ms",
                          "auto_fwd_ms", "auto_grad_ms"):
                    if k in res:
                        res[k.replace("_ms", "_x")] = res[k] / res["ort_ms"]
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return row


def gmean(v):
    v = [x for x in v if x and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


COLUMNS = [("fwd", "interp fwd / ORT"), ("grad", "interp grad / ORT"), ("rt_fwd", "ortrt fwd / ORT"),
           ("rt_grad", "ortrt grad / ORT"), ("auto_fwd", "**default fwd / ORT**"),
           ("auto_grad", "**default grad / ORT**"), ("base_fwd", "baseline fwd / ORT"),
           ("base_grad", "baseline grad / ORT")]


def print_tables(rows, batches, targets=(1.5, 2.5, 3.5)):
    """Per batch size: one row per model, ratios to onnxruntime's forward. "interp" = the torch interpreter
    (runtime "torch"), "ortrt" = runtime "onnxruntime", "default" = runtime "auto", what the commands run."""
    lines = []
    present = [(k, h) for k, h in COLUMNS
               if any(k + "_x" in r.get("batches", {}).get(b, {}) for r in rows for b in batches)]
    grad_key = "auto_grad" if any(k == "auto_grad" for k, _ in present) else "grad"
    for b in batches:
        lines.append(f"\n### batch {b}\n")
        head = ["model", "family", "exporter", "nodes", "ORT fwd ms"] + [h for _, h in present] + \
            ["gradient path (ortrt)", "max rel err", "grad diff max / median"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        groups = {"synthetic": {k: [] for k, _ in present}, "all": {k: [] for k, _ in present}}
        for r in rows:
            res = r.get("batches", {}).get(b, {})
            blank = [""] * (len(present) + 3)
            if "load_error" in r:
                cells = [f"load failed: {r['load_error'][:110]}"] + blank
            elif "skip" in res:
                cells = [f"skipped: {res['skip']}"] + blank
            elif "error" in res:
                cells = [f"failed: {res['error']}"] + blank
            else:
                def cell(k):
                    if k + "_x" in res:
                        return f"{res[k + '_x']:.2f}x"
                    return "error: " + res.get(k + "_error", "?")[:110]
                ort_c = f"{res['ort_ms']:.1f}" if "ort_ms" in res else "error: " + res.get("ort_error", "?")
                err_c = f"{res['err']:.1e}" if "err" in res else ""
                path = res.get("rt_path") or ""
                path = "onnxruntime" if path == "onnxruntime" else (f"interpreter: {path[:80]}" if path else "")
                if res.get("rt_islands"):
                    path += f" (torch islands: {res['rt_islands']})"
                diff = f"{res['rt_grad_diff']:.1e} / {res['rt_grad_diff_median']:.1e}" if "rt_grad_diff" in res else ""
                cells = [ort_c] + [cell(k) for k, _ in present] + [path, err_c, diff]
                for key in ("synthetic", "all"):
                    if key == "synthetic" and r["exporter"] == "real":
                        continue
                    for k, _ in present:
                        if k + "_x" in res:
                            groups[key][k].append(res[k + "_x"])
            lines.append(f"| {r['name']} | {r['family']} | {r['exporter']} | {r.get('nodes', '')} | "
                         + " | ".join(cells) + " |")
        for key, cols in groups.items():
            if not cols.get(grad_key):
                continue
            over = sum(1 for g in cols[grad_key] if g > targets[2])
            lines.append(f"| **geometric mean ({key}, {len(cols[grad_key])} rows)** | | | | | "
                         + " | ".join(f"**{gmean(cols[k]):.2f}x**" for k, _ in present)
                         + f" | {over} rows {grad_key.replace('_', ' ')} > {targets[2]}x | | |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma list of model names (corpus names or real names)")
    ap.add_argument("--exporters", default="ts,dynamo")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (2 at batch 1, 1 at batch 32)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rounds32", type=int, default=2)
    ap.add_argument("--b32-budget", type=float, default=45.0, help="skip a batch-32 row estimated over this (s)")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/jacaudit-bench-corpus"))
    ap.add_argument("--json", default="")
    ap.add_argument("--baseline", default="", help="another commit's jacaudit/models/onnx folder, timed alongside")
    ap.add_argument("--no-runtime", action="store_true", help="do not time runtime=\"onnxruntime\" alongside")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.rounds32 = 2, 1
    torch.set_num_threads(1)
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)
        libc.mallopt(-1, 1 << 31)
    except Exception:  # noqa: BLE001
        pass
    import onnxruntime as ort

    import jacaudit
    from corpus.models import BUILDERS, export
    batches = [int(b) for b in args.batches.split(",")]
    only = set(filter(None, args.only.split(",")))
    src = os.path.dirname(os.path.dirname(os.path.abspath(jacaudit.__file__)))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **git_info(src), "jacaudit_src": src,
            "torch": torch.__version__, "onnxruntime": ort.__version__, "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "rounds": args.rounds,
            "rounds32": args.rounds32, "load_avg_start": os.getloadavg()}
    base_load = None
    if args.baseline:
        base_load = load_baseline(args.baseline)
        meta["baseline"] = {"dir": os.path.abspath(args.baseline),
                            **git_info(os.path.dirname(os.path.dirname(os.path.dirname(
                                os.path.abspath(args.baseline)))))}
    print(json.dumps(meta), flush=True)
    rows = []
    plan = []
    for name, (family, _b, example, names, _op) in BUILDERS.items():
        if only and name not in only:
            continue
        for exp in args.exporters.split(","):
            plan.append((name, family, exp, example, names))
    if not args.no_real:
        for name, (pat, family, feeds, dyn) in REAL.items():
            if only and name not in only:
                continue
            hits = sorted(glob.glob(os.path.join(REAL_DIR, pat)))
            if hits:
                plan.append((name, family, "real", (hits[0], feeds, dyn), None))
    for name, family, exp, example, names in plan:
        row = {"name": name, "family": family, "exporter": exp}
        t0 = time.perf_counter()
        try:
            if exp == "real":
                path, feeds_fn, dyn = example
            else:
                path, dyn, note = export(name, exp, args.cache)
                if note:
                    row["note"] = note
                feeds_fn = (lambda ex, nm: (lambda b: corpus_feeds(ex, nm, b)))(example, names)
            row["path"] = path
            row.update(bench_one(path, feeds_fn, dyn, batches, args.rounds, args.rounds32, args.b32_budget,
                                 base_load=base_load, with_rt=not args.no_runtime))
        except Exception as e:  # noqa: BLE001
            row["load_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            row["traceback"] = traceback.format_exc()[-2000:]
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        import gc
        gc.collect()  # the models, their sessions and onnxruntime's arenas go before the next file
        brief = {b: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                 for b, r in row.get("batches", {}).items()}
        print(f"[{name} {exp}] {row.get('load_error', '')} {brief} ({row['wall_s']:.0f} s)", flush=True)
    meta["load_avg_end"] = os.getloadavg()
    text = print_tables(rows, batches)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "table": text}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
