"""Image decoding shared by prepare, training, evaluation and Serve: one way to turn bytes into RGB.

Untrusted input is guarded here: a pixel limit against decompression bombs (checked on the declared
size before any pixel is decoded, beside Pillow's own DecompressionBombError), EXIF orientation
honoured, and every mode (grayscale, palette, RGBA, CMYK, 16-bit) converted to 8-bit RGB. Nothing here
touches process-wide state (warning filters, Image.MAX_IMAGE_PIXELS): Serve decodes in several threads.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dermaid.errors import DermaidError

# Formats decoded by content (magic bytes), never by file name or Content-Type.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000x7000: above any dermoscope, below a decompression bomb


class ImageDecodeError(DermaidError, ValueError):
    """The bytes are not a supported, decodable image."""


class ImageTooLargeError(ImageDecodeError):
    """The image declares more pixels than allowed (decompression-bomb guard)."""


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """bytes -> an RGB PIL image, upright, fully decoded.

    draft_size: for JPEGs, let libjpeg decode at a reduced scale whose shorter side is still
    at least this many pixels (much faster when the target is small).
    """
    if not data:
        raise ImageDecodeError("empty image")
    try:
        img = Image.open(io.BytesIO(data))  # Pillow's own guard: DecompressionBombError above 2x MAX_IMAGE_PIXELS
        fmt = img.format
        if fmt not in ALLOWED_FORMATS:
            raise ImageDecodeError(f"unsupported image format {fmt!r}; allowed: {sorted(ALLOWED_FORMATS)}")
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
        if draft_size and fmt in ("JPEG", "MPO"):
            scale = min(width, height) / draft_size
            if scale >= 2:
                img.draft("RGB", (int(width / scale * 1.0001) + 1, int(height / scale * 1.0001) + 1))
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning: under `-W error`
        raise ImageTooLargeError(str(exc)) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image (unknown or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"image could not be decoded: {exc}") from None


def sniff_format(data: bytes) -> str | None:
    """The format PIL reads from the bytes' header ("JPEG", "PNG", ...), None for bytes it does not know."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:  # noqa: BLE001 - unknown bytes are simply "not an image"
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey -> 8-bit on the fixed scale (65535 -> 255), so a 16-bit image and its 8-bit twin give the
        # same pixels; a 32-bit "I" image whose values stay within 0..255 is already on the 8-bit scale
        arr = np.asarray(img, dtype=np.float32)
        scale = 257.0 if img.mode != "I" or arr.max() > 255 else 1.0
        img = Image.fromarray((arr / scale).round().clip(0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    return img.convert("RGB")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (aspect kept); never upsamples."""
    width, height = img.size
    short = min(width, height)
    if short <= size:
        return img
    scale = size / short
    return img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
