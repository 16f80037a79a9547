"""Input data for every command: image files, folders of them, .npy/.npz arrays, and synthetic inputs.

Stable API (other commands rely on it; add, don't change)::

    from jacaudit.data import Preprocess, Sample, load_inputs, iter_inputs, expand_paths, synthetic_sample,
                              load_sample, stack, PRESETS

    spec = model.input_spec()                       # jacaudit.models.TensorSpec
    pp = Preprocess.infer(spec.shape, preset="imagenet", size=None, mean=None, std=None,
                          scale=None, layout=None, channels=None)   # None = keep the inferred/preset value
    samples = load_inputs(["img.png", "folder/", "x.npz"], pp, spec)   # list[Sample]; raises DataError
    for path, item in iter_inputs(paths, pp, spec):                    # item is a Sample or a DataError
        ...                                                            # (one broken file does not stop a run)
    x = stack(samples, device="cpu", dtype=None)     # torch tensor (N, *sample shape); imports torch lazily
    s = synthetic_sample(spec, seed=0, preprocess=pp)                  # Sample(synthetic=True)

:class:`Sample` fields: ``name`` (display name), ``source`` (path or "synthetic"), ``array`` (np.float32, the
model input for ONE sample, *without* the batch axis), ``pixels`` (uint8 (H, W, 3) display RGB after resizing,
or None for array inputs), ``extra`` (other named inputs from an .npz, without batch axis), ``synthetic``.

Preprocessing (:class:`Preprocess`, frozen): ``size`` (H, W) | None, ``mean``, ``std`` (1 or C values, in the
units after ``scale``), ``scale`` "0-1" (pixels / 255) | "0-255", ``layout`` "NCHW" | "NHWC", ``channels``
"RGB" | "BGR" | "L", ``resize`` "stretch" | "crop". Presets: ``imagenet``, ``minus1to1``, ``unit``, ``raw``,
``caffe``. ``to_tensor(pixels)`` / ``from_tensor(x)`` map pixels (0..255, spec channel order) to the tensor
and back exactly; ``value_range()`` gives the per-channel tensor range of 0..255 pixels.

Arrays: ``.npy`` holds the first input; its rank equals the declared input rank (a batch: split into
samples) or one less (one sample). ``.npz`` holds arrays by input name (a single unnamed ``arr_0`` is taken as
the first input); arrays are already preprocessed and are used as they are (cast to float32 for float inputs).
Image mode conversions are documented in :mod:`jacaudit.data.images`. Every bad file raises
:class:`jacaudit.errors.DataError` with one line naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import DataError
from .images import IMAGE_EXTS, is_image_path, open_image, read_pixels, to_mode
from .preprocess import PRESETS, Preprocess, parse_floats, parse_size

__all__ = ["Preprocess", "PRESETS", "Sample", "load_inputs", "iter_inputs", "expand_paths", "load_sample",
           "load_arrays", "synthetic_sample", "stack", "parse_floats", "parse_size", "IMAGE_EXTS",
           "open_image", "read_pixels", "to_mode", "ARRAY_EXTS"]

ARRAY_EXTS = (".npy", ".npz")


@dataclass(frozen=True, eq=False)
class Sample:
    """One model input, ready to batch (see the module docstring)."""

    name: str
    source: str
    array: np.ndarray
    pixels: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    synthetic: bool = False
    index: int | None = None  # position inside a multi-sample array file


def expand_paths(paths: Sequence[str], recursive: bool = True) -> list[str]:
    """Files as given, folders expanded to their image/array files (sorted, hidden files skipped).

    A path that does not exist raises :class:`DataError`; an empty folder too."""
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in sorted(files):
                    if f.startswith("."):
                        continue
                    if os.path.splitext(f)[1].lower() in IMAGE_EXTS + ARRAY_EXTS:
                        found.append(os.path.join(root, f))
                if not recursive:
                    break
            if not found:
                raise DataError(f"{p}: folder holds no image ({', '.join(IMAGE_EXTS)}) or array (.npy/.npz) files")
            out.extend(found)
        elif os.path.exists(p):
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def _declared_rank(spec: Any) -> int | None:
    shape = getattr(spec, "shape", None)
    return None if shape is None else len(shape)


def _check_shape(arr: np.ndarray, spec: Any, path: str, name: str) -> None:
    shape = getattr(spec, "shape", None)
    if shape is None:
        return
    want = list(shape[1:])
    got = list(arr.shape)
    if len(want) != len(got) or any(isinstance(w, int) and w > 0 and w != g for w, g in zip(want, got)):
        shown = ["?" if not (isinstance(w, int) and w > 0) else w for w in shape]
        raise DataError(f"{path}: array {name!r} has sample shape {tuple(got)}, the model input "
                        f"{getattr(spec, 'name', '?')!r} expects (N, {', '.join(map(str, shown[1:]))})")


def check_finite(arr: np.ndarray, where: str) -> None:
    """Refuse NaN / inf input values (:class:`DataError`, exit 2): every derivative at such a point is
    meaningless, and a report on it would pass silently."""
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(bad.sum()) - n_nan
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        what = ", ".join(p for p in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} inf" if n_inf else "") if p)
        raise DataError(f"{where}: holds {what} value(s) (first at index {first}); non-finite inputs make every "
                        "derivative meaningless")


def _as_input(arr: np.ndarray, spec: Any, path: str) -> np.ndarray:
    if arr.dtype == object:
        raise DataError(f"{path}: object arrays are not supported")
    check_finite(arr, path)
    dt = getattr(spec, "dtype", None)
    is_float = dt is None or getattr(dt, "is_floating_point", True)
    if is_float:
        if arr.dtype.kind not in "fiub":
            raise DataError(f"{path}: array of dtype {arr.dtype} cannot feed a float input")
        return np.ascontiguousarray(arr, dtype=np.float32 if arr.dtype != np.float64 else np.float64)
    return np.ascontiguousarray(arr)


def load_arrays(path: str, spec: Any = None, input_names: Sequence[str] | None = None) -> list[Sample]:
    """Samples from a .npy / .npz file (see the module docstring)."""
    name0 = getattr(spec, "name", None) or (input_names[0] if input_names else "input")
    try:
        if path.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            arrays = {name0: np.load(path, allow_pickle=False)}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except ValueError as e:
        msg = str(e).splitlines()[0] if str(e) else "invalid"
        if "pickle" in msg.lower():
            msg = "holds pickled objects; only plain numeric arrays are read"
        raise DataError(f"{path}: cannot read array file ({msg})") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError
        raise DataError(f"{path}: cannot read array file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    if not arrays:
        raise DataError(f"{path}: holds no arrays")
    if name0 not in arrays:
        if len(arrays) == 1:
            arrays = {name0: next(iter(arrays.values()))}
        else:
            raise DataError(f"{path}: no array named {name0!r} (arrays: {', '.join(sorted(arrays))}); "
                            "name arrays after the model's inputs")
    main = arrays.pop(name0)
    rank = _declared_rank(spec)
    if rank is not None:
        if main.ndim == rank - 1:
            main = main[None]
            arrays = {k: v[None] for k, v in arrays.items()}
        elif main.ndim != rank:
            raise DataError(f"{path}: array {name0!r} has shape {main.shape}; the model input has rank {rank} "
                            f"(declared {tuple('?' if not isinstance(d, int) else d for d in spec.shape)})")
        _check_shape(main[0], spec, path, name0)
    elif main.ndim == 0:
        raise DataError(f"{path}: array {name0!r} is a scalar")
    else:
        main = main[None]
        arrays = {k: v[None] for k, v in arrays.items()}
    main = _as_input(main, spec, path)
    n = main.shape[0]
    stem = os.path.basename(path)
    out = []
    for i in range(n):
        extra = {}
        for k, v in arrays.items():
            extra[k] = v[i] if v.ndim and v.shape[0] == n else v
        out.append(Sample(name=stem if n == 1 else f"{stem}[{i}]", source=path, array=main[i], extra=extra,
                          index=None if n == 1 else i))
    return out


def load_sample(path: str, preprocess: Preprocess, spec: Any = None) -> list[Sample]:
    """One file -> its samples (an image gives one; an array file one per row). Raises :class:`DataError`."""
    ext = os.path.splitext(path)[1].lower()
    if ext in ARRAY_EXTS:
        return load_arrays(path, spec)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    shape = getattr(spec, "shape", None)
    if shape is not None and len(shape) != 4:
        raise DataError(f"{path}: the model input {getattr(spec, 'name', '?')!r} has rank {len(shape)}, not an "
                        "image (N, C, H, W / N, H, W, C); give a .npy/.npz array instead")
    pixels, display = read_pixels(path, preprocess.channels, preprocess.size, preprocess.resize)
    arr = preprocess.to_tensor(pixels)
    if spec is not None:
        _check_shape(arr, spec, path, "image")
    return [Sample(name=os.path.basename(path), source=path, array=arr, pixels=display)]


def iter_inputs(paths: Sequence[str], preprocess: Preprocess, spec: Any = None
                ) -> Iterator[tuple[str, Sample | DataError]]:
    """Yield (path, Sample) per sample, or (path, DataError) for a file that cannot be used; never raises for
    one bad file (a missing top-level path is still raised by :func:`expand_paths`)."""
    for p in expand_paths(paths):
        try:
            samples = load_sample(p, preprocess, spec)
        except DataError as e:
            yield p, e
            continue
        for s in samples:
            yield p, s


def load_inputs(paths: Sequence[str], preprocess: Preprocess, spec: Any = None) -> list[Sample]:
    """All samples of ``paths``; the first bad file raises :class:`DataError`."""
    out = []
    for _, item in iter_inputs(paths, preprocess, spec):
        if isinstance(item, DataError):
            raise item
        out.append(item)
    return out


#: the most values a synthetic input may hold (4 GiB as float32): a larger declared shape is refused before
#: anything is allocated
SYNTHETIC_MAX_VALUES = 1 << 30


def check_synthetic_size(shape: Sequence[int], name: str) -> None:
    n = 1
    for d in shape:
        n *= int(d)
    if n > SYNTHETIC_MAX_VALUES:
        gib = n * 4 / (1 << 30)
        raise DataError(f"input {name!r} of shape {tuple(int(d) for d in shape)} would hold {n:,} values "
                         f"({gib:,.0f} GiB as float32): too large for a synthetic input; give data (--input) or a "
                         "smaller --shape")


def synthetic_sample(spec: Any, seed: int = 0, preprocess: Preprocess | None = None,
                     fill: dict[str, int] | int | None = None) -> Sample:
    """A seeded synthetic input of the declared shape (batch axis dropped), flagged ``synthetic=True``.

    Without a declared shape, an image of ``preprocess.size`` is made. Dynamic dims are never guessed: the batch
    axis is 1 (one sample, by design), a rank-4 image input takes its height and width from ``preprocess.size``,
    ``fill`` maps real symbolic names (not placeholders such as ``?``) to sizes; any other dynamic dim raises
    :class:`jacaudit.errors.InputError` naming the input, its dynamic axes and ``--shape``.

    With an image preprocessing spec and a rank-4 input it is a smooth random image in pixel space (mapped
    through ``preprocess``, so it lies in the model's input range); otherwise standard normal values."""
    rng = np.random.default_rng(seed)
    if getattr(spec, "shape", None) is None:
        if preprocess is None or preprocess.size is None:
            raise DataError(f"input {getattr(spec, 'name', '?')!r} has no declared shape; give an input file "
                            "(or --size for a synthetic image)")
        shape = (1, *preprocess.tensor_shape(*preprocess.size))
    else:
        shape = _synthetic_shape(spec, preprocess, fill)
    check_synthetic_size(shape, getattr(spec, "name", "?"))
    sample_shape = tuple(shape[1:])
    pixels = None
    if preprocess is not None and len(shape) == 4:
        c = preprocess.n_channels
        h, w = (shape[2], shape[3]) if preprocess.layout == "NCHW" else (shape[1], shape[2])
        coarse = rng.uniform(0, 255, size=(max(2, h // 8), max(2, w // 8), c))
        from PIL import Image
        chans = [np.asarray(Image.fromarray(coarse[:, :, i].astype(np.float32), mode="F").resize((w, h),
                            Image.BILINEAR)) for i in range(c)]
        px = np.clip(np.stack(chans, axis=2) + rng.normal(0, 8, size=(h, w, c)), 0, 255)
        arr = preprocess.to_tensor(px)
        if arr.shape != sample_shape:
            arr = rng.standard_normal(sample_shape).astype(np.float32)
        else:
            pixels = preprocess.pixels_to_rgb(px)
    else:
        dt = getattr(spec, "dtype", None)
        if dt is not None and not dt.is_floating_point:
            arr = rng.integers(0, 2, size=sample_shape).astype(np.int64)
        else:
            arr = rng.standard_normal(sample_shape).astype(np.float32)
    return Sample(name=f"synthetic(seed={seed})", source="synthetic", array=arr, pixels=pixels, synthetic=True)


def _synthetic_shape(spec: Any, preprocess: Preprocess | None, fill: dict[str, int] | int | None
                     ) -> tuple[int, ...]:
    from ..errors import InputError
    from ..models.base import is_placeholder_dim

    dims = list(spec.shape)
    hw: dict[int, int] = {}
    if preprocess is not None and preprocess.size is not None and len(dims) == 4:
        c_h_w = preprocess.tensor_shape(*preprocess.size)
        hw = {i + 1: v for i, v in enumerate(c_h_w)}
    out: list[int | None] = []
    for i, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif isinstance(fill, int):
            out.append(fill)
        elif isinstance(fill, dict) and not is_placeholder_dim(d) and d in fill:
            out.append(int(fill[d]))
        elif i == 0:
            out.append(1)  # one sample: the batch axis is 1 by design
        elif i in hw:
            out.append(hw[i])
        else:
            out.append(None)
    bad = [i for i, v in enumerate(out) if v is None]
    if bad:
        msg = getattr(spec, "unknown_dims_message", None)
        raise InputError(msg(bad) if msg is not None else
                         f"input {getattr(spec, 'name', '?')!r} has dynamic axes {bad} that nothing fixes; pass "
                         "--shape")
    return tuple(out)  # type: ignore[return-value]


def stack(samples: Sequence[Sample], device: Any = "cpu", dtype: Any = None):
    """Samples -> one torch tensor (N, ...) on ``device`` (float arrays cast to ``dtype`` when given)."""
    import torch

    if not samples:
        raise DataError("no samples to batch")
    shapes = {s.array.shape for s in samples}
    if len(shapes) > 1:
        raise DataError(f"samples have different shapes {sorted(shapes)}; set --size to resize images alike")
    x = torch.from_numpy(np.stack([s.array for s in samples]))
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    return x.to(device)
