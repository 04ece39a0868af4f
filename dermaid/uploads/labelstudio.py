"""Label Studio interop: the labeling config, uploads as tasks, a JSON export parsed into label rows.

    LABELSTUDIO_CONFIG                                      # paste into the project's Labeling Interface
    labelstudio_task(upload_row, image_url)                 # one task, the model's top class pre-annotated
    labelstudio_task(upload_row, image_url, pre_annotate=False)   # blinded review: no model answer in the task
    rows, skipped = parse_labelstudio_export(export_json)   # label rows for LabelStore.import_labelstudio

Nothing here touches the database: `LabelStore.labelstudio_tasks` / `import_labelstudio` do
(dermaid.uploads.labels). A malformed export raises a DermaidError naming the task (its position and
Label Studio id) and the annotation.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from typing import Any

from dermaid.classes import BY_CODE, CLASS_CODES, NOT_A_LESION
from dermaid.errors import DermaidError
from dermaid.uploads.validation import (
    MAX_REVIEWER_CHARS, InvalidUploadId, check_code, check_comment, parse_upload_id,
)

# The names in the labeling config that tasks and exports refer to.
LS_IMAGE = "image"
LS_CHOICES = "diagnosis"
LS_COMMENT = "comment"
EXTERNAL_ID_CHARS = 160  # the labels.external_id column

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


def labelstudio_task(upload: dict[str, Any], image_url: str, *, pre_annotate: bool = True) -> dict[str, Any]:
    """One upload row -> a Label Studio task with the model's top class as a pre-annotation.

    pre_annotate=False (blinded review): the task carries the photo and its metadata only: no prediction, and
    neither the model's class nor its uncertainty in the data or the summary line Label Studio shows."""
    probabilities = upload["probabilities"]
    top = upload["top_class"]
    meta = ", ".join(str(v) for v in (upload["age"] and f"age {upload['age']:g}", upload["sex"], upload["site"]) if v)
    data = {
        LS_IMAGE: image_url,
        "upload_id": upload["id"],
        "age": upload["age"],
        "sex": upload["sex"],
        "site": upload["site"],
        "model_version": upload["model_version"],
    }
    if not pre_annotate:
        return {"data": {**data, "summary": f"{meta or 'no metadata'} (blinded review: the model's answer is not "
                                            "shown; decision support only)"}}
    return {
        "data": {
            **data,
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
    """A Label Studio JSON export (list, bytes or text) -> label rows (not yet stored) and counts of what was
    skipped (cancelled annotations, annotations without a diagnosis). A row's reviewer and created are what the
    file claims (completed_by, created_at): unverified, so LabelStore.import_labelstudio records the importer
    and clamps the time instead."""
    tasks = _load_tasks(export)
    rows: list[dict[str, Any]] = []
    skipped = {"tasks": len(tasks), "cancelled": 0, "without_diagnosis": 0}
    for t, task in enumerate(tasks):
        where, upload_id, annotations = _read_task(t, task)
        for a, annotation in enumerate(annotations):
            at = f"{where}, annotation {a}"
            if not isinstance(annotation, dict):
                raise DermaidError(f"Label Studio export: {at} is not an object")
            if annotation.get("was_cancelled"):
                skipped["cancelled"] += 1
                continue
            row = _annotation_label(task, annotation, upload_id, at)
            if row is None:
                skipped["without_diagnosis"] += 1
                continue
            rows.append(row)
    return rows, skipped


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _load_tasks(export: Any) -> list[Any]:
    """The export as a list of tasks (JSON text or bytes are parsed; a single task object is a list of one)."""
    if isinstance(export, (bytes, str)):
        try:
            export = json.loads(export)
        except ValueError as exc:
            raise DermaidError(f"Label Studio export: not JSON ({exc})") from None
    if isinstance(export, dict):
        export = [export]
    if not isinstance(export, list):
        raise DermaidError("Label Studio export: expected a JSON list of tasks (Export -> JSON in Label Studio)")
    return export


def _read_task(position: int, task: Any) -> tuple[str, str, list[Any]]:
    """(where: the task named for messages, its upload id, its annotations) of one exported task."""
    task_id = task.get("id") if isinstance(task, dict) else None
    where = f"task {position}" + (f" (id {task_id})" if task_id is not None else "")
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise DermaidError(f"Label Studio export: {where} has no 'data' object")
    try:
        upload_id = parse_upload_id(task["data"].get("upload_id"))
    except InvalidUploadId as exc:
        raise DermaidError(f"Label Studio export: {where}: data.{exc}") from None
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        raise DermaidError(f"Label Studio export: {where}: 'annotations' is not a list")
    return where, upload_id, annotations


def _annotation_label(task: dict[str, Any], annotation: dict[str, Any], upload_id: str,
                      at: str) -> dict[str, Any] | None:
    """One annotation -> a label row; None when it has no diagnosis choice."""
    results = annotation.get("result") or []
    choices = [r for r in results if isinstance(r, dict) and r.get("type") == "choices"
               and r.get("from_name", LS_CHOICES) == LS_CHOICES]
    if not choices:
        return None
    values = (choices[0].get("value") or {}).get("choices") or []
    if len(choices) > 1 or len(values) != 1:
        raise DermaidError(f"Label Studio export: {at}: expected exactly one '{LS_CHOICES}' choice, got {values}")
    try:
        code = check_code(values[0])
        texts = [text for r in results if isinstance(r, dict) and r.get("type") == "textarea"
                 for text in ((r.get("value") or {}).get("text") or [])]
        comment = check_comment("\n".join(str(text) for text in texts) if texts else None)
    except DermaidError as exc:
        raise DermaidError(f"Label Studio export: {at}: {exc}") from None
    reviewer = _reviewer(annotation.get("completed_by"))
    created = _parse_time(annotation.get("created_at"), at)
    if annotation.get("id") is not None and task.get("id") is not None:
        external = f"labelstudio:{task['id']}:{annotation['id']}"
    else:
        digest = hashlib.sha256(json.dumps([upload_id, reviewer, code, comment, str(created)]).encode())
        external = f"labelstudio:sha256:{digest.hexdigest()[:32]}"
    return {"upload_id": upload_id, "reviewer": reviewer, "code": code, "comment": comment,
            "created": created, "external_id": external[:EXTERNAL_ID_CHARS]}


def _reviewer(completed_by: Any) -> str:
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
        # Stored in UTC: SQLite keeps the wall time only, so another offset would shift the history.
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)).astimezone(_dt.timezone.utc)
    except ValueError:
        raise DermaidError(f"Label Studio export: {where}: created_at {str(value)[:40]!r} is not an ISO time") from None
    except OverflowError:  # e.g. 9999-12-31T23:00-05:00 is past the last UTC datetime
        raise DermaidError(f"Label Studio export: {where}: created_at {str(value)[:40]!r} is out of range") from None
