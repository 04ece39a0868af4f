"""The reference profile: the prediction log's features on a checkpoint's validation fold, stored with it.

    profile = build_reference(checkpoint, version_url, fold)    # DataFrame, one prediction_row per image
    write_reference(checkpoint, profile)                         # <checkpoint>/monitoring_reference.parquet
    reference = read_reference(checkpoint)                       # what the monitoring report compares with

`dermaid calibrate` writes it (dermaid/evaluation/calibrate.py), after the OOD detector, so the profile holds
the same OOD score the service logs. Each validation image goes through the served path itself
(dermaid.inference.Predictor: prepare -> image_statistics on the model input -> forward_full; build_result for the
malignancy score and triage with the Serve defaults), so an unchanged stream matches it. The image is the raw
upload when the dataset's raw root (the prepared manifest's source.root) can still be read: then width, height,
format and the pixels are the upload's, as the service sees them; otherwise the prepared JPEG, and width / height
are left empty (not tested) since prepare resized them. The profile's Parquet metadata says which.
Age, sex and site also get a row per other labelled image of the version (route "reference-metadata", nothing
else set): what people give does not depend on the model, and the validation fold alone is too small and
lesion-clustered a sample of it (_metadata_rows). dermaid.monitoring.drift compares every other feature with the
validation rows only.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd

from dermaid.errors import DermaidError
from dermaid.files import exists, get_fs, join
from dermaid.monitoring.drift import METADATA_ROUTE  # noqa: F401 - the metadata-only rows' route, defined there

logger = logging.getLogger(__name__)

REFERENCE_FILE = "monitoring_reference.parquet"
REFERENCE_ROUTE = "reference"            # validation images through the served path: every feature
BATCH_SIZE = 32


def build_reference(checkpoint: str, version_url: str, fold: int, split: str = "val") -> tuple[pd.DataFrame, str]:
    """(profile, source): the split's rows through the served path; source is "raw" or "prepared"."""
    from dermaid.data.loading import load_records
    from dermaid.inference import Predictor

    records = load_records(version_url, split=split, fold=fold)
    if records.empty:
        raise DermaidError(f"{version_url}: the {split} part of fold {fold} is empty; no reference profile")
    raw = _raw_urls(version_url)
    source = "raw" if raw is not None and set(records["image_id"]) <= set(raw) else "prepared"
    uploads = [(_read(raw[r.image_id]) if source == "raw" else bytes(r.image), *_meta(r)) for r in records.itertuples()]
    profile = profile_uploads(Predictor(checkpoint), uploads, route=REFERENCE_ROUTE)
    if source != "raw":  # prepare resized them and re-encoded them: not what an upload looks like
        profile[["width", "height", "image_format"]] = None
    others = load_records(version_url, split="all", fold=fold, with_images=False)
    others = others[(others["label_idx"] >= 0) & ~others["image_id"].isin(records["image_id"])]
    return pd.concat([profile, _metadata_rows(others, profile)], ignore_index=True), source


def _metadata_rows(records: pd.DataFrame, profile: pd.DataFrame) -> pd.DataFrame:
    """Rows with only age / sex / site (route METADATA_ROUTE) for the other labelled images: metadata do not
    depend on the model, and the validation fold alone is a small lesion-clustered sample of them (the demo's
    600-image set: posterior torso 4% of its validation fold, 18% of the set), which alerted on site in 13 of 20
    unshifted windows; with every fold, none."""
    from dermaid.monitoring.features import age_band

    rows = pd.DataFrame({column: [None] * len(records) for column in profile.columns})
    rows["time"] = profile["time"].iloc[0] if len(profile) else pd.Timestamp.now(tz="UTC")
    rows["model_version"] = profile["model_version"].iloc[0] if len(profile) else None
    rows["route"] = METADATA_ROUTE
    rows["consent"] = False
    meta = [_meta(r) for r in records.itertuples()]
    rows["age"] = [age_band(m[0]) for m in meta]
    rows["sex"] = [m[1] for m in meta]
    rows["site"] = [m[2] for m in meta]
    return rows


def profile_uploads(predictor: Any, uploads: list[tuple[bytes, Any, Any, Any]], route: str = "reference",
                    batch_size: int = BATCH_SIZE) -> pd.DataFrame:
    """[(image bytes, age, sex, site)] -> one prediction_row each, as the service logs them: Predictor.prepare,
    describe_image on the model input, forward_full, build_result with the Serve defaults (MALIGNANT_CODES,
    DEFAULT_TRIAGE, the card's operating point)."""
    import torch

    from dermaid.classes import MALIGNANT_CODES
    from dermaid.inference import DEFAULT_TRIAGE, build_result
    from dermaid.monitoring.features import describe_image, prediction_row

    rows: list[dict[str, Any]] = []
    for start in range(0, len(uploads), batch_size):
        chunk = uploads[start:start + batch_size]
        prepared = [predictor.prepare(data) for data, *_ in chunk]
        metadata = torch.stack([predictor.encode_metadata(*meta) for _, *meta in chunk])  # (B, 14)
        batch = predictor.forward_full(torch.stack([p.tensor for p in prepared]), metadata)  # (B, 8), (B,)
        for i, ((data, age, sex, site), item) in enumerate(zip(chunk, prepared)):
            ood = None if batch.ood_scores is None else float(batch.ood_scores[i])
            abstain = None if batch.abstain is None else bool(batch.abstain[i])
            result = build_result(batch.probabilities[i], list(MALIGNANT_CODES), dict(DEFAULT_TRIAGE),
                                  operating_point=predictor.card.triage, ood_score=ood, abstain=abstain)
            triage = "abstained" if abstain else (result.get("triage") or {}).get("level")
            described = describe_image(data, item.model_input)
            rows.append(prediction_row(
                probabilities=batch.probabilities[i], ood_score=ood, abstain=abstain,
                malignancy_score=result.get("malignancy_score"), triage=triage, model_version=predictor.version,
                route=route, width=item.upload_size[0], height=item.upload_size[1],
                image_format=described["image_format"], stats=described["stats"], age=age, sex=sex, site=site,
                consent=False))
    return pd.DataFrame(rows)


def write_reference(checkpoint: str, profile: pd.DataFrame, source: str) -> str:
    """Write the profile beside the checkpoint's weights (LOG_SCHEMA columns); its URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermaid.monitoring.log import LOG_SCHEMA

    table = pa.Table.from_pandas(profile[LOG_SCHEMA.names], schema=LOG_SCHEMA, preserve_index=False, safe=False)  # ns -> ms
    table = table.replace_schema_metadata({b"dermaid_reference": json.dumps({"source": source}).encode()})
    url = join(checkpoint, REFERENCE_FILE)
    fs, path = get_fs(url)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    return url


def read_reference(checkpoint: str) -> pd.DataFrame:
    """The checkpoint's reference profile; a DermaidError that says how to make one when it has none."""
    import pyarrow.parquet as pq

    url = join(checkpoint, REFERENCE_FILE)
    if not exists(url):
        raise DermaidError(f"{checkpoint}: no reference profile ({REFERENCE_FILE}); run `dermaid calibrate "
                           f"checkpoint={checkpoint}` to write one")
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pandas()


def reference_source(checkpoint: str) -> str:
    """"raw" or "prepared": which images the profile was computed on."""
    import pyarrow.parquet as pq

    fs, path = get_fs(join(checkpoint, REFERENCE_FILE))
    with fs.open(path, "rb") as f:
        metadata = pq.read_schema(f).metadata or {}
    return json.loads(metadata.get(b"dermaid_reference", b"{}")).get("source", "unknown")


def _raw_urls(version_url: str) -> dict[str, str] | None:
    """image_id -> raw image URL from the manifest's source root, or None when it cannot be read."""
    from dermaid.data.isic import read_records
    from dermaid.data.loading import read_manifest

    source = read_manifest(version_url).get("source") or {}
    root = source.get("root")
    if not root or not exists(root):
        return None
    try:
        records = read_records(root, source.get("layout") or "isic2019", source.get("name"))
    except (DermaidError, OSError) as exc:
        logger.info("reference profile: raw root %s not readable (%s); using the prepared images", root, exc)
        return None
    return dict(zip(records["image_id"], records["image_url"]))


def _read(url: str) -> bytes:
    fs, path = get_fs(url)
    return fs.cat_file(path)


def _meta(record: Any) -> tuple[Any, Any, Any]:
    """(age, sex, site) of a record, None where missing."""
    def clean(value: Any) -> Any:
        return None if value is None or (isinstance(value, float) and value != value) else value
    return clean(record.age), clean(record.sex), clean(record.site)
