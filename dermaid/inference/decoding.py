"""Untrusted request bytes -> an upright RGB photo, or a DermaidError that says why not.

    image = decode_image(data, max_pixels)   # ImageDecodeError / ImageTooLargeError, never a crash
    check_aspect_ratio(image)                # ImageShapeError for a strip that cannot be a lesion photo
"""

from __future__ import annotations

from PIL import Image

from dermaid.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, open_image
from dermaid.errors import DermaidError

# Longest/shortest side above which an image cannot be a photo of a lesion; guards the resize step
# (a 1 x 50000 strip passes the pixel limit but would be resized to billions of pixels).
MAX_ASPECT_RATIO = 20.0


class ImageShapeError(ImageDecodeError):
    """A decodable image whose shape cannot be a lesion photo (extreme aspect ratio)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """open_image with every decoder failure reported as ImageDecodeError (untrusted bytes never crash)."""
    try:
        return open_image(data, max_pixels=max_pixels)
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
