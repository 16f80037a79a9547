"""A labelled dataset for the dataset commands (``robustness``): samples, labels, and where the labels came from.

``DATA`` is one of:

* a folder of images: labels from a ``labels.csv`` in it (``file,label`` rows, file relative to the folder), else
  from the sub-folder names (``data/cat/1.png`` -> ``cat``) when every image lies in a sub-folder; images directly
  in the folder without a labels.csv are unlabelled;
* an ``.npz`` with ``x`` (or an array named after the model input) and optionally ``y`` (class indices), plus
  arrays named after other model inputs (fed as they are, one row per sample);
* an ``.npy`` of inputs (unlabelled);
* a CSV of features (one row per sample) with a label column (``--label-column``, else one named
  label/target/y/class).

A label is a class index or a class name from the model's labels. Unlabelled data is labelled with the model's
own predictions (as ART does), so no label leaks and clean accuracy is 1 by construction; the report says so.
Nothing guesses silently: a label that is neither an index nor a known class name is an error naming it.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import DataError

__all__ = ["LabelledData", "load_dataset", "PREDICTIONS", "Entry", "DatasetIndex", "index_dataset", "decode"]

#: the label source when the data has no labels
PREDICTIONS = "the model's own predictions (the data has no labels)"


@dataclass
class LabelledData:
    samples: list                                  # jacaudit.data.Sample
    labels: list[int] | None                       # per sample; None: use the model's predictions
    source: str                                    # where the labels came from (words)
    failures: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    total: int = 0                                 # samples before --limit


def _label_index(text: Any, classes: Sequence[str] | None, where: str) -> int:
    t = str(text).strip()
    if classes and t in classes:
        return list(classes).index(t)
    try:
        v = float(t)
    except ValueError:
        v = None
    if v is not None and v == int(v) and v >= 0:
        return int(v)
    known = f" (the model's labels: {', '.join(list(classes)[:12])}{' ...' if len(classes) > 12 else ''})" \
        if classes else " (the model has no labels file: use class indices, or give --labels)"
    raise DataError(f"{where}: label {t!r} is neither a class index nor a class name{known}")


def _subsample(n: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=limit, replace=False))


def _npz(path: str, spec: Any, input_names: Sequence[str], classes: Sequence[str] | None
         ) -> tuple[list, list[int] | None, str]:
    from . import Sample, _as_input, _check_shape, _declared_rank

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        from .feeds import _array_error

        raise _array_error(path, e) from None
    main_name = spec.name if spec.name in arrays else ("x" if "x" in arrays else None)
    if main_name is None:
        if len(arrays) == 1:
            main_name = next(iter(arrays))
        else:
            raise DataError(f"{path}: no array named x or {spec.name!r} (arrays: {', '.join(sorted(arrays))})")
    x = arrays.pop(main_name)
    y = arrays.pop("y", None) if "y" not in input_names else None
    rank = _declared_rank(spec)
    if rank is not None and x.ndim != rank:
        raise DataError(f"{path}: array {main_name!r} has shape {x.shape}; the model input {spec.name!r} has rank "
                        f"{rank} (a stack of samples, batch axis first)")
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{path}: array {main_name!r} holds no samples")
    _check_shape(x[0], spec, path, main_name)
    x = _as_input(x, spec, path)
    n = x.shape[0]
    unknown = [k for k in arrays if k not in input_names]
    if unknown:
        raise DataError(f"{path}: array(s) {', '.join(unknown)} are neither x, y nor model inputs "
                        f"({', '.join(input_names)})")
    labels = None
    if y is not None:
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != n:
            raise DataError(f"{path}: y has {y.shape[0]} labels for {n} samples")
        labels = [_label_index(v.item() if hasattr(v, "item") else v, classes, f"{path}: y[{i}]")
                  for i, v in enumerate(y)]
    stem = os.path.basename(path)
    samples = [Sample(name=f"{stem}[{i}]", source=path, array=x[i],
                      extra={k: (v[i] if v.ndim and v.shape[0] == n else v) for k, v in arrays.items()}, index=i)
               for i in range(n)]
    return samples, labels, "the npz array y" if labels is not None else PREDICTIONS


def _csv_labels(path: str, column: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    idx = [c.strip() for c in rows[0]].index(column)
    return [r[idx].strip() for r in rows[1:]]


def load_dataset(path: str, pp: Any, spec: Any, *, classes: Sequence[str] | None = None,
                 input_names: Sequence[str] = (), label_column: str | None = None, limit: int | None = None,
                 seed: int = 0) -> LabelledData:
    """Read ``path`` (see the module docstring); ``limit`` keeps a seeded random subset (in file order)."""
    from . import load_arrays
    from .collect import read_table

    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    low = path.lower()
    failures: list = []
    warnings: list[str] = []
    if os.path.isdir(path):  # the lazy index, every entry read here
        idx = index_dataset(path, pp, spec, classes=classes, input_names=input_names, label_column=label_column)
        good, bad = decode(idx.entries, pp, spec)
        samples = [smp for _, smp in good]
        labels = [e.label for e, _ in good] if idx.labelled else None
        source, warnings = idx.source, idx.warnings + [msg for _, msg in bad]
        failures = idx.failures + [(e.path or e.id, msg) for e, msg in bad]
    elif low.endswith(".npz"):
        samples, labels, source = _npz(path, spec, list(input_names), classes)
    elif low.endswith(".npy"):
        samples, labels, source = load_arrays(path, spec), None, PREDICTIONS
    elif low.endswith(".csv"):
        samples, _names, dropped = read_table(path, spec, label_column)
        if dropped:
            labels = [_label_index(v, classes, f"{path}: column {dropped!r} row {i + 1}")
                      for i, v in enumerate(_csv_labels(path, dropped))]
            source = f"the CSV column {dropped!r}"
        else:
            labels, source = None, PREDICTIONS
    else:
        from . import load_sample
        samples, labels, source = load_sample(path, pp, spec), None, PREDICTIONS
    if not samples:
        raise DataError(f"{path}: no sample could be read" + (f" ({failures[0][1]})" if failures else ""))
    total = len(samples)
    keep = _subsample(total, limit, seed)
    samples = [samples[i] for i in keep]
    if labels is not None:
        labels = [labels[i] for i in keep]
    return LabelledData(samples, labels, source, failures, warnings, total)


# ---------------------------------------------------------------------------------------------------------
# A lazy index: what the dataset holds, without decoding images (for audits in batches, in one process or
# sharded on workers; see jacaudit.distributed)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One sample of a dataset: its stable id (the path relative to the data folder, or ``file[row]``), its
    position in the full dataset (before ``--limit``), its label, and either the decoded sample (array files)
    or the image file to decode."""

    id: str
    position: int
    label: int | None
    path: str | None = None       # an image file or an array shard, read where the batch is computed
    sample: Any = None            # a decoded jacaudit.data.Sample (single array and table files)
    row: int | None = None        # the sample's row in the array shard ``path`` (None: an image, or a 1-row file)


@dataclass
class DatasetIndex:
    entries: list[Entry]
    source: str                   # where the labels came from (words)
    labelled: bool
    image: bool                   # every sample is an image (pixels, the report's pictures)
    warnings: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # found while indexing (array files)
    total: int = 0                # samples before --limit
    spec: Any = None              # the model input (how array shards are read)

    @classmethod
    def of(cls, data: "LabelledData | DatasetIndex") -> "DatasetIndex":
        """An index of decoded samples (a :class:`LabelledData`, e.g. made in code); an index as it is."""
        if isinstance(data, DatasetIndex):
            return data
        ents = [Entry(s.name if s.index is None else f"{os.path.basename(s.source)}[{s.index}]", k,
                      None if data.labels is None else data.labels[k], sample=s) for k, s in enumerate(data.samples)]
        return cls(ents, data.source, data.labels is not None, all(s.pixels is not None for s in data.samples),
                   list(data.warnings), list(data.failures), data.total or len(ents))

    def value_range(self) -> np.ndarray:
        """[min, max] of every input value of the listed samples (array data: the valid range's default); array
        shards are read here one file at a time (give ``--range`` to skip this pass)."""
        lo, hi = np.inf, -np.inf
        by_file: dict[str, list[int]] = {}
        for e in self.entries:
            if e.sample is not None:
                lo, hi = min(lo, float(np.min(e.sample.array))), max(hi, float(np.max(e.sample.array)))
            elif e.path is not None:
                by_file.setdefault(e.path, []).append(e.row if e.row is not None else 0)
        for path, rows in by_file.items():
            main = _shard_arrays(path, self.spec)[0]
            sel = np.asarray(main[sorted(rows)], dtype=np.float64)
            lo, hi = min(lo, float(sel.min())), max(hi, float(sel.max()))
        return np.asarray([lo, hi])


def index_dataset(path: str, pp: Any, spec: Any, *, classes: Sequence[str] | None = None,
                  input_names: Sequence[str] = (), label_column: str | None = None, limit: int | None = None,
                  seed: int = 0) -> DatasetIndex:
    """Like :func:`load_dataset`, but image files are listed (with their labels), not decoded: :func:`decode`
    reads a batch of them where it is computed, and a file that cannot be read is that input's failure. Array,
    table and single files are read here. ``limit`` keeps a seeded random subset of the listed samples."""
    from . import IMAGE_EXTS, expand_paths

    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if not os.path.isdir(path):
        d = load_dataset(path, pp, spec, classes=classes, input_names=input_names, label_column=label_column,
                         limit=limit, seed=seed)
        keep = _subsample(d.total, limit, seed)
        ents = [Entry(_sample_id(s, path), pos, None if d.labels is None else d.labels[k], sample=s)
                for k, (s, pos) in enumerate(zip(d.samples, keep))]
        return DatasetIndex(ents, d.source, d.labels is not None, all(s.pixels is not None for s in d.samples),
                            d.warnings, d.failures, d.total, spec)
    files = expand_paths([path])
    table = os.path.join(path, "labels.csv")
    by_file = _labels_csv(table) if os.path.isfile(table) else None
    rel = [os.path.normpath(os.path.relpath(p, path)) for p in files]
    nested = all(os.sep in r for r in rel)
    if by_file is not None:
        source = f"labels.csv ({table})"
    else:
        source = "sub-folder names" if nested and files else PREDICTIONS
    warnings: list[str] = []
    failures: list[tuple[str, str]] = []
    listed: list[tuple[str, int | None, str | None, Any, int | None]] = []
    for p, r in zip(files, rel):
        if by_file is not None:
            if r not in by_file:
                raise DataError(f"{table}: no label for {r}")
            label = _label_index(by_file[r], classes, f"{table} ({r})")
        elif nested:
            label = _label_index(r.split(os.sep)[0], classes, f"{path}: sub-folder")
        else:
            label = None
        if os.path.splitext(p)[1].lower() in IMAGE_EXTS:
            listed.append((r.replace(os.sep, "/"), label, p, None, None))
            continue
        try:  # an array file in the folder: a shard, whose rows are read where their batch is computed
            n_rows, ys = _shard_header(p, spec, input_names, classes)
        except DataError as e:
            failures.append((p, str(e)))
            warnings.append(str(e))
            continue
        rid = r.replace(os.sep, "/")
        for k in range(n_rows):
            lab = ys[k] if ys is not None else label
            listed.append((rid if n_rows == 1 else f"{rid}[{k}]", lab, p, None, None if n_rows == 1 else k))
    if by_file is None and not nested and any(os.sep in r for r in rel):
        warnings.append(f"{path}: some images lie in sub-folders and some do not: sub-folder names are not used "
                        "as labels; the model's own predictions are")
    if not listed:
        raise DataError(f"{path}: no sample could be read" + (f" ({failures[0][1]})" if failures else ""))
    keep = _subsample(len(listed), limit, seed)
    ents = [Entry(listed[i][0], i, listed[i][1], listed[i][2], listed[i][3], listed[i][4]) for i in keep]
    from . import IMAGE_EXTS as _IMG

    image = all(e.path is not None and os.path.splitext(e.path)[1].lower() in _IMG for e in ents)
    labelled = by_file is not None or nested or all(e.label is not None for e in ents)
    return DatasetIndex(ents, source if by_file is not None or nested or not labelled else "the shards' y arrays",
                        labelled, image, warnings, failures, len(listed), spec)


def _sample_id(s: Any, base: str) -> str:
    src = s.source
    try:
        src = os.path.relpath(src, base) if os.path.isdir(base) else os.path.basename(src)
    except ValueError:
        pass
    src = src.replace(os.sep, "/")
    return f"{src}[{s.index}]" if s.index is not None else src


def _labels_csv(table: str) -> dict[str, str]:
    by_file: dict[str, str] = {}
    try:
        with open(table, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{table}: cannot read ({type(e).__name__})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["file", "label"], ["filename", "label"],
                                                               ["path", "label"]):
        rows = rows[1:]
    for k, r in enumerate(rows, 1):
        if len(r) < 2:
            raise DataError(f"{table}: row {k} needs file,label")
        by_file[os.path.normpath(r[0].strip())] = r[1].strip()
    return by_file


def decode(entries: Sequence[Entry], pp: Any, spec: Any) -> tuple[list[tuple[Entry, Any]], list[tuple[Entry, str]]]:
    """A batch of entries -> (entry, Sample) pairs for those that could be read, and (entry, error) for the
    rest. Never raises for one bad file."""
    from . import load_sample

    from . import ARRAY_EXTS, Sample, _as_input

    good, bad = [], []
    for e in entries:
        if e.sample is not None:
            good.append((e, e.sample))
            continue
        if os.path.splitext(e.path)[1].lower() in ARRAY_EXTS:
            try:
                main, extra = _shard_arrays(e.path, spec)
                k = e.row if e.row is not None else 0
                arr = _as_input(np.asarray(main[k:k + 1]), spec, f"{e.path} (row {k})")[0]
                stem = os.path.basename(e.path)
                good.append((e, Sample(name=stem if e.row is None else f"{stem}[{k}]", source=e.path, array=arr,
                                       extra={n: np.asarray(v[k]) for n, v in extra.items()}, index=e.row)))
            except DataError as err:
                bad.append((e, str(err)))
            continue
        try:
            s = load_sample(e.path, pp, spec)
        except DataError as err:
            bad.append((e, str(err)))
            continue
        if len(s) != 1:
            bad.append((e, f"{e.path}: holds {len(s)} samples, not one image"))
            continue
        good.append((e, s[0]))
    return good, bad


# ---------------------------------------------------------------------------------------------------------
# Array shards: a folder of .npy / .npz files, each a stack of samples (batch axis first). The index reads their
# headers (and an .npz's y); a batch reads its rows (.npy memory-mapped; .npz loaded once per process and kept
# for the next batches, two files at a time).
# ---------------------------------------------------------------------------------------------------------
_SHARDS: "dict[str, tuple[Any, dict[str, np.ndarray]]]" = {}
_SHARDS_KEEP = 2


def _main_name(names: Sequence[str], spec: Any, path: str) -> str:
    name0 = getattr(spec, "name", None)
    if name0 in names:
        return name0
    if "x" in names:
        return "x"
    cand = [n for n in names if n != "y"]
    if len(cand) == 1:
        return cand[0]
    raise DataError(f"{path}: no array named x or {name0!r} (arrays: {', '.join(sorted(names))})")


def _shard_arrays(path: str, spec: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """(main array with the batch axis first -- memory-mapped for .npy --, other model inputs by name)."""
    from . import _declared_rank

    try:
        st = os.stat(path)
        key = f"{path}\x1f{st.st_size}\x1f{st.st_mtime_ns}"   # a rewritten file is read again
    except OSError:
        key = path
    hit = _SHARDS.get(key)
    if hit is not None:
        return hit
    try:
        if path.lower().endswith(".npy"):
            main = np.load(path, mmap_mode="r", allow_pickle=False)
            extra: dict[str, np.ndarray] = {}
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            name = _main_name(list(arrays), spec, path)
            main = arrays.pop(name)
            arrays.pop("y", None)
            extra = arrays
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - ValueError (pickles), BadZipFile, OSError, EOFError
        from .feeds import _array_error

        raise _array_error(path, e) from None
    rank = _declared_rank(spec)
    if main.dtype == object:
        raise DataError(f"{path}: object arrays are not supported")
    if rank is not None and main.ndim == rank - 1:
        main = main[None]
        extra = {k: v[None] for k, v in extra.items()}
    while len(_SHARDS) >= _SHARDS_KEEP:
        _SHARDS.pop(next(iter(_SHARDS)))
    _SHARDS[key] = (main, extra)
    return main, extra


def _shard_header(path: str, spec: Any, input_names: Sequence[str], classes: Sequence[str] | None
                  ) -> tuple[int, list[int] | None]:
    """Rows of an array shard (its shape checked against the model input) and the labels of its ``y`` array."""
    from . import _check_shape, _declared_rank

    main, extra = _shard_arrays(path, spec)
    rank = _declared_rank(spec)
    if rank is not None and main.ndim != rank:
        raise DataError(f"{path}: array has shape {tuple(main.shape)}; the model input "
                        f"{getattr(spec, 'name', '?')!r} has rank {rank} (a stack of samples, batch axis first)")
    if main.ndim == 0 or main.shape[0] == 0:
        raise DataError(f"{path}: holds no samples")
    _check_shape(np.asarray(main[0]), spec, path, "x")
    unknown = [k for k in extra if k not in input_names]
    if unknown:
        raise DataError(f"{path}: array(s) {', '.join(unknown)} are neither x, y nor model inputs "
                        f"({', '.join(input_names)})")
    n = int(main.shape[0])
    ys = None
    if path.lower().endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if "y" in z.files and "y" not in input_names:
                y = np.asarray(z["y"]).reshape(-1)
                if y.shape[0] != n:
                    raise DataError(f"{path}: y has {y.shape[0]} labels for {n} samples")
                ys = [_label_index(v.item() if hasattr(v, "item") else v, classes, f"{path}: y[{i}]")
                      for i, v in enumerate(y)]
    return n, ys
