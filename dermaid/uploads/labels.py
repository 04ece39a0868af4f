"""Dermatologist review of consented uploads: labels, the review queue, Label Studio interop, the dataset export.

    dermaid labels-export out=data/labels min_agreement=0.6     # reviewed uploads -> ISIC 2019 layout
    dermaid prepare data.root=data/labels tag=labels-v1          # ... a dataset version of its own
    dermaid train experiment=finetune train.init_from=runs/toy/best data.extra=data/labels   # + the original data

    labels = LabelStore.open("uploads")                          # SQLite beside the blobs; or (url, postgres URL)
    labels.queue(top_class="MEL", reviewer="dr_a")               # consented, unlabeled uploads, most uncertain first
    labels.add(upload_id, reviewer="dr_a", code="MEL", comment="asymmetric, two colours")
    labels.history(upload_id); labels.agreement(upload_id)
    tasks = labels.labelstudio_tasks(image_url=lambda upload: f"https://host/v1/review/uploads/{upload['id']}/image")
    labels.import_labelstudio(json.load(open("project-1-export.json")))

Rules:
- Labels are only inserted, never updated or deleted: every label keeps its reviewer and time. A reviewer who
  changes their mind adds a newer label; the newest label per reviewer is that reviewer's vote.
- Agreement per upload: the share of reviewers whose vote is the most common code (1.0 = unanimous); the
  consensus is that code, or None on a tie.
- The queue orders by the entropy of the calibrated probabilities (highest first: active learning).
- Upload ids must match the uuid4 pattern before anything touches the database or the blob store.

The export writes the ISIC 2019 training layout (images + GroundTruth + Metadata CSVs + labels.json with
the provenance), atomically, into a directory that is new or a previous labels export (never anything else).
Labels are decision-support research data: a dermatologist's review of a photo is not a histopathology result.
"""

from __future__ import annotations

import collections
import csv
import datetime as _dt
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from sqlalchemy import distinct, exists, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from dermaid.classes import BY_CODE, CLASS_CODES, NOT_A_LESION, REVIEW_CODES, UNKNOWN_CODE
from dermaid.errors import DermaidError
from dermaid.files import absolute_url, atomic_dir, exists as url_exists, join, write_bytes, write_text
from dermaid.uploads.db import Label, Upload
from dermaid.uploads.store import UploadStore

UPLOAD_ID_PATTERN = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?4[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}$")
MAX_COMMENT_CHARS = 2000       # a paragraph; longer text belongs in the clinical record, not a label
MAX_REVIEWER_CHARS = 64        # the labels.reviewer column
MAX_PAGE = 200                 # queue page size cap (one page is what a reviewer works through)
EXPORT_MARKER = "labels.json"  # written last into an export; its presence marks a directory as ours
EXPORT_IMAGE_PREFIX = "DERMAID_"
EXPORT_JPEG_QUALITY = 95       # re-encoding only for formats the ISIC reader does not take (WebP, GIF, ...)
LABEL_SOURCES = ("web", "api", "labelstudio")

# Label Studio: the names in the labeling config (LABELSTUDIO_CONFIG) that tasks and exports refer to.
LS_IMAGE = "image"
LS_CHOICES = "diagnosis"
LS_COMMENT = "comment"

ISIC_INPUT_DIR = "ISIC_2019_Training_Input"
ISIC_GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
ISIC_METADATA = "ISIC_2019_Training_Metadata.csv"


class InvalidUploadId(DermaidError):
    """An id that is not a uuid4: refused before any storage is touched."""


class UnknownUpload(DermaidError):
    """A well-formed id with no stored (consented) upload."""


# ---------------------------------------------------------------------------------------------------------
# Pure helpers


def parse_upload_id(value: Any) -> str:
    """A client-supplied upload id -> the canonical uuid4 string (lowercase, dashed); InvalidUploadId otherwise."""
    text = value if isinstance(value, str) else ""
    if len(text) > 36 or not UPLOAD_ID_PATTERN.match(text):
        shown = repr(value)[:60]
        raise InvalidUploadId(f"upload id {shown} is not an upload id (a uuid4: 32 lowercase hex digits, "
                              "optionally with dashes)")
    digits = text.replace("-", "")
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def check_code(code: Any) -> str:
    if not isinstance(code, str) or code not in REVIEW_CODES:
        raise DermaidError(f"code: {str(code)[:40]!r} is not a review code; allowed: {', '.join(REVIEW_CODES)} "
                           f"({NOT_A_LESION} = not a lesion / unusable)")
    return code


def check_comment(comment: Any) -> str | None:
    if comment is None:
        return None
    if not isinstance(comment, str):
        raise DermaidError("comment: must be text")
    comment = comment.strip()
    if len(comment) > MAX_COMMENT_CHARS:
        raise DermaidError(f"comment: {len(comment)} characters; at most {MAX_COMMENT_CHARS} are kept with a label")
    return comment or None


def compute_agreement(labels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Labels of one upload (any order) -> votes (newest label per reviewer), consensus and agreement."""
    latest: dict[str, dict[str, Any]] = {}
    for label in sorted(labels, key=lambda row: (_when(row["created"]), row.get("id") or 0)):
        latest[label["reviewer"]] = label
    votes = collections.Counter(label["code"] for label in latest.values())
    reviewers = len(latest)
    if not reviewers:
        return {"labels": len(labels), "reviewers": 0, "votes": {}, "consensus": None, "agreement": None}
    top = max(votes.values())
    winners = sorted(code for code, n in votes.items() if n == top)
    return {
        "labels": len(labels),
        "reviewers": reviewers,
        "votes": dict(sorted(votes.items(), key=lambda item: (-item[1], item[0]))),
        "consensus": winners[0] if len(winners) == 1 else None,   # None: a tie between codes
        "agreement": top / reviewers,
    }


def public_upload(row: dict[str, Any]) -> dict[str, Any]:
    """An upload row as reviewers see it: metadata and prediction; no blob keys or hashes."""
    probabilities = row["probabilities"]
    return {
        "id": row["id"],
        "created": _iso(row["created"]),
        "model_version": row["model_version"],
        "metadata": {"age": row["age"], "sex": row["sex"], "site": row["site"]},
        "prediction": {
            "probabilities": sorted(
                ({"code": code, "name": BY_CODE[code].name, "probability": float(probabilities.get(code, 0.0))}
                 for code in CLASS_CODES), key=lambda item: item["probability"], reverse=True),
            "top_class": row["top_class"],
            "malignancy_score": row["malignancy_score"],
            "entropy": row["entropy"],
        },
        "width": row.get("width"),
        "height": row.get("height"),
        "image_format": row.get("image_format"),
    }


LABELSTUDIO_CONFIG = "\n".join([
    "<View>",
    f'  <Image name="{LS_IMAGE}" value="${LS_IMAGE}" zoom="true"/>',
    '  <Header value="$summary"/>',
    f'  <Choices name="{LS_CHOICES}" toName="{LS_IMAGE}" choice="single" showInLine="false" required="true">',
    *[f'    <Choice value="{code}" hint="{BY_CODE[code].name}"/>' for code in CLASS_CODES],
    f'    <Choice value="{NOT_A_LESION}" hint="Not a lesion / unusable photo"/>',
    "  </Choices>",
    f'  <TextArea name="{LS_COMMENT}" toName="{LS_IMAGE}" maxSubmissions="1" rows="3"/>',
    "</View>",
])


def labelstudio_task(upload: dict[str, Any], image_url: str) -> dict[str, Any]:
    """One upload row -> a Label Studio task with the model's top class as a pre-annotation."""
    probabilities = upload["probabilities"]
    top = upload["top_class"]
    meta = ", ".join(str(v) for v in (upload["age"] and f"age {upload['age']:g}", upload["sex"], upload["site"]) if v)
    return {
        "data": {
            LS_IMAGE: image_url,
            "upload_id": upload["id"],
            "age": upload["age"],
            "sex": upload["sex"],
            "site": upload["site"],
            "model_version": upload["model_version"],
            "top_class": top,
            "entropy": upload["entropy"],
            "summary": f"{meta or 'no metadata'}; model: {top} {float(probabilities[top]):.2f} (decision support only)",
        },
        "predictions": [{
            "model_version": upload["model_version"],
            "score": float(probabilities[top]),
            "result": [{
                "id": f"dermaid-{upload['id'][:8]}",
                "from_name": LS_CHOICES,
                "to_name": LS_IMAGE,
                "type": "choices",
                "value": {"choices": [top]},
            }],
        }],
    }


def parse_labelstudio_export(export: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A Label Studio JSON export -> label rows (not yet stored) and counts of what was skipped.

    Raises DermaidError naming the task (its position and Label Studio id) on anything malformed.
    """
    if isinstance(export, (bytes, str)):
        try:
            export = json.loads(export)
        except ValueError as exc:
            raise DermaidError(f"Label Studio export: not JSON ({exc})") from None
    if isinstance(export, dict):
        export = [export]
    if not isinstance(export, list):
        raise DermaidError("Label Studio export: expected a JSON list of tasks (Export -> JSON in Label Studio)")
    rows: list[dict[str, Any]] = []
    skipped = {"tasks": len(export), "cancelled": 0, "without_diagnosis": 0}
    for t, task in enumerate(export):
        task_id = task.get("id") if isinstance(task, dict) else None
        where = f"task {t}" + (f" (id {task_id})" if task_id is not None else "")
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise DermaidError(f"Label Studio export: {where} has no 'data' object")
        try:
            upload_id = parse_upload_id(task["data"].get("upload_id"))
        except InvalidUploadId as exc:
            raise DermaidError(f"Label Studio export: {where}: data.{exc}") from None
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list):
            raise DermaidError(f"Label Studio export: {where}: 'annotations' is not a list")
        for a, annotation in enumerate(annotations):
            at = f"{where}, annotation {a}"
            if not isinstance(annotation, dict):
                raise DermaidError(f"Label Studio export: {at} is not an object")
            if annotation.get("was_cancelled"):
                skipped["cancelled"] += 1
                continue
            results = annotation.get("result") or []
            choices = [r for r in results if isinstance(r, dict) and r.get("type") == "choices"
                       and r.get("from_name", LS_CHOICES) == LS_CHOICES]
            if not choices:
                skipped["without_diagnosis"] += 1
                continue
            values = (choices[0].get("value") or {}).get("choices") or []
            if len(choices) > 1 or len(values) != 1:
                raise DermaidError(f"Label Studio export: {at}: expected exactly one '{LS_CHOICES}' choice, "
                                   f"got {values}")
            try:
                code = check_code(values[0])
                texts = [t for r in results if isinstance(r, dict) and r.get("type") == "textarea"
                         for t in ((r.get("value") or {}).get("text") or [])]
                comment = check_comment("\n".join(str(t) for t in texts) if texts else None)
            except DermaidError as exc:
                raise DermaidError(f"Label Studio export: {at}: {exc}") from None
            reviewer = _labelstudio_reviewer(annotation.get("completed_by"))
            created = _parse_time(annotation.get("created_at"), at)
            if annotation.get("id") is not None and task.get("id") is not None:
                external = f"labelstudio:{task['id']}:{annotation['id']}"
            else:
                digest = hashlib.sha256(json.dumps([upload_id, reviewer, code, comment, str(created)]).encode())
                external = f"labelstudio:sha256:{digest.hexdigest()[:32]}"
            rows.append({"upload_id": upload_id, "reviewer": reviewer, "code": code, "comment": comment,
                         "created": created, "external_id": external[:160]})
    return rows, skipped


# ---------------------------------------------------------------------------------------------------------
# The store


class LabelStore:
    """Labels on the uploads of one UploadStore (same database; the blobs stay where the uploads store put them)."""

    def __init__(self, uploads: UploadStore) -> None:
        self.uploads = uploads
        self.engine = uploads.engine
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def open(cls, storage_url: str, db_url: str | None = None, must_exist: bool = False) -> "LabelStore":
        """The labels of the uploads at storage_url (db_url None: the SQLite file inside a local storage_url).

        must_exist: refuse a SQLite database that does not exist yet (an export from a wrong path would
        otherwise create an empty one and find nothing).
        """
        if must_exist:
            _require_database(storage_url, db_url)
        return cls(UploadStore(storage_url, db_url))

    # -- labels ---------------------------------------------------------------------------------------

    def add(self, upload_id: str, reviewer: str, code: str, comment: str | None = None, *,
            source: str = "web") -> dict[str, Any]:
        """Insert one label (nothing is overwritten); returns it. UnknownUpload for an id with no upload."""
        upload_id = parse_upload_id(upload_id)
        code = check_code(code)
        comment = check_comment(comment)
        reviewer = _check_reviewer(reviewer)
        if source not in LABEL_SOURCES:
            raise DermaidError(f"source: {source!r} is not one of {LABEL_SOURCES}")
        with self._session.begin() as session:
            upload = session.get(Upload, upload_id)
            if upload is None or not upload.consent:
                raise UnknownUpload(f"upload {upload_id}: no such upload")
            label = Label(upload_id=upload_id, reviewer=reviewer, code=code, comment=comment,
                          created=_dt.datetime.now(_dt.timezone.utc), source=source,
                          model_version=upload.model_version)
            session.add(label)
            session.flush()
            return label.to_dict()

    def history(self, upload_id: str) -> list[dict[str, Any]]:
        """Every label of an upload, oldest first."""
        upload_id = parse_upload_id(upload_id)
        with self._session() as session:
            if session.get(Upload, upload_id) is None:
                raise UnknownUpload(f"upload {upload_id}: no such upload")
            rows = session.scalars(select(Label).where(Label.upload_id == upload_id)
                                   .order_by(Label.created, Label.id)).all()
            return [row.to_dict() for row in rows]

    def agreement(self, upload_id: str) -> dict[str, Any]:
        return compute_agreement(self.history(upload_id))

    def item(self, upload_id: str) -> dict[str, Any]:
        """One upload for a reviewer: metadata, prediction, label history and agreement."""
        upload = self._upload(upload_id)
        labels = self.history(upload["id"])
        return {"upload": public_upload(upload), "labels": labels, "agreement": compute_agreement(labels)}

    def read_image(self, upload_id: str, kind: str = "image") -> tuple[bytes, str]:
        """(bytes, media type) of an upload's photo ("image") or of what the model saw ("input", PNG)."""
        if kind not in ("image", "input"):
            raise DermaidError(f"kind: {kind!r} is not one of image, input")
        upload = self._upload(upload_id)
        key = upload["blobs"][kind]  # from the database row, never from the request
        data = self.uploads.read_blob(key)
        media = "image/png" if kind == "input" else _MEDIA_TYPES.get(upload.get("image_format") or "",
                                                                      "application/octet-stream")
        return data, media

    # -- the queue ------------------------------------------------------------------------------------

    def queue(self, *, top_class: str | None = None, reviewer: str | None = None, labels_below: int = 1,
              limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """Consented uploads with fewer than `labels_below` reviewers' labels, highest entropy first.

        top_class filters by the model's predicted class; `reviewer` leaves out uploads that reviewer
        already labeled (with labels_below=2 a second opinion is asked only of someone else).
        """
        if top_class is not None and top_class not in CLASS_CODES:
            raise DermaidError(f"top_class: {top_class!r} is not a class code; allowed: {', '.join(CLASS_CODES)}")
        if not 1 <= int(labels_below) <= 100:
            raise DermaidError("labels_below: must be between 1 and 100")
        limit, offset = max(1, min(int(limit), MAX_PAGE)), max(0, int(offset))
        counts = (select(Label.upload_id, func.count(distinct(Label.reviewer)).label("reviewers"))
                  .group_by(Label.upload_id).subquery())
        reviewers = func.coalesce(counts.c.reviewers, 0)
        conditions = [Upload.consent.is_(True), reviewers < int(labels_below)]
        if top_class is not None:
            conditions.append(Upload.top_class == top_class)
        if reviewer is not None:
            conditions.append(~exists().where(Label.upload_id == Upload.id, Label.reviewer == reviewer))
        base = select(Upload, reviewers).outerjoin(counts, counts.c.upload_id == Upload.id).where(*conditions)
        with self._session() as session:
            total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
            rows = session.execute(base.order_by(Upload.entropy.desc(), Upload.created, Upload.id)
                                   .limit(limit).offset(offset)).all()
            items = [{**public_upload(row.to_dict()), "reviewers": int(n)} for row, n in rows]
        return {"items": items, "total": int(total), "limit": limit, "offset": offset}

    def labeled(self, min_agreement: float = 0.0, min_reviewers: int = 1) -> list[dict[str, Any]]:
        """Labeled uploads whose agreement and reviewer count reach the thresholds, oldest first:
        [{"upload": row dict, "agreement": compute_agreement(...)}]."""
        with self._session() as session:
            labels = session.scalars(select(Label).order_by(Label.upload_id, Label.created, Label.id)).all()
            by_upload: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
            for label in labels:
                by_upload[label.upload_id].append(label.to_dict())
            uploads = session.scalars(select(Upload).where(Upload.id.in_(list(by_upload)))
                                      .order_by(Upload.created, Upload.id)).all() if by_upload else []
            out = []
            for upload in uploads:
                agreement = compute_agreement(by_upload[upload.id])
                if (agreement["consensus"] is not None and agreement["reviewers"] >= min_reviewers
                        and agreement["agreement"] >= min_agreement):
                    out.append({"upload": upload.to_dict(), "agreement": agreement})
            return out

    # -- Label Studio ---------------------------------------------------------------------------------

    def labelstudio_tasks(self, image_url: Callable[[dict[str, Any]], str], *, top_class: str | None = None,
                          limit: int = MAX_PAGE, offset: int = 0) -> list[dict[str, Any]]:
        """Pending (unlabeled) uploads as Label Studio tasks, most uncertain first, with pre-annotations."""
        ids = [item["id"] for item in self.queue(top_class=top_class, limit=limit, offset=offset)["items"]]
        with self._session() as session:
            rows = {row.id: row.to_dict() for row in session.scalars(select(Upload).where(Upload.id.in_(ids)))}
        return [labelstudio_task(rows[i], image_url(rows[i])) for i in ids]

    def import_labelstudio(self, export: Any) -> dict[str, Any]:
        """Store the annotations of a Label Studio JSON export as labels (source "labelstudio").

        All or nothing: a malformed export or an unknown upload raises before anything is written.
        Annotations imported before (same Label Studio task and annotation id) are skipped, so
        importing the same export twice adds nothing.
        """
        rows, skipped = parse_labelstudio_export(export)
        wanted = sorted({row["upload_id"] for row in rows})
        try:
            with self._session.begin() as session:
                found = set(session.scalars(select(Upload.id).where(Upload.id.in_(wanted)))) if wanted else set()
                missing = [i for i in wanted if i not in found]
                if missing:
                    raise UnknownUpload(f"Label Studio export: {len(missing)} task(s) name uploads that do not exist: "
                                        f"{', '.join(missing[:5])}; nothing was imported")
                externals = [row["external_id"] for row in rows]
                known = set(session.scalars(select(Label.external_id).where(Label.external_id.in_(externals)))) \
                    if externals else set()
                versions = dict(session.execute(select(Upload.id, Upload.model_version)
                                                .where(Upload.id.in_(wanted))).all()) if wanted else {}
                new = [row for row in rows if row["external_id"] not in known]
                seen: set[str] = set()
                for row in new:
                    if row["external_id"] in seen:
                        continue
                    seen.add(row["external_id"])
                    session.add(Label(**row, source="labelstudio", model_version=versions.get(row["upload_id"])))
        except IntegrityError:
            raise DermaidError("Label Studio export: another import of the same annotations ran at the same "
                               "time; nothing was imported by this one, try again") from None
        return {"tasks": skipped["tasks"], "imported": len(seen),
                "already_imported": len(rows) - len(seen), "skipped_cancelled": skipped["cancelled"],
                "skipped_without_diagnosis": skipped["without_diagnosis"]}

    # -- the dataset export ---------------------------------------------------------------------------

    def export_dataset(self, out: str, *, min_agreement: float, min_reviewers: int = 1) -> dict[str, Any]:
        """Uploads with a consensus diagnosis -> the ISIC 2019 training layout at `out` (atomic)."""
        if not 0.0 <= float(min_agreement) <= 1.0:
            raise DermaidError(f"min_agreement: {min_agreement} is not between 0 and 1")
        if int(min_reviewers) < 1:
            raise DermaidError(f"min_reviewers: {min_reviewers} must be at least 1")
        out = str(out).rstrip("/")
        if url_exists(out) and not url_exists(join(out, EXPORT_MARKER)):
            raise DermaidError(f"out={out} exists and is not a labels export (no {EXPORT_MARKER}); "
                               "choose a new directory: nothing was written")
        selected = self.labeled(float(min_agreement), int(min_reviewers))
        not_lesion = [item for item in selected if item["agreement"]["consensus"] == NOT_A_LESION]
        selected = [item for item in selected if item["agreement"]["consensus"] != NOT_A_LESION]
        if not selected:
            raise DermaidError(
                f"no labeled upload has a consensus diagnosis with agreement >= {min_agreement} from "
                f">= {min_reviewers} reviewer(s) ({len(not_lesion)} marked {NOT_A_LESION}); nothing written to {out}")
        images, gt_rows, meta_rows = [], [], []
        with atomic_dir(out) as tmp:
            for item in selected:
                upload, agreement = item["upload"], item["agreement"]
                image_id = EXPORT_IMAGE_PREFIX + upload["id"].replace("-", "")
                data, ext = self._export_image(upload)
                write_bytes(join(tmp, ISIC_INPUT_DIR, f"{image_id}.{ext}"), data)
                code = agreement["consensus"]
                gt_rows.append([image_id, *("1.0" if c == code else "0.0" for c in (*CLASS_CODES, UNKNOWN_CODE))])
                meta_rows.append([image_id, _age_approx(upload["age"]), upload["site"] or "",
                                  f"DERMAID_LESION_{upload['sha256'][:16]}", upload["sex"] or ""])
                images.append({"image": image_id, "upload_id": upload["id"], "label": code,
                               "agreement": agreement["agreement"], "reviewers": agreement["reviewers"],
                               "votes": agreement["votes"], "model_version": upload["model_version"],
                               "predicted": upload["top_class"], "uploaded": _iso(upload["created"])})
            write_text(join(tmp, ISIC_GROUND_TRUTH), _csv(["image", *CLASS_CODES, UNKNOWN_CODE], gt_rows))
            write_text(join(tmp, ISIC_METADATA),
                       _csv(["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], meta_rows))
            counts = dict(sorted(collections.Counter(image["label"] for image in images).items()))
            summary = {
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "layout": "isic2019",
                "source": {"storage_url": self.uploads.storage_url,
                           "db_url": make_url(self.uploads.db_url).render_as_string(hide_password=True)},
                "settings": {"min_agreement": float(min_agreement), "min_reviewers": int(min_reviewers)},
                "count": len(images),
                "counts": counts,
                "excluded_not_a_lesion": len(not_lesion),
                "note": "Dermatologist review labels of consented uploads (photos, not histopathology).",
                "images": images,
            }
            write_text(join(tmp, EXPORT_MARKER), json.dumps(summary, indent=2))  # last: marks a complete export
        return {key: value for key, value in summary.items() if key != "images"} | {"out": out}

    # -- helpers --------------------------------------------------------------------------------------

    def _upload(self, upload_id: str) -> dict[str, Any]:
        upload = self.uploads.get(parse_upload_id(upload_id))
        if upload is None or not upload["consent"]:
            raise UnknownUpload(f"upload {parse_upload_id(upload_id)}: no such upload")
        return upload

    def _export_image(self, upload: dict[str, Any]) -> tuple[bytes, str]:
        """The raw photo when the ISIC reader takes its format (JPEG, PNG); else re-encoded as JPEG."""
        try:
            data = self.uploads.read_blob(upload["blobs"]["image"])
        except FileNotFoundError:
            raise DermaidError(f"upload {upload['id']}: its image blob {upload['blobs']['image']} is missing "
                               f"under {self.uploads.storage_url}; nothing was written") from None
        fmt = upload.get("image_format")
        if fmt in ("JPEG", "MPO"):
            return data, "jpg"
        if fmt == "PNG":
            return data, "png"
        from dermaid.data.images import open_image

        buf = io.BytesIO()
        open_image(data).save(buf, format="JPEG", quality=EXPORT_JPEG_QUALITY)
        return buf.getvalue(), "jpg"


# ---------------------------------------------------------------------------------------------------------
# `dermaid labels-export`


def run_export(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid labels-export out=URL [min_agreement=0.6 min_reviewers=1]`: write the export, print a summary."""
    if OmegaConf.is_missing(cfg, "out") or not cfg.get("out"):
        raise DermaidError("out= is required: the directory (any fsspec URL) to write the ISIC 2019 layout to")
    plain = OmegaConf.to_container(cfg, resolve=True)
    storage = plain.get("storage") or {}
    store = LabelStore.open(absolute_url(storage.get("url") or "uploads"), storage.get("db_url"), must_exist=True)
    summary = store.export_dataset(absolute_url(plain["out"]), min_agreement=plain["min_agreement"],
                                   min_reviewers=plain["min_reviewers"])
    print(f"labels export: {summary['count']} image(s) -> {summary['out']}")
    print("  per class: " + ", ".join(f"{code} {n}" for code, n in summary["counts"].items()))
    if summary["excluded_not_a_lesion"]:
        print(f"  left out: {summary['excluded_not_a_lesion']} upload(s) reviewed as {NOT_A_LESION} (not a lesion)")
    print("next:")
    print(f"  dermaid prepare data.root={summary['out']} tag=labels")
    print(f"  dermaid train experiment=finetune train.init_from=CHECKPOINT data.extra={summary['out']}")
    return summary


def _require_database(storage_url: str, db_url: str | None) -> None:
    from dermaid.uploads.store import default_db_url

    url = make_url(db_url or default_db_url(storage_url))
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not url_exists(url.database):
            raise DermaidError(f"storage: no uploads database at {url.database} (storage.url={storage_url}); "
                               "point storage.url / storage.db_url at the server's uploads store")


# ---------------------------------------------------------------------------------------------------------
# Private helpers

_MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff"}


def _check_reviewer(reviewer: Any) -> str:
    if not isinstance(reviewer, str) or not reviewer.strip() or len(reviewer) > MAX_REVIEWER_CHARS:
        raise DermaidError(f"reviewer: must be 1-{MAX_REVIEWER_CHARS} characters")
    return reviewer.strip()


def _labelstudio_reviewer(completed_by: Any) -> str:
    """Label Studio's completed_by (a user id, or {"id", "email"} in some exports) -> a reviewer name."""
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("email") or completed_by.get("id")
    if completed_by is None or str(completed_by).strip() == "":
        return "labelstudio"
    text = str(completed_by).strip()
    name = text if "@" in text else f"labelstudio-user-{text}"
    return name[:MAX_REVIEWER_CHARS]


def _parse_time(value: Any, where: str) -> _dt.datetime:
    if value in (None, ""):
        return _dt.datetime.now(_dt.timezone.utc)
    try:
        parsed = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise DermaidError(f"Label Studio export: {where}: created_at {str(value)[:40]!r} is not an ISO time") from None
    # Stored in UTC: SQLite keeps the wall time only, so another offset would shift the history.
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)).astimezone(_dt.timezone.utc)


def _when(value: Any) -> _dt.datetime:
    """A label's created time (datetime or ISO text) as an aware UTC datetime, for ordering."""
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return (value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)).isoformat()


def _age_approx(age: float | None) -> str:
    """ISIC 2019 gives ages rounded to 5 years (age_approx); missing stays empty."""
    if age is None:
        return ""
    return str(int(5 * round(float(age) / 5)))


def _csv(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    writer.writerows([list(row) for row in rows])
    return buf.getvalue()


__all__ = [
    "LABELSTUDIO_CONFIG", "InvalidUploadId", "LabelStore", "UnknownUpload", "compute_agreement", "labelstudio_task",
    "parse_labelstudio_export", "parse_upload_id", "public_upload", "run_export",
]
