"""Builders of hostile and odd files, all made by code (nothing downloaded).

Every builder takes a folder and returns the path it wrote. The ONNX models are tiny (a few floats) so that a
command on them runs in a fraction of a second.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
TABULAR = ROOT / "sample_models/tabular/tabular_mlp.onnx"
ARM = ROOT / "sample_models/arm/arm.pt"
OPSET = 18


# -- ONNX ---------------------------------------------------------------------------------------------------------
def onnx_model(nodes, inputs, outputs, inits=(), opset: int = OPSET, domains=(), doc: str = "",
               metadata: dict | None = None, name: str = "g") -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    m = helper.make_model(graph, opset_imports=opsets, producer_name="badinputs")
    m.ir_version = 8
    m.doc_string = doc
    for k, v in (metadata or {}).items():
        m.metadata_props.add(key=k, value=v)
    return m


def fvi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape) if shape is not None else None)


def save(m: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(m.SerializeToString())
    return path


def linear(d: Path, name: str = "lin.onnx", extra_nodes=(), out: str = "y", out_type=TensorProto.FLOAT,
           out_shape=(1, 2), **kw) -> Path:
    """y = x @ W (+ extra nodes reading 'z' = x @ W): x [1, 4] -> [1, 2]."""
    w = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2) / 8.0 - 0.3, "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z" if extra_nodes else "y"], name="mm")] + list(extra_nodes)
    outs = [helper.make_tensor_value_info(out, out_type, list(out_shape) if out_shape is not None else None)]
    return save(onnx_model(nodes, [fvi("x", [1, 4])], outs, [w], **kw), d / name)


def image_model(d: Path, name: str = "img.onnx", **kw) -> Path:
    """A tiny image classifier: [1, 3, 8, 8] -> GlobalAveragePool -> Flatten -> Gemm -> [1, 2] logits."""
    w = numpy_helper.from_array(np.array([[1.0, -1.0, 0.5], [-0.5, 1.0, 1.0]], np.float32), "W")
    b = numpy_helper.from_array(np.zeros(2, np.float32), "B")
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1, name="fc")]
    m = onnx_model(nodes, [fvi("image", [1, 3, 8, 8])], [fvi("logits", [1, 2])], [w, b], **kw)
    return save(m, d / name)


def table_model(d: Path, name: str = "tab.onnx") -> Path:
    """features [batch, 3] -> logits [batch, 2]."""
    w = numpy_helper.from_array(np.array([[1.0, -1.0], [0.5, 0.2], [-0.3, 1.0]], np.float32), "W")
    nodes = [helper.make_node("MatMul", ["features", "W"], ["logits"], name="mm")]
    return save(onnx_model(nodes, [fvi("features", ["batch", 3])], [fvi("logits", ["batch", 2])], [w]), d / name)


def cycle(d: Path) -> Path:
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2"),
             helper.make_node("Identity", ["a"], ["y"], name="n3")]
    return save(onnx_model(nodes, [fvi("x", [1, 4])], [fvi("y", [1, 4])]), d / "cycle.onnx")


def undefined_tensor(d: Path) -> Path:
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")]
    return save(onnx_model(nodes, [fvi("x", [1, 4])], [fvi("y", [1, 4])]), d / "undefined.onnx")


def undefined_output(d: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")]
    return save(onnx_model(nodes, [fvi("x", [1, 4])], [fvi("nowhere", [1, 4])]), d / "undefined_out.onnx")


def future_opset(d: Path) -> Path:
    return linear(d, "opset99.onnx", opset=99)


def custom_op(d: Path) -> Path:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="mm"),
             helper.make_node("FancyActivation", ["z"], ["y"], domain="com.example", name="fancy")]
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    m = onnx_model(nodes, [fvi("x", [1, 4])], [fvi("y", [1, 2])], [w], domains=["com.example"])
    return save(m, d / "custom.onnx")


def unsupported_op(d: Path) -> Path:
    """A standard op with no derivative story (string ops) in the default domain."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"),
             helper.make_node("NotARealOnnxOp", ["x"], ["junk"], name="nonsense")]
    return save(onnx_model(nodes, [fvi("x", [1, 4])], [fvi("y", [1, 4]), fvi("junk", [1, 4])]), d / "unsup.onnx")


def external(d: Path, location: str, name: str = "ext.onnx", write: bytes | None = None) -> Path:
    """W stored as external data at ``location`` (relative to the model's folder, or absolute)."""
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 2])
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    if write is not None:
        target = Path(location) if os.path.isabs(location) else d / location
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(write)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    return save(onnx_model(nodes, [fvi("x", [1, 4])], [fvi("y", [1, 2])], [t]), d / name)


W_BYTES = (np.arange(8, dtype=np.float32) / 8.0).tobytes()


def external_outside(d: Path) -> Path:
    (d / "secret.bin").write_bytes(W_BYTES)
    sub = d / "model"
    sub.mkdir()
    return external(sub, "../secret.bin")


def external_absolute(d: Path) -> Path:
    (d / "abs.bin").write_bytes(W_BYTES)
    sub = d / "model"
    sub.mkdir()
    return external(sub, str(d / "abs.bin"))


def external_missing(d: Path) -> Path:
    return external(d, "missing.bin")


def external_symlink(d: Path) -> Path:
    (d / "secret.bin").write_bytes(W_BYTES)
    sub = d / "model"
    sub.mkdir()
    os.symlink(d / "secret.bin", sub / "weights.bin")
    return external(sub, "weights.bin")


def external_ok(d: Path) -> Path:
    return external(d, "weights.bin", write=W_BYTES)


def external_short(d: Path) -> Path:
    return external(d, "weights.bin", write=W_BYTES[:10])


def huge_initializer(d: Path) -> Path:
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])  # 2^40 elements, no data
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    return save(onnx_model(nodes, [fvi("x", [1, 1 << 20])], [fvi("y", [1, 1 << 20])], [t]), d / "huge.onnx")


def huge_input(d: Path) -> Path:
    """An input declaring 2^40 values (no initializer): a synthetic input of that shape is refused, not allocated."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    return save(onnx_model(nodes, [fvi("x", [1 << 20, 1 << 20])], [fvi("y", [1 << 20, 1 << 20])]), d / "hugein.onnx")


def relu_model(d: Path, shape, name: str = "relu.onnx") -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    return save(onnx_model(nodes, [fvi("x", shape)], [fvi("y", shape)]), d / name)


def wrong_size_initializer(d: Path) -> Path:
    t = numpy_helper.from_array(np.ones(5, np.float32), "W")
    t.dims[:] = [4, 2]  # declares 8 floats, holds 5
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    return save(onnx_model(nodes, [fvi("x", [1, 4])], [fvi("y", [1, 2])], [t]), d / "badinit.onnx")


def zero_dim(d: Path) -> Path:
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    return save(onnx_model(nodes, [fvi("x", [1, 0])], [fvi("y", [1, 2])], [w]), d / "zerodim.onnx")


def sequence_input(d: Path) -> Path:
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("SequenceAt", ["s", "i"], ["y"], name="at")]
    i = numpy_helper.from_array(np.array(0, np.int64), "i")
    return save(onnx_model(nodes, [seq], [fvi("y", [1, 4])], [i]), d / "seq.onnx")


def not_a_model_protobuf(d: Path) -> Path:
    """A serialised TensorProto named .onnx: valid protobuf, not a model."""
    (d / "tensor.onnx").write_bytes(numpy_helper.from_array(np.ones((3, 3), np.float32), "t").SerializeToString())
    return d / "tensor.onnx"


def graph_only(d: Path) -> Path:
    m = onnx.load(str(TABULAR))
    (d / "graph.onnx").write_bytes(m.graph.SerializeToString())
    return d / "graph.onnx"


def no_graph(d: Path) -> Path:
    m = onnx.ModelProto(ir_version=8)
    m.opset_import.add(domain="", version=OPSET)
    return save(m, d / "nograph.onnx")


def no_outputs(d: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    return save(onnx_model(nodes, [fvi("x", [1, 4])], []), d / "noout.onnx")


# -- misbehaving ONNX models -----------------------------------------------------------------------------------
def nan_output(d: Path) -> Path:
    c = numpy_helper.from_array(np.array([np.nan, 1.0], np.float32), "C")
    return _linear_with(d, "nan.onnx", "Mul", c)


def _linear_with(d: Path, name: str, op: str, const=None, out_type=TensorProto.FLOAT, out_shape=(1, 2), **attrs):
    w = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2) / 8.0 - 0.3, "W")
    inits = [w] + ([const] if const is not None else [])
    ins = ["z"] + (["C"] if const is not None else [])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="mm"),
             helper.make_node(op, ins, ["y"], name=op.lower(), **attrs)]
    outs = [helper.make_tensor_value_info("y", out_type, list(out_shape) if out_shape is not None else None)]
    return save(onnx_model(nodes, [fvi("x", [1, 4])], outs, inits), d / name)


def rank0_output(d: Path) -> Path:
    return _linear_with(d, "rank0.onnx", "ReduceSum", out_shape=(), keepdims=0)


def int_output(d: Path) -> Path:
    return _linear_with(d, "int.onnx", "Cast", out_type=TensorProto.INT64, to=TensorProto.INT64)


def argmax_output(d: Path) -> Path:
    return _linear_with(d, "argmax.onnx", "ArgMax", out_type=TensorProto.INT64, out_shape=(1, 1), axis=1)


def floor_output(d: Path) -> Path:
    """Zero derivatives everywhere (Floor is piecewise constant)."""
    return _linear_with(d, "floor.onnx", "Floor")


def quantised(d: Path) -> Path:
    s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.uint8), "zp")
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq"),
             helper.make_node("MatMul", ["dq", "W"], ["y"], name="mm")]
    return save(onnx_model(nodes, [fvi("x", [1, 4])], [fvi("y", [1, 2])], [s, zp, w]), d / "quant.onnx")


XSS = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def html_model(d: Path, XSS: str = XSS) -> Path:  # noqa: N803
    """<script> / <img onerror> in the doc string, metadata, graph/node/tensor names; labels.txt beside it."""
    w = numpy_helper.from_array(np.array([[1.0, -1.0, 0.5], [-0.5, 1.0, 1.0]], np.float32), "W" + XSS)
    b = numpy_helper.from_array(np.zeros(2, np.float32), "B")
    x, out = "image" + XSS, "logits" + XSS
    nodes = [helper.make_node("GlobalAveragePool", [x], ["p" + XSS], name="gap" + XSS, doc_string=XSS),
             helper.make_node("Flatten", ["p" + XSS], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", w.name, "B"], [out], transB=1, name="fc" + XSS)]
    m = onnx_model(nodes, [fvi(x, [1, 3, 8, 8])], [fvi(out, [1, 2])], [w, b], doc=XSS,
                   metadata={"author" + XSS: XSS, "description": XSS}, name="graph" + XSS)
    m.producer_name = "prod" + XSS
    d.mkdir(parents=True, exist_ok=True)
    (d / "labels.txt").write_text(f"cat{XSS}\ndog<b onmouseover=alert(3)>{XSS}\n")
    return save(m, d / "xss.onnx")


# -- TorchScript and other .pt files ---------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def state_dict(d: Path) -> Path:
    torch = _torch()
    torch.save(torch.nn.Linear(3, 2).state_dict(), d / "sd.pt")
    return d / "sd.pt"


def pickled_module(d: Path) -> Path:
    torch = _torch()
    torch.save(torch.nn.Linear(3, 2), d / "module.pt")
    return d / "module.pt"


def torch_package(d: Path) -> Path:
    """The layout of a torch.package archive (.data/version, .data/extern_modules), written by hand."""
    with zipfile.ZipFile(d / "pkg.pt", "w") as z:
        z.writestr("pkg/.data/version", "6\n")
        z.writestr("pkg/.data/extern_modules", "")
        z.writestr("pkg/model/model.pkl", pickle.dumps({"a": 1}))
    return d / "pkg.pt"


def real_torch_package(d: Path) -> Path:
    """An archive written by torch.package's own PackageExporter (skipped where torch no longer has it)."""
    import warnings

    import pytest

    try:
        from torch.package import PackageExporter
    except ImportError:
        pytest.skip("this torch has no torch.package")
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with PackageExporter(str(d / "real_pkg.pt")) as e:
            e.intern("**")
            e.save_pickle("model", "model.pkl", {"w": torch.ones(2)})
    return d / "real_pkg.pt"


def plain_zip(d: Path) -> Path:
    with zipfile.ZipFile(d / "zip.pt", "w") as z:
        z.writestr("hello.txt", "not a model")
    return d / "zip.pt"


def zip_bad_names(d: Path) -> Path:
    """A zip whose file names are flagged UTF-8 but are not (zipfile raises UnicodeDecodeError reading it)."""
    with zipfile.ZipFile(d / "names.pt", "w") as z:
        z.writestr("m/caf\u00e9/data.pkl", b"x")
    data = (d / "names.pt").read_bytes().replace("\u00e9".encode(), b"\xc3\x28")
    (d / "names.pt").write_bytes(data)
    return d / "names.pt"


def json_pt(d: Path) -> Path:
    (d / "model.pt").write_text(json.dumps({"weights": [1, 2, 3]}))
    return d / "model.pt"


class Hostile:
    """Unpickling this creates the marker file (os.system would run a command): it must never happen."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps(Hostile(str(marker)), protocol=2)


def hostile_legacy_pt(d: Path, marker: Path) -> Path:
    (d / "legacy.pt").write_bytes(hostile_pickle_bytes(marker))
    return d / "legacy.pt"


def hostile_zip_pt(d: Path, marker: Path) -> Path:
    """A torch.save-style zip whose data.pkl runs a command when unpickled."""
    with zipfile.ZipFile(d / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", hostile_pickle_bytes(marker))
        z.writestr("evil/version", "3\n")
        z.writestr("evil/byteorder", "little")
    return d / "evil.pt"


def hostile_torchscript(d: Path, marker: Path) -> Path:
    """A real TorchScript archive whose constants.pkl was replaced by a hostile pickle."""
    torch = _torch()
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(d / "plain_ts.pt"))
    src = zipfile.ZipFile(d / "plain_ts.pt")
    with zipfile.ZipFile(d / "evil_ts.pt", "w") as z:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith(("constants.pkl", "data.pkl")):
                data = hostile_pickle_bytes(marker)
            z.writestr(info.filename, data)
    return d / "evil_ts.pt"


def extra_arg_ts(d: Path) -> Path:
    torch = _torch()

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
            return x * k

    torch.jit.script(M()).save(str(d / "extra.pt"))
    return d / "extra.pt"


def warning_ts(d: Path) -> Path:
    """A TorchScript forward that calls warnings.warn on every call."""
    torch = _torch()

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            warnings.warn("this model is deprecated")
            return x * 2

    torch.jit.script(M()).save(str(d / "warn.pt"))
    return d / "warn.pt"


def raising_ts(d: Path) -> Path:
    torch = _torch()

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] != 7:
                raise RuntimeError("expected 7 features")
            return x

    torch.jit.script(M()).save(str(d / "raise.pt"))
    return d / "raise.pt"


def nan_ts(d: Path) -> Path:
    torch = _torch()

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float("nan")

    torch.jit.script(M()).save(str(d / "nan.pt"))
    return d / "nan.pt"


# -- images ----------------------------------------------------------------------------------------------------
def image(d: Path, name: str, mode: str = "RGB", size=(8, 8), fmt: str | None = None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(len(name))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert("P")
    else:
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 4), dtype=np.uint8), "RGBA").convert(mode)
    d.mkdir(parents=True, exist_ok=True)
    img.save(d / name, format=fmt)
    return d / name


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(d: Path, side: int = 40000) -> Path:
    """A PNG header declaring side x side pixels (1.6 G by default) with almost no data: past Pillow's limit."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) \
        + _png_chunk(b"IEND", b"")
    (d / "bomb.png").write_bytes(data)
    return d / "bomb.png"


def side_between_bomb_limits() -> int:
    from PIL import Image

    return int((1.5 * (Image.MAX_IMAGE_PIXELS or 89478485)) ** 0.5)


def truncated_png(d: Path) -> Path:
    p = image(d, "full.png", size=(64, 64))
    data = p.read_bytes()
    p.unlink()
    (d / "trunc.png").write_bytes(data[: len(data) // 2])
    return d / "trunc.png"


def corrupt_png(d: Path) -> Path:
    p = image(d, "full.png", size=(16, 16))
    data = bytearray(p.read_bytes())
    p.unlink()
    for i in range(40, len(data) - 20):
        data[i] ^= 0x5A
    (d / "corrupt.png").write_bytes(bytes(data))
    return d / "corrupt.png"


def text_png(d: Path) -> Path:
    (d / "notes.png").write_text("this is not an image\n")
    return d / "notes.png"


def empty_file(d: Path, name: str) -> Path:
    (d / name).write_bytes(b"")
    return d / name


def random_file(d: Path, name: str, n: int = 4096) -> Path:
    (d / name).write_bytes(np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8).tobytes())
    return d / name


def truncated_copy(src: Path, d: Path, name: str, frac: float = 0.5) -> Path:
    data = src.read_bytes()
    (d / name).write_bytes(data[: int(len(data) * frac)])
    return d / name


def npy(d: Path, name: str, a) -> Path:
    np.save(d / name, a, allow_pickle=True)
    return d / name


def hostile_npy(d: Path, marker: Path) -> Path:
    a = np.empty(1, dtype=object)
    a[0] = Hostile(str(marker))
    np.save(d / "evil.npy", a, allow_pickle=True)
    return d / "evil.npy"


def hostile_npz(d: Path, marker: Path) -> Path:
    a = np.empty(1, dtype=object)
    a[0] = Hostile(str(marker))
    np.savez(d / "evil.npz", x=a)
    return d / "evil.npz"


def csv(d: Path, name: str, text: str) -> Path:
    (d / name).write_text(text)
    return d / name
