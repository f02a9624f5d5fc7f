"""Bytes -> RGB pixels, or a Skip saying why not; and the fixed-side resize.

Uncurated images are broken in every way a file can be: empty, truncated, not an
image at all, 400 megapixels behind a 600 KB PNG, CMYK, 16-bit, palette with a
transparent index, rotated by an EXIF tag. Nothing here raises for bad data: every
failure is a `Skip(key, reason)` that the loader counts and logs once.

Two paths produce the `uint8 [3, S, S]` every batch is made of:
- files: `read_file` -> `decode_resized` (Pillow; JPEG draft mode; bilinear resize of
  the shorter side to S with antialias, then a centre crop), or `decode_whole` for
  pretraining (the whole image squashed to S x S, with its aspect ratio);
- in-memory tensors (Fashion-MNIST): `resize_center_crop` on whole batches in torch.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Skip:
    """An item that is not an image: `key` names it (a path), `reason` says why."""

    key: str
    reason: str


def _short(err: BaseException) -> str:
    """`OSError: image file is truncated` style reason: one line, at most ~120 characters."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def read_file(path: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes | Skip:
    """The whole file's bytes, or Skip for missing, broken symlink, directory, no permission."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            return Skip(path, "is a directory")
        if not stat.S_ISREG(info.st_mode):
            return Skip(path, "not a regular file")
        if info.st_size > max_bytes:
            return Skip(path, f"file too large: {info.st_size} bytes > {max_bytes}")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except FileNotFoundError:
        return Skip(path, "broken symlink" if os.path.islink(path) else "missing")
    except PermissionError:
        return Skip(path, "permission denied")
    except OSError as err:  # EIO, ELOOP (symlink loop), ENAMETOOLONG, ...
        return Skip(path, f"unreadable: {err.strerror or _short(err)}")


def _open(data: bytes, key: str, max_pixels: int) -> Image.Image | Skip:
    """Header only: Pillow reads the size lazily, so the pixel limit bites before decoding."""
    if len(data) == 0:
        return Skip(key, "empty file")
    try:
        with warnings.catch_warnings():  # Pillow warns above ~89M pixels; our limit decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Skip(key, "not an image")
    except Image.DecompressionBombError as err:  # Pillow's own hard limit (~179M pixels)
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        return Skip(key, f"too large: {pixels[1] if pixels else 'over 179M'} pixels")
    except Exception as err:  # noqa: BLE001  # bad data of any kind is a skip, never fatal
        reason = _short(err)
        return Skip(key, "truncated" if "truncated" in reason.lower() else f"bad header: {reason}")
    width, height = img.size
    if width <= 0 or height <= 0:
        return Skip(key, f"bad size: {width}x{height}")
    if width * height > max_pixels:
        return Skip(key, f"too large: {width}x{height}")
    return img


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """Integer/float grey levels -> uint8 by scaling, never clipping.

    uint16 (`I;16*`): v * 255 / 65535. 32-bit `I`: by the smallest range that holds it
    (8 or 16 bit). `F`: [0, 1] -> [0, 255]. Otherwise [min(0, lo), hi] -> [0, 255].
    """
    v = values.astype(np.float64)
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return np.rint(v * (255.0 / 65535.0)).astype(np.uint8)
    if values.dtype.kind == "f":
        v = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(v.min(initial=0.0)), float(v.max(initial=0.0))
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(v * 255.0).astype(np.uint8)
    else:
        lo, hi = float(v.min(initial=0)), float(v.max(initial=0))
        if lo >= 0 and hi <= 255:
            return v.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return np.rint(v * (255.0 / 65535.0)).astype(np.uint8)
    span = hi - lo if hi > lo else 1.0
    return np.rint((v - lo) * (255.0 / span)).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited on white, 16/32-bit and float grey scaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if (mode == "P" and "transparency" in img.info) or mode == "PA":
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":  # I;16, I;16B, I;16L, I, F: numbers, not levels
        grey = _to_8bit(np.asarray(img))
        return Image.fromarray(grey).convert("RGB")  # [H, W] uint8: mode L
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX


def _decode(data: bytes, key: str, max_pixels: int, draft_side: int | None) -> Image.Image | Skip:
    """Open (size checked), optionally JPEG draft, EXIF-rotate, first frame, convert to RGB."""
    img = _open(data, key, max_pixels)
    if isinstance(img, Skip):
        return img
    try:
        if draft_side is not None and img.format == "JPEG":
            # decode at 1/2, 1/4 or 1/8 scale while the shorter side stays >= draft_side
            w, h = img.size
            scale = draft_side / min(w, h)
            img.draft(None, (max(1, round(w * scale)), max(1, round(h * scale))))
        img.load()  # animated GIF/PNG/WebP: the first frame
        try:
            img = ImageOps.exif_transpose(img) or img
        except Exception:  # noqa: BLE001  # a corrupt EXIF block keeps the stored orientation
            pass
        return _to_rgb(img)
    except Image.DecompressionBombError:
        return Skip(key, "too large: decompression bomb")
    except Exception as err:  # noqa: BLE001  # truncated, corrupt, unsupported: all skips
        reason = _short(err)
        return Skip(key, "truncated" if "truncated" in reason.lower() else f"corrupt: {reason}")


def decode_image(
    data: bytes, *, key: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray | Skip:
    """Encoded bytes -> uint8 [H, W, 3] RGB at full resolution, EXIF orientation applied."""
    img = _decode(data, key, max_pixels, draft_side=None)
    if isinstance(img, Skip):
        return img
    return np.array(img, dtype=np.uint8).reshape(img.size[1], img.size[0], 3)  # writable copy


def decode_resized(
    data: bytes, *, key: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor | Skip:
    """Encoded bytes -> uint8 [3, S, S]: shorter side to S (bilinear, antialiased), centre crop.

    JPEGs are decoded in draft mode (DCT scaling) when they are at least twice as large
    as needed, which is several times faster for photos and changes pixels only at the
    level of the antialiasing filter.
    """
    img = _decode(data, key, max_pixels, draft_side=size)
    if isinstance(img, Skip):
        return img
    new_w, new_h = _shorter_side_to(*img.size, size)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return _square_pixels(img, key, (new_w, new_h), (left, top, left + size, top + size))


def decode_whole(
    data: bytes, *, key: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[torch.Tensor, float] | Skip:
    """Encoded bytes -> (uint8 [3, S, S], width / height): the WHOLE image resized to S x S
    (bilinear, antialiased; squashed along its longer side) and its aspect ratio, so that
    random crops can cover all of it with the geometry of the original (the crop sampler
    stretches its boxes by the aspect ratio, views/ops.sample_crop_boxes). Draft mode as above."""
    img = _decode(data, key, max_pixels, draft_side=size)
    if isinstance(img, Skip):
        return img
    w, h = img.size
    pixels = _square_pixels(img, key, (size, size), None)
    return pixels if isinstance(pixels, Skip) else (pixels, w / h)


def _square_pixels(
    img: Image.Image, key: str, resize_to: tuple[int, int], crop: tuple[int, int, int, int] | None
) -> torch.Tensor | Skip:
    """img resized to `resize_to` (bilinear, antialiased), then cropped to `crop` (a square box
    of that size) -> uint8 [3, S, S]; a Skip if Pillow fails on it."""
    try:
        img = img.resize(resize_to, Image.Resampling.BILINEAR, reducing_gap=3.0)
        if crop is not None:
            img = img.crop(crop)
        side = img.size[0]
        pixels = np.asarray(img, dtype=np.uint8).reshape(side, side, 3)  # [S, S, 3]
    except Exception as err:  # noqa: BLE001
        return Skip(key, f"corrupt: {_short(err)}")
    # numpy's transpose copy: torch's OpenMP one is ~100x slower on a busy machine
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # [3, S, S]


def _shorter_side_to(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_w, new_h) with min(new_w, new_h) == size and the aspect ratio kept (rounded)."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, C, H, W] -> uint8 [B, C, S, S]: shorter side to S (bilinear, antialias), crop.

    torch resizes uint8 directly (rounded, within 1 level of the float path, ~10x faster).
    """
    _, _, h, w = images.shape
    if (h, w) == (size, size):
        return images
    new_w, new_h = _shorter_side_to(w, h, size)
    x = F.interpolate(images, size=(new_h, new_w), mode="bilinear", antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2  # x: [B, C, new_h, new_w]
    return x[:, :, top : top + size, left : left + size].contiguous()
