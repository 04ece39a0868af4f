"""Out-of-distribution photos: what a consumer might wrongly upload instead of a close-up of a lesion.

    dermaid synth kind=ood out=data/toy-ood n=50 seed=0      # n images per kind
    python -c "from dermaid.data.synth_ood import generate_ood; generate_ood('data/toy-ood', 50, 0)"

Writes, at any fsspec URL:
    <kind>/<kind>_<i>.jpg      i = 0 .. n-1 for every kind in OOD_KINDS
    ood_manifest.csv           image,kind (image relative to the set's root)
    ood_synth.json             generator settings (n_per_kind, seed, kinds, version); written last

The kinds: documents (letters, tables, receipts in PIL's default font), flat colours, gradients,
noise, procedural textures (grass, wood grain, fabric weave), everyday objects (a mug, a phone, a
ball, shaded, on a wall and table), skin without a lesion, and toy lesions made unusable (heavily
blurred, over-exposed) with dermaid.data.synth's own drawing. Sizes follow the toy set
(synth.IMAGE_SIZES). These are synthetic pictures for testing abstention, not a clinical benchmark.
Deterministic for a seed: image i of a kind draws from its own generator seeded by (seed, kind, i).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from dermaid.classes import CLASS_CODES
from dermaid.data.synth import IMAGE_SIZE_WEIGHTS, IMAGE_SIZES, NO_LESION, lesion_image
from dermaid.errors import DermaidError
from dermaid.files import exists, get_fs, join, read_text, write_bytes, write_text

log = logging.getLogger(__name__)

OOD_KINDS: tuple[str, ...] = (
    "document", "flat", "gradient", "noise", "texture", "object", "bare_skin", "blurred_lesion", "overexposed_lesion",
)
OOD_GENERATOR_VERSION = 1  # bump when a drawing changes: a different version means different images
MANIFEST_FILE = "ood_manifest.csv"
MARKER_FILE = "ood_synth.json"
BLUR_RADIUS = (0.04, 0.08)  # blurred_lesion: Gaussian radius as a share of the shorter side (18-36 px at 450 px)
OVEREXPOSURE = (2.5, 3.5)  # overexposed_lesion: brightness factor before clipping (about x3)

_WORDS = (
    "the", "of", "and", "to", "in", "for", "with", "your", "please", "note", "date", "page", "meeting", "report",
    "summary", "invoice", "order", "number", "account", "address", "reference", "quarter", "budget", "review",
    "approved", "delivery", "service", "thank", "you", "schedule", "item", "amount", "total", "due", "payment",
)
_ITEMS = ("COFFEE", "BREAD", "MILK", "APPLES", "PASTA", "SOAP", "TEA", "RICE", "EGGS", "CHEESE", "WATER", "JAM")


# ---------------------------------------------------------------------------------------------
# Helpers (float RGB in [0, 1])


def _to_image(canvas: np.ndarray) -> Image.Image:
    """(h, w, 3) float in [0, 1] -> RGB image."""
    return Image.fromarray((np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def _grid(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates normalised by the shorter side: (xx, yy), each (h, w), centred on the image."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    short = float(min(w, h))
    return (xx - w / 2) / short, (yy - h / 2) / short


def _smooth(rng: np.random.Generator, size: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random cells x cells grid upsampled bicubically. (h, w)"""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid, mode="L").resize(size, Image.BICUBIC), dtype=np.float32) / 255.0


def _sensor(rng: np.random.Generator, canvas: np.ndarray, sigma: float) -> np.ndarray:
    """A camera's light falloff and sensor noise on canvas (h, w, 3)."""
    h, w = canvas.shape[:2]
    light = 0.94 + 0.08 * _smooth(rng, (w, h), 3)  # (h, w)
    return canvas * light[..., None] + rng.normal(0, sigma, canvas.shape).astype(np.float32)


def _colour(rng: np.random.Generator, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    return rng.uniform(low, high, 3).astype(np.float32)  # (3,)


# ---------------------------------------------------------------------------------------------
# Documents


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, px))  # PIL's own font, scalable where FreeType is present


def _words_line(rng: np.random.Generator, draw: ImageDraw.ImageDraw, font, width: float) -> str:
    """Random words up to `width` pixels of text."""
    line = str(rng.choice(_WORDS)).capitalize()
    while True:
        longer = f"{line} {rng.choice(_WORDS)}"
        if draw.textlength(longer, font=font) > width:
            return line + ("." if rng.random() < 0.2 else "")
        line = longer


def _letter(rng, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], px: int, ink) -> None:
    x0, y0, x1, y1 = box
    draw.text((x0, y0), " ".join(rng.choice(_WORDS, 3)).upper(), fill=ink, font=_font(int(px * 1.5)))
    font, y = _font(px), y0 + 3 * px
    while y < y1 - px:
        for _ in range(int(rng.integers(2, 7))):  # a paragraph
            if y >= y1 - px:
                break
            width = (x1 - x0) * (rng.uniform(0.3, 0.8) if rng.random() < 0.15 else 1.0)
            draw.text((x0, y), _words_line(rng, draw, font, width), fill=ink, font=font)
            y += int(px * 1.5)
        y += px


def _table(rng, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], px: int, ink) -> None:
    x0, y0, x1, y1 = box
    cols, row_h = int(rng.integers(3, 7)), int(px * 2.0)
    rows = max(2, (y1 - y0) // row_h)
    font, col_w = _font(px), (x1 - x0) / cols
    for r in range(rows + 1):
        draw.line([(x0, y0 + r * row_h), (x1, y0 + r * row_h)], fill=ink, width=1 if r else 2)
    for c in range(cols + 1):
        draw.line([(x0 + c * col_w, y0), (x0 + c * col_w, y0 + rows * row_h)], fill=ink, width=1)
    for r in range(rows):
        for c in range(cols):
            text = str(rng.choice(_WORDS)).upper() if r == 0 else (
                str(rng.choice(_WORDS)) if c == 0 else f"{rng.uniform(0, 999):.2f}")
            draw.text((x0 + c * col_w + px * 0.4, y0 + r * row_h + px * 0.45), text, fill=ink, font=font)


def _receipt(rng, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], px: int, ink) -> None:
    x0, y0, x1, y1 = box
    font, y = _font(px), y0
    draw.text((x0, y), "STORE " + str(rng.integers(100, 999)), fill=ink, font=_font(int(px * 1.4)))
    y += 3 * px
    total = 0.0
    while y < y1 - 5 * px:
        price = float(rng.uniform(0.5, 20))
        total += price
        draw.text((x0, y), str(rng.choice(_ITEMS)), fill=ink, font=font)
        text = f"{price:.2f}"
        draw.text((x1 - draw.textlength(text, font=font), y), text, fill=ink, font=font)
        y += int(px * 1.4)
    draw.line([(x0, y + px // 2), (x1, y + px // 2)], fill=ink, width=max(1, px // 8))
    draw.text((x0, y + px), f"TOTAL {total:.2f}", fill=ink, font=_font(int(px * 1.3)))


def _document(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A letter, a table or a receipt on near-white paper, photographed flat."""
    w, h = size
    layout = str(rng.choice(["letter", "table", "receipt"]))
    desk = _colour(rng, 0.25, 0.7)
    paper = np.clip(rng.uniform(0.93, 1.0) + rng.normal(0, 0.015, 3), 0, 1).astype(np.float32)
    px = int(min(w, h) * rng.uniform(0.025, 0.04))
    ink = tuple(int(v) for v in (rng.integers(5, 50, 3) if rng.random() < 0.8 else (20, 30, int(rng.integers(90, 140)))))
    img = Image.new("RGB", size, tuple(int(v * 255) for v in (desk if layout == "receipt" else paper)))
    draw = ImageDraw.Draw(img)
    if layout == "receipt":  # a narrow slip on a desk: the paper still fills most of the frame
        half = int(w * rng.uniform(0.36, 0.44))
        draw.rectangle([w // 2 - half, 0, w // 2 + half, h], fill=tuple(int(v * 255) for v in paper))
        _receipt(rng, draw, (w // 2 - half + 2 * px, 2 * px, w // 2 + half - 2 * px, h - px), px, ink)
    else:
        margin = int(w * rng.uniform(0.05, 0.1))
        (_letter if layout == "letter" else _table)(rng, draw, (margin, margin, w - margin, h - margin), px, ink)
    canvas = np.asarray(img.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float32) / 255.0  # (h, w, 3)
    return _to_image(_sensor(rng, canvas, 0.01))


# ---------------------------------------------------------------------------------------------
# Flat colours, gradients, noise


def _flat(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One colour (a wall, a table top, a lens cap) with the camera's falloff and a little noise."""
    w, h = size
    colour = _colour(rng) if rng.random() < 0.6 else np.full(3, rng.uniform(0.05, 0.95), np.float32)
    canvas = np.empty((h, w, 3), np.float32)
    canvas[:] = colour
    return _to_image(_sensor(rng, canvas, 0.008))


def _gradient(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A linear or radial blend of two colours (a sky, a lit wall)."""
    xx, yy = _grid(size)
    if rng.random() < 0.6:
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
    else:
        t = np.hypot(xx - rng.uniform(-0.4, 0.4), yy - rng.uniform(-0.4, 0.4))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)  # (h, w) in [0, 1]
    c0, c1 = _colour(rng), _colour(rng)
    canvas = c0 * (1 - t[..., None]) + c1 * t[..., None]  # (h, w, 3)
    return _to_image(canvas + rng.normal(0, 0.008, canvas.shape).astype(np.float32))


def _noise(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Uniform colour noise, grey Gaussian noise, salt and pepper, or random blocks."""
    w, h = size
    variant = int(rng.integers(4))
    if variant == 0:
        canvas = rng.random((h, w, 3), dtype=np.float32)
    elif variant == 1:
        canvas = np.repeat(rng.normal(0.5, rng.uniform(0.15, 0.3), (h, w, 1)).astype(np.float32), 3, axis=2)
    elif variant == 2:
        canvas = np.empty((h, w, 3), np.float32)
        canvas[:] = _colour(rng, 0.2, 0.8)
        salt = rng.random((h, w))
        canvas[salt < 0.15] = 0.0
        canvas[salt > 0.85] = 1.0
    else:
        cell = int(rng.integers(4, 33))
        blocks = (rng.random((h // cell + 1, w // cell + 1, 3)) * 255).astype(np.uint8)
        return Image.fromarray(blocks).resize((w, h), Image.NEAREST)
    return _to_image(canvas)


# ---------------------------------------------------------------------------------------------
# Textures


def _grass(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    base = np.array([0.18, 0.38, 0.12], np.float32) * rng.uniform(0.7, 1.2)
    img = _to_image(np.broadcast_to(base, (h, w, 3)) * (0.7 + 0.5 * _smooth(rng, size, 6))[..., None])
    draw = ImageDraw.Draw(img)
    length = min(w, h) * 0.06
    for _ in range(w * h // 250):  # blades
        x, y = rng.uniform(0, w), rng.uniform(0, h * 1.05)
        lean = rng.normal(0, 0.35)
        green = np.clip(base * rng.uniform(0.6, 2.0) + rng.normal(0, 0.04, 3), 0, 1)
        draw.line([(x, y), (x + lean * length, y - length * rng.uniform(0.5, 1.2))],
                  fill=tuple(int(v * 255) for v in green), width=int(rng.integers(1, 4)))
    return img.filter(ImageFilter.GaussianBlur(0.7))


def _wood(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    xx, yy = _grid(size)
    vertical = rng.random() < 0.5  # boards along y instead of x
    across, along = (xx, yy) if vertical else (yy, xx)
    warp = _smooth(rng, size, 4) * rng.uniform(0.5, 1.5)  # (h, w)
    rings = np.mod((across + 0.15 * along ** 2) * rng.uniform(10, 25) + 4 * warp, 1.0) ** rng.uniform(1.5, 3)
    grain = (rng.random((16, w // 12 + 1) if vertical else (h // 12 + 1, 16)) * 255).astype(np.uint8)
    streaks = np.asarray(Image.fromarray(grain).resize(size, Image.BICUBIC), np.float32) / 255.0  # fine grain
    light, dark = np.array([0.78, 0.58, 0.38], np.float32), np.array([0.45, 0.28, 0.15], np.float32)
    tone = np.clip(0.6 * rings + 0.4 * streaks, 0, 1)[..., None]  # (h, w, 1)
    canvas = (light * (1 - tone) + dark * tone) * rng.uniform(0.8, 1.1)
    return _to_image(_sensor(rng, canvas, 0.01))


def _fabric(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(5, 14)  # thread width in pixels
    u, v = xx / period, yy / period
    twill = int(rng.integers(0, 3))  # 0: plain weave, 1-2: twill steps
    over = np.mod(np.floor(u) + np.floor(v) * (twill or 1), 2 if twill == 0 else 3) < 1  # (h, w) warp on top
    profile_warp = 0.55 + 0.45 * np.sin(np.pi * np.mod(u, 1.0))  # round threads
    profile_weft = 0.55 + 0.45 * np.sin(np.pi * np.mod(v, 1.0))
    warp_c, weft_c = _colour(rng, 0.15, 0.9), _colour(rng, 0.15, 0.9)
    canvas = np.where(over[..., None], warp_c * profile_warp[..., None], weft_c * profile_weft[..., None])
    return _to_image(_sensor(rng, canvas.astype(np.float32), 0.015))


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Grass, wood grain or a woven fabric, procedural."""
    return (_grass, _wood, _fabric)[int(rng.integers(3))](rng, size)


# ---------------------------------------------------------------------------------------------
# Everyday objects


def _soft(signed: np.ndarray, edge: float) -> np.ndarray:
    """A mask from a signed distance-like field (> 0 inside) with a soft edge of `edge` units."""
    return np.clip(signed / edge + 0.5, 0.0, 1.0)


def _object_shape(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A mug, a phone or a ball around the centre: (mask (h, w), shade (h, w))."""
    kind, px = int(rng.integers(3)), 0.004
    light = rng.uniform(-0.6, 0.6)  # horizontal light direction
    if kind == 0:  # ball: Lambert shading and a highlight
        r = rng.uniform(0.2, 0.33)
        d2 = (xx ** 2 + yy ** 2) / r ** 2
        nz = np.sqrt(np.clip(1 - d2, 0, 1))
        shade = 0.25 + 0.75 * np.clip((xx / r) * light - (yy / r) * 0.5 + nz * 0.7, 0, 1)
        shade += 0.6 * np.exp(-(((xx / r - light * 0.5) ** 2 + (yy / r + 0.35) ** 2) / 0.02))
        return _soft(r - np.sqrt(xx ** 2 + yy ** 2), px), shade
    if kind == 1:  # phone: a rotated rounded rectangle with a screen
        angle = rng.uniform(-0.6, 0.6)
        u, v = xx * np.cos(angle) + yy * np.sin(angle), -xx * np.sin(angle) + yy * np.cos(angle)
        a, b = rng.uniform(0.14, 0.2), rng.uniform(0.28, 0.38)
        body = 1 - ((np.abs(u) / a) ** 8 + (np.abs(v) / b) ** 8)
        screen = 1 - ((np.abs(u) / (0.88 * a)) ** 8 + (np.abs(v) / (0.9 * b)) ** 8)
        shade = 0.15 + 0.7 * _soft(screen, 0.02) * (0.6 + 0.4 * (v / b + 1) / 2)
        return _soft(body, 0.02), shade
    width, height = rng.uniform(0.16, 0.24), rng.uniform(0.22, 0.32)  # mug: a shaded cylinder and a handle
    body = np.minimum(width - np.abs(xx), height - np.abs(yy))
    side = np.sign(rng.uniform(-1, 1))
    ring = np.hypot(xx - side * width, yy + 0.1 * height)  # the handle: half a ring outside the body
    handle = np.minimum(0.03 - np.abs(ring - height * 0.45), side * (xx - side * width))
    shade = 0.3 + 0.7 * np.clip(np.cos(np.clip(xx / width, -1, 1) * np.pi / 2 - light), 0, 1)
    rim = np.exp(-((yy + height) / 0.015) ** 2) * (np.abs(xx) < width)
    return np.maximum(_soft(body, px), _soft(handle, px)), shade * (1 - 0.4 * rim)


def _object(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A mug, a phone or a ball, shaded, with a shadow, on a wall above a table."""
    w, h = size
    xx, yy = _grid(size)
    horizon = rng.uniform(-0.1, 0.25)
    wall, table = _colour(rng, 0.4, 0.95), _colour(rng, 0.2, 0.8)
    canvas = np.where((yy < horizon)[..., None], wall, table).astype(np.float32)  # (h, w, 3)
    cx, cy = rng.normal(0, 0.08), rng.normal(0, 0.05)
    mask, shade = _object_shape(rng, xx - cx, yy - cy)  # (h, w) each
    shadow = np.asarray(_to_image(np.repeat(mask[..., None], 3, 2)).filter(ImageFilter.GaussianBlur(min(w, h) * 0.03))
                        .transform(size, Image.AFFINE, (1, 0, -min(w, h) * 0.04, 0, 1, -min(w, h) * 0.03)),
                        np.float32)[..., 0] / 255.0
    canvas *= (1 - 0.45 * shadow)[..., None]
    colour = _colour(rng, 0.1, 0.95)
    canvas = canvas * (1 - mask[..., None]) + (colour * shade[..., None]) * mask[..., None]
    return _to_image(_sensor(rng, canvas, 0.012))


# ---------------------------------------------------------------------------------------------
# Skin and unusable lesions (dermaid.data.synth's drawing)


def _bare_skin(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """The toy set's skin, light, hair and noise with no lesion; pores and fine creases on top."""
    w, h = size
    img = lesion_image(NO_LESION, int(rng.integers(2**31)), int(rng.integers(2**31)), size)
    pores = np.zeros((h, w), np.uint8)
    count = int(w * h / rng.uniform(250, 600))
    pores[rng.integers(0, h, count), rng.integers(0, w, count)] = 255
    pore_map = np.asarray(Image.fromarray(pores).filter(ImageFilter.GaussianBlur(1.2)), np.float32) / 255.0
    xx, yy = _grid(size)
    angle = rng.uniform(0, np.pi)
    creases = np.clip(np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * rng.uniform(40, 80)
                             + 6 * _smooth(rng, size, 5)) - 0.9, 0, 1) * 3  # (h, w): thin dark lines
    darken = 1 - np.clip(2.5 * pore_map + 0.12 * creases, 0, 0.45)
    return _to_image(np.asarray(img, np.float32) / 255.0 * darken[..., None])


def _toy_lesion(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    style = str(rng.choice(CLASS_CODES))
    return lesion_image(style, int(rng.integers(2**31)), int(rng.integers(2**31)), size)


def _blurred_lesion(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A toy lesion out of focus: Gaussian blur with a radius of BLUR_RADIUS of the shorter side."""
    img = _toy_lesion(rng, size)
    return img.filter(ImageFilter.GaussianBlur(min(size) * rng.uniform(*BLUR_RADIUS)))


def _overexposed_lesion(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A toy lesion with the flash too close: brightness times OVEREXPOSURE, clipped."""
    img = _toy_lesion(rng, size)
    return _to_image(np.asarray(img, np.float32) / 255.0 * rng.uniform(*OVEREXPOSURE))


_DRAWERS: dict[str, Callable[[np.random.Generator, tuple[int, int]], Image.Image]] = {
    "document": _document, "flat": _flat, "gradient": _gradient, "noise": _noise, "texture": _texture,
    "object": _object, "bare_skin": _bare_skin, "blurred_lesion": _blurred_lesion,
    "overexposed_lesion": _overexposed_lesion,
}
assert tuple(_DRAWERS) == OOD_KINDS


# ---------------------------------------------------------------------------------------------
# Public API


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    unknown = [k for k in kinds if k not in OOD_KINDS]
    if unknown or not kinds:
        raise DermaidError(f"synth ood: unknown kind(s) {unknown or list(kinds)}; choose from {', '.join(OOD_KINDS)}")
    return tuple(kinds)


def generate_ood_image(kind: str, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One RGB image of `kind` at size (width, height), drawn from rng."""
    _check_kinds([kind])
    img = _DRAWERS[kind](rng, (int(size[0]), int(size[1])))
    return img.convert("RGB")


def _image_rngs(seed: int, kind: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(drawing rng, size rng) of image `index` of `kind`: independent of the other kinds and images."""
    k = OOD_KINDS.index(kind)
    return np.random.default_rng([seed, k, index]), np.random.default_rng([seed, k, index, 1])


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _render(kind: str, seed: int, index: int, size: tuple[int, int] | None, quality: int) -> bytes:
    """JPEG bytes of image `index` of `kind`; size None: one of the toy set's sizes, drawn per image."""
    rng, size_rng = _image_rngs(seed, kind, index)
    if size is None:
        size = IMAGE_SIZES[int(size_rng.choice(len(IMAGE_SIZES), p=IMAGE_SIZE_WEIGHTS))]
    return _encode(generate_ood_image(kind, rng, size), quality)


def iter_ood_images(n_per_kind: int, seed: int, size: tuple[int, int] = (256, 256),
                    kinds: Sequence[str] = OOD_KINDS, quality: int = 90) -> Iterator[tuple[str, bytes]]:
    """(kind, JPEG bytes) for n_per_kind images of every kind, in memory: the same drawings as
    generate_ood with the same seed, at one size."""
    for kind in _check_kinds(kinds):
        for index in range(n_per_kind):
            yield kind, _render(kind, seed, index, tuple(size), quality)


def _marker(n_per_kind: int, seed: int, kinds: Sequence[str], quality: int) -> dict[str, Any]:
    return {"generator": "dermaid.synth_ood", "version": OOD_GENERATOR_VERSION, "n_per_kind": n_per_kind,
            "seed": seed, "kinds": list(kinds), "quality": quality}


def _prepare_out(out: str, marker: dict[str, Any], overwrite: bool) -> bool:
    """True when `out` already holds this set; else clear our entries (or refuse a foreign directory)."""
    marker_url = join(out, MARKER_FILE)
    if exists(marker_url):
        try:
            if json.loads(read_text(marker_url)) == marker:
                return True
        except (ValueError, OSError):
            pass
    fs, path = get_fs(out)
    if fs.exists(path) and fs.ls(path) and not overwrite:
        raise DermaidError(f"synth ood: {out} exists and is not an OOD set with these settings; "
                           "choose another out= or pass overwrite=true")
    for name in (MARKER_FILE, MANIFEST_FILE, *OOD_KINDS):
        if fs.exists(f"{path.rstrip('/')}/{name}"):
            fs.rm(f"{path.rstrip('/')}/{name}", recursive=True)
    return False


def generate_ood(out: str, n_per_kind: int, seed: int, kinds: Sequence[str] = OOD_KINDS, quality: int = 90,
                 workers: int = 2, overwrite: bool = False) -> dict[str, Any]:
    """Write n_per_kind JPEGs of every kind under out/<kind>/ plus out/ood_manifest.csv; returns
    {"out", "counts": {kind: n}, "reused", "seconds"}. A set with the same settings at `out` is reused;
    any other non-empty `out` is an error unless overwrite=True (then only this set's entries are replaced)."""
    kinds = _check_kinds(kinds)
    if n_per_kind < 1 or seed < 0:
        raise DermaidError(f"synth ood: need n >= 1 images per kind and seed >= 0, got n={n_per_kind} seed={seed}")
    summary: dict[str, Any] = {"out": str(out), "counts": {kind: n_per_kind for kind in kinds}}
    marker = _marker(n_per_kind, seed, kinds, quality)
    if _prepare_out(out, marker, overwrite):
        log.info("synth ood: %s already holds this set; reusing it", out)
        return {**summary, "reused": True}
    start = time.perf_counter()
    jobs = [(kind, index) for kind in kinds for index in range(n_per_kind)]
    names = [f"{kind}/{kind}_{index}.jpg" for kind, index in jobs]

    def _write(i: int) -> None:
        kind, index = jobs[i]
        write_bytes(join(out, names[i]), _render(kind, seed, index, None, quality))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL filters and encoding release the GIL
        list(pool.map(_write, range(len(jobs))))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "kind"])
    writer.writerows([name, kind] for name, (kind, _) in zip(names, jobs))
    write_text(join(out, MANIFEST_FILE), buf.getvalue())  # after the images: a listed image is never missing
    write_text(join(out, MARKER_FILE), json.dumps(marker))
    seconds = time.perf_counter() - start
    log.info("synth ood: wrote %d images to %s in %.1f s", len(jobs), out, seconds)
    return {**summary, "reused": False, "seconds": round(seconds, 2)}


def read_ood_set(url: str) -> list[tuple[str, str]]:
    """[(image_url, kind)] from url/ood_manifest.csv, in manifest order."""
    manifest = join(url, MANIFEST_FILE)
    if not exists(manifest):
        raise DermaidError(f"{manifest}: not found; write an OOD set with `dermaid synth kind=ood out={url}`")
    rows = list(csv.reader(io.StringIO(read_text(manifest))))
    if not rows or rows[0] != ["image", "kind"]:
        raise DermaidError(f"{manifest}: expected the header image,kind, got {rows[0] if rows else 'an empty file'}")
    return [(join(url, image), kind) for image, kind in rows[1:]]
