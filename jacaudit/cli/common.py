"""Shared CLI plumbing: consoles (stdout = data, stderr = messages), error -> exit-code mapping, options.

Nothing here imports torch: ``jacaudit --help`` must stay fast.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import typer
from rich.console import Console

from ..errors import EXIT_RUNTIME, JacauditError

# stdout carries data; stderr carries messages and progress.
# Not a terminal (CI logs, pipes): a wide fixed width so tables do not wrap into unreadable columns.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class State:
    debug: bool = False
    quiet: bool = False
    threads: int | None = None
    config_path: str | None = None
    model_args: tuple = ()
    #: --runtime / JACAUDIT_RUNTIME: "auto", "onnxruntime" or "torch" (ONNX models; TorchScript ignores it)
    runtime: str = "auto"
    #: while a command computes, its notes and warnings wait here (printed once it completed): an error is then
    #: the only line on stderr
    deferred: list | None = None


state = State()


def info(msg: str) -> None:
    if not state.quiet:
        if state.deferred is not None:
            state.deferred.append((msg, None))
        else:
            err.print(msg, markup=False)


def warn(msg: str) -> None:
    if state.deferred is not None:
        state.deferred.append((f"warning: {msg}", "yellow"))
    else:
        err.print(f"warning: {msg}", style="yellow", markup=False)


def _from_torch(filename: str) -> bool:
    """A warning raised by torch's own code (not by a model's forward)."""
    mod = sys.modules.get("torch")
    base = os.path.dirname(getattr(mod, "__file__", "") or "") if mod is not None else ""
    return bool(base) and os.path.abspath(str(filename)).startswith(base + os.sep)


@contextlib.contextmanager
def deferred_messages() -> Iterator[None]:
    """Hold info/warn lines back until the block completes; they are printed then, dropped when it raised
    (the error line stands alone; ``--debug`` prints them before the traceback)."""
    import warnings

    state.deferred = []
    ok = False
    caught: list = []
    try:
        # Python warnings of the model or a library (a TorchScript forward's warnings.warn, say) become one
        # "warning:" line each, once, instead of two raw lines per call
        with warnings.catch_warnings(record=True) as rec:
            try:
                yield
                ok = True
            finally:
                caught = list(rec)
    finally:
        pending, state.deferred = state.deferred, None
        if ok or state.debug:
            for msg, style in pending:
                err.print(msg, style=style, markup=False)
            seen = set()
            for w in caught:
                if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
                    continue  # API deprecations inside libraries are for developers, not for this run's user
                if issubclass(w.category, FutureWarning) and _from_torch(w.filename):
                    continue  # torch announcing its own API changes (torch.jit.load's deprecation, 2.14)
                text = (str(w.message).strip().splitlines() or [""])[0]
                if (w.category.__name__, text) not in seen:
                    seen.add((w.category.__name__, text))
                    err.print(f"warning: {text} ({w.category.__name__})", style="yellow", markup=False)


def fail(msg: str, code: int) -> "typer.Exit":
    err.print(f"error: {msg}", style="bold red", markup=False)
    return typer.Exit(code)


def parse_model_arg(text: str):
    """A --model-arg value: int, float, true/false, or else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


RUNTIMES = ("auto", "onnxruntime", "torch")  # the same as jacaudit.models.onnx.ortgrad.RUNTIMES (no torch here)


def resolve_runtime(option: str | None, configured: Any = None, config_path: str | None = None) -> str:
    """--runtime, else JACAUDIT_RUNTIME, else the config file's top-level ``runtime``, else "auto"; a bad
    environment or config value is an InputError (exit 2)."""
    from ..errors import InputError

    if option is not None:
        return option
    env = os.environ.get("JACAUDIT_RUNTIME", "").strip()
    if env:
        if env.lower() not in RUNTIMES:
            raise InputError(f"JACAUDIT_RUNTIME={env!r}: use one of {', '.join(RUNTIMES)}")
        return env.lower()
    if configured is None:
        return "auto"
    if not isinstance(configured, str) or configured.strip().lower() not in RUNTIMES:
        raise InputError(f"{config_path or 'config'}: runtime = {configured!r}: use one of {', '.join(RUNTIMES)}")
    return configured.strip().lower()


def model_spec(device: str | None, dtype: str | None) -> dict:
    """The keyword arguments of ``jacaudit.models.load`` for this run (here and on Ray workers)."""
    return {"device": device, "dtype": dtype, "extra_args": state.model_args, "runtime": state.runtime}


def load_model(path: str, device: str | None = "cpu", dtype: str | None = None):
    """``jacaudit.load`` with the global --model-arg values (extra arguments of a TorchScript forward) and the
    global --runtime (ONNX models); the model's onnxruntime runtime counts its input-gradient calls by path (the
    report says which path computed them: :func:`gradient_path`)."""
    from ..models import load

    return load(path, **model_spec(device, dtype))


def gradient_path(model) -> str | None:
    """Which path computed the input gradients of this run (``environment.gradients``): "onnxruntime", "torch
    interpreter (<reason>)" or both; None where unknown (TorchScript, no gradient taken). A dataset command's
    batches say it themselves (``model._batch_gradient_paths``: also shards reused or computed on Ray)."""
    if getattr(model, "format", None) != "onnx" or not hasattr(model, "runtime"):
        return None
    from ..engine.gradpaths import describe_paths, paths_of

    batches = getattr(model, "_batch_gradient_paths", None)
    if batches is None:
        return describe_paths(model)
    return describe_paths(model, set(batches) | set(paths_of(model) or ()))


def fixed_feeds(items: list[str] | None, model, main: str) -> dict:
    """``--input NAME=FILE`` (.npy) for the model's other inputs: one value fed with every sample."""
    import numpy as np
    import torch

    from ..errors import DataError, InputError

    feeds = {}
    names = [s.name for s in model.inputs]
    for it in items or []:
        if "=" not in it:
            raise InputError(f"--input {it!r}: give NAME=FILE for another model input (the data is DATA)")
        name, path = it.split("=", 1)
        if name not in names or name == main:
            raise InputError(f"--input {it!r}: {name!r} is not another input of the model "
                             f"({', '.join(n for n in names if n != main) or 'it has none'})")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read a .npy array ({type(e).__name__})") from None
        spec = model.input_spec(name)
        t = torch.as_tensor(arr)
        if spec.shape is not None and t.dim() == len(spec.shape) - 1:
            t = t[None]
        feeds[name] = t
    return feeds


def sharded_executor(ctx, analysis: str, index, model, model_path: str, batch_size: int, *, ray: str | None,
                     workers: int | None, resume: bool, device: str | None, dtype: str | None,
                     keep_shards: bool = False):
    """The batch executor of a dataset command (``executor(plan) -> records``): batches in this process, or on
    Ray with ``--ray``; finished batches into ``OUT/shards``; ``--resume`` reuses them (jacaudit.distributed)."""
    from ..errors import InputError

    ray = (ray or "").strip() or None
    if workers is not None and ray is None:
        raise InputError("--ray-workers needs --ray (auto, local or an address)")
    if ray is not None:
        from ..distributed.ray_runner import _import_ray
        _import_ray()  # a missing extra is one line before anything is computed

    def run(plan):
        from ..distributed import Job, run_batches
        from ..distributed.shards import ShardStore

        if ray is not None:  # a cluster that cannot be reached fails before anything is written
            from ..distributed.ray_runner import connect
            connect(ray, str(device or "cpu"))
        spec = model_spec(device, dtype)
        job = Job(analysis, plan, index, max(1, int(batch_size)), model_path, spec, threads=state.threads or 1)
        store = ShardStore(str(ctx.out_dir), shard_fingerprint(model_path, index, plan, job.batch_size, spec),
                           resume=resume)
        if store.note:
            info(store.note)
        _remove_stale_reports(str(ctx.out_dir))
        if not keep_shards:
            ctx.after_reports.append(store.remove)
        try:
            with ctx.progress(f"{analysis}" + (f" on Ray ({ray})" if ray else ""), len(index.entries)) as bar:
                recs = run_batches(job, model, store=store, ray=ray, workers=workers,
                                   device=str(device or "cpu"), progress=bar.advance, on_note=info)
            # the gradient paths of every batch (computed here, on Ray, or reused from shards) for the report
            model._batch_gradient_paths = sorted({p for r in recs for p in r.get("gradients") or ()})
            return recs
        except KeyboardInterrupt:
            n = store.count()
            raise KeyboardInterrupt(f"{n} of {job.n_batches} batch(es) kept in {store.dir}: the same command with "
                                    "--resume goes on from there") from None
    return run


def shard_fingerprint(model_path: str, index, plan, batch_size: int, spec: dict) -> dict:
    """The shard store's fingerprint: a resume with another device, dtype or runtime computes afresh."""
    from ..distributed.shards import fingerprint

    return fingerprint(model_path, index, plan=plan, batch_size=batch_size, device=str(spec["device"]),
                       dtype=str(spec["dtype"]), runtime=str(spec.get("runtime", "torch")))


def _remove_stale_reports(out_dir: str) -> None:
    """A run that keeps shards in OUT first removes OUT's previous report files, so an interrupted run never
    leaves a report that looks complete (the shards say how far it got)."""
    from ..report import FORMATS

    for ext in FORMATS.values():
        p = os.path.join(out_dir, "report" + ext)
        if os.path.isfile(p):
            os.remove(p)


def labels_file(model_path, labels) -> str | None:
    """The class-labels file: the one given, else a labels.txt beside the model (said on stderr), else None."""
    if labels:
        return str(labels)
    cand = os.path.join(os.path.dirname(os.path.abspath(str(model_path))), "labels.txt")
    if os.path.isfile(cand):
        info(f"labels: {cand}")
        return cand
    return None


def setup_runtime(threads: int | None = None) -> None:
    """Torch threads and allocator settings, applied once per command that computes."""
    import torch

    n = threads if threads is not None else state.threads
    if n is None:
        env = os.environ.get("JACAUDIT_THREADS")
        n = int(env) if env else None
    if n is None:
        try:
            free = len(os.sched_getaffinity(0))
        except AttributeError:
            free = os.cpu_count() or 1
        # On small shared machines one thread is steadier than oversubscribed OpenMP teams.
        n = 1 if free <= 2 else min(free, 8)
    torch.set_num_threads(max(1, n))
    _tune_malloc()


def _tune_malloc() -> None:
    """Raise glibc's mmap/trim thresholds so large tensors are not mapped and unmapped on every op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 31)
    except Exception:
        pass


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Map library exceptions to one line on stderr and the documented exit code (traceback with --debug)."""
    try:
        yield
    except typer.Exit:
        raise
    except JacauditError as e:
        if state.debug:
            raise
        raise fail(str(e), e.exit_code) from None
    except KeyboardInterrupt as e:
        hint = e.args[0] if e.args and isinstance(e.args[0], str) else ""
        err.print(f"interrupted{'; ' + hint if hint else ''}", style="red", markup=False)
        raise typer.Exit(130) from None
    except Exception as e:  # an unexpected failure: still one line, code 3
        if state.debug:
            raise
        name = type(e).__name__
        if name == "OutOfMemoryError" or isinstance(e, MemoryError):
            raise fail(f"out of memory: {e}".splitlines()[0], EXIT_RUNTIME) from None
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        first = lines[0] if lines else ""
        if first.startswith("The following operation failed in the TorchScript interpreter") and len(lines) > 1:
            first = "TorchScript model failed: " + lines[-1]  # the model's own error is on the last line
            name = ""
        raise fail(f"{name + ': ' if name else ''}{first} (run with --debug for the traceback)", EXIT_RUNTIME) \
            from None
