"""Reviewed uploads -> a dataset in the ISIC 2019 training layout: `dermaid labels-export`.

    dermaid labels-export out=data/labels min_agreement=0.6     # reviewed uploads -> ISIC 2019 layout
    dermaid prepare data.root=data/labels tag=labels-v1          # ... a dataset version of its own
    dermaid train experiment=finetune train.init_from=runs/toy/best data.extra=data/labels   # + the original data

    export_dataset(LabelStore.open("uploads"), "data/labels", min_agreement=0.6)   # the same from Python

Only uploads with a consensus diagnosis (agreement and reviewer count at the thresholds) are written;
those reviewed as not a lesion are left out, and so are deleted ones (a consumer's DELETE removes the row and
its labels). The photos are the stored ones, already without metadata (dermaid.uploads.store.clean_image); each
exported upload's `exported` time is set (the first export's), so its deletion can say a copy exists here.
The layout comes from dermaid.data.isic's one writer (images + GroundTruth + Metadata CSVs), plus labels.json
with the provenance, written last and atomically, into a directory that is new or a previous labels export (never
anything else). labels.json keeps each image's agreement (consensus share, reviewers, votes) and, under
reviewer_agreement, the statistics over all reviewers (dermaid.uploads.agreement.reviewer_statistics: pairwise
Cohen's kappa, Krippendorff's alpha, ties).
"""

from __future__ import annotations

import collections
import datetime as _dt
import io
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf
from sqlalchemy.engine import make_url

from dermaid.classes import NOT_A_LESION
from dermaid.data.images import open_image
from dermaid.data.isic import IsicRow, write_isic2019
from dermaid.errors import DermaidError
from dermaid.files import absolute_url, atomic_dir, exists, join, write_text
from dermaid.uploads.labels import LabelStore, iso_time

EXPORT_MARKER = "labels.json"  # written last into an export; its presence marks a directory as ours
EXPORT_IMAGE_PREFIX = "DERMAID_"
EXPORT_JPEG_QUALITY = 95       # re-encoding only for formats the ISIC reader does not take (WebP, GIF, ...)


def export_dataset(labels: LabelStore, out: str, *, min_agreement: float, min_reviewers: int = 1) -> dict[str, Any]:
    """Uploads with a consensus diagnosis -> the ISIC 2019 training layout at `out` (atomic); returns a summary."""
    if not 0.0 <= float(min_agreement) <= 1.0:
        raise DermaidError(f"min_agreement: {min_agreement} is not between 0 and 1")
    if int(min_reviewers) < 1:
        raise DermaidError(f"min_reviewers: {min_reviewers} must be at least 1")
    out = str(out).rstrip("/")
    if exists(out) and not exists(join(out, EXPORT_MARKER)):
        raise DermaidError(f"out={out} exists and is not a labels export (no {EXPORT_MARKER}); "
                           "choose a new directory: nothing was written")
    selected = labels.labeled(float(min_agreement), int(min_reviewers))
    not_lesion = [item for item in selected if item["agreement"]["consensus"] == NOT_A_LESION]
    selected = [item for item in selected if item["agreement"]["consensus"] != NOT_A_LESION]
    if not selected:
        raise DermaidError(
            f"no labeled upload has a consensus diagnosis with agreement >= {min_agreement} from "
            f">= {min_reviewers} reviewer(s) ({len(not_lesion)} marked {NOT_A_LESION}); nothing written to {out}")
    rows = [_isic_row(item["upload"], item["agreement"]["consensus"]) for item in selected]
    images = [_provenance(row.image_id, item["upload"], item["agreement"]) for row, item in zip(rows, selected)]
    summary = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "layout": "isic2019",
        "source": {"storage_url": labels.uploads.storage_url,
                   "db_url": make_url(labels.uploads.db_url).render_as_string(hide_password=True)},
        "settings": {"min_agreement": float(min_agreement), "min_reviewers": int(min_reviewers)},
        "count": len(images),
        "counts": dict(sorted(collections.Counter(image["label"] for image in images).items())),
        "excluded_not_a_lesion": len(not_lesion),
        # over every reviewed upload, not only the exported ones (those were chosen for agreeing)
        "reviewer_agreement": labels.statistics(),
        "note": "Dermatologist review labels of consented uploads (photos, not histopathology).",
        "images": images,
    }
    with atomic_dir(out) as tmp:
        write_isic2019(tmp, rows, lambda i: _export_image(labels, selected[i]["upload"]))
        write_text(join(tmp, EXPORT_MARKER), json.dumps(summary, indent=2))  # last: marks a complete export
    # a consumer who deletes one of these uploads later is told that this export holds a copy (uploads.exported)
    labels.uploads.mark_exported([item["upload"]["id"] for item in selected])
    return {key: value for key, value in summary.items() if key != "images"} | {"out": out}


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid labels-export out=URL [min_agreement=0.6 min_reviewers=1]`: write the export, print a summary."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    if not plain["out"]:
        raise DermaidError("out= is required: the directory (any fsspec URL) to write the ISIC 2019 layout to")
    storage = plain["storage"]
    if not storage["url"]:
        raise DermaidError("storage.url= is required: the uploads store the server writes (local dir or fsspec URL)")
    labels = LabelStore.open(absolute_url(storage["url"]), storage["db_url"], must_exist=True)
    summary = export_dataset(labels, absolute_url(plain["out"]), min_agreement=plain["min_agreement"],
                             min_reviewers=plain["min_reviewers"])
    print(f"labels export: {summary['count']} image(s) -> {summary['out']}")
    print("  per class: " + ", ".join(f"{code} {n}" for code, n in summary["counts"].items()))
    overall = summary["reviewer_agreement"]["overall"]
    if overall["alpha"] is not None:
        print(f"  reviewer agreement: Krippendorff's alpha {overall['alpha']:.2f} over {overall['units']} upload(s) "
              f"with 2+ reviewers; {summary['reviewer_agreement']['ties']} tie(s)")
    if summary["excluded_not_a_lesion"]:
        print(f"  left out: {summary['excluded_not_a_lesion']} upload(s) reviewed as {NOT_A_LESION} (not a lesion)")
    print("next:")
    print(f"  dermaid prepare data.root={summary['out']} tag=labels")
    print(f"  dermaid train experiment=finetune train.init_from=CHECKPOINT data.extra={summary['out']}")
    return summary


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _isic_row(upload: dict[str, Any], code: str) -> IsicRow:
    """One upload and its consensus code as a row of the ISIC layout (lesion id: the image's content hash)."""
    return IsicRow(image_id=EXPORT_IMAGE_PREFIX + upload["id"].replace("-", ""), label=code,
                   age_approx=_age_approx(upload["age"]), site=upload["site"],
                   lesion_id=f"DERMAID_LESION_{upload['sha256'][:16]}", sex=upload["sex"])


def _provenance(image_id: str, upload: dict[str, Any], agreement: dict[str, Any]) -> dict[str, Any]:
    """What labels.json keeps about one exported image."""
    return {"image": image_id, "upload_id": upload["id"], "label": agreement["consensus"],
            "agreement": agreement["agreement"], "reviewers": agreement["reviewers"],
            "votes": agreement["votes"], "model_version": upload["model_version"],
            "predicted": upload["top_class"], "uploaded": iso_time(upload["created"])}


def _export_image(labels: LabelStore, upload: dict[str, Any]) -> tuple[bytes, str]:
    """The raw photo when the ISIC reader takes its format (JPEG, PNG); else re-encoded as JPEG."""
    try:
        data = labels.uploads.read_blob(upload["blobs"]["image"])
    except FileNotFoundError:
        raise DermaidError(f"upload {upload['id']}: its image blob {upload['blobs']['image']} is missing "
                           f"under {labels.uploads.storage_url}; nothing was written") from None
    fmt = upload.get("image_format")
    if fmt in ("JPEG", "MPO"):
        return data, "jpg"
    if fmt == "PNG":
        return data, "png"
    buf = io.BytesIO()
    open_image(data).save(buf, format="JPEG", quality=EXPORT_JPEG_QUALITY)
    return buf.getvalue(), "jpg"


def _age_approx(age: float | None) -> str | None:
    """ISIC 2019 gives ages rounded to 5 years (age_approx); missing stays empty."""
    if age is None:
        return None
    return str(int(5 * round(float(age) / 5)))
