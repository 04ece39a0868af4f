"""dermaid.data.images: untrusted bytes -> RGB, with the decompression-bomb guard (no Ray, no Serve)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from dermaid.data.images import ImageTooLargeError, open_image


def _png_header_only(width: int, height: int) -> bytes:
    """A valid 1-bit PNG declaring width x height pixels, with a tiny compressed body (a bomb when large)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"\x00" * (1 + width // 8) * 16)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 90)).save(buf, "JPEG")
    return buf.getvalue()


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(ImageTooLargeError, match="8000x8000"):
        open_image(_png_header_only(8000, 8000))  # 64 MP: over the 50 MP default, under Pillow's own limit
    with pytest.raises(ImageTooLargeError, match="the limit is 1000"):
        open_image(_jpeg(), max_pixels=1000)


def test_pillows_own_bomb_guard_still_applies_above_a_raised_limit():
    assert Image.MAX_IMAGE_PIXELS  # Pillow's default guard is on (nothing here changes it)
    with pytest.raises(ImageTooLargeError):
        open_image(_png_header_only(20_000, 20_000), max_pixels=10**12)  # > 2x MAX_IMAGE_PIXELS: Pillow refuses


def test_decoding_leaves_warning_filters_alone_in_threads(monkeypatch):
    """Serve decodes in several threads: no warnings.catch_warnings (process-wide, not thread-safe) on the way."""
    def process_wide(*_args, **_kwargs):
        raise AssertionError("open_image changed the process-wide warning filters")

    monkeypatch.setattr(warnings, "catch_warnings", process_wide)
    monkeypatch.setattr(warnings, "simplefilter", process_wide)
    bomb, jpeg = _png_header_only(8000, 8000), _jpeg()

    def decode(data: bytes) -> str:
        try:
            return "x".join(map(str, open_image(data).size))
        except ImageTooLargeError:
            return "too large"

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(decode, [bomb, jpeg] * 8))
    assert results == ["too large", "64x48"] * 8
