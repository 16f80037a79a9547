"""jacaudit.data: images (modes, EXIF), folders, arrays, preprocessing both ways, synthetic inputs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jacaudit.data import (Preprocess, Sample, expand_paths, iter_inputs, load_arrays, load_inputs, read_pixels,
                           stack, synthetic_sample)
from jacaudit.errors import DataError, InputError


class Spec:  # a stand-in for models.TensorSpec (no torch needed)
    def __init__(self, shape, name="x", dtype=None):
        self.shape, self.name, self.dtype = shape, name, dtype

    def concrete_shape(self, fill=None):
        return tuple(d if isinstance(d, int) else 1 for d in self.shape)


def test_infer_from_shape():
    p = Preprocess.infer((1, 3, 64, 64))
    assert (p.size, p.layout, p.channels) == ((64, 64), "NCHW", "RGB")
    p = Preprocess.infer((1, 28, 28, 1))
    assert (p.size, p.layout, p.channels) == ((28, 28), "NHWC", "L")
    p = Preprocess.infer(("N", 3, "H", "W"))
    assert p.size is None and p.layout == "NCHW"
    p = Preprocess.infer((1, 1, 28, 28), preset="imagenet")  # 3-value preset averaged for grey
    assert p.channels == "L" and len(p.mean) == 1


def test_presets_and_overrides():
    p = Preprocess.build("imagenet", size="32x48", layout="nhwc")
    assert p.mean == (0.485, 0.456, 0.406) and p.size == (32, 48) and p.layout == "NHWC"
    with pytest.raises(InputError):
        Preprocess.build("nope")
    with pytest.raises(InputError):
        Preprocess.build(mean="1,2")  # two values for three channels
    with pytest.raises(InputError):
        Preprocess.build(std="0")
    lo, hi = Preprocess.build("minus1to1").value_range()
    assert np.allclose(lo, -1) and np.allclose(hi, 1)


@pytest.mark.parametrize("preset", ["imagenet", "minus1to1", "unit", "raw", "caffe"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_roundtrip(preset, layout):
    p = Preprocess.build(preset, layout=layout)
    px = np.random.default_rng(0).uniform(0, 255, size=(5, 7, 3))
    x = p.to_tensor(px)
    assert x.shape == ((3, 5, 7) if layout == "NCHW" else (5, 7, 3))
    assert np.allclose(p.from_tensor(x), px, atol=1e-3)
    assert np.allclose(p.from_tensor(x[None]), px, atol=1e-3)


def test_imagenet_values():
    p = Preprocess.build("imagenet")
    x = p.to_tensor(np.full((1, 1, 3), 255.0))
    assert np.allclose(x[:, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
                       atol=1e-6)


def test_image_modes(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = 10
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    a, disp = read_pixels(str(tmp_path / "rgb.png"), "BGR")
    assert a[0, 0].tolist() == [10, 0, 200] and disp[0, 0].tolist() == [200, 0, 10]
    # RGBA: composited over black
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    a, _ = read_pixels(str(tmp_path / "rgba.png"), "RGB")
    assert abs(int(a[0, 0, 0]) - 100) <= 2
    # 16-bit grey -> /257
    g16 = np.full((4, 6), 65535, np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    a, _ = read_pixels(str(tmp_path / "g16.png"), "L")
    assert a.shape == (4, 6, 1) and a.max() == 255
    # palette, bilevel, grey -> RGB
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.new("1", (6, 4), 1).save(tmp_path / "b.png")
    for f in ("p.png", "b.png"):
        a, _ = read_pixels(str(tmp_path / f), "RGB", size=(8, 8))
        assert a.shape == (8, 8, 3)


def test_exif_orientation(tmp_path):
    img = Image.new("RGB", (6, 4), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "o.jpg", exif=exif)
    a, _ = read_pixels(str(tmp_path / "o.jpg"), "RGB")
    assert a.shape[:2] == (6, 4)


def test_folder_and_broken(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    (tmp_path / "c.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    Image.new("L", (10, 10)).save(tmp_path / "sub" / "d.jpg")
    p = Preprocess.infer((1, 3, 8, 8))
    items = list(iter_inputs([str(tmp_path)], p, Spec((1, 3, 8, 8))))
    assert len(items) == 3
    bad = [(path, e) for path, e in items if isinstance(e, DataError)]
    assert len(bad) == 1 and "b.png" in str(bad[0][1]) and "\n" not in str(bad[0][1])
    with pytest.raises(DataError):
        load_inputs([str(tmp_path)], p, Spec((1, 3, 8, 8)))
    with pytest.raises(DataError, match="no such"):
        expand_paths([str(tmp_path / "missing")])
    x = stack([s for _, s in items if isinstance(s, Sample)])
    assert tuple(x.shape) == (2, 3, 8, 8)


def test_arrays(tmp_path):
    spec = Spec((1, 3, 4, 4), name="input")
    np.save(tmp_path / "one.npy", np.ones((3, 4, 4), np.float64))
    np.save(tmp_path / "batch.npy", np.zeros((5, 3, 4, 4), np.float32))
    np.savez(tmp_path / "named.npz", input=np.ones((2, 3, 4, 4)), other=np.arange(2))
    np.savez(tmp_path / "anon.npz", np.ones((3, 4, 4)))
    assert len(load_arrays(str(tmp_path / "one.npy"), spec)) == 1
    b = load_arrays(str(tmp_path / "batch.npy"), spec)
    assert len(b) == 5 and b[3].name == "batch.npy[3]" and b[0].array.dtype == np.float32
    n = load_arrays(str(tmp_path / "named.npz"), spec)
    assert len(n) == 2 and int(n[1].extra["other"]) == 1
    assert len(load_arrays(str(tmp_path / "anon.npz"), spec)) == 1
    np.save(tmp_path / "bad.npy", np.ones((3, 5, 5)))
    with pytest.raises(DataError, match="expects"):
        load_arrays(str(tmp_path / "bad.npy"), spec)
    np.save(tmp_path / "obj.npy", np.array([{}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickle"):
        load_arrays(str(tmp_path / "obj.npy"), spec)
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError):
        load_arrays(str(tmp_path / "trunc.npz"), spec)


def test_synthetic_is_seeded():
    spec = Spec((1, 3, 16, 16))
    p = Preprocess.infer(spec.shape, preset="imagenet")
    a, b = synthetic_sample(spec, 3, p), synthetic_sample(spec, 3, p)
    assert a.synthetic and np.array_equal(a.array, b.array) and a.array.shape == (3, 16, 16)
    assert not np.array_equal(a.array, synthetic_sample(spec, 4, p).array)
    lo, hi = p.value_range()
    assert a.array.min() >= lo.min() - 1e-5 and a.array.max() <= hi.max() + 1e-5
    assert synthetic_sample(Spec((1, 10)), 0).array.shape == (10,)
