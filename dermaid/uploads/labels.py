"""Dermatologist review of consented uploads: LabelStore (labels, the review queue, Label Studio import).

    labels = LabelStore.open("uploads")                          # SQLite beside the blobs; or (url, postgres URL)
    labels.queue(top_class="MEL", reviewer="dr_a")               # consented, unlabeled uploads, most uncertain first
    labels.add(upload_id, reviewer="dr_a", code="MEL", comment="asymmetric, two colours",
               confidence="medium", advice="biopsy")
    labels.history(upload_id); labels.agreement(upload_id); labels.statistics()   # kappa / alpha over reviewers
    blind = LabelStore(uploads, blinded=True)                    # the review server's: see "Blinded review"
    tasks = labels.labelstudio_tasks(image_url=lambda upload: f"https://host/v1/review/uploads/{upload['id']}/image")
    labels.import_labelstudio(json.load(open("project-1-export.json")), reviewer="dr_a")  # all as dr_a's

Rules:
- Labels are only inserted, never updated or deleted: every label keeps its reviewer and time. A reviewer who
  changes their mind adds a newer label; the newest label per reviewer is that reviewer's vote
  (dermaid.uploads.agreement).
- The queue: consented uploads with fewer than `labels_below` reviewers, or whose reviewers tie (>= 2 votes and no
  single most common code: a tie always asks one more reviewer, whatever labels_below says); the ones the model
  refused (abstain) first, then ties, then the entropy of the calibrated probabilities (highest first: active
  learning). A reviewer never gets an upload they voted on already.
- Blinded review (`blinded=True`, the server's default: `review.blinded`): until a reviewer has labelled an upload,
  `item`, `labels_view` and `queue` show them the photo's metadata and whether the model refused the photo
  ("model_refused": a photo it could not assess, never a class), and neither its prediction nor other reviewers'
  labels; filtering by the model's class is refused; Label Studio tasks carry no pre-annotation. A label saved
  then is stored with blinded=True; after it the upload is revealed to that reviewer (and their later labels of
  it are blinded=False). Blinding shapes the workflow: it is not a secret (anyone may classify a photo).
- Upload ids must match the uuid4 pattern before anything touches the database or the blob store
  (dermaid.uploads.validation).

Label Studio's config, tasks and export parsing live in dermaid.uploads.labelstudio; the reviewed uploads
become a dataset through dermaid.uploads.export (`dermaid labels-export`).
Labels are decision-support research data: a dermatologist's review of a photo is not a histopathology result.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
from collections.abc import Callable
from typing import Any

from sqlalchemy import case, distinct, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from dermaid.classes import BY_CODE, CLASS_CODES
from dermaid.errors import DermaidError
from dermaid.uploads.agreement import ADVICE, CONFIDENCE_LEVELS, compute_agreement, is_tie, reviewer_statistics
from dermaid.uploads.db import Label, Upload
from dermaid.uploads.labelstudio import EXTERNAL_ID_CHARS, labelstudio_task, parse_labelstudio_export
from dermaid.uploads.store import UploadStore, require_database
from dermaid.uploads.validation import (
    UnknownUpload, check_code, check_comment, check_reviewer, check_source, parse_upload_id,
)

MAX_PAGE = 200                 # queue page size cap (one page is what a reviewer works through)
MAX_OFFSET = 1_000_000_000     # far past any queue; keeps OFFSET inside every database's integer (else a 500)

_MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff"}


def public_upload(row: dict[str, Any]) -> dict[str, Any]:
    """An upload row as reviewers see it: metadata and prediction; no blob keys or hashes."""
    probabilities = row["probabilities"]
    return {
        "id": row["id"],
        "created": iso_time(row["created"]),
        "model_version": row["model_version"],
        "metadata": {"age": row["age"], "sex": row["sex"], "site": row["site"]},
        "prediction": {
            "probabilities": sorted(
                ({"code": code, "name": BY_CODE[code].name, "probability": float(probabilities.get(code, 0.0))}
                 for code in CLASS_CODES), key=lambda item: item["probability"], reverse=True),
            "top_class": row["top_class"],
            "malignancy_score": row["malignancy_score"],
            "entropy": row["entropy"],
            "ood_score": row.get("ood_score"),
            "abstain": row.get("abstain"),   # True: the model refused the photo (shown first in the queue)
        },
        "model_refused": row.get("abstain"),  # = prediction.abstain; the one thing a blinded view keeps
        "width": row.get("width"),
        "height": row.get("height"),
        "image_format": row.get("image_format"),
    }


def blinded_upload(row: dict[str, Any]) -> dict[str, Any]:
    """An upload as a reviewer sees it before choosing (blinded review): public_upload without the prediction.

    model_refused stays: "a photo the model could not assess" names no class (it is why the photo comes first
    in the queue, and the reviewer's label is then the only answer there is)."""
    return {**public_upload(row), "prediction": None}


def iso_time(value: Any) -> str | None:
    """A stored time (datetime or ISO text) as ISO text; a naive datetime is UTC (SQLite keeps wall times)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return (value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)).isoformat()


class LabelStore:
    """Labels on the uploads of one UploadStore (same database; the blobs stay where the uploads store put them)."""

    def __init__(self, uploads: UploadStore, *, blinded: bool = False) -> None:
        self.uploads = uploads
        self.blinded = blinded   # True: blinded review (the module doc); the review server passes review.blinded
        self.engine = uploads.engine
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def open(cls, storage_url: str, db_url: str | None = None, must_exist: bool = False) -> "LabelStore":
        """The labels of the uploads at storage_url (db_url None: the SQLite file inside a local storage_url).

        must_exist: refuse a SQLite database that does not exist yet (an export from a wrong path would
        otherwise create an empty one and find nothing).
        """
        if must_exist:
            require_database(storage_url, db_url)
        return cls(UploadStore(storage_url, db_url))

    # -- labels ---------------------------------------------------------------------------------------

    def add(self, upload_id: str, reviewer: str, code: str, comment: str | None = None, *,
            source: str = "web", confidence: str | None = None, advice: str | None = None) -> dict[str, Any]:
        """Insert one label (nothing is overwritten); returns it. UnknownUpload for an id with no upload.

        confidence: low | medium | high; advice: none | visit | biopsy (None: not given). The label is stored
        blinded=True when this store is blinded and the reviewer had not labelled the upload before (so had
        not been shown the model's answer)."""
        upload_id = parse_upload_id(upload_id)
        code = check_code(code)
        comment = check_comment(comment)
        reviewer = check_reviewer(reviewer)
        source = check_source(source)
        confidence = _check_choice("confidence", confidence, CONFIDENCE_LEVELS)
        advice = _check_choice("advice", advice, ADVICE)
        with self._session.begin() as session:
            upload = session.get(Upload, upload_id)
            if upload is None or not upload.consent:
                raise UnknownUpload(f"upload {upload_id}: no such upload")
            seen = session.scalar(select(exists().where(Label.upload_id == upload_id, Label.reviewer == reviewer)))
            label = Label(upload_id=upload_id, reviewer=reviewer, code=code, comment=comment,
                          created=_dt.datetime.now(_dt.timezone.utc), source=source,
                          model_version=upload.model_version, confidence=confidence, advice=advice,
                          blinded=self.blinded and not seen)
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

    def item(self, upload_id: str, reviewer: str | None = None) -> dict[str, Any]:
        """One upload for `reviewer`: metadata, prediction, label history and agreement; before their own
        label on a blinded store only the metadata (prediction, labels and agreement None, revealed False)."""
        upload = self._upload(upload_id)
        view = self.labels_view(upload["id"], reviewer)
        shown = public_upload(upload) if view["revealed"] else blinded_upload(upload)
        return {"upload": shown, **{key: value for key, value in view.items() if key != "upload_id"}}

    def labels_view(self, upload_id: str, reviewer: str | None = None) -> dict[str, Any]:
        """An upload's labels as `reviewer` may see them: {upload_id, labels, agreement, reviewers,
        needs_tiebreak, blinded, revealed}; labels and agreement are None until they labelled it (blinded store)."""
        labels = self.history(upload_id)
        agreement = compute_agreement(labels)
        revealed = not self.blinded or any(label["reviewer"] == reviewer for label in labels)
        return {"upload_id": parse_upload_id(upload_id), "labels": labels if revealed else None,
                "agreement": agreement if revealed else None, "reviewers": agreement["reviewers"],
                "needs_tiebreak": is_tie(agreement), "blinded": self.blinded, "revealed": revealed}

    def labeled_by(self, reviewer: str) -> set[str]:
        """Ids of the uploads `reviewer` has labelled (revealed to them under blinded review)."""
        with self._session() as session:
            return set(session.scalars(select(Label.upload_id).where(Label.reviewer == reviewer).distinct()))

    def statistics(self) -> dict[str, Any]:
        """Reviewers' counts and agreement beyond chance over every label (dermaid.uploads.agreement
        reviewer_statistics: pairwise Cohen's kappa, Krippendorff's alpha, ties)."""
        columns = (Label.id, Label.upload_id, Label.reviewer, Label.code, Label.created, Label.confidence,
                   Label.advice, Label.blinded)   # plain rows: ORM objects cost ~3x the time at 30k labels
        with self._session() as session:
            rows = session.execute(select(*columns).order_by(Label.created, Label.id)).mappings()
            labels = [dict(row) for row in rows]
        return reviewer_statistics(labels)

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
        """Consented uploads with fewer than `labels_below` reviewers' labels, or whose reviewers tie: the ones
        the model refused (abstain) first, then ties, then highest entropy first: what a dermatologist should see.
        Items carry "reviewers" and "needs_tiebreak"; on a blinded store no prediction (blinded_upload).

        top_class filters by the model's predicted class (refused on a blinded store: it would show the class);
        `reviewer` leaves out uploads that reviewer already labeled (with labels_below=2 a second opinion is
        asked only of someone else).
        """
        if top_class is not None and self.blinded:
            raise DermaidError("top_class: the review is blinded (review.blinded=true): filtering by the model's "
                               "class would show it before you choose; leave top_class out")
        if top_class is not None and top_class not in CLASS_CODES:
            raise DermaidError(f"top_class: {top_class!r} is not a class code; allowed: {', '.join(CLASS_CODES)}")
        if not 1 <= int(labels_below) <= 100:
            raise DermaidError("labels_below: must be between 1 and 100")
        limit, offset = max(1, min(int(limit), MAX_PAGE)), max(0, int(offset))
        if offset > MAX_OFFSET:
            raise DermaidError(f"offset: at most {MAX_OFFSET}")
        counts = (select(Label.upload_id, func.count(distinct(Label.reviewer)).label("reviewers"))
                  .group_by(Label.upload_id).subquery())
        reviewers = func.coalesce(counts.c.reviewers, 0)
        ties = _tied_uploads().subquery()   # joined once (an IN in WHERE and SELECT would evaluate it twice)
        tie = ties.c.upload_id.is_not(None)
        conditions = [Upload.consent.is_(True), or_(reviewers < int(labels_below), tie)]
        if top_class is not None:
            conditions.append(Upload.top_class == top_class)
        if reviewer is not None:
            conditions.append(~exists().where(Label.upload_id == Upload.id, Label.reviewer == reviewer))
        tied = case((tie, 1), else_=0).label("tied")
        base = (select(Upload, reviewers, tied).outerjoin(counts, counts.c.upload_id == Upload.id)
                .outerjoin(ties, ties.c.upload_id == Upload.id).where(*conditions))
        shown = blinded_upload if self.blinded else public_upload
        with self._session() as session:
            total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
            refused_first = case((Upload.abstain.is_(True), 0), else_=1)
            rows = session.execute(base.order_by(refused_first, tied.desc(), Upload.entropy.desc(), Upload.created,
                                                 Upload.id).limit(limit).offset(offset)).all()
            items = [{**shown(row.to_dict()), "reviewers": int(n), "needs_tiebreak": bool(t)} for row, n, t in rows]
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
        """Pending uploads (the queue's) as Label Studio tasks, most uncertain first; with the model's class
        pre-annotated only when this store is not blinded."""
        ids = [item["id"] for item in self.queue(top_class=top_class, limit=limit, offset=offset)["items"]]
        with self._session() as session:
            rows = {row.id: row.to_dict() for row in session.scalars(select(Upload).where(Upload.id.in_(ids)))}
        return [labelstudio_task(rows[i], image_url(rows[i]), pre_annotate=not self.blinded) for i in ids]

    def import_labelstudio(self, export: Any, *, reviewer: str) -> dict[str, Any]:
        """Store the annotations of a Label Studio JSON export as labels of `reviewer`, the importer (source
        "labelstudio"; the review API passes the token's reviewer).

        Nothing in the file decides who voted or when: every label is recorded under `reviewer` with
        imported_by = `reviewer`, whatever user the file's completed_by names (one token holder could otherwise
        invent reviewers, or vote in a colleague's name, and so decide the consensus that labels-export feeds
        into fine-tuning); a created_at after now becomes now. Several annotations of one upload become several
        labels of this reviewer, and the newest is their vote (dermaid.uploads.agreement).
        External ids (Label Studio task + annotation) are scoped to the importer: ids claimed by another token
        holder's import never make a genuine import skip annotations.

        All or nothing: a malformed export or an unknown upload raises before anything is written.
        Annotations this reviewer imported before are skipped, so importing the same export twice adds nothing.
        """
        reviewer = check_reviewer(reviewer)
        rows, skipped = parse_labelstudio_export(export)
        wanted = sorted({row["upload_id"] for row in rows})
        now = _dt.datetime.now(_dt.timezone.utc)
        try:
            with self._session.begin() as session:
                versions = dict(session.execute(select(Upload.id, Upload.model_version)
                                                .where(Upload.id.in_(wanted))).all()) if wanted else {}
                missing = [i for i in wanted if i not in versions]
                if missing:
                    raise UnknownUpload(f"Label Studio export: {len(missing)} task(s) name uploads that do not exist: "
                                        f"{', '.join(missing[:5])}; nothing was imported")
                externals = [_scoped_external_id(reviewer, row["external_id"]) for row in rows]
                known = set(session.scalars(select(Label.external_id).where(Label.external_id.in_(externals)))) \
                    if externals else set()
                seen: set[str] = set()
                for row, external in zip(rows, externals):
                    if external in known or external in seen:
                        continue
                    seen.add(external)
                    session.add(Label(upload_id=row["upload_id"], reviewer=reviewer, code=row["code"],
                                      comment=row["comment"], created=min(row["created"], now),
                                      source="labelstudio", external_id=external,
                                      model_version=versions[row["upload_id"]], imported_by=reviewer))
        except IntegrityError:
            raise DermaidError("Label Studio export: another import of the same annotations ran at the same "
                               "time; nothing was imported by this one, try again") from None
        return {"tasks": skipped["tasks"], "imported": len(seen),
                "already_imported": len(rows) - len(seen), "skipped_cancelled": skipped["cancelled"],
                "skipped_without_diagnosis": skipped["without_diagnosis"], "reviewer": reviewer,
                "labelstudio_users": len({row["reviewer"] for row in rows})}

    # -- helpers --------------------------------------------------------------------------------------

    def _upload(self, upload_id: str) -> dict[str, Any]:
        upload = self.uploads.get(parse_upload_id(upload_id))
        if upload is None or not upload["consent"]:
            raise UnknownUpload(f"upload {parse_upload_id(upload_id)}: no such upload")
        return upload


def _tied_uploads() -> Any:
    """SELECT of the upload ids whose reviewers tie: over each reviewer's newest label, two or more codes share
    the highest vote count (agreement.is_tie, in SQL so that the queue still pages in the database)."""
    newest = func.row_number().over(partition_by=(Label.upload_id, Label.reviewer),
                                    order_by=(Label.created.desc(), Label.id.desc()))
    latest = select(Label.upload_id, Label.code, newest.label("newest")).subquery()
    votes = (select(latest.c.upload_id, func.count().label("n")).where(latest.c.newest == 1)
             .group_by(latest.c.upload_id, latest.c.code).subquery())
    ranked = select(votes.c.upload_id, votes.c.n,
                    func.max(votes.c.n).over(partition_by=votes.c.upload_id).label("top")).subquery()
    return (select(ranked.c.upload_id).where(ranked.c.n == ranked.c.top)
            .group_by(ranked.c.upload_id).having(func.count() > 1))


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> str | None:
    """An optional choice (confidence, advice): None or one of `allowed`; a DermaidError naming them otherwise."""
    if value is None or value in allowed:
        return value
    raise DermaidError(f"{field}: {str(value)[:40]!r} is not one of {', '.join(allowed)}")


def _scoped_external_id(importer: str, external: str) -> str:
    """A Label Studio annotation's external id within the importer's own namespace (the column is unique: an
    unscoped id pre-claimed by one token holder would make another's genuine import skip it)."""
    scoped = f"labelstudio:{importer}:{external.removeprefix('labelstudio:')}"
    if len(scoped) <= EXTERNAL_ID_CHARS:
        return scoped
    return f"labelstudio:{importer}:sha256:{hashlib.sha256(scoped.encode()).hexdigest()[:32]}"

