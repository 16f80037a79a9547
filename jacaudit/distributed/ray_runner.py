"""The batches of a run on a Ray cluster: a Ray Dataset of batch numbers, ``map_batches`` on an actor pool whose
actors load the model once, records streamed back to the driver as they finish. Imported only with ``--ray``."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from typing import Any, Iterator

from ..errors import InputError, RuntimeFailure

__all__ = ["run_on_ray", "connect"]


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        from . import RAY_EXTRA_MESSAGE
        raise InputError(RAY_EXTRA_MESSAGE) from None
    return ray


def connect(address: str, device: str = "cpu") -> Any:
    """``auto``: the cluster this machine belongs to (``RAY_ADDRESS`` or a running head); ``local``: a new local
    cluster for this run; anything else: that address. Already connected: kept."""
    import logging

    ray = _import_ray()
    for name in ("ray", "ray.data"):  # Ray's own progress and info lines stay off our stderr
        logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return ray
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR",
                          "configure_logging": True}
    if address not in ("local", "auto"):
        _reachable(address)
    try:
        if address == "local":
            ray.init(address="local", **kw)
        elif address == "auto":
            ray.init(address="auto", **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"--ray {address}: cannot connect ({first})") from None
    return ray


_NATIVE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\] ")


@contextlib.contextmanager
def native_log_filter(log_path: str | None):
    """Ray's C++ core writes its log lines (``[date time E pid tid] file.cc:N: ...``) straight to file
    descriptor 2; our stderr is one line per message. While Ray runs, fd 2 goes through a pipe: Ray's native
    lines go to ``log_path`` (or nowhere), everything else to the real stderr unchanged."""
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    sink = open(log_path, "a", encoding="utf-8") if log_path else None

    def pump() -> None:
        with os.fdopen(r, "rb") as src:
            for line in src:
                text = line.decode("utf-8", "replace")
                if _NATIVE_LOG.match(text):
                    if sink is not None:
                        sink.write(text)
                else:
                    os.write(real, line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)   # closes the pipe's last write end: the pump ends
        t.join(timeout=5)
        os.close(real)
        if sink is not None:
            sink.close()


def _reachable(address: str, timeout: float = 5.0) -> None:
    """An explicit ``host:port`` (or ``ray://host:port``) answers a TCP connect within ``timeout``: else one line,
    exit 2 (ray.init would retry for a minute or more)."""
    import socket

    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        raise InputError(f"--ray {address}: give auto, local, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise InputError(f"--ray {address}: nothing answers at {host}:{port} ({e.strerror or type(e).__name__})") \
            from None


class _Worker:
    """One Ray actor: loads the model once, computes whole batches (rows of the Ray Dataset are batch numbers)."""

    def __init__(self, job: Any):
        import torch

        torch.set_num_threads(max(1, int(job.threads)))
        from ..models import load

        from . import _functions

        self.job = job
        model = load(job.model_path, **job.load)  # its runtime counts the gradient paths (each batch record says)
        ctx_cls, _ = _functions(job)
        self.bctx = ctx_cls(model, job.plan)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from . import compute_one, decode_entries
        from .shards import encode_record

        bs, texts, blobs = [], [], []
        for b, ents in zip(batch["batch"], batch["entries"]):
            rec = compute_one(self.job, self.bctx, int(b), decode_entries(bytes(ents)))
            rec["worker"] = f"worker pid {os.getpid()}"
            text, blob = encode_record(rec)
            bs.append(int(b))
            texts.append(text)
            blobs.append(blob or b"")
        return {"batch": bs, "text": texts, "blob": blobs}


def run_on_ray(job: Any, todo: list[int], address: str, *, workers: int | None = None, device: str = "cpu"
               ) -> Iterator[tuple[int, str, bytes | None]]:
    """Yield (batch, record JSON, arrays .npz bytes) for every batch in ``todo``, as they finish."""
    import copy

    ray = connect(address, device)
    import ray.data

    gpus = 1 if str(device).startswith("cuda") else 0
    res = ray.cluster_resources()
    if workers is None:
        workers = int(res.get("GPU", 0)) if gpus else int(res.get("CPU", 1))
        workers = max(1, min(workers, len(todo)))
    if gpus and res.get("GPU", 0) < 1:
        raise InputError("--device cuda with --ray: the Ray cluster has no GPU")
    # each row carries its batch's entries (image paths, or decoded arrays as .npz bytes); the actors get the
    # job without the index
    from . import encode_entries

    light = copy.copy(job)
    light.index = None
    B = job.batch_size
    rows = [{"batch": b, "entries": encode_entries(job.index.entries[b * B:(b + 1) * B])} for b in todo]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = False
    ds = ray.data.from_items(rows, override_num_blocks=len(todo))
    out = ds.map_batches(_Worker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                         fn_constructor_kwargs={"job": light}, num_cpus=1,
                         num_gpus=gpus, zero_copy_batch=False)
    try:
        for row in out.iter_rows():
            blob = row["blob"]
            yield int(row["batch"]), row["text"], (bytes(blob) if blob else None)
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, InputError):
            raise cause from None
        first = str(e).strip().splitlines()
        raise RuntimeFailure(f"Ray: {first[-1] if first else type(e).__name__}") from None
