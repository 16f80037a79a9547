"""Feeds for one evaluation point: every model input filled from data files, ``--shape`` or seeded synthetic values.

``jacobian`` and ``verify`` (and the Python API) take one point: :func:`load_feeds` reads it. Nothing is printed:
what a user should know comes back in ``Feeds.notes`` (the CLI shows them) and ``Feeds.warnings`` (the report).

Rules (issue 9):

* data: ``input`` is one item or a list. ``name=FILE`` feeds the input ``name``; a plain ``FILE`` is an ``.npz``
  (arrays by input name, for every input it names) or feeds the *main* input (``input_name``, else the
  differentiated one). Arrays from an ``.npz`` or a named file keep their stored shape (one axis less than
  declared: a batch axis of 1 is added, and said); a plain ``.npy`` / image is one sample of the main input
  (a batch in it: the first sample is used, and said).
* shapes: ``shape`` is one item or a list, ``name=1,3,48,192`` or plain ``1,3,48,192`` (the main input); it is
  used exactly as given. Dims left unknown come from the data (a real symbolic name shared with an input that has
  data, e.g. ``batch``); placeholders (``?``, ``DynamicDimension.0``, unnamed) never tie dims. The batch axis of a
  synthetic input is 1 by design (said in the warnings); any other unknown dim is an :class:`InputError` naming
  the input, its dynamic axes and the option to pass. Nothing is filled with 1 silently.
* the differentiated input is ``wrt`` when it names an input, else the first float input; every other input is
  held fixed at its value here.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from ..models.base import did_you_mean, format_shape, is_placeholder_dim, is_static_dim

__all__ = ["Feeds", "load_feeds", "parse_shape", "parse_named", "default_wrt"]


@dataclass
class Feeds:
    feeds: dict            # input name -> torch tensor (shape as run)
    input_name: str        # the main input: the one differentiated unless ``wrt`` names another tensor
    synthetic: bool        # the main input's values are synthetic
    source: str            # the main input's file, or "synthetic"
    notes: list[str] = field(default_factory=list)      # said to the user (info)
    warnings: list[str] = field(default_factory=list)   # go into the report
    shapes: dict[str, list[int]] = field(default_factory=dict)   # every input's shape as run
    sources: dict[str, str] = field(default_factory=dict)        # every input: its file, "--shape" or "synthetic"
    fixed: list[str] = field(default_factory=list)               # the inputs held fixed (not differentiated)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> a tuple; ``""`` / ``"()"`` is a scalar ``()``."""
    if text is None:
        return None
    body = text.strip().strip("()[]")
    try:
        dims = tuple(int(p) for p in body.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise InputError(f"cannot read the shape {text!r}; use e.g. 1,3,224,224 or name=1,3,224,224") from None
    if not dims and text.strip() not in ("()", "[]"):
        raise InputError(f"the shape {text!r} lists no sizes; use e.g. 1,3,224,224 (or () for a scalar)")
    if any(d <= 0 for d in dims):
        raise InputError(f"the shape {text!r} must list positive sizes")
    return dims


def parse_named(items: str | Sequence[str] | None, names: Sequence[str], what: str
                ) -> tuple[dict[str, str], list[str]]:
    """``name=value`` items (``name`` a model input) and plain ones. ``what`` names the option in messages."""
    if items is None:
        return {}, []
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    named: dict[str, str] = {}
    plain: list[str] = []
    for raw in items:
        item = os.fspath(raw)
        key, sep, value = item.partition("=")
        if sep and key in names:
            if key in named:
                raise InputError(f"{what} {key}=... given twice")
            named[key] = value
        elif sep and (what == "--shape" or not os.path.exists(item)):
            raise InputError(f"{what} {item}: no model input named {key!r}{did_you_mean(key, list(names))}; "
                             f"inputs are: {', '.join(names)}")
        else:
            plain.append(item)
    return named, plain


def default_wrt(model: Any, wrt: str | None = None) -> str | None:
    """The input differentiated: ``wrt`` when it is an input; None when it is an internal tensor; else the first
    float input (an input of unknown dtype counts as float), else the first input."""
    names = [s.name for s in model.inputs]
    if wrt is not None:
        return wrt if wrt in names else None
    for s in model.inputs:
        if s.is_float:
            return s.name
    for s in model.inputs:
        if s.dtype is None and getattr(s, "dtype_name", None) is None:
            return s.name
    return names[0]


def load_feeds(model: Any, input: str | Sequence[str] | None = None, *, input_name: str | None = None,
               wrt: str | None = None, seed: int = 0, shape: str | Sequence[str] | None = None,
               preprocess: dict[str, Any] | None = None) -> Feeds:
    """One evaluation point for every model input (see the module docstring for the rules).

    ``preprocess`` holds the keyword arguments of :meth:`jacaudit.data.Preprocess.infer` for image files."""
    import torch

    from .. import data as D

    names = [s.name for s in model.inputs]
    specs = {s.name: s for s in model.inputs}
    if input_name is not None:
        model.input_spec(input_name)  # a clear error for an unknown name
    diff = default_wrt(model, wrt)
    main = input_name or diff or names[0]
    spec = specs[main]

    files, plain_files = parse_named(input, names, "--input")
    shapes_txt, plain_shapes = parse_named(shape, names, "--shape")
    if len(plain_files) > 1:
        raise InputError(f"{len(plain_files)} plain --input files ({', '.join(plain_files)}); give one, and the "
                         "others as --input NAME=FILE")
    if len(plain_shapes) > 1:
        raise InputError("more than one plain --shape; give the others as --shape NAME=1,2,3")
    if plain_shapes:
        if main in shapes_txt:
            raise InputError(f"--shape given twice for input {main!r}")
        shapes_txt[main] = plain_shapes[0]
    given_shape = {k: parse_shape(v) for k, v in shapes_txt.items()}
    for k, v in given_shape.items():
        _check_given_shape(specs[k], v)

    notes: list[str] = []
    warnings: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}

    def pp_for(s: Any, strict: bool):
        pp_kw = dict(preprocess or {})
        try:
            return D.Preprocess.infer(s.shape, preset=pp_kw.get("preset"), size=D.parse_size(pp_kw.get("size")),
                                      mean=D.parse_floats(pp_kw.get("mean")), std=D.parse_floats(pp_kw.get("std")),
                                      scale=pp_kw.get("scale"), layout=pp_kw.get("layout"),
                                      channels=pp_kw.get("channels"), **({"resize": pp_kw["resize"]}
                                                                         if pp_kw.get("resize") else {}))
        except Exception:
            if strict:
                raise
            return None

    # -- data files ---------------------------------------------------------------------------------------
    if plain_files:
        path = plain_files[0]
        if path.lower().endswith(".npz"):
            for k, a in _read_npz(path, names, main).items():
                if k in files:
                    raise InputError(f"input {k!r} is both in {path} and given as --input {k}=...")
                arrays[k] = _as_stored(a, specs[k], path, notes)
                sources[k] = path
        else:
            arrays[main], w = _one_sample(path, spec, pp_for(spec, D.is_image_path(path)))
            sources[main] = path
            warnings += w
    for k, path in files.items():
        if k in arrays:
            raise InputError(f"input {k!r} is given twice (--input {k}=... and in {sources[k]})")
        s = specs[k]
        if D.is_image_path(path):
            arrays[k], w = _one_sample(path, s, pp_for(s, True))
            warnings += w
        elif path.lower().endswith(".npz"):
            z = _read_npz(path, [k], k)
            if k not in z:
                raise InputError(f"{path}: no array named {k!r} (arrays: {', '.join(sorted(z))})")
            arrays[k] = _as_stored(z[k], s, path, notes)
        else:
            arrays[k] = _as_stored(_np_load(path), s, path, notes)
        sources[k] = path
    for k, a in arrays.items():
        D.check_finite(a, sources[k] if k == main else f"{sources[k]} (input {k!r})")
        arrays[k] = _cast(a, specs[k], sources[k])
        _check_static(specs[k], a.shape, sources[k])
        if k in given_shape and tuple(a.shape) != given_shape[k]:
            raise InputError(f"input {k!r}: --shape {','.join(map(str, given_shape[k]))} but {sources[k]} holds "
                             f"shape {tuple(a.shape)}; drop one of them")

    # -- the shapes of the inputs without data ------------------------------------------------------------
    known: dict[str, tuple[int, str]] = {}   # real symbolic dim name -> (size, where it came from)
    for k, shp in [*((k, a.shape) for k, a in arrays.items()), *given_shape.items()]:
        for d, v in zip(specs[k].shape or (), shp):
            if isinstance(d, str) and not is_placeholder_dim(d) and not is_static_dim(d):
                if d in known and known[d][0] != v:
                    raise InputError(f"dim {d!r} is {known[d][0]} in input {known[d][1]!r} but {v} in input "
                                     f"{k!r}; the model ties them")
                known.setdefault(d, (int(v), k))
    fill = {d: v for d, (v, _) in known.items()}
    run_shape: dict[str, tuple[int, ...]] = {}
    errors: list[str] = []
    batch_set: list[str] = []
    missing: list[str] = []
    for s in model.inputs:
        if s.name in arrays:
            continue
        if s.name in given_shape:
            run_shape[s.name] = given_shape[s.name]
            continue
        if s.shape is None:
            missing.append(s.name)
            continue
        shp = list(s.shape)
        if s.name == main and len(shp) == 4 and any(not is_static_dim(d) for d in shp[1:]):
            pp = pp_for(s, False)
            if pp is not None and pp.size is not None and (preprocess or {}).get("size"):
                for i, v in zip(range(1, 4), pp.tensor_shape(*pp.size)):
                    if not is_static_dim(shp[i]):
                        shp[i] = v  # the image size the user asked for (--size)
        try:
            s2 = dataclasses.replace(s, shape=tuple(shp))
            run_shape[s.name] = s2.concrete_shape(fill, batch=1)
        except InputError as e:
            errors.append(str(e))
            continue
        if shp and not is_static_dim(shp[0]) and not (isinstance(shp[0], str) and shp[0] in fill
                                                and not is_placeholder_dim(shp[0])):
            batch_set.append(s.name)
    if missing:
        raise InputError(f"input(s) {', '.join(repr(m) for m in missing)} have no data and no declared shape: "
                         f"give data (--input NAME=FILE.npy, or an .npz by input name) or a shape "
                         f"(--shape {missing[0]}=1,...)")
    if errors:
        raise InputError("; ".join(errors))

    # -- synthetic values -----------------------------------------------------------------------------------
    for s in model.inputs:
        if s.name in arrays:
            continue
        shp = run_shape[s.name]
        D.check_synthetic_size(shp, s.name)
        s2 = dataclasses.replace(s, shape=shp)
        is_main = s.name == main
        pp = pp_for(s2, False) if is_main else None
        sd = seed if is_main else seed + 1 + names.index(s.name)
        if len(shp) and shp[0] == 1:
            a = D.synthetic_sample(s2, seed=sd, preprocess=pp).array[None]   # an image where it is one
        else:
            rng = np.random.default_rng(sd)
            a = (rng.integers(0, 2, size=shp) if s.dtype is not None and not s.dtype.is_floating_point
                 else rng.standard_normal(shp).astype(np.float32))
        arrays[s.name] = _cast(a, s, "synthetic")
        sources[s.name] = "--shape (synthetic values)" if s.name in given_shape else "synthetic"
        if is_main:
            notes.append(f"no data for input {s.name!r}: seeded random values of shape {tuple(shp)} "
                         f"(synthetic, seed {seed})")
            warnings.append(f"input {s.name!r} is synthetic (seeded random values of shape {tuple(shp)})")
        else:
            warnings.append(f"input {s.name!r}: seeded random values of shape {tuple(shp)} (synthetic)")
    if batch_set:
        warnings.append(f"the batch axis (axis 0) of synthetic input(s) {', '.join(map(repr, batch_set))} is 1 by "
                        "design; pass --shape NAME=... to choose it")
    feeds = {k: torch.from_numpy(_contig(arrays[k])) for k in names}
    fixed = [k for k in names if k != diff]
    if len(names) > 1:
        d = diff if diff is not None else f"the internal tensor {wrt!r}"
        notes.append(f"differentiating with respect to {d}; held fixed: {', '.join(k for k in fixed)}")
    _probe_synthetic_integers(model, feeds, sources)
    warnings += _stateless(model, feeds)
    warnings += [w for w in getattr(model, "warnings", []) if w not in warnings]
    return Feeds(feeds, main, sources[main] in ("synthetic", "--shape (synthetic values)"),
                 sources[main] if sources[main] != "--shape (synthetic values)" else "synthetic", notes, warnings,
                 shapes={k: list(map(int, arrays[k].shape)) for k in names}, sources=sources, fixed=fixed)


# -- helpers ------------------------------------------------------------------------------------------------
def _check_given_shape(spec: Any, shp: tuple[int, ...]) -> None:
    if spec.shape is None:
        return
    if len(shp) != len(spec.shape):
        raise InputError(f"--shape {spec.name}={','.join(map(str, shp))} has {len(shp)} dims; input {spec.name!r} "
                         f"{format_shape(spec.shown_shape())} has {len(spec.shape)}")
    _check_static(spec, shp, "--shape")


def _check_static(spec: Any, shp: Sequence[int], where: str) -> None:
    if spec.shape is None:
        return
    if len(shp) != len(spec.shape) or any(is_static_dim(d) and d != v for d, v in zip(spec.shape, shp)):
        raise InputError(f"{where}: input {spec.name!r} gets shape {tuple(shp)}; the model declares "
                         f"{format_shape(spec.shown_shape())}")


def _array_error(path: str, e: Exception):
    """One line for an array file numpy cannot read (missing, pickled objects, corrupt)."""
    from ..errors import DataError

    if isinstance(e, FileNotFoundError):
        return DataError(f"{path}: no such file")
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "pickle" in msg.lower():  # numpy says so for any file without the .npy header, too
        msg = "not a plain .npy array: pickled objects or another format; only plain numeric arrays are read"
    return DataError(f"{path}: cannot read array file ({msg})")


def _np_load(path: str) -> np.ndarray:
    from ..errors import DataError

    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise _array_error(path, e) from None
    if not isinstance(a, np.ndarray):
        raise DataError(f"{path}: not a single array (an .npz? name it NAME=FILE.npz or pass it plainly)")
    return a


def _read_npz(path: str, names: Sequence[str], main: str) -> dict[str, np.ndarray]:
    from ..errors import DataError

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise _array_error(path, e) from None
    if not arrays:
        raise DataError(f"{path}: holds no arrays")
    if len(arrays) == 1 and next(iter(arrays)) not in names:
        return {main: next(iter(arrays.values()))}  # one unnamed array (arr_0): the main input
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise DataError(f"{path}: array {unknown[0]!r} names no model input{did_you_mean(unknown[0], list(names))}"
                        f"; inputs are: {', '.join(names)}")
    return arrays


def _as_stored(a: np.ndarray, spec: Any, path: str, notes: list[str]) -> np.ndarray:
    """An array for one input as stored; one axis less than declared: a batch axis of 1 is added (said)."""
    from ..errors import DataError

    if a.dtype == object:
        raise DataError(f"{path}: object arrays are not supported")
    if spec.shape is not None and a.ndim == len(spec.shape) - 1 and len(spec.shape) >= 1:
        try:
            _check_static(spec, (1, *a.shape), path)
        except InputError:
            pass
        else:
            notes.append(f"{path}: array {spec.name!r} of shape {a.shape} is one sample of the declared "
                         f"{format_shape(spec.shown_shape())}; a batch axis of 1 was added")
            return a[None]
    if spec.shape is not None and a.ndim != len(spec.shape):
        raise DataError(f"{path}: array {spec.name!r} has shape {a.shape}; the model input has rank "
                        f"{len(spec.shape)} (declared {format_shape(spec.shown_shape())})")
    return a


def _one_sample(path: str, spec: Any, pp: Any) -> tuple[np.ndarray, list[str]]:
    """A plain .npy / image for the main input: one sample, batch axis 1 (a batch: the first sample)."""
    from .. import data as D

    if spec.shape is None and path.lower().endswith(".npy"):
        return _np_load(path), []   # no declared shape (TorchScript): the array is the whole input
    samples = D.load_sample(path, pp, spec) if pp is not None else D.load_arrays(path, spec)
    w = [f"{path} holds {len(samples)} samples; the first was used"] if len(samples) > 1 else []
    return samples[0].array[None], w


def _cast(a: np.ndarray, spec: Any, where: str) -> np.ndarray:
    from ..errors import DataError
    import torch

    dt = getattr(spec, "dtype", None)
    if dt is None:
        return _contig(a if a.dtype != np.float16 else a.astype(np.float32))
    if dt.is_floating_point:
        if a.dtype.kind not in "fiub":
            raise DataError(f"{where}: array of dtype {a.dtype} cannot feed the float input {spec.name!r}")
        # the declared dtype (float64 data for a float32 input is narrowed: the graph computes in float32)
        return _contig(a, dtype=np.float64 if dt == torch.float64 else np.float32)
    np_dt = torch.empty((), dtype=dt).numpy().dtype
    if a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.round(a))):
        raise DataError(f"{where}: input {spec.name!r} is {str(dt).replace('torch.', '')}, the array holds "
                        "non-integer values")
    return _contig(a.astype(np_dt, copy=False))



def _contig(a: np.ndarray, dtype: Any = None) -> np.ndarray:
    """C-contiguous, of ``dtype`` when given; keeps a 0-d array 0-d (np.ascontiguousarray makes it 1-d)."""
    a = np.asarray(a, dtype=dtype)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _probe_synthetic_integers(model: Any, feeds: dict, sources: dict[str, str]) -> None:
    """Integer inputs with synthetic values (a sample rate, a length, token ids: 0 or 1) can send a model down a
    path real data does not take (silero-vad's 8 kHz branch for a 16 kHz window) and fail deep inside it: one
    forward run here turns that into one line naming those inputs and their values (bad input, exit 2)."""
    import torch

    from ..errors import JacauditError
    ints = [k for k, v in feeds.items() if sources.get(k) in ("synthetic", "--shape (synthetic values)")
            and not v.is_floating_point()]
    if not ints:
        return
    try:
        with torch.no_grad():
            model.run(feeds)
    except JacauditError as e:
        shown = ", ".join(f"{k}={feeds[k].reshape(-1).tolist()}" if feeds[k].numel() <= 4 else
                          f"{k} (shape {tuple(feeds[k].shape)})" for k in ints)
        raise InputError(f"the model failed on synthetic values of its integer input(s) {shown} ({e}); give them "
                         f"real values: --input {ints[0]}=FILE.npy") from e


def _stateless(model: Any, feeds: dict) -> list[str]:
    """A model keeping state between calls: derivatives describe one call (said, never hidden)."""
    check = getattr(model, "check_stateless", None)
    msg = check(feeds) if check is not None else None
    return [msg] if msg else []
