"""Collecting the inputs of a dataset command from paths: image files and folders (with object masks beside the
images), preprocessed arrays, and CSV tables whose rows are samples of a (batch, features) input.

Nothing here prints or knows about options; bad files come back as :class:`jacaudit.errors.DataError` (or, inside
a folder, as failures that do not stop the run).
"""
from __future__ import annotations

import os

LABEL_COLUMNS = ("label", "target", "y", "class")


def read_table(path: str, spec, label_column: str | None = None) -> tuple[list, list[str] | None, str | None]:
    """Rows of a CSV file as samples of a rank-2 (batch, features) input: (samples, feature names from the
    header or None, the label column dropped or None). A header is a first row that is not all numbers; a
    label column (``label_column``, else one named label/target/y/class when there is one column too many) is
    not fed."""
    import csv

    import numpy as np

    from .. import data as D
    from ..errors import DataError

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a CSV text file ({type(e).__name__})") from None
    if not rows:
        raise DataError(f"{path}: the CSV holds no rows")

    def numeric(r):
        try:
            [float(c) for c in r]
            return True
        except ValueError:
            return False

    header = None if numeric(rows[0]) else [c.strip() for c in rows[0]]
    body = rows[1:] if header is not None else rows
    if not body:
        raise DataError(f"{path}: the CSV holds a header but no data rows")
    ncol = len(body[0])
    want = spec.shape[1] if spec is not None and spec.shape and len(spec.shape) == 2 and isinstance(
        spec.shape[1], int) and spec.shape[1] > 0 else None
    drop = None
    if label_column:
        if header is None or label_column not in header:
            raise DataError(f"{path}: no column named {label_column!r}"
                            + (f" (columns: {', '.join(header)})" if header else " (the CSV has no header)"))
        drop = header.index(label_column)
    elif header is not None and want is not None and ncol == want + 1:
        found = [i for i, h in enumerate(header) if h.lower() in LABEL_COLUMNS]
        if len(found) == 1:
            drop = found[0]
    keep = [i for i in range(ncol) if i != drop]
    if want is not None and len(keep) != want:
        raise DataError(f"{path}: {len(keep)} feature column(s), the model input {spec.name!r} takes {want}"
                        + ("; name the label column to leave out" if len(keep) == want + 1 else ""))
    try:
        arr = np.array([[float(r[i]) for i in keep] for r in body], dtype=np.float32)
    except (ValueError, IndexError):
        raise DataError(f"{path}: every data row needs {ncol} numeric values") from None
    D.check_finite(arr, path)
    stem = os.path.basename(path)
    samples = [D.Sample(name=f"{stem}[{k}]", source=path, array=arr[k], index=k) for k in range(arr.shape[0])]
    names = None if header is None else [header[i] for i in keep]
    return samples, names, None if drop is None or header is None else header[drop]


def read_feature_names(text: str | None) -> list[str] | None:
    """``a,b,c``, or a file with one name per line (or comma-separated)."""
    from ..errors import DataError

    if not text:
        return None
    if os.path.isfile(text):
        try:
            raw = open(text, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{text}: cannot read feature names ({type(e).__name__})") from None
        parts = [p.strip() for line in raw.splitlines() for p in line.split(",")]
    else:
        parts = [p.strip() for p in text.split(",")]
    names = [p for p in parts if p]
    if not names:
        raise DataError(f"no feature names in {text!r}")
    return names


def read_inputs(paths: list[str], pp, spec, mask_suffix: str, label_column: str | None = None
                ) -> tuple[list, list, dict, list[str], list[str] | None]:
    """Samples from files/folders; (samples, failures, masks by sample name, warnings, CSV feature names). Mask
    files are no inputs."""
    from .. import data as D
    from ..errors import DataError

    samples, failures, masks, warnings = [], [], {}, []
    names = None
    tables = [p for p in paths if p.lower().endswith(".csv")]
    for p in tables:
        if not os.path.isfile(p):
            raise DataError(f"{p}: no such file")
        rows, header, dropped = read_table(p, spec, label_column)
        samples.extend(rows)
        if header is not None:
            if names is not None and names != header:
                raise DataError(f"{p}: its columns differ from the first CSV's")
            names = header
        if dropped:
            warnings.append(f"{p}: column {dropped!r} is not fed to the model (a label)")
    paths = [p for p in paths if p not in tables]
    if not paths:
        return samples, failures, masks, warnings, names
    expanded = D.expand_paths(paths)
    if mask_suffix:
        expanded = [p for p in expanded if not os.path.splitext(p)[0].endswith(mask_suffix)]
    for p, item in D.iter_inputs(expanded, pp, spec):
        if isinstance(item, DataError):
            failures.append((p, str(item)))
            warnings.append(str(item))
            continue
        samples.append(item)
        if mask_suffix and item.pixels is not None:
            stem, _ = os.path.splitext(p)
            for ext in (".png", os.path.splitext(p)[1]):
                mp = stem + mask_suffix + ext
                if os.path.isfile(mp):
                    try:
                        mpx, _ = D.read_pixels(mp, "L", pp.size, pp.resize)
                        masks[item.name] = mpx[:, :, 0] > 127
                    except DataError as e:
                        warnings.append(f"mask {mp}: {e}")
                    break
    return samples, failures, masks, warnings, names
