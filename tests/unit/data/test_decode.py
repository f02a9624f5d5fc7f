"""decode_image / decode_resized / read_file on a generated corpus of good, odd and broken files."""

from __future__ import annotations

import contextlib
import io
import os
import random
import resource
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wildsight.data import Skip, decode_image, decode_resized, read_file
from wildsight.data.decode import resize_center_crop


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A 1-bit PNG whose header claims width x height; `rows` real rows of zeros (None: all)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    count = height if rows is None else rows
    body = b"".join(compressor.compress(row * 1000) for _ in range(count // 1000))
    body += compressor.compress(row * (count % 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", body)
        + png_chunk(b"IEND", b"")
    )


def decoded(data: bytes, **kwargs) -> np.ndarray:
    out = decode_image(data, key="k", **kwargs)
    assert isinstance(out, np.ndarray), out
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    return out


def skipped(data: bytes, **kwargs) -> str:
    out = decode_image(data, key="k", **kwargs)
    assert isinstance(out, Skip), f"expected a skip, got an image of shape {out.shape}"
    assert out.key == "k" and "\n" not in out.reason and len(out.reason) <= 120
    return out.reason


# --- broken data: always a Skip with a short reason, never an exception -------------------


def test_zero_bytes_random_bytes_and_text_are_skipped():
    assert skipped(b"") == "empty file"
    assert skipped(os.urandom(4096)) == "not an image"
    assert skipped(b"just some notes\nnot a picture\n") == "not an image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_files_are_skipped(fmt):
    data = encode(noise(64, 48), fmt)
    for cut in (len(data) // 2, len(data) - 40, 30):
        reason = skipped(data[:cut])
        assert reason, fmt


def test_fuzzed_files_never_raise():
    rng = random.Random(0)
    originals = [encode(noise(24, 16, s), fmt) for s, fmt in enumerate(["JPEG", "PNG", "GIF"])]
    for data in originals:
        for _ in range(25):
            broken = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                broken[rng.randrange(len(broken))] = rng.randrange(256)
            broken = broken[: rng.randint(1, len(broken))]
            for out in (
                decode_image(bytes(broken), key="f"),
                decode_resized(bytes(broken), key="f", size=8),
            ):
                assert isinstance(out, Skip | np.ndarray | torch.Tensor)


def test_decompression_bomb_is_skipped_by_header_without_decoding():
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # beyond Pillow's own hard limit (~179M pixels): a header and a few rows of zeros
    assert skipped(png_bomb(20000, 20000, rows=10)) == "too large: 400000000 pixels"
    # a real, complete bomb of 81M pixels in ~10 KB: under Pillow's limits, over ours (64M)
    bomb = png_bomb(9000, 9000)
    assert len(bomb) < 100_000
    assert skipped(bomb) == "too large: 9000x9000"
    assert decode_resized(bomb, key="k", size=8) == Skip("k", "too large: 9000x9000")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 1024
    assert grown_mb < 100, f"decoding a bomb header allocated {grown_mb:.0f} MB"


def test_own_pixel_limit_applies_to_small_images_too():
    data = encode(noise(20, 10), "PNG")
    assert skipped(data, max_pixels=199) == "too large: 20x10"
    assert decoded(data, max_pixels=200).shape == (10, 20, 3)


# --- odd but valid images: decoded sensibly ------------------------------------------------


def test_one_by_one_image():
    out = decoded(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    assert out.tolist() == [[[10, 200, 30]]]
    resized = decode_resized(
        encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), key="k", size=5
    )
    assert isinstance(resized, torch.Tensor) and resized.shape == (3, 5, 5)
    assert resized[:, 2, 2].tolist() == [10, 200, 30] and (resized == resized[:, :1, :1]).all()


def test_cmyk_jpeg_becomes_rgb():
    red = Image.new("RGB", (16, 16), (230, 20, 20)).convert("CMYK")
    data = encode(red, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    r, g, b = decoded(data)[8, 8].tolist()
    assert r > 190 and g < 70 and b < 70


def test_16bit_png_is_scaled_not_clipped():
    levels = np.array([[0, 1000, 257 * 100, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(levels), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decoded(data)
    assert out[0, :, 0].tolist() == [0, 4, 100, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32bit_int_and_float_tiff_are_scaled():
    ints = np.array([[0, 30000, 65535]], dtype=np.int32)
    assert decoded(encode(Image.fromarray(ints, "I"), "TIFF"))[0, :, 0].tolist() == [0, 117, 255]
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert decoded(encode(Image.fromarray(floats, "F"), "TIFF"))[0, :, 0].tolist() == [0, 128, 255]


def test_alpha_is_composited_on_white():
    rgba = np.array([[[0, 0, 255, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    out = decoded(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out[0, 0].tolist() == [0, 0, 255]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[0, 2].tolist())
    la = Image.fromarray(np.array([[[50, 255], [0, 0]]], dtype=np.uint8), "LA")
    assert decoded(encode(la, "PNG"))[0].tolist() == [[50, 50, 50], [255, 255, 255]]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_white(fmt):
    img = Image.new("P", (4, 1), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.putpixel((3, 0), 1)
    out = decoded(encode(img, fmt, transparency=0))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 3].tolist() == [0, 255, 0]


def test_bilevel_image():
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    assert decoded(encode(img, "PNG"))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    r, g, b = decoded(data)[4, 4].tolist()
    assert r > 200 and b < 50


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high, left half red, right half blue; EXIF orientation 6 (90 CW)."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied():
    out = decoded(exif_rotated_jpeg())
    assert out.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 high
    top, bottom = out[2:18].mean(axis=(0, 1)), out[22:38].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 50, "rotating 90 degrees clockwise brings the left side up"
    assert bottom[2] > 200 and bottom[0] < 50
    resized = decode_resized(exif_rotated_jpeg(), key="k", size=8)  # 8 wide, 16 high, crop 4..12
    assert isinstance(resized, torch.Tensor)
    assert resized[0, 0].float().mean() > 200 and resized[2, -1].float().mean() > 200


# --- resize and crop --------------------------------------------------------------------------


def three_bands(width: int, height: int, horizontal: bool) -> np.ndarray:
    """Red | blue | green bands along the longer side; the blue one is as long as the shorter."""
    long_side, short = max(width, height), min(width, height)
    band = (long_side - short) // 2
    line = np.zeros((long_side, 3), dtype=np.uint8)
    line[:band] = (255, 0, 0)
    line[band : band + short] = (0, 0, 255)
    line[band + short :] = (0, 255, 0)
    return np.broadcast_to(line[None] if horizontal else line[:, None], (height, width, 3)).copy()


@pytest.mark.parametrize("width,height", [(100, 50), (50, 100)])
def test_shorter_side_is_resized_then_centre_cropped(width, height):
    pixels = three_bands(width, height, horizontal=width > height)
    out = decode_resized(encode(Image.fromarray(pixels), "PNG"), key="k", size=10)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 10, 10) and out.dtype == torch.uint8
    inner = out[:, 2:8, 2:8]  # the antialias filter may blend the bands at the crop border
    assert (inner[2] == 255).all() and (inner[:2] == 0).all()
    assert (out[2] > 150).all()
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # [1, 3, H, W]
    same = resize_center_crop(tensor, 10)[0]  # the in-memory path agrees up to rounding
    assert (same.int() - out.int()).abs().max() <= 2


def test_upscaling_small_images():
    out = decode_resized(encode(noise(7, 5), "PNG"), key="k", size=32)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 32, 32)


# --- reading files ----------------------------------------------------------------------------


def test_read_file_reports_missing_directory_and_broken_symlink(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(b"\x89PNG")
    assert read_file(str(good)) == b"\x89PNG"
    assert read_file(str(tmp_path / "nope.jpg")) == Skip(str(tmp_path / "nope.jpg"), "missing")
    assert read_file(str(tmp_path)) == Skip(str(tmp_path), "is a directory")
    link = tmp_path / "link.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    assert read_file(str(link)) == Skip(str(link), "broken symlink")
    big = read_file(str(good), max_bytes=3)
    assert isinstance(big, Skip) and big.reason.startswith("file too large")


def test_read_file_reports_permission_denied() -> None:
    """A file without read permission. Root reads every file, so as root the read is made with
    the effective user and group of `nobody` (seteuid; restored after): the same EACCES a user
    gets. The folder is world-searchable, so only the file's own mode can refuse."""
    folder = Path(tempfile.mkdtemp(prefix="wildsight-perm-"))
    folder.chmod(0o711)
    locked = folder / "locked.jpg"
    locked.write_bytes(b"x")
    locked.chmod(0)
    try:
        with _unprivileged():
            assert not os.access(locked, os.R_OK, effective_ids=True)
            assert read_file(str(locked)) == Skip(str(locked), "permission denied")
            assert os.stat(locked).st_size == 1  # the file itself is visible: only reading fails
    finally:
        locked.chmod(0o644)
        shutil.rmtree(folder)


@contextlib.contextmanager
def _unprivileged(uid: int = 65534, gid: int = 65534) -> Iterator[None]:
    """As root: run the block with the effective ids of `nobody`; otherwise as is."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_whole_decode_keeps_the_edges_that_the_centre_square_cuts():
    """A 4:3 picture with white bands on its outer tenths (left and right): the centre square
    (its middle 3/4) loses them, decode_whole keeps them (squashed) and reports the picture's
    aspect ratio."""
    from wildsight.data.decode import decode_whole

    pixels = np.zeros((300, 400, 3), dtype=np.uint8)
    pixels[:, :40] = pixels[:, -40:] = 255  # the outer 1/10 of the width on each side
    data = encode(Image.fromarray(pixels), "PNG")
    centre = decode_resized(data, key="p.png", size=64)
    image, aspect = decode_whole(data, key="p.png", size=64)
    assert aspect == pytest.approx(4 / 3) and image.shape == (3, 64, 64)
    assert int(centre.max()) < 128  # the bands are outside the centre square
    # squashed, each band is 64 / 10 = 6.4 columns wide: white there, black in the middle
    assert int(image[:, :, :5].min()) > 200 and int(image[:, :, -5:].min()) > 200
    assert int(image[:, :, 12:52].max()) < 50
    broken = decode_whole(b"not a picture", key="b.png", size=64)
    assert isinstance(broken, Skip) and broken.key == "b.png"
