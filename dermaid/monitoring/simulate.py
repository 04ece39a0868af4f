"""`dermaid monitor simulate`: replay toy uploads through a running DermAID service, optionally shifted.

    dermaid serve checkpoint=runs/toy/best &                                 # a calibrated checkpoint
    dermaid monitor simulate url=http://127.0.0.1:8000 n=300                 # an unshifted stream
    dermaid monitor simulate n=300 shift=brightness                          # the same stream, 40% brighter
    dermaid monitor simulate n=300 shift=downscale seed=7 concurrency=8
    dermaid report monitoring checkpoint=runs/toy/best window_hours=1        # then look (fail_on_alert=true)

The uploads are new toy images from the `dermaid synth` generator (written to a temporary folder, seed
`seed`: not the training set's), each sent to POST /v1/classify over HTTP with its age, sex and site, as a
client would. Shifts (SHIFTS), each changing what a real change in the field would:
    brightness    every photo brighter (PIL ImageEnhance.Brightness x strength, default 1.4): an overexposed camera
    colour_cast   a blue cast (R x 0.8, B x 1.25): another phone's white balance
    downscale     the shorter side resized to 64 px: a broken client resizing uploads
    class_mix     only malignant-class lesions (MEL, BCC, SCC): another clinic's case mix
    non_lesion    a third of the uploads non-lesion photos (dermaid.data.synth_ood): documents, objects, textures
Toy data, not real lesions; the service's answers are decision support for research, never a diagnosis.
"""

from __future__ import annotations

import io
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageEnhance

from dermaid.classes import DISCLAIMER, MALIGNANT_CODES
from dermaid.config import action_args, to_plain
from dermaid.errors import DermaidError

SHIFTS = ("none", "brightness", "colour_cast", "downscale", "class_mix", "non_lesion")
ACTIONS = ("simulate",)
DOWNSCALE_SIDE = 64          # "a broken client resizing to 64 px"
NON_LESION_SHARE = 1 / 3     # share of the non_lesion stream replaced by generated non-lesion photos
CAST = (0.8, 1.0, 1.25)      # colour_cast: R, G, B gains (a blue white balance)

hydra_args = action_args     # `dermaid monitor simulate k=v` -> action=simulate k=v


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid monitor simulate [url=] [n=] [shift=] [seed=] [strength=] [concurrency=]`."""
    plain = to_plain(cfg)
    if plain["action"] not in ACTIONS:
        raise DermaidError(f"monitor: unknown action {plain['action']!r}; run `dermaid monitor simulate ...`")
    summary = simulate(str(plain["url"]), n=int(plain["n"]), shift=str(plain["shift"]), seed=int(plain["seed"]),
                       strength=plain.get("strength"), concurrency=int(plain["concurrency"]))
    print(f"sent {summary['sent']} uploads (shift={summary['shift']}) to {summary['url']}: "
          + ", ".join(f"{status}={count}" for status, count in sorted(summary["status"].items())))
    print(DISCLAIMER)
    return summary


def simulate(url: str, n: int, shift: str = "none", seed: int = 100, strength: float | None = None,
             concurrency: int = 4, timeout_s: float = 60.0) -> dict[str, Any]:
    """POST n toy uploads (shifted) to url/v1/classify; {url, shift, sent, status: {code: count}}."""
    import requests

    uploads = list(shifted_uploads(n, shift, seed, strength))
    endpoint = url.rstrip("/") + "/v1/classify"

    def send(upload: tuple[bytes, dict[str, str]]) -> int:
        data, fields = upload
        try:
            return requests.post(endpoint, files={"image": ("upload.jpg", data, "image/jpeg")}, data=fields,
                                 timeout=timeout_s).status_code
        except requests.RequestException:
            return 0  # no answer at all
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        codes = list(pool.map(send, uploads))
    if codes and codes.count(0) == len(codes):
        raise DermaidError(f"monitor simulate: no answer from {endpoint}; is `dermaid serve` running there?")
    return {"url": url, "shift": shift, "sent": len(codes),
            "status": {str(code): codes.count(code) for code in sorted(set(codes))}}


def shifted_uploads(n: int, shift: str, seed: int, strength: float | None = None) -> Iterator[tuple[bytes, dict]]:
    """n (JPEG bytes, form fields) toy uploads with `shift` applied (SHIFTS; the module docstring)."""
    if shift not in SHIFTS:
        raise DermaidError(f"monitor simulate: shift={shift!r}; choose one of {', '.join(SHIFTS)}")
    if n < 1:
        raise DermaidError(f"monitor simulate: n={n}; send at least one upload")
    records = _toy_records(n * 4 if shift == "class_mix" else n, seed)
    if shift == "class_mix":
        records = [r for r in records if r["label"] in MALIGNANT_CODES][:n]
    change = _pixel_shift(shift, strength)
    rng = np.random.default_rng([seed, 2])
    non_lesion = _non_lesion_images(n, seed) if shift == "non_lesion" else None
    for i, record in enumerate(records[:n]):
        fields = {key: str(record[key]) for key in ("age", "sex", "site") if record[key] is not None}
        if non_lesion is not None and rng.random() < NON_LESION_SHARE:
            yield next(non_lesion), fields
            continue
        yield change(record["data"]), fields


def _pixel_shift(shift: str, strength: float | None) -> Callable[[bytes], bytes]:
    """bytes -> shifted JPEG bytes (identity for shifts that change the stream, not the pixels)."""
    if shift == "brightness":
        factor = float(strength or 1.4)
        return lambda data: _jpeg(ImageEnhance.Brightness(_open(data)).enhance(factor))
    if shift == "colour_cast":
        gains = np.asarray(CAST, dtype=np.float32) if strength is None else np.asarray(
            [1 - 0.2 * strength, 1.0, 1 + 0.25 * strength], dtype=np.float32)

        def cast(data: bytes) -> bytes:
            pixels = np.asarray(_open(data), dtype=np.float32) * gains  # (H, W, 3)
            return _jpeg(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
        return cast
    if shift == "downscale":
        side = int(strength or DOWNSCALE_SIDE)

        def shrink(data: bytes) -> bytes:
            img = _open(data)
            scale = side / min(img.size)
            return _jpeg(img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                    Image.BILINEAR))
        return shrink
    return lambda data: data


def _toy_records(n: int, seed: int) -> list[dict[str, Any]]:
    """n new toy images (dermaid.data.synth.generate at `seed`) with label and metadata, bytes in memory."""
    from dermaid.data.isic import read_isic2019
    from dermaid.data.synth import generate
    from dermaid.files import get_fs

    with tempfile.TemporaryDirectory(prefix="dermaid-simulate-") as folder:
        generate(folder, n=max(n, 8), seed=seed)
        table = read_isic2019(folder)
        rows = []
        for row in table.itertuples():
            fs, path = get_fs(row.image_url)
            rows.append({"data": fs.cat_file(path), "label": row.label, "age": _clean(row.age),
                         "sex": _clean(row.sex), "site": _clean(row.site)})
    return rows


def _non_lesion_images(n: int, seed: int) -> Iterator[bytes]:
    """Generated non-lesion photos of every kind, cycling (dermaid.data.synth_ood)."""
    from dermaid.data.synth_ood import OOD_KINDS, iter_ood_images

    per_kind = max(1, int(np.ceil(n * NON_LESION_SHARE / len(OOD_KINDS))) + 1)
    images = [data for _, data in iter_ood_images(per_kind, seed + 1)]
    order = np.random.default_rng([seed, 3]).permutation(len(images))
    while True:
        for i in order:
            yield images[i]


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _clean(value: Any) -> Any:
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
