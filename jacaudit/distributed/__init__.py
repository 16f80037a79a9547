"""Dataset audits in batches: in this process, or sharded on a Ray cluster, resumable, with one answer.

A dataset command (``robustness``) splits its run into a plan (decided once on the driver), batches of inputs
(computed anywhere: :func:`jacaudit.analyses.robustness.compute_batch` returns plain data) and an aggregate
(on the driver). This module runs the batches:

* **here** (default): one after another in this process;
* **on Ray** (``--ray auto|local|ADDRESS``, ``robustness`` and ``saliency``): the batch numbers are a Ray Dataset, processed by ``map_batches`` on
  an actor pool whose actors load the model once (``--ray-workers N``; ``num_gpus=1`` each with ``--device
  cuda``); the records stream back to the driver as they finish.

Either way each finished batch is written to ``OUT/shards`` (:class:`~jacaudit.distributed.shards.ShardStore`)
and ``--resume`` skips the batches already there. Batches are the same in both (consecutive ``--batch-size``
slices of the run's inputs in their listed order), every random number is seeded from the run seed and the
input's stable id, and the aggregate sorts by batch, so a sharded run's report equals the single-process
report apart from timings. Ray is imported only with ``--ray`` (an optional extra: ``pip install
'jacaudit[ray]'``).

Faults: a worker process that dies is restarted by Ray and its batch retried (Ray Data's actor pools retry
tasks lost to a dead actor); a batch that raises (e.g. a tensor the model rejects) becomes a failure of its
inputs and the rest go on; an input error (a bad option, inconsistent data) stops the run with its one line.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InputError, JacauditError

__all__ = ["Job", "run_batches", "RAY_EXTRA_MESSAGE"]

RAY_EXTRA_MESSAGE = ("--ray needs Ray, an optional extra: pip install 'jacaudit[ray]' (or pip install 'ray[data]')")

# analysis -> (module, context factory, batch function)
_ANALYSES = {"robustness": ("jacaudit.analyses.robustness", "BatchContext", "compute_batch"),
             "saliency": ("jacaudit.analyses.saliency", "SaliencyContext", "saliency_batch")}


@dataclass
class Job:
    """Everything a worker needs to compute any batch of the run (picklable)."""

    analysis: str
    plan: Any
    index: Any                         # jacaudit.data.dataset.DatasetIndex
    batch_size: int
    model_path: str
    load: dict[str, Any] = field(default_factory=dict)  # keyword arguments of jacaudit.models.load
    threads: int = 1

    @property
    def n_batches(self) -> int:
        return -(-len(self.index.entries) // self.batch_size)


def encode_entries(entries: list) -> bytes:
    """Dataset entries -> bytes for a Ray Dataset row: an .npz of their arrays plus their fields as JSON (no
    pickle)."""
    import io
    import json

    import numpy as np

    meta, arrays = [], {}
    for k, e in enumerate(entries):
        m = {"id": e.id, "position": e.position, "label": e.label, "path": e.path, "row": e.row, "sample": None}
        if e.sample is not None:
            s = e.sample
            m["sample"] = {"name": s.name, "source": s.source, "index": s.index, "synthetic": s.synthetic,
                           "pixels": s.pixels is not None, "extra": sorted(s.extra)}
            arrays[f"a{k}"] = np.asarray(s.array)
            if s.pixels is not None:
                arrays[f"p{k}"] = np.asarray(s.pixels)
            for j, name in enumerate(sorted(s.extra)):
                arrays[f"x{k}_{j}"] = np.asarray(s.extra[name])
        meta.append(m)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_entries(blob: bytes) -> list:
    import io
    import json

    import numpy as np

    from ..data import Sample
    from ..data.dataset import Entry

    out = []
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode("utf-8"))
        for k, m in enumerate(meta):
            smp = None
            if m["sample"] is not None:
                sm = m["sample"]
                smp = Sample(name=sm["name"], source=sm["source"], array=z[f"a{k}"],
                             pixels=z[f"p{k}"] if sm["pixels"] else None,
                             extra={name: z[f"x{k}_{j}"] for j, name in enumerate(sm["extra"])},
                             synthetic=sm["synthetic"], index=sm["index"])
            out.append(Entry(m["id"], m["position"], m["label"], m["path"], smp, m.get("row")))
    return out


def _error(rec: dict[str, Any]) -> JacauditError:
    """A worker's input error, raised again on the driver as the same type where it is ours."""
    from .. import errors

    if rec.get("error_type") == "TargetNeeded":
        from ..engine.gradients import TargetNeeded
        return TargetNeeded(rec["error"], rec.get("error_output", "?"), tuple(rec.get("error_shape", ())))
    cls = getattr(errors, str(rec.get("error_type")), None)
    if isinstance(cls, type) and issubclass(cls, JacauditError):
        try:
            return cls(rec["error"])
        except TypeError:
            pass
    return InputError(rec["error"])


def _functions(job: Job) -> tuple[Callable, Callable]:
    import importlib

    mod, ctx_name, fn_name = _ANALYSES[job.analysis]
    m = importlib.import_module(mod)
    return getattr(m, ctx_name), getattr(m, fn_name)


def compute_one(job: Job, bctx: Any, b: int, entries: list | None = None) -> dict[str, Any]:
    """Batch ``b`` (its ``entries``, default: from the job's index) -> its record. An input error is returned as
    ``{"error": ...}`` (the driver raises it); any other exception makes every input of the batch a failure,
    with the error's one line."""
    _, fn = _functions(job)
    s = b * job.batch_size
    if entries is None:
        entries = job.index.entries[s:s + job.batch_size]
    t0 = time.perf_counter()
    from ..engine.gradpaths import paths_of

    before = paths_of(getattr(bctx, "model", None))
    try:
        rec = fn(bctx, entries, s)
    except JacauditError as e:
        rec = {"slot0": s, "error": str(e), "error_type": type(e).__name__}
        if hasattr(e, "output") and hasattr(e, "shape"):  # TargetNeeded: the CLI adds its hint from these
            rec["error_output"], rec["error_shape"] = str(e.output), [int(d) for d in e.shape]
        return rec
    except Exception as e:  # noqa: BLE001 - one batch's failure must not stop the run
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
        rec = {"slot0": s, "n_entries": len(entries), "n": 0, "arrays": {}, "timings": {},
               "failures": [[e_.path or e_.id, f"{e_.id}: its batch failed ({msg})"] for e_ in entries]}
    rec["seconds"] = time.perf_counter() - t0
    rec["worker"] = f"pid {os.getpid()}"
    if before is not None:  # --runtime: the paths this batch's gradients took (the report's environment)
        after = paths_of(bctx.model) or {}
        rec["gradients"] = sorted(k for k, n in after.items() if n > before.get(k, 0))
    return rec


def run_batches(job: Job, model: Any, *, store: Any, ray: str | None = None, workers: int | None = None,
                device: str = "cpu", progress: Callable[[int], None] | None = None,
                on_note: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every batch of ``job``: the finished ones from ``store``, the rest computed here (``ray`` None) or on
    Ray; each new one is written to ``store`` as it finishes. ``progress(k)`` after each batch (its inputs).
    Returns the records in batch order, each through the shard encoding (so resumed and fresh runs aggregate
    the very same values). Per-worker throughput is noted through ``on_note``."""
    from .shards import decode_record, encode_record

    done = store.finished() if store is not None else {}
    todo = [b for b in range(job.n_batches) if b not in done]
    if done and on_note:
        on_note(f"--resume: {len(done)} of {job.n_batches} batch(es) reused from {store.dir}")
    if progress:
        for b in done:
            progress(done[b].get("n_entries", 0))
    recs: dict[int, dict[str, Any]] = dict(done)
    stats: dict[str, list[float]] = {}

    def finish(b: int, text: str, blob: bytes | None) -> None:
        rec = decode_record(text, blob)
        if "error" in rec:
            raise _error(rec)
        if store is not None:
            store.put(b, text, blob)
        recs[b] = rec
        st = stats.setdefault(rec.get("worker", "?"), [0, 0.0])
        st[0] += rec.get("n", 0)
        st[1] += rec.get("seconds", 0.0)
        if progress:
            progress(rec.get("n_entries", 0))

    if todo and ray is None:
        ctx_cls, _ = _functions(job)
        bctx = ctx_cls(model, job.plan)
        for b in todo:
            finish(b, *encode_record(compute_one(job, bctx, b)))
    elif todo:
        from .ray_runner import native_log_filter, run_on_ray

        log = os.path.join(store.dir, "ray.log") if store is not None else None
        with native_log_filter(log):
            for b, text, blob in run_on_ray(job, todo, ray, workers=workers, device=device):
                finish(b, text, blob)
    if on_note and stats and ray is not None:
        parts = [f"{w}: {n} input(s) in {s:.1f} s ({n / s:.2f}/s)" if s > 0 else f"{w}: {n} input(s)"
                 for w, (n, s) in sorted(stats.items())]
        on_note("Ray workers: " + "; ".join(parts))
    return [recs[b] for b in range(job.n_batches)]
