"""Reading image files with Pillow into pixel arrays, with documented mode conversions.

Conversions (applied after EXIF orientation, :func:`PIL.ImageOps.exif_transpose`):

* ``RGB`` / ``L``: as stored.
* ``RGBA``, ``LA``, ``PA``, ``P`` with transparency: composited over **black** (premultiplied), then RGB / L.
* ``P`` (palette), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's ``convert("RGB")``.
* ``1`` (bilevel): 0 / 255.
* ``I;16*`` (16-bit): divided by 257 (65535 -> 255). ``I`` (32-bit int) and ``F`` (float): values already in
  0..255 are kept, otherwise scaled by 255 / max.
* Grey models (channels ``L``) get ITU-R 601-2 luma (``convert("L")``); BGR models get RGB reversed.
* Animated images: the first frame.

Resizing is bilinear (Pillow) with antialiasing, on the 8-bit image.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def _to_8bit(img):
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        else:
            mx = float(np.nanmax(a)) if a.size else 0.0
            if mx > 255.0:
                a = a * (255.0 / mx)
        a = np.clip(np.nan_to_num(a), 0, 255)
        return Image.fromarray(np.round(a).astype(np.uint8), mode="L")
    return img


def open_image(path: str):
    """Open, orient (EXIF) and decode fully; any failure is a :class:`DataError` naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            # Pillow's warnings about a file (broken metadata, a short read) never reach stderr as extra lines:
            # a truncated read is an error, metadata noise is dropped
            warnings.simplefilter("always")
            # past Pillow's pixel limit (Image.MAX_IMAGE_PIXELS) Pillow only warns up to twice the limit:
            # refused like a larger bomb, before anything is decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.seek(0)
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:
                    pass  # a broken EXIF block: keep the stored orientation
                img = im.copy()
        short = [w for w in caught if "truncated" in str(w.message).lower()]
        if short:
            raise DataError(f"{path}: cannot decode image ({str(short[0].message).splitlines()[0]})")
        return img
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated, corrupt, decompression bomb
        raise DataError(f"{path}: cannot decode image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: refused by Pillow's decompression-bomb limit ({e})") from None


def to_mode(img, channels: str):
    """A Pillow image in any mode -> mode "RGB" (for RGB/BGR) or "L", as documented above."""
    from PIL import Image

    img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        base = "L" if img.mode in ("LA", "La") else "RGB"
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba).convert(base)
    if img.mode == "1":
        img = img.convert("L")
    target = "L" if channels == "L" else "RGB"
    if img.mode != target:
        img = img.convert(target)
    return img


def resize(img, size: tuple[int, int] | None, mode: str = "stretch"):
    """Resize a Pillow image to (H, W): stretch, or shorter side then centre crop."""
    from PIL import Image

    if size is None:
        return img
    h, w = size
    if img.size == (w, h):
        return img
    if mode == "crop":
        iw, ih = img.size
        s = max(w / iw, h / ih)
        nw, nh = max(w, round(iw * s)), max(h, round(ih * s))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - w) // 2, (nh - h) // 2
        return img.crop((left, top, left + w, top + h))
    return img.resize((w, h), Image.BILINEAR)


def read_pixels(path: str, channels: str = "RGB", size: tuple[int, int] | None = None,
                resize_mode: str = "stretch") -> tuple[np.ndarray, np.ndarray]:
    """(pixels in the spec's channel order as uint8 (H, W, C), display RGB uint8 (H, W, 3)) of one image file."""
    img = to_mode(open_image(path), channels)
    img = resize(img, size, resize_mode)
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    display = np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a.copy()
    if channels == "BGR":
        a = a[:, :, ::-1]
    return np.ascontiguousarray(a), display


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTS
