"""Properties over mutated files: an ONNX file mutated from a sample model (bytes flipped, fields deleted, dims,
op types and element types changed), a TorchScript archive with flipped bytes, and corrupt images / .npy files
either load (ONNX: and are described, as `inspect` does) or raise one of jacaudit's own errors
(:class:`jacaudit.errors.JacauditError`, one line, an exit code) -- never anything else. Bounded examples, no
deadline per example, the whole file in well under 30 s; JACAUDIT_FUZZ_EXAMPLES=N and JACAUDIT_FUZZ_RANDOM=1
explore further."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e .[test])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jacaudit.errors import JacauditError  # noqa: E402
from jacaudit.models import describe_file, load  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
SAMPLES = [ROOT / "sample_models/tabular/tabular_mlp.onnx", ROOT / "sample_models/flow/flow.onnx",
           ROOT / "sample_models/policy/policy.onnx", ROOT / "sample_models/sequence/sequence.onnx"]
SAMPLES = [p for p in SAMPLES if p.is_file()]
RAW = [p.read_bytes() for p in SAMPLES]
FUZZ = settings(max_examples=int(os.environ.get("JACAUDIT_FUZZ_EXAMPLES", "60")), deadline=None, derandomize="JACAUDIT_FUZZ_RANDOM" not in os.environ, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_TMP = tempfile.mkdtemp(prefix="jacaudit-fuzz-")


def _load_bytes(data: bytes) -> None:
    path = os.path.join(_TMP, "m.onnx")
    with open(path, "wb") as f:
        f.write(data)
    for loader in (load, describe_file):  # jacaudit.load, and inspect's description (unsupported ops listed)
        try:
            loader(path)
        except JacauditError as e:
            assert str(e).strip() and "\n" not in str(e).strip(), repr(str(e))


@FUZZ
@given(which=st.integers(0, len(RAW) - 1), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                      st.integers(1, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_flipped_bytes_load_or_raise_our_error(which, flips, cut):
    data = bytearray(RAW[which])
    for pos, x in flips:
        data[int(pos * len(data))] ^= x
    if cut is not None:
        data = data[: int(cut * len(data))]
    _load_bytes(bytes(data))


_FIELDS = ["node", "initializer", "input", "output", "value_info", "opset_import", "node_input", "node_attribute",
           "dims", "input_dim", "ir_version", "graph", "op_type", "elem_type", "init_dtype"]
_OPS = ["Conv", "Gemm", "MatMul", "Reshape", "Gather", "Concat", "Split", "Transpose", "Softmax", "LSTM", "If",
        "Loop", "Resize", "Pad", "Slice", "BatchNormalization", "Cast", "Shape", "Expand", "TopK"]


@FUZZ
@given(which=st.integers(0, len(RAW) - 1),
       edits=st.lists(st.tuples(st.sampled_from(_FIELDS), st.integers(0, 1000),
                                st.sampled_from([0, 1, 2, 3, 7, -1, 1 << 20, 1 << 40])), min_size=1, max_size=4))
def test_edited_protobuf_loads_or_raises_our_error(which, edits):
    m = onnx.ModelProto()
    m.ParseFromString(RAW[which])
    g = m.graph
    for field, k, v in edits:
        if field == "ir_version":
            m.ir_version = max(v, 0) % 100
        elif field == "graph":
            m.ClearField("graph")
        elif field == "opset_import" and m.opset_import:
            imp = m.opset_import[k % len(m.opset_import)]
            imp.version = max(v, 0) % 40 if v != -1 else 0
        elif field in ("node", "initializer", "input", "output", "value_info"):
            items = getattr(g, field)
            if items:
                del items[k % len(items)]
        elif field == "node_input" and g.node:
            n = g.node[k % len(g.node)]
            if n.input:
                if v % 2:
                    del n.input[k % len(n.input)]
                else:
                    n.input[k % len(n.input)] = f"renamed_{v}"
        elif field == "node_attribute" and g.node:
            n = g.node[k % len(g.node)]
            if n.attribute:
                a = n.attribute[k % len(n.attribute)]
                if a.ints:
                    a.ints[k % len(a.ints)] = v
                elif a.type == onnx.AttributeProto.INT:
                    a.i = v
                else:
                    del n.attribute[k % len(n.attribute)]
        elif field == "dims" and g.initializer:
            t = g.initializer[k % len(g.initializer)]
            if t.dims:
                t.dims[k % len(t.dims)] = v
        elif field == "op_type" and g.node:
            g.node[k % len(g.node)].op_type = _OPS[(k + v) % len(_OPS)]
        elif field == "elem_type" and g.input:
            g.input[k % len(g.input)].type.tensor_type.elem_type = abs(v) % 24
        elif field == "init_dtype" and g.initializer:
            g.initializer[k % len(g.initializer)].data_type = abs(v) % 24
        elif field == "input_dim" and g.input:
            vi = g.input[k % len(g.input)]
            dims = vi.type.tensor_type.shape.dim
            if dims:
                dims[k % len(dims)].dim_value = max(v, 0) if v != -1 else 0
    _load_bytes(m.SerializeToString())


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_the_unmutated_samples_load(path):
    assert load(str(path)).inputs


TS_RAW = (ROOT / "sample_models/arm/arm.pt").read_bytes()


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_flipped_torchscript_bytes_load_or_raise_our_error(flips, cut):
    """The same property for a TorchScript archive (the zip directory is read before torch sees the file)."""
    data = bytearray(TS_RAW)
    for pos, x in flips:
        data[int(pos * len(data))] ^= x
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = os.path.join(_TMP, "m.pt")
    with open(path, "wb") as f:
        f.write(bytes(data))
    try:
        load(path)
    except JacauditError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), repr(str(e))


def _image_sources() -> dict[str, bytes]:
    import io

    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    out = {}
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tif"),
                     ("PPM", "ppm")):
        b = io.BytesIO()
        Image.fromarray(arr).save(b, format=fmt)
        out[ext] = b.getvalue()
    b = io.BytesIO()
    np.save(b, np.ones((2, 12), np.float32))
    out["npy"] = b.getvalue()
    return out


IMAGES = _image_sources()


@FUZZ
@given(ext=st.sampled_from(sorted(IMAGES)),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=5),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_flipped_image_and_array_bytes_read_or_raise_our_error(ext, flips, cut):
    """Input files too: a corrupt image or .npy reads, or raises DataError; Pillow's warnings stay inside."""
    import warnings

    from jacaudit import data as D

    data = bytearray(IMAGES[ext])
    for pos, x in flips:
        data[int(pos * len(data))] ^= x
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = os.path.join(_TMP, f"x.{ext}")
    with open(path, "wb") as f:
        f.write(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            D.load_arrays(path) if ext == "npy" else D.read_pixels(path, "RGB", (8, 8))
        except JacauditError as e:
            assert str(e).strip() and "\n" not in str(e).strip(), repr(str(e))
    assert not [w for w in caught if "PIL" in (w.filename or "")], [str(w.message) for w in caught]
