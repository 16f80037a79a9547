"""Regenerate reports/ from the sample models (sample_models/, built by ``python -m jacaudit.samples``).

    python scripts/make_reports.py [--samples sample_models] [--out reports]

For each sample image classifier found (shapes, shortcut) it runs ``jacaudit saliency`` on the model's
examples/ folder (object masks via --mask-suffix _mask) with all methods and the sanity check, writing
reports/saliency-<model>/report.{html,json,md} and maps/. Deterministic (--seed 0).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = {
    # model folder: (model file, extra arguments)
    "shapes": ("shapes_cnn.onnx", ["--method", "all", "--sanity", "--steps", "32", "--samples", "16"]),
    "shortcut": ("shortcut_cnn.onnx", ["--method", "grad,ig", "--steps", "32"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default=os.path.join(ROOT, "sample_models"))
    ap.add_argument("--out", default=os.path.join(ROOT, "reports"))
    a = ap.parse_args()
    done = 0
    for name, (fname, extra) in RUNS.items():
        d = os.path.join(a.samples, name)
        model = os.path.join(d, fname)
        if not os.path.exists(model):
            cands = [f for f in sorted(os.listdir(d)) if f.endswith(".onnx")] if os.path.isdir(d) else []
            if not cands:
                print(f"skip {name}: no model in {d} (run python -m jacaudit.samples)", file=sys.stderr)
                continue
            model = os.path.join(d, cands[0])
        out = os.path.join(a.out, f"saliency-{name}")
        cmd = [sys.executable, "-m", "jacaudit", "saliency", os.path.relpath(model, ROOT),
               os.path.relpath(os.path.join(d, "examples"), ROOT), "--mask-suffix", "_mask", "--seed", "0",
               "--out", os.path.relpath(out, ROOT), "--format", "html,json,md", *extra]
        print("$", " ".join(cmd[1:]), file=sys.stderr)
        p = subprocess.run(cmd, cwd=ROOT)
        if p.returncode not in (0, 1):
            print(f"{name}: exit {p.returncode}", file=sys.stderr)
            return p.returncode
        done += 1
    print(f"{done} report(s) written under {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
