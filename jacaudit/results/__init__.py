"""The report spine: one frozen result dataclass per analysis, wrapped in a common :class:`Report` envelope.

Plain data only: this package imports neither torch nor numpy at module level (``jacaudit schema`` and
``jacaudit render`` stay light). Images travel as :class:`Image` (PNG bytes base64, small thumbnails) with an
optional path to a full-size file written beside the report.

JSON is the source of truth: ``to_json(report) -> str`` / ``from_json(text) -> Report``; HTML and Markdown are
rendered from the Report alone (``jacaudit render report.json -o report.html``).

Adding a result type (for a new analysis ``foo``)
-------------------------------------------------
1. Create ``jacaudit/results/foo.py`` with frozen dataclasses only (fields typed with: bool, int, float, str,
   None, ``X | None``, ``list[T]``, ``tuple[T, ...]``, ``dict[str, T]``, ``Literal[...]``, ``Any`` (any JSON),
   other dataclasses, :class:`Image`). Give fields a description with ``field(metadata={"doc": "..."})``
   when the name is not enough. Decorate the top-level one::

       from dataclasses import dataclass, field
       from . import result_type

       @result_type("foo")
       @dataclass(frozen=True)
       class FooResult:
           verdict: str
           score: float = field(metadata={"doc": "what it measures, and its units"})

   Every module in this package is imported by :func:`result_types`, so nothing else needs registering.
   The JSON Schema is derived from the type hints: ``jacaudit schema foo`` prints it; tests validate every
   produced report against it (``validate(report_dict)``).
2. Build the envelope in the analysis / CLI: ``make_report("foo", FooResult(...), model=model,
   settings={...every setting that changes a verdict...}, timings=..., warnings=[...])``.
3. HTML: add ``jacaudit/report/templates/foo.html.j2`` (it is included by ``base.html.j2`` with ``r`` = the
   result dataclass, ``report`` = the envelope, and the filters ``img`` (Image -> <img> data URI), ``fmt``
   (numbers), and globals ``svg_bars``, ``svg_lines`` from :mod:`jacaudit.report.svg`). Without it, the
   generic template renders every field as nested tables. Autoescaping is on: never use ``|safe`` on a
   string that came from a model or a file. Markdown: optionally add ``markdown_foo(report) -> str`` in
   :mod:`jacaudit.report.formats.markdown`'s ``SECTIONS``; else a generic key/value summary is used.

Non-finite floats are written as ``null`` (the schema allows ``null`` for every float).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Union

from .checks import BaselineComparison, Check, MetricValue

SCHEMA_VERSION = "1.2"
#: versions this package still reads and renders (1.0: no checks/metrics/baseline; 1.1: no environment.runtime /
#: environment.gradients)
READABLE_VERSIONS = ("1.0", "1.1", "1.2")
TOOL = "jacaudit"

__all__ = ["SCHEMA_VERSION", "Report", "ModelIdentity", "TensorInfo", "Environment", "Image", "result_type",
           "result_types", "make_report", "model_identity", "environment", "to_json", "to_dict", "from_json",
           "from_dict", "schema", "validate", "timed", "json_schema_for"]

_RESULTS: dict[str, type] = {}


def result_type(kind: str):
    """Class decorator registering a result dataclass under ``kind`` (the command / analysis name)."""
    def deco(cls):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        _RESULTS[kind] = cls
        cls.__result_kind__ = kind
        return cls
    return deco


def result_types() -> dict[str, type]:
    """kind -> result dataclass, importing every module of this package once."""
    import importlib
    import pkgutil

    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")
    return dict(sorted(_RESULTS.items()))


# ---------------------------------------------------------------------------------------------------------
# The envelope
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    """A small picture carried inside the report (base64 PNG), optionally with a full-size file's path."""

    data: str = field(metadata={"doc": "base64 of the image bytes"})
    width: int
    height: int
    mime: str = "image/png"
    alt: str = ""
    path: str | None = field(default=None, metadata={"doc": "full-size file written beside the report"})

    @property
    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{self.data}"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: list[int | str] | None
    dtype: str | None


@dataclass(frozen=True)
class ModelIdentity:
    path: str | None
    name: str
    format: str
    sha256: str | None
    opset: dict[str, int] | None = None
    producer: str | None = None
    parameters: int | None = None
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)


@dataclass(frozen=True)
class Environment:
    python: str
    platform: str
    jacaudit: str
    torch: str | None
    onnxruntime: str | None
    onnx: str | None
    numpy: str | None
    device: str | None = None
    threads: int | None = None
    runtime: str | None = field(default=None, metadata={
        "doc": "--runtime (auto, onnxruntime, torch): where an ONNX model's values and input gradients run "
               "(schema 1.2)"})
    gradients: str | None = field(default=None, metadata={
        "doc": "which path computed the input gradients: 'onnxruntime', 'torch interpreter (<reason>)', or both "
               "with their call counts; null where not known (TorchScript, Ray workers, no gradient; schema 1.2)"})


@dataclass(frozen=True)
class Report:
    """The common envelope of every analysis's report."""

    schema_version: str
    kind: str = field(metadata={"doc": "the analysis (command) that produced the result"})
    tool: str
    version: str
    command_line: list[str]
    created: str = field(metadata={"doc": "UTC time, ISO 8601"})
    status: Literal["pass", "warn", "fail", "inconclusive", "partial", "error"] = field(
        metadata={"doc": "from the checks: fail when a check fails or errs, warn when one warns, else pass; "
                         "inconclusive: nothing failed but the evidence was too thin for a verdict; "
                         "partial: some inputs were skipped; error"})
    exit_code: int
    model: ModelIdentity | None
    environment: Environment
    settings: dict[str, Any] = field(metadata={"doc": "every setting that changes a verdict"})
    timings: dict[str, float] = field(metadata={"doc": "seconds per phase"})
    warnings: list[str]
    result: Any
    checks: list[Check] = field(default_factory=list, metadata={"doc": "the verdicts (schema 1.1)"})
    metrics: list[MetricValue] = field(default_factory=list, metadata={
        "doc": "every number the analysis measured, by id; --fail-on/--warn-on turn one into a check"})
    baseline: BaselineComparison | None = field(default=None, metadata={
        "doc": "comparison with --baseline-report, by check id"})


# ---------------------------------------------------------------------------------------------------------
# Helpers to build it
# ---------------------------------------------------------------------------------------------------------
def _version_of(dist: str) -> str | None:
    mod = sys.modules.get(dist)
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def environment(device: str | None = None, threads: int | None = None, runtime: str | None = None,
                gradients: str | None = None) -> Environment:
    """Versions of the libraries that shape the numbers (read without importing torch)."""
    from .. import __version__

    if threads is None and "torch" in sys.modules:
        try:
            threads = int(sys.modules["torch"].get_num_threads())
        except Exception:
            threads = None
    return Environment(python=platform.python_version(), platform=platform.platform(terse=True),
                       jacaudit=__version__, torch=_version_of("torch"), onnxruntime=_version_of("onnxruntime"),
                       onnx=_version_of("onnx"), numpy=_version_of("numpy"),
                       device=None if device is None else str(device), threads=threads, runtime=runtime,
                       gradients=gradients)


def _tensor_info(spec: Any) -> TensorInfo:
    d = spec.describe() if hasattr(spec, "describe") else {"name": str(spec), "shape": None, "dtype": None}
    return TensorInfo(name=str(d["name"]), shape=d.get("shape"), dtype=d.get("dtype"))


def model_identity(model: Any) -> ModelIdentity:
    """Identity of a loaded :class:`jacaudit.models.Model` (duck-typed: path, format, metadata, inputs)."""
    md = getattr(model, "metadata", {}) or {}
    path = getattr(model, "path", None)
    opset = md.get("opset")
    return ModelIdentity(
        path=None if path is None else str(path),
        name=os.path.basename(str(path)) if path else type(model).__name__,
        format=str(getattr(model, "format", "?")),
        sha256=md.get("sha256"),
        opset={str(k): int(v) for k, v in opset.items()} if isinstance(opset, dict) else None,
        producer=md.get("producer") or None,
        parameters=md.get("parameters"),
        inputs=[_tensor_info(s) for s in getattr(model, "inputs", [])],
        outputs=[_tensor_info(s) for s in getattr(model, "outputs", [])],
    )


def command_line() -> list[str]:
    argv = list(sys.argv)
    if argv:
        base = os.path.basename(argv[0])
        argv[0] = "jacaudit" if base in ("jacaudit", "__main__.py", "main.py") else base
    return argv


def make_report(kind: str, result: Any, *, model: Any = None, settings: dict[str, Any] | None = None,
                timings: dict[str, float] | None = None, warnings: list[str] | None = None,
                exit_code: int = 0, status: str | None = None, device: str | None = None,
                argv: list[str] | None = None, checks: list[Check] | None = None,
                metrics: list[MetricValue] | None = None, baseline: BaselineComparison | None = None,
                runtime: str | None = None, gradients: str | None = None) -> Report:
    """Wrap an analysis result in the envelope. ``model`` is a loaded Model or a ModelIdentity; ``runtime`` /
    ``gradients``: the --runtime mode and the path that computed the input gradients (Environment)."""
    from .. import __version__

    if status is None:
        status = {0: "pass", 1: "fail", 2: "partial"}.get(exit_code, "error")
    ident = model if isinstance(model, ModelIdentity) or model is None else model_identity(model)
    if device is None and model is not None and hasattr(model, "device"):
        device = str(model.device)
    return Report(schema_version=SCHEMA_VERSION, kind=kind, tool=TOOL, version=__version__,
                  command_line=argv if argv is not None else command_line(),
                  created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                  status=status, exit_code=int(exit_code), model=ident,
                  environment=environment(device, runtime=runtime, gradients=gradients),
                  settings=dict(settings or {}), timings=dict(timings or {}), warnings=list(warnings or []),
                  result=result, checks=list(checks or []), metrics=list(metrics or []), baseline=baseline)


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """``with timed(t, "forward"): ...`` adds the elapsed seconds to ``t[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - t0, 6)


# ---------------------------------------------------------------------------------------------------------
# JSON in and out
# ---------------------------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    # numpy scalars / arrays without importing numpy
    if hasattr(v, "tolist"):
        return _plain(v.tolist())
    if hasattr(v, "item"):
        return _plain(v.item())
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    raise TypeError(f"cannot serialise {type(v).__name__} in a report")


def to_dict(report: Report) -> dict[str, Any]:
    return _plain(report)


def to_json(report: Report) -> str:
    return json.dumps(to_dict(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _hints(cls: type) -> dict[str, Any]:
    mod = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, globalns=vars(mod) if mod else None)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _from(tp: Any, v: Any) -> Any:
    if tp is Any or tp is object:
        return v
    if _is_union(tp):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _from(a, v)
            except (TypeError, ValueError, KeyError) as e:
                errs.append(e)
        raise ValueError(f"value {v!r:.60} matches none of {tp}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        if v not in typing.get_args(tp):
            raise ValueError(f"{v!r} not in {typing.get_args(tp)}")
        return v
    if origin in (list, typing.List):
        (a,) = typing.get_args(tp) or (Any,)
        if not isinstance(v, list):
            raise TypeError("expected a list")
        return [_from(a, x) for x in v]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(v, list):
            raise TypeError("expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from(args[0], x) for x in v)
        return tuple(_from(a, x) for a, x in zip(args, v))
    if origin is dict:
        _, a = typing.get_args(tp) or (str, Any)
        if not isinstance(v, dict):
            raise TypeError("expected an object")
        return {k: _from(a, x) for k, x in v.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise TypeError(f"expected an object for {tp.__name__}")
        hints = _hints(tp)
        kw = {}
        for f in dataclasses.fields(tp):
            if f.name in v:
                kw[f.name] = _from(hints[f.name], v[f.name])
        return tp(**kw)
    if tp is float:
        if v is None:
            return float("nan")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError("expected a number")
        return float(v)
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError("expected an integer")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise TypeError("expected a string")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise TypeError("expected a boolean")
        return v
    if tp is type(None):
        if v is not None:
            raise TypeError("expected null")
        return None
    return v


def from_dict(d: dict[str, Any]) -> Report:
    """A report dict (as written by :func:`to_json`) -> :class:`Report` with its result dataclass."""
    if not isinstance(d, dict) or "kind" not in d or "result" not in d:
        raise ValueError("not a jacaudit report (no 'kind' / 'result')")
    kinds = result_types()
    rep = _from(Report, {**d, "result": None})
    cls = kinds.get(d["kind"])
    result = _from(cls, d["result"]) if cls is not None else d["result"]
    return dataclasses.replace(rep, result=result)


def from_json(text: str | bytes) -> Report:
    return from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------------------
# JSON Schema (draft 2020-12) from the type hints
# ---------------------------------------------------------------------------------------------------------
def json_schema_for(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a type hint; dataclasses go to ``defs`` and are referenced."""
    if tp is Any or tp is object:
        return {}
    if _is_union(tp):
        args = typing.get_args(tp)
        alts = [json_schema_for(a, defs) for a in args]
        return {"anyOf": alts}
    if tp is type(None):
        return {"type": "null"}
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return {"type": "array", "prefixItems": [json_schema_for(a, defs) for a in args],
                    "minItems": len(args), "maxItems": len(args)}
        item = args[0] if args else Any
        return {"type": "array", "items": json_schema_for(item, defs)}
    if origin is dict:
        args = typing.get_args(tp)
        return {"type": "object", "additionalProperties": json_schema_for(args[1] if args else Any, defs)}
    if dataclasses.is_dataclass(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # reserved while its fields are walked (guards recursive types)
            hints = _hints(tp)
            props, required = {}, []
            for f in dataclasses.fields(tp):
                s = json_schema_for(hints[f.name], defs)
                doc = f.metadata.get("doc") if f.metadata else None
                if doc:
                    s = {**s, "description": doc}
                props[f.name] = s
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    required.append(f.name)
            body = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
            if tp.__doc__ and not tp.__doc__.startswith(f"{name}("):
                body["description"] = " ".join(tp.__doc__.split())
            defs[name] = body
        return {"$ref": f"#/$defs/{name}"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": ["number", "null"]}
    if tp is str:
        return {"type": "string"}
    return {}


def schema(kind: str | None = None) -> dict[str, Any]:
    """The JSON Schema of a report of ``kind`` (or of any kind: ``result`` is one of the registered types)."""
    kinds = result_types()
    if kind is not None and kind not in kinds:
        from ..errors import InputError
        raise InputError(f"no result type {kind!r}; known: {', '.join(kinds) or 'none'}")
    defs: dict[str, Any] = {}
    json_schema_for(Report, defs)
    env = dict(defs.pop("Report"))
    props = dict(env["properties"])
    props["schema_version"] = {"enum": list(READABLE_VERSIONS)}
    chosen = {kind: kinds[kind]} if kind else kinds
    if kind:
        props["kind"] = {"const": kind, "description": props["kind"].get("description", "")}
        props["result"] = json_schema_for(kinds[kind], defs)
        out: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                               "$id": f"https://jacaudit.dev/schema/{SCHEMA_VERSION}/{kind}.json",
                               "title": f"jacaudit {kind} report", **{k: v for k, v in env.items()
                                                                      if k != "properties"},
                               "properties": props, "$defs": defs}
        return out
    props["kind"] = {"enum": list(chosen), "description": props["kind"].get("description", "")}
    branches = []
    for k, cls in chosen.items():
        branches.append({"if": {"properties": {"kind": {"const": k}}},
                         "then": {"properties": {"result": json_schema_for(cls, defs)}}})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://jacaudit.dev/schema/{SCHEMA_VERSION}/report.json",
            "title": "jacaudit report", **{k: v for k, v in env.items() if k != "properties"},
            "properties": props, "allOf": branches, "$defs": defs}


def validate(report: Report | dict[str, Any]) -> None:
    """Validate a report against its kind's schema (needs the ``jsonschema`` package; tests use it)."""
    import jsonschema

    d = to_dict(report) if isinstance(report, Report) else report
    jsonschema.validate(d, schema(d.get("kind")), cls=jsonschema.Draft202012Validator)
