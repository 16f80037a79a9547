"""Per-batch results on disk (``OUT/shards``): written as batches finish, reused by ``--resume``.

A shard is one batch of the run: ``batch-NNNNNN.json`` (the batch record: per-input measurements, candidate
pictures as base64 PNG, plain JSON) and, when the batch has arrays (adversarial inputs, sensitivity directions),
``batch-NNNNNN.npz`` beside it (plain numeric arrays, read with ``allow_pickle=False``). Each file is written
atomically, the ``.npz`` first: a ``.json`` present means its batch is complete. ``manifest.json`` holds the
run's fingerprint (model file digest, data ids and arrays digest, options, versions): ``--resume`` reuses
shards only under the same fingerprint and refuses otherwise, naming what differs. JSON keeps every float
exactly (``repr`` round-trips), so a resumed run's report equals an uninterrupted one's.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["ShardStore", "digest_file", "encode_record", "decode_record"]

FORMAT = 1


def digest_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_record(rec: dict[str, Any]) -> tuple[str, bytes | None]:
    """A batch record -> (JSON text, .npz bytes of its arrays or None)."""
    arrays = rec.get("arrays") or {}
    body = {k: v for k, v in rec.items() if k != "arrays"}
    body["array_keys"] = sorted(arrays)
    blob = None
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        blob = buf.getvalue()
    return json.dumps(body, allow_nan=True, separators=(",", ":")), blob


def decode_record(text: str, blob: bytes | None) -> dict[str, Any]:
    rec = json.loads(text)
    keys = rec.pop("array_keys", [])
    arrays: dict[str, np.ndarray] = {}
    if keys:
        if blob is None:
            raise InputError("a shard's arrays are missing")
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            arrays = {k: z[k] for k in keys}
    rec["arrays"] = arrays
    return rec


def _atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardStore:
    """``OUT/shards`` for one run. ``resume=False`` starts afresh (old shards removed); ``resume=True`` keeps
    the finished batches of a run with the same fingerprint (none there: starts afresh, said in ``note``)."""

    def __init__(self, out_dir: str, fingerprint: dict[str, Any], *, resume: bool):
        self.dir = os.path.join(str(out_dir), "shards")
        self.fingerprint = fingerprint
        self.note = ""
        manifest = os.path.join(self.dir, "manifest.json")
        old = None
        if os.path.isfile(manifest):
            try:
                with open(manifest, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = None
        if resume:
            if old is None:
                self.note = f"--resume: no earlier shards in {self.dir}; every batch is computed"
            else:
                prev = old.get("fingerprint", {})
                diff = sorted(k for k in set(prev) | set(fingerprint) if prev.get(k) != fingerprint.get(k))
                if diff or old.get("format") != FORMAT:
                    raise InputError(f"--resume: the shards in {self.dir} were made by another run ("
                                     f"{', '.join(diff) or 'shard format'} differ); run without --resume to "
                                     "start afresh")
        os.makedirs(self.dir, exist_ok=True)
        if not resume or old is None:
            for f in os.listdir(self.dir):
                if f.startswith("batch-") or f == "manifest.json":
                    os.remove(os.path.join(self.dir, f))
            _atomic(manifest, json.dumps({"format": FORMAT, "fingerprint": fingerprint}, indent=1).encode())

    def _path(self, batch: int, ext: str) -> str:
        return os.path.join(self.dir, f"batch-{batch:06d}.{ext}")

    def count(self) -> int:
        """How many batches are complete on disk (without reading them)."""
        return sum(1 for f in os.listdir(self.dir) if f.startswith("batch-") and f.endswith(".json"))

    def finished(self) -> dict[int, dict[str, Any]]:
        """The complete batches on disk (a .json without its .npz is incomplete and ignored)."""
        out = {}
        for f in sorted(os.listdir(self.dir)):
            if not (f.startswith("batch-") and f.endswith(".json")):
                continue
            b = int(f[len("batch-"):-len(".json")])
            try:
                with open(os.path.join(self.dir, f), encoding="utf-8") as fh:
                    text = fh.read()
                npz = self._path(b, "npz")
                blob = open(npz, "rb").read() if os.path.exists(npz) else None
                out[b] = decode_record(text, blob)
            except (OSError, ValueError, InputError):
                continue
        return out

    def remove(self) -> None:
        """The run completed and its report is written: the shards go (the folder too, when nothing else is in it)."""
        if not os.path.isdir(self.dir):
            return
        for f in os.listdir(self.dir):
            if f.startswith("batch-") or f in ("manifest.json", "ray.log"):
                os.remove(os.path.join(self.dir, f))
        try:
            os.rmdir(self.dir)
        except OSError:
            pass

    def put(self, batch: int, text: str, blob: bytes | None) -> None:
        if blob is not None:
            _atomic(self._path(batch, "npz"), blob)
        _atomic(self._path(batch, "json"), text.encode("utf-8"))


def fingerprint(model_path: str, index: Any, **parts: Any) -> dict[str, str]:
    """What makes two runs' batches interchangeable: the model file's digest, the data (ids, positions, labels,
    files, decoded arrays), the options given as ``parts`` (repr'd), jacaudit's and torch's versions."""
    import torch

    from .. import __version__

    h = hashlib.sha256()
    for e in index.entries:
        h.update(repr((e.id, e.position, e.label, e.path)).encode())
        if e.path is not None and os.path.exists(e.path):
            st = os.stat(e.path)
            h.update(repr((st.st_size, st.st_mtime_ns)).encode())
        if e.sample is not None:
            h.update(np.ascontiguousarray(e.sample.array).tobytes())
            for k in sorted(e.sample.extra):
                h.update(k.encode() + np.ascontiguousarray(e.sample.extra[k]).tobytes())
    fp = {"model": digest_file(model_path) if os.path.isfile(model_path) else model_path,
          "data": h.hexdigest(), "versions": f"jacaudit {__version__}, torch {torch.__version__}"}
    for k, v in sorted(parts.items()):
        fp[k] = hashlib.sha256(_stable_repr(v).encode()).hexdigest()[:16]
    return fp


def _stable_repr(v: Any) -> str:
    try:
        import torch
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)}:{v.dtype}:" + hashlib.sha256(
                v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, dict):
        return "{" + ",".join(f"{k!r}:{_stable_repr(v[k])}" for k in sorted(v, key=str)) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_stable_repr(x) for x in v) + "]"
    if hasattr(v, "__dataclass_fields__"):
        return type(v).__name__ + _stable_repr({f: getattr(v, f) for f in v.__dataclass_fields__})
    if isinstance(v, np.ndarray):
        return f"array{v.shape}:" + hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
    return repr(v)


def plain(v: Any) -> Any:
    """Dataclasses, lists, dicts, numpy scalars -> JSON-able values, floats kept as they are (NaN and inf
    included: a shard is our own file, read back by :func:`decode_record`; rebuild with
    ``jacaudit.results._from``)."""
    import dataclasses

    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if v is None or isinstance(v, (bool, str, int, float)):
        return v
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if hasattr(v, "tolist"):
        return plain(v.tolist())
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    raise TypeError(f"cannot keep {type(v).__name__} in a shard")
