"""Issue 15: dataset audits sharded on Ray -- one process vs Ray with 1 and 2 workers, in one run.

    python benchmarks/bench_distributed.py [--data sample_models/robust/data] [--limit 64] [--resnet]

Rows (each a full `jacaudit robustness` in its own subprocess, as a user runs it; default options, batch 8,
JACAUDIT_THREADS=1 so every worker is one core):

* `one process`: no Ray;
* `ray local, N worker(s)`: `--ray local --ray-workers N` (the command starts a local cluster: its start-up is
  in the wall time and reported separately, measured by `ray.init` + `ray.shutdown` alone);
* the driver's overhead per batch: the same runs with a trivial workload (one epsilon, one PGD step, no
  bisection, no norms, batch 1), where the wall time is almost all Ray's and ours per batch.

Every Ray report is checked equal to the one-process report (apart from timings) before its time is printed.
`--resnet` adds the per-input cost of the default audit (FGSM + PGD-10 over 4 epsilons, bisection, norms on 64
inputs) on the ResNet-50-class corpus export (benchmarks/corpus, 160x160), the figure the 1M-input estimate in
benchmarks/README.md starts from.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], out: Path) -> tuple[float, dict, str]:
    env = dict(os.environ, JACAUDIT_THREADS="1")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jacaudit", *args, "--out", str(out), "--format", "json"],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode not in (0, 1):
        raise SystemExit(f"failed ({r.returncode}): {' '.join(args)}\n{r.stderr[-2000:]}")
    rep = json.loads((out / "report.json").read_text())
    return wall, rep, r.stderr


def same(a: dict, b: dict) -> bool:
    strip = lambda d: {k: v for k, v in d.items() if k not in ("timings", "created", "command_line")}  # noqa: E731
    return strip(a) == strip(b)


def ray_startup() -> float:
    code = ("import time, ray; t = time.perf_counter(); ray.init(address='local', include_dashboard=False, "
            "log_to_driver=False, logging_level='ERROR'); ray.shutdown(); print(time.perf_counter() - t)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "sample_models/robust/robust_cnn.onnx"))
    ap.add_argument("--data", default=str(ROOT / "sample_models/robust/data"))
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--resnet", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="jacaudit-bench-ray-"))
    print(f"ray.init + shutdown (local cluster) alone: {ray_startup():.1f} s", flush=True)
    for label, extra in (("default audit", ["--batch-size", "8"]),
                         ("trivial workload (driver overhead)", ["--eps", "0.01", "--pgd-steps", "1", "--bisect",
                                                                 "0", "--norm-limit", "0", "--batch-size", "1"])):
        base = ["robustness", a.model, a.data, "--limit", str(a.limit), *extra]
        w1, rep1, _ = run(base, tmp / "one")
        n = rep1["result"]["n_inputs"]
        batches = len(list((tmp / "one" / "shards").glob("batch-*.json")))
        print(f"\n{label}: {n} inputs, {batches} batches", flush=True)
        print(f"| run | wall s | inputs/s | vs one process | per-worker inputs/s | equal report |")
        print(f"|---|---|---|---|---|---|")
        print(f"| one process | {w1:.1f} | {n / w1:.2f} | 1.00x | | |", flush=True)
        for k in (1, 2):
            wk, repk, err = run(base + ["--ray", "local", "--ray-workers", str(k)], tmp / f"ray{k}")
            per = next((ln.split("Ray workers: ", 1)[1] for ln in err.splitlines() if "Ray workers:" in ln), "")
            rates = [p.split("(")[-1].rstrip(")") for p in per.split("; ")]
            print(f"| ray local, {k} worker(s) | {wk:.1f} | {n / wk:.2f} | {w1 / wk:.2f}x | {', '.join(rates)} | "
                  f"{'yes' if same(rep1, repk) else 'NO'} |", flush=True)
            if label.startswith("trivial"):
                busy = sum(float(p.split(" in ")[1].split(" s")[0]) for p in per.split("; ") if " in " in p)
                print(f"  -> wall - start-up - worker busy time over {batches} batches: "
                      f"{(wk - busy / k) / batches * 1000:.0f} ms per batch (start-up included)", flush=True)
    if a.resnet:
        model = Path.home() / ".cache/jacaudit-bench-corpus/resnet50c.ts.onnx"
        if not model.exists():
            print("\n(no ResNet-50-class export: run benchmarks/bench_corpus.py once)")
            return
        import numpy as np

        x = np.random.default_rng(0).uniform(0, 1, size=(8, 3, 160, 160)).astype(np.float32)
        np.save(tmp / "x.npy", x)
        w, rep, _ = run(["robustness", str(model), str(tmp / "x.npy"), "--batch-size", "8"], tmp / "resnet")
        t = rep["timings"]
        print(f"\nResNet-50-class (160x160, batch 8, 1 thread), default audit on 8 inputs: wall {w:.1f} s, "
              f"batches {t.get('batch', 0):.1f} s = {t.get('batch', 0) / 8:.2f} s per input "
              f"(pgd {t.get('pgd', 0) / 8:.2f}, bisection {t.get('bisection', 0) / 8:.2f}, "
              f"norms {t.get('norms', 0) / 8:.2f}, masking {t.get('masking', 0) / 8:.2f} s per input)")


if __name__ == "__main__":
    main()
