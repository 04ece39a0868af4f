"""Untrusted request bytes -> an upright RGB photo, or a DermaidError that says why not.

    image = decode_image(data, max_pixels)   # ImageDecodeError / ImageTooLargeError, never a crash
    image = decode_prepared(data, card.preparation, max_pixels)  # the same, after prepare's own process_image
    image = decode_bounded(data, max_side, max_pixels)  # for people to see: long side <= max_side, JPEG draft
    check_aspect_ratio(image)                # ImageShapeError for a strip that cannot be a lesion photo
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any, TypeVar

from PIL import Image

from dermaid.data.images import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, open_image
from dermaid.data.shards import process_image
from dermaid.errors import DermaidError

_T = TypeVar("_T")

# Longest/shortest side above which an image cannot be a photo of a lesion; guards the resize step
# (a 1 x 50000 strip passes the pixel limit but would be resized to billions of pixels).
MAX_ASPECT_RATIO = 20.0
EXIF_ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose applies


class ImageShapeError(ImageDecodeError):
    """A decodable image whose shape cannot be a lesion photo (extreme aspect ratio)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """open_image with every decoder failure reported as ImageDecodeError (untrusted bytes never crash)."""
    return _guarded(lambda: open_image(data, max_pixels=max_pixels))


def decoded_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) the upload has once decoded upright (EXIF orientation applied), read from its header
    without decoding the pixels; the same checks as decode_image (format, pixel limit)."""
    def read() -> tuple[int, int]:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ALLOWED_FORMATS:
                raise ImageDecodeError(f"unsupported image format {img.format!r}; allowed: {sorted(ALLOWED_FORMATS)}")
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
            transposed = img.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)  # a quarter turn swaps the sides
            return (height, width) if transposed else (width, height)

    if not data:
        raise ImageDecodeError("empty image")
    return _guarded(read)


def decode_prepared(data: bytes, preparation: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The pixels `dermaid evaluate` reads from a prepared shard: `dermaid prepare`'s own process_image
    (dermaid.data.shards: JPEG draft, shorter side to image_size, JPEG at quality) with the card's
    `preparation` block, then decode_image of those bytes, guarded the same way."""
    encoded, _, _ = _guarded(lambda: process_image(data, int(preparation["image_size"]),
                                                   int(preparation["quality"]), max_pixels))
    return decode_image(encoded, max_pixels)


def decode_bounded(data: bytes, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The upload, upright RGB, scaled down (never up) so its longer side is at most max_side: what an overlay is
    drawn on. A JPEG decodes at libjpeg's reduced scale (draft) whose longer side is still at least max_side, so a
    50 MP photo never exists at full size here; other formats decode at full size first, then shrink."""
    width, height = decoded_size(data, max_pixels)
    draft = math.ceil(max_side * min(width, height) / max(width, height)) if max(width, height) > max_side else None
    return fit_within(_guarded(lambda: open_image(data, max_pixels=max_pixels, draft_size=draft)), max_side)


def fit_within(image: Image.Image, max_side: int) -> Image.Image:
    """image scaled down (never up, aspect kept) so its longer side is at most max_side; bicubic, with PIL's
    reducing_gap (a box reduction first, then the bicubic pass: fast for large factors)."""
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def _guarded(decode: Callable[[], _T]) -> _T:
    """decode(), any decoder failure raised as ImageDecodeError."""
    try:
        return decode()
    except DermaidError:
        raise
    except MemoryError:
        raise ImageTooLargeError("image needs more memory to decode than this server allows") from None
    except Exception as exc:  # PIL raises struct.error, IndexError, ... for some damaged files
        raise ImageDecodeError(f"image could not be decoded: {type(exc).__name__}") from None


def check_aspect_ratio(image: Image.Image) -> None:
    """ImageShapeError when the longer side is over MAX_ASPECT_RATIO times the shorter one."""
    width, height = image.size
    if max(width, height) / max(1, min(width, height)) > MAX_ASPECT_RATIO:
        raise ImageShapeError(
            f"image is {width}x{height}; the aspect ratio is above {MAX_ASPECT_RATIO:g}:1, not a lesion photo"
        )
