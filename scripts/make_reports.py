"""Regenerate reports/ from the sample models (sample_models/, built by ``python -m jacaudit.samples``).

    python scripts/make_reports.py [--samples sample_models] [--out reports]

Runs each command on the samples it suits, writing reports/<command>-<model>/report.{html,json,md}:
saliency on the image classifiers' examples/ (object masks via --mask-suffix _mask; all methods and the
sanity check on shapes), verify on the tabular MLP, the flow and the sequence model (through its embedding
output), jacobian on the robot arm (float64) and the flow, inspect on the sequence model, robustness on the
brittle/robust pair with its gate (robust/gate.toml). Deterministic (--seed 0).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (report folder, command, model path relative to the samples folder, arguments)
RUNS = [
    ("saliency-shapes", "saliency", "shapes/shapes_cnn.onnx",
     ["shapes/examples", "--method", "all", "--sanity", "--ig-steps", "32", "--sg-samples", "16"]),
    ("saliency-shortcut", "saliency", "shortcut/shortcut_cnn.onnx",
     ["shortcut/examples", "--method", "grad,ig", "--ig-steps", "32"]),
    ("verify-tabular", "verify", "tabular/tabular_mlp.onnx", []),
    ("verify-flow", "verify", "flow/flow.onnx", []),
    ("verify-sequence", "verify", "sequence/sequence.onnx", ["--wrt", "embeddings"]),
    ("jacobian-arm", "jacobian", "arm/arm.pt", ["--shape", "1,3", "--dtype", "float64"]),
    ("jacobian-flow", "jacobian", "flow/flow.onnx", ["--output-name", "z", "--linearity"]),
    ("inspect-sequence", "inspect", "sequence/sequence.onnx", []),
    ("robustness-shapes", "robustness", "shapes/shapes_cnn.onnx", ["robust/data", "--config", "robust/gate.toml"]),
    ("robustness-robust", "robustness", "robust/robust_cnn.onnx", ["robust/data", "--config", "robust/gate.toml"]),
    ("transfer-shapes", "transfer", "shapes/shapes_cnn.onnx",
     ["transfer/source", "--target-data", "transfer/target", "--layer", "all"]),
    ("geometry-arm", "geometry", "arm/arm.pt",
     ["--line", "0.4,-0.3,0", "0.4,3.4416,0", "--steps", "25", "--dtype", "float64"]),
    ("geometry-flow", "geometry", "flow/flow.onnx", ["--output-name", "z", "--logdet-output", "log_det_jacobian", "--density",
                                                     "--dtype", "float64"]),
    ("gradflow-shapes", "gradflow", "shapes/shapes_cnn.onnx", ["--input", "shapes/examples/02_circle.png"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default=os.path.join(ROOT, "sample_models"))
    ap.add_argument("--out", default=os.path.join(ROOT, "reports"))
    a = ap.parse_args()
    done = 0
    for folder, command, model, args in RUNS:
        model_path = os.path.join(a.samples, model)
        if not os.path.exists(model_path):
            print(f"skip {folder}: {model_path} missing (run python -m jacaudit.samples)", file=sys.stderr)
            continue
        rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731  (paths in the reports stay repo-relative)
        args = [rel(os.path.join(a.samples, x)) if "/" in x and os.path.exists(os.path.join(a.samples, x)) else x
                for x in args]
        if "--config" in args:  # a global option: before the command
            k = args.index("--config")
            glob, args = args[k:k + 2], args[:k] + args[k + 2:]
        else:
            glob = []
        out = os.path.join(a.out, folder)
        cmd = [sys.executable, "-m", "jacaudit", *glob, command, rel(model_path), *args,
               "--out", rel(out), "--format", "html,json,md"]
        if command != "inspect":
            cmd += ["--seed", "0"]
        if command == "saliency":
            cmd += ["--mask-suffix", "_mask"]
        print("$", " ".join(cmd[1:]), file=sys.stderr)
        p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        if p.returncode not in (0, 1):
            print(f"{folder}: exit {p.returncode}", file=sys.stderr)
            return p.returncode
        done += 1
    print(f"{done} report(s) written under {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
