"""The labels store (dermaid.uploads: labels, agreement, labelstudio, export) against SQLite and PostgreSQL: queue
order and filters, label history and agreement, bad input, concurrent labels, Label Studio export/import, the
ISIC 2019 export (no Ray)."""

from __future__ import annotations

import io
import json
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from dermaid.classes import CLASS_CODES, NOT_A_LESION
from dermaid.errors import DermaidError
from dermaid.uploads.agreement import compute_agreement
from dermaid.uploads.export import EXPORT_MARKER, export_dataset
from dermaid.uploads.export import run as run_export
from dermaid.uploads.labels import LabelStore
from dermaid.uploads.labelstudio import LABELSTUDIO_CONFIG
from dermaid.uploads.validation import InvalidUploadId, UnknownUpload, parse_upload_id
from dermaid.uploads.store import UploadStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration(reason="PostgreSQL"))])
def store(request, tmp_path) -> LabelStore:
    """A LabelStore on an empty database: a SQLite file, or a fresh schema in the session's PostgreSQL database."""
    db_url = None
    if request.param == "postgresql":
        base = request.getfixturevalue("postgres_url")
        schema = f"t_{uuid.uuid4().hex[:10]}"
        admin = sa.create_engine(base)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
        db_url = sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    labels = LabelStore(UploadStore(str(tmp_path / "uploads"), db_url))
    yield labels
    labels.engine.dispose()


def _image(fmt: str = "JPEG", seed: int = 0, size: tuple[int, int] = (48, 36)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _probs(top: str, p_top: float) -> list[float]:
    """p_top on `top`, the rest spread evenly: a higher p_top gives a lower entropy."""
    rest = (1.0 - p_top) / (len(CLASS_CODES) - 1)
    return [p_top if code == top else rest for code in CLASS_CODES]


def _upload(labels: LabelStore, top: str = "MEL", p_top: float = 0.6, seed: int = 0, fmt: str = "JPEG",
            ood: dict | None = None, **meta) -> str:
    meta = {"age": 55.0, "sex": "male", "site": "posterior torso", **meta}
    return labels.uploads.save(image=_image(fmt, seed), model_input_png=_image("PNG", seed, (16, 16)),
                               probabilities=_probs(top, p_top), model_version="toy-float-abc", ood=ood, **meta)


def test_queue_puts_the_photos_the_model_refused_first(store):
    unsure = _upload(store, "MEL", 0.30, seed=1, ood={"ood_score": 0.4, "abstain": False})
    refused_certain = _upload(store, "NV", 0.95, seed=2, ood={"ood_score": 9.0, "abstain": True})
    refused_unsure = _upload(store, "BCC", 0.40, seed=3, ood={"ood_score": 7.5, "abstain": True})
    no_detector = _upload(store, "MEL", 0.20, seed=4)  # a model without an OOD detector: abstain None

    page = store.queue()
    assert [item["id"] for item in page["items"]] == [refused_unsure, refused_certain, no_detector, unsure]
    first = page["items"][0]["prediction"]
    assert first["abstain"] is True and first["ood_score"] == pytest.approx(7.5)
    assert page["items"][2]["prediction"]["abstain"] is None and page["items"][2]["prediction"]["ood_score"] is None
    assert store.uploads.get(unsure)["abstain"] is False


def test_queue_is_most_uncertain_first_and_filters(store):
    certain = _upload(store, "NV", 0.95, seed=1)
    unsure = _upload(store, "MEL", 0.30, seed=2)
    middle = _upload(store, "MEL", 0.60, seed=3)
    flat = _upload(store, "BCC", 0.15, seed=4)

    page = store.queue()
    assert [item["id"] for item in page["items"]] == [flat, unsure, middle, certain] and page["total"] == 4
    entropies = [item["prediction"]["entropy"] for item in page["items"]]
    assert entropies == sorted(entropies, reverse=True)
    assert "blobs" not in page["items"][0] and page["items"][0]["metadata"]["site"] == "posterior torso"

    assert [item["id"] for item in store.queue(top_class="MEL")["items"]] == [unsure, middle]
    assert [item["id"] for item in store.queue(limit=2, offset=1)["items"]] == [unsure, middle]

    store.add(unsure, "dr_a", "MEL")  # labeled: leaves the queue of unlabeled uploads
    assert [item["id"] for item in store.queue()["items"]] == [flat, middle, certain]
    # second opinions: uploads with < 2 reviewers, but not the ones dr_a labeled already
    assert unsure in [item["id"] for item in store.queue(labels_below=2, reviewer="dr_b")["items"]]
    assert unsure not in [item["id"] for item in store.queue(labels_below=2, reviewer="dr_a")["items"]]
    with pytest.raises(DermaidError, match="top_class"):
        store.queue(top_class="XYZ")


def test_history_is_kept_and_agreement_uses_each_reviewers_newest_label(store):
    upload = _upload(store)
    first = store.add(upload, "dr_a", "MEL", "irregular border")
    store.add(upload, "dr_b", "NV")
    tie = store.agreement(upload)
    assert tie == {"labels": 2, "reviewers": 2, "votes": {"MEL": 1, "NV": 1}, "consensus": None, "agreement": 0.5}

    store.add(upload, "dr_a", "NV", "on second look: a nevus")  # dr_a changes their mind: a new row
    store.add(upload, "dr_c", "NV")
    history = store.history(upload)
    assert [(h["reviewer"], h["code"]) for h in history] == [("dr_a", "MEL"), ("dr_b", "NV"), ("dr_a", "NV"),
                                                            ("dr_c", "NV")]
    assert history[0] == first and history[0]["comment"] == "irregular border"  # never overwritten
    assert all(h["model_version"] == "toy-float-abc" and h["created"].endswith("+00:00") for h in history)
    assert store.agreement(upload) == {"labels": 4, "reviewers": 3, "votes": {"NV": 3}, "consensus": "NV",
                                       "agreement": 1.0}
    item = store.item(upload)
    assert item["upload"]["id"] == upload and len(item["labels"]) == 4 and item["agreement"]["consensus"] == "NV"


def test_bad_input_is_refused_and_nothing_is_stored(store):
    upload = _upload(store)
    for bad in ["../../etc/passwd", "..%2Fuploads.db", "", "x" * 36, str(uuid.uuid1()), upload.upper(),
                upload + "/../x", None, 42]:
        with pytest.raises(InvalidUploadId, match="not an upload id"):
            store.add(bad, "dr_a", "MEL")
    assert parse_upload_id(upload.replace("-", "")) == upload
    with pytest.raises(UnknownUpload, match="no such upload"):
        store.add(str(uuid.uuid4()), "dr_a", "MEL")
    with pytest.raises(UnknownUpload):
        store.history(str(uuid.uuid4()))
    with pytest.raises(DermaidError, match="not a review code; allowed: MEL, NV"):
        store.add(upload, "dr_a", "melanoma")
    with pytest.raises(DermaidError, match="at most 2000"):
        store.add(upload, "dr_a", "MEL", "x" * 2001)
    assert store.history(upload) == []
    assert store.add(upload, "dr_a", NOT_A_LESION, "  blurry  ")["comment"] == "blurry"


def test_concurrent_labels_on_one_upload_are_all_kept(store):
    upload = _upload(store)
    reviewers, per_reviewer = 6, 5
    barrier = threading.Barrier(reviewers)
    errors: list[BaseException] = []

    def label(i: int) -> None:
        try:
            barrier.wait()
            for k in range(per_reviewer):
                store.add(upload, f"dr_{i}", CLASS_CODES[(i + k) % 8], f"{i}-{k}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=label, args=(i,)) for i in range(reviewers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    history = store.history(upload)
    assert len(history) == reviewers * per_reviewer
    assert {h["comment"] for h in history} == {f"{i}-{k}" for i in range(reviewers) for k in range(per_reviewer)}
    assert store.agreement(upload)["reviewers"] == reviewers


def _labelstudio_export(tasks: list[dict]) -> list[dict]:
    """What Label Studio's Export -> JSON gives for our tasks after annotation (ids, users, results)."""
    exported = []
    for i, task in enumerate(tasks):
        code = task["predictions"][0]["result"][0]["value"]["choices"][0]
        exported.append({
            "id": 100 + i, "data": task["data"], "predictions": task["predictions"],
            "annotations": [
                {"id": 1000 + i, "completed_by": 7, "was_cancelled": False, "created_at": "2026-01-02T10:00:00.5Z",
                 "result": [
                     {"id": "a", "from_name": "diagnosis", "to_name": "image", "type": "choices",
                      "value": {"choices": [code]}},
                     {"id": "b", "from_name": "comment", "to_name": "image", "type": "textarea",
                      "value": {"text": [f"agree with {code}"]}}]},
                {"id": 2000 + i, "completed_by": {"id": 8, "email": "derm@clinic.example"}, "was_cancelled": False,
                 "created_at": "2026-01-02T12:00:00+02:00",
                 "result": [{"id": "c", "from_name": "diagnosis", "to_name": "image", "type": "choices",
                             "value": {"choices": ["NONE"]}}]},
                {"id": 3000 + i, "completed_by": 9, "was_cancelled": True, "result": []},
            ],
        })
    return exported


def test_labelstudio_tasks_and_import_round_trip(store):
    pending = _upload(store, "BCC", 0.4, seed=1)
    done = _upload(store, "NV", 0.9, seed=2)
    store.add(done, "dr_a", "NV")

    tasks = store.labelstudio_tasks(lambda upload: f"https://dermaid.example/img/{upload['id']}")
    assert len(tasks) == 1  # pending uploads only
    task = tasks[0]
    assert task["data"]["image"] == f"https://dermaid.example/img/{pending}" and task["data"]["upload_id"] == pending
    prediction = task["predictions"][0]
    assert prediction["model_version"] == "toy-float-abc" and prediction["score"] == pytest.approx(0.4)
    assert prediction["result"][0] | {"id": None} == {"id": None, "from_name": "diagnosis", "to_name": "image",
                                                      "type": "choices", "value": {"choices": ["BCC"]}}
    assert 'name="diagnosis"' in LABELSTUDIO_CONFIG and all(f'"{c}"' in LABELSTUDIO_CONFIG for c in CLASS_CODES)
    json.dumps(tasks)  # plain JSON

    export = _labelstudio_export(tasks)
    summary = store.import_labelstudio(json.dumps(export).encode(), reviewer="dr_a")
    assert summary == {"tasks": 1, "imported": 2, "already_imported": 0, "skipped_cancelled": 1,
                       "skipped_without_diagnosis": 0, "reviewer": "dr_a", "labelstudio_users": 2}
    history = store.history(pending)
    assert [(h["reviewer"], h["imported_by"], h["code"], h["source"]) for h in history] == [
        ("dr_a", "dr_a", "NONE", "labelstudio"),  # 12:00+02:00 = 10:00Z
        ("dr_a", "dr_a", "BCC", "labelstudio")]   # 10:00:00.5Z
    assert history[1]["comment"] == "agree with BCC" and history[0]["created"].startswith("2026-01-02T10:00:00+00:00")
    assert store.import_labelstudio(export, reviewer="dr_a")["imported"] == 0  # a re-import adds nothing

    bad_code = json.loads(json.dumps(export))
    bad_code[0]["annotations"][0]["id"] = 5555
    bad_code[0]["annotations"][0]["result"][0]["value"]["choices"] = ["Melanoma"]
    with pytest.raises(DermaidError, match=r"task 0 \(id 100\), annotation 0: code: 'Melanoma' is not a review code"):
        store.import_labelstudio(bad_code, reviewer="dr_a")
    unknown = json.loads(json.dumps(export))
    unknown[0]["data"]["upload_id"] = str(uuid.uuid4())
    unknown[0]["annotations"][0]["id"] = 6666
    with pytest.raises(UnknownUpload, match="nothing was imported"):
        store.import_labelstudio(unknown, reviewer="dr_a")
    tricky = [{"id": 1, "data": {"upload_id": "../../uploads.db"}, "annotations": []}]
    with pytest.raises(DermaidError, match="task 0 .*not an upload id"):
        store.import_labelstudio(tricky, reviewer="dr_a")
    with pytest.raises(DermaidError, match="not JSON"):
        store.import_labelstudio(b"{not json", reviewer="dr_a")
    assert len(store.history(pending)) == 2  # the refused imports wrote nothing



def _forged_export(upload: str, annotations: list[tuple[int, object, str, str]], task_id: int = 900) -> list[dict]:
    """One task whose annotations (id, completed_by, code, created_at) claim whatever the file's author chose."""
    return [{"id": task_id, "data": {"upload_id": upload}, "annotations": [
        {"id": annotation_id, "completed_by": user, "created_at": created,
         "result": [{"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": [code]}}]}
        for annotation_id, user, code, created in annotations]}]


def test_labelstudio_import_cannot_invent_reviewers(store):
    """Five invented Label Studio users voting MEL are one reviewer's labels: the importer's, one vote."""
    upload = _upload(store, "NV", 0.5, seed=1)
    store.add(upload, "dr_b", "NV")
    forged = _forged_export(upload, [(i, {"id": i, "email": f"invented{i}@example.org"}, "MEL", "2026-01-02T10:00:00Z")
                                     for i in range(1, 6)])
    summary = store.import_labelstudio(forged, reviewer="dr_a")
    assert (summary["imported"], summary["reviewer"], summary["labelstudio_users"]) == (5, "dr_a", 5)
    assert {(h["reviewer"], h["imported_by"]) for h in store.history(upload) if h["source"] == "labelstudio"} == {
        ("dr_a", "dr_a")}
    agreement = store.agreement(upload)
    assert agreement["reviewers"] == 2 and agreement["consensus"] is None  # dr_a MEL vs dr_b NV: a tie, no majority


def test_labelstudio_import_cannot_vote_in_another_reviewers_name(store):
    """completed_by naming a real reviewer changes nothing of theirs: the label is the importer's."""
    upload = _upload(store, "NV", 0.5, seed=1)
    store.add(upload, "dr_b", "NV")
    forged = _forged_export(upload, [(1, "dr_b", "MEL", "2026-01-02T10:00:00Z"),
                                     (2, {"id": 4, "email": "dr_b"}, "MEL", "2026-01-02T10:00:01Z")])
    store.import_labelstudio(forged, reviewer="dr_a")
    votes = {h["reviewer"]: h["code"] for h in store.history(upload)}  # the newest label per reviewer wins
    assert votes == {"dr_b": "NV", "dr_a": "MEL"}
    assert [h["code"] for h in store.history(upload) if h["reviewer"] == "dr_b"] == ["NV"]


def test_labelstudio_import_cannot_date_a_vote_in_the_future(store):
    """A label dated 2999 would stay the importer's newest vote forever: it is stored at the import's time, so
    the reviewer's later web label still counts."""
    import datetime as dt

    upload = _upload(store, "NV", 0.5, seed=1)
    before = dt.datetime.now(dt.timezone.utc)
    store.import_labelstudio(_forged_export(upload, [(1, 7, "MEL", "2999-01-01T00:00:00Z")]), reviewer="dr_a")
    after = dt.datetime.now(dt.timezone.utc)
    (imported,) = store.history(upload)
    assert before <= dt.datetime.fromisoformat(imported["created"]) <= after
    store.add(upload, "dr_a", "NV")  # changes their mind later, on the review page
    assert store.agreement(upload)["consensus"] == "NV"


def test_labelstudio_import_ids_claimed_by_another_importer_skip_nothing(store):
    """One token holder imports a file with the task and annotation ids of a genuine export first: the genuine
    import by another reviewer still stores every annotation; the same reviewer's re-import adds nothing."""
    upload = _upload(store, "NV", 0.5, seed=1)
    genuine = _forged_export(upload, [(1, 7, "BCC", "2026-01-02T10:00:00Z"), (2, 7, "BCC", "2026-01-02T10:05:00Z")])
    squatter = _forged_export(upload, [(1, 9, "NONE", "2026-01-02T09:00:00Z"), (2, 9, "NONE", "2026-01-02T09:00:00Z")])
    assert store.import_labelstudio(squatter, reviewer="dr_b")["imported"] == 2
    summary = store.import_labelstudio(genuine, reviewer="dr_a")
    assert (summary["imported"], summary["already_imported"]) == (2, 0)
    assert store.import_labelstudio(genuine, reviewer="dr_a")["imported"] == 0
    ids = [h["external_id"] for h in store.history(upload)]
    assert len(set(ids)) == 4 and all(i.startswith(("labelstudio:dr_a:", "labelstudio:dr_b:")) for i in ids)
    assert {h["reviewer"]: h["code"] for h in store.history(upload)} == {"dr_b": "NONE", "dr_a": "BCC"}
    long_ids = _forged_export(upload, [("a" * 150, 7, "BCC", "2026-01-02T10:00:00Z")], task_id="t" * 150)
    assert store.import_labelstudio(long_ids, reviewer="dr_a")["imported"] == 1  # hashed into the 160-char column
    assert store.import_labelstudio(long_ids, reviewer="dr_a")["imported"] == 0
    with pytest.raises(DermaidError, match="reviewer"):
        store.import_labelstudio(genuine, reviewer="")

def test_export_writes_the_isic_layout_the_reader_takes(store, tmp_path):
    from dermaid.data.isic import read_records

    agreed = _upload(store, "MEL", 0.5, seed=1, age=62.0, sex="female", site="head/neck")
    majority = _upload(store, "NV", 0.7, seed=2, fmt="WEBP", age=None, sex=None, site=None)
    tie = _upload(store, "BCC", 0.5, seed=3)
    unusable = _upload(store, "NV", 0.5, seed=4)
    _upload(store, "NV", 0.5, seed=5)  # never labeled
    store.add(agreed, "dr_a", "MEL")
    store.add(agreed, "dr_b", "MEL")
    for reviewer, code in [("dr_a", "NV"), ("dr_b", "NV"), ("dr_c", "BKL")]:
        store.add(majority, reviewer, code)
    store.add(tie, "dr_a", "BCC")
    store.add(tie, "dr_b", "SCC")
    store.add(unusable, "dr_a", NOT_A_LESION)

    out = str(tmp_path / "export")
    summary = export_dataset(store, out, min_agreement=0.6)
    assert summary["count"] == 2 and summary["counts"] == {"MEL": 1, "NV": 1}
    assert summary["excluded_not_a_lesion"] == 1
    records = read_records(out).set_index("image_id")
    by_upload = {f"DERMAID_{u.replace('-', '')}": u for u in (agreed, majority)}
    assert set(records.index) == set(by_upload)
    mel = records.loc[f"DERMAID_{agreed.replace('-', '')}"]
    nv = records.loc[f"DERMAID_{majority.replace('-', '')}"]
    assert (mel["label"], mel["age"], mel["sex"], mel["site"]) == ("MEL", 60.0, "female", "head/neck")
    assert nv["label"] == "NV" and np.isnan(nv["age"]) and nv["sex"] is None and nv["site"] is None
    assert nv["image_url"].endswith(".jpg")  # WebP re-encoded: the ISIC reader takes JPEG and PNG
    assert Image.open(nv["image_url"]).size == (48, 36)
    stored = store.uploads.read_blob(store.uploads.get(agreed)["blobs"]["image"])
    assert Path(mel["image_url"]).read_bytes() == stored  # the stored JPEG exported byte for byte
    provenance = json.loads((Path(out) / EXPORT_MARKER).read_text())
    agreements = {i["upload_id"]: i["agreement"] for i in provenance["images"]}
    assert agreements == {agreed: 1.0, majority: pytest.approx(2 / 3)}

    assert export_dataset(store, out, min_agreement=1.0)["count"] == 1  # a stricter export replaces the earlier one
    assert len(read_records(out)) == 1
    with pytest.raises(DermaidError, match="nothing written"):
        export_dataset(store, str(tmp_path / "none"), min_agreement=0.6, min_reviewers=4)
    assert not (tmp_path / "none").exists()
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(DermaidError, match="not a labels export"):
        export_dataset(store, str(keep), min_agreement=0.6)
    assert (keep / "notes.txt").read_text() == "mine" and len(list(keep.iterdir())) == 1


def test_compute_agreement_edge_cases():
    assert compute_agreement([])["consensus"] is None
    rows = [{"reviewer": "a", "code": "MEL", "created": "2026-01-01T00:00:00+00:00", "id": 2},
            {"reviewer": "a", "code": "NV", "created": "2026-01-01T00:00:00+00:00", "id": 1},
            {"reviewer": "b", "code": "MEL", "created": "2025-12-31T23:00:00-02:00", "id": 3}]
    # a's newest is id 2 (same time, larger id); b's label (01:00Z) is a later time than a's
    assert compute_agreement(rows) == {"labels": 3, "reviewers": 2, "votes": {"MEL": 2}, "consensus": "MEL",
                                       "agreement": 1.0}


def test_run_export_from_the_composed_config(tmp_path, capsys):
    from dermaid.config import compose

    labels = LabelStore(UploadStore(str(tmp_path / "uploads")))
    upload = _upload(labels, "SCC", 0.5)
    labels.add(upload, "dr_a", "SCC")
    out = tmp_path / "labels"
    cfg = compose("labels-export", [f"out={out}", f"storage.url={tmp_path / 'uploads'}", "min_agreement=1.0"])
    summary = run_export(cfg)
    assert summary["count"] == 1 and (out / "ISIC_2019_Training_GroundTruth.csv").exists()
    assert "dermaid prepare data.root=" in capsys.readouterr().out

    missing = compose("labels-export", [f"out={tmp_path / 'x'}", f"storage.url={tmp_path / 'nowhere'}"])
    with pytest.raises(DermaidError, match="no uploads database"):
        run_export(missing)
    assert not (tmp_path / "nowhere").exists()  # a wrong path does not create an empty store


def test_labels_export_cli_reports_bad_input_in_one_line(tmp_path, dermaid_cli):
    result = dermaid_cli("labels-export", f"out={tmp_path / 'x'}", f"storage.url={tmp_path / 'nowhere'}",
                         "min_agreement=2", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: storage: no uploads database at") and "Traceback" not in result.stderr


# --- blinded review, confidence and advice, ties, agreement over reviewers (issue #13) ------------------------

def _votes(store: LabelStore, table: dict[str, dict[str, str]]) -> dict[str, str]:
    """{upload name: {reviewer: code}} -> uploads labelled so; returns {upload name: upload id}."""
    ids = {}
    for seed, (name, votes) in enumerate(table.items()):
        ids[name] = _upload(store, "NV", 0.5, seed=seed)
        for reviewer, code in votes.items():
            store.add(ids[name], reviewer, code)
    return ids


def test_kappa_and_alpha_match_a_hand_computed_case(store):
    """Six uploads, dr_a and dr_b on all, dr_c on the first two. By hand:
    Cohen's kappa a-b: p_o = 4/6; a's marginals MEL 2 NV 3 BCC 1, b's MEL 1 NV 3 BCC 2 -> p_e = (2+9+2)/36 = 13/36;
      kappa = (24/36 - 13/36) / (23/36) = 11/23.
    b-c on u1, u2: b MEL NV, c MEL MEL: p_o = 1/2, p_e = 1/2 * 1 = 1/2 -> kappa 0. a-c: both MEL only: undefined.
    Krippendorff's alpha (nominal), coincidences over pairable values: u1 (MEL x3) o_MM += 3; u2 (MEL, NV, MEL)
      o_MM += 1, o_MN = o_NM += 1; u3, u4 (NV, NV) o_NN += 2 each; u5 (NV, BCC) o_NB = o_BN += 1; u6 o_BB += 2.
      n = 14, n_MEL 5, n_NV 6, n_BCC 3; D_o = 4/14, D_e = (14^2 - 25 - 36 - 9) / (14 * 13) = 126/182;
      alpha = 1 - (4/14) / (126/182) = 37/63."""
    a = ["MEL", "MEL", "NV", "NV", "NV", "BCC"]
    b = ["MEL", "NV", "NV", "NV", "BCC", "BCC"]
    table = {f"u{i + 1}": {"dr_a": a[i], "dr_b": b[i]} for i in range(6)}
    table["u1"]["dr_c"] = "MEL"
    table["u2"]["dr_c"] = "MEL"
    ids = _votes(store, table)
    store.add(ids["u6"], "dr_a", "SCC")  # dr_a changes their mind ...
    store.add(ids["u6"], "dr_a", "BCC")  # ... and back: only the newest label per reviewer counts

    stats = store.statistics()
    pairs = {tuple(pair["reviewers"]): pair for pair in stats["pairs"]}
    assert pairs[("dr_a", "dr_b")]["shared"] == 6 and pairs[("dr_a", "dr_b")]["cohen_kappa"] == pytest.approx(11 / 23)
    assert pairs[("dr_a", "dr_b")]["observed_agreement"] == pytest.approx(4 / 6)
    assert pairs[("dr_b", "dr_c")]["cohen_kappa"] == pytest.approx(0.0)
    assert pairs[("dr_a", "dr_c")]["shared"] == 2 and pairs[("dr_a", "dr_c")]["cohen_kappa"] is None
    assert stats["overall"]["alpha"] == pytest.approx(37 / 63) and stats["overall"]["units"] == 6
    assert "Krippendorff" in stats["overall"]["method"]
    assert (stats["uploads"], stats["multi_reviewed"], stats["ties"]) == (6, 6, 1)  # u5 (NV : BCC); u2 is 2 MEL : 1 NV
    assert stats["reviewers"]["dr_a"]["labels"] == 8 and stats["reviewers"]["dr_a"]["uploads"] == 6
    assert stats["reviewers"]["dr_c"]["confidence"] == {"low": 0, "medium": 0, "high": 0, "not_given": 2}


def test_agreement_statistics_on_too_little_data_are_none_not_errors(store):
    assert store.statistics()["overall"]["alpha"] is None and store.statistics()["pairs"] == []
    ids = _votes(store, {"u1": {"dr_a": "MEL", "dr_b": "MEL"}, "u2": {"dr_a": "NV"}})
    stats = store.statistics()
    assert stats["overall"] == {"method": stats["overall"]["method"], "alpha": None, "units": 1}  # one code only
    assert stats["pairs"] == [{"reviewers": ["dr_a", "dr_b"], "shared": 1, "observed_agreement": 1.0,
                               "cohen_kappa": None}]
    store.add(ids["u2"], "dr_b", "MEL")
    # u1 MEL MEL, u2 NV MEL: n = 4 (MEL 3, NV 1), D_o = 2/4, D_e = (16 - 9 - 1) / 12 = 1/2: alpha = 0
    assert store.statistics()["overall"]["alpha"] == pytest.approx(0.0, abs=1e-12)


def test_ties_are_flagged_and_offered_to_a_further_reviewer(store):
    """A tie (>= 2 votes, no single most common code) stays in the queue whatever labels_below says, after refused
    photos and before the rest; not for the reviewers who voted; settled by the next vote."""
    refused = _upload(store, "NV", 0.9, seed=1, ood={"ood_score": 9.0, "abstain": True})
    plain = _upload(store, "MEL", 0.2, seed=2)   # the highest entropy
    tied = _upload(store, "NV", 0.95, seed=3)    # the lowest entropy
    agreed = _upload(store, "NV", 0.5, seed=4)
    store.add(tied, "dr_a", "MEL")
    store.add(tied, "dr_b", "NV")
    for reviewer in ("dr_a", "dr_b"):
        store.add(agreed, reviewer, "NV")

    page = store.queue(reviewer="dr_c")  # labels_below=1: the tie still needs someone
    assert [item["id"] for item in page["items"]] == [refused, tied, plain] and page["total"] == 3
    assert [item["needs_tiebreak"] for item in page["items"]] == [False, True, False]
    assert page["items"][1]["reviewers"] == 2
    assert tied not in [item["id"] for item in store.queue(reviewer="dr_a", labels_below=5)["items"]]
    assert store.item(tied, "dr_c")["needs_tiebreak"] is True

    store.add(tied, "dr_a", "NV")   # dr_a changes their mind: 2 NV, no tie (SQL agrees with compute_agreement)
    assert tied not in [item["id"] for item in store.queue(reviewer="dr_c")["items"]]
    store.add(tied, "dr_a", "MEL")  # and back: a tie again
    assert tied in [item["id"] for item in store.queue(reviewer="dr_c")["items"]]
    store.add(tied, "dr_c", "NV")   # the third reviewer settles it
    assert tied not in [item["id"] for item in store.queue(reviewer="dr_d")["items"]]
    assert store.agreement(tied)["consensus"] == "NV"
    store.add(tied, "dr_d", "BCC")  # 2 NV : 1 MEL : 1 BCC: a majority, still no tie
    three_way = _upload(store, "NV", 0.5, seed=5)
    for reviewer, code in [("dr_a", "MEL"), ("dr_b", "NV"), ("dr_c", "BCC")]:
        store.add(three_way, reviewer, code)
    assert [item["id"] for item in store.queue(reviewer="dr_d")["items"] if item["needs_tiebreak"]] == [three_way]


def test_confidence_and_advice_are_stored_and_validated(store):
    upload = _upload(store)
    label = store.add(upload, "dr_a", "MEL", confidence="high", advice="biopsy")
    assert (label["confidence"], label["advice"], label["blinded"]) == ("high", "biopsy", False)  # store not blinded
    assert store.add(upload, "dr_b", "NV")["confidence"] is None  # optional
    with pytest.raises(DermaidError, match="confidence: 'sure' is not one of low, medium, high"):
        store.add(upload, "dr_a", "MEL", confidence="sure")
    with pytest.raises(DermaidError, match="advice: 'excise' is not one of none, visit, biopsy"):
        store.add(upload, "dr_a", "MEL", advice="excise")
    assert len(store.history(upload)) == 2
    stats = store.statistics()["reviewers"]["dr_a"]
    assert stats["confidence"]["high"] == 1 and stats["advice"] == {"none": 0, "visit": 0, "biopsy": 1, "not_given": 0}


def test_blinded_item_hides_the_prediction_and_labels_until_the_reviewer_labels(store):
    blind = LabelStore(store.uploads, blinded=True)
    refused = _upload(store, "BCC", 0.4, seed=1, ood={"ood_score": 8.0, "abstain": True})
    upload = _upload(store, "MEL", 0.6, seed=2, age=70.0)
    blind.add(upload, "dr_a", "MEL", "two colours")

    before = blind.item(upload, "dr_b")
    assert before["revealed"] is False and before["blinded"] is True
    assert before["upload"]["prediction"] is None and before["labels"] is None and before["agreement"] is None
    assert before["upload"]["metadata"]["age"] == 70.0 and before["reviewers"] == 1
    assert "MEL" not in json.dumps(before) and "two colours" not in json.dumps(before)
    assert blind.item(upload)["revealed"] is False  # no reviewer named: nothing revealed
    view = blind.labels_view(upload, "dr_b")
    assert view["labels"] is None and view["agreement"] is None

    queue = blind.queue(reviewer="dr_b")
    assert [item["id"] for item in queue["items"]] == [refused]  # upload has its one reviewer already
    assert queue["items"][0]["prediction"] is None and queue["items"][0]["model_refused"] is True
    assert "BCC" not in json.dumps(queue)
    with pytest.raises(DermaidError, match="blinded"):
        blind.queue(top_class="MEL")
    tasks = blind.labelstudio_tasks(lambda row: f"https://x/{row['id']}")
    assert [t["data"]["upload_id"] for t in tasks] == [refused]
    assert "predictions" not in tasks[0] and "BCC" not in json.dumps(tasks) and "top_class" not in tasks[0]["data"]

    first = blind.add(upload, "dr_b", "NV", confidence="low", advice="visit")
    assert first["blinded"] is True  # chosen before the model's answer was shown to dr_b
    after = blind.item(upload, "dr_b")
    assert after["revealed"] is True and after["upload"]["prediction"]["top_class"] == "MEL"
    assert [label["code"] for label in after["labels"]] == ["MEL", "NV"] and after["needs_tiebreak"] is True
    assert blind.add(upload, "dr_b", "MEL")["blinded"] is False  # a later label: dr_b has seen it all
    assert store.item(upload)["revealed"] is True and store.item(upload)["upload"]["prediction"] is not None
    assert blind.labeled_by("dr_b") == {upload}
    assert blind.statistics()["reviewers"]["dr_b"]["blinded"] == 0  # dr_b's vote now is the later, unblinded one


def test_export_manifest_carries_agreement_over_all_reviewers(store, tmp_path):
    """labels.json: each image's agreement, and kappa / alpha over every reviewed upload (not only the exported
    ones, which were chosen for agreeing)."""
    ids = _votes(store, {"u1": {"dr_a": "MEL", "dr_b": "MEL"}, "u2": {"dr_a": "NV", "dr_b": "NV"},
                         "u3": {"dr_a": "NV", "dr_b": "BCC"}})
    summary = export_dataset(store, str(tmp_path / "export"), min_agreement=1.0, min_reviewers=2)
    manifest = json.loads((tmp_path / "export" / EXPORT_MARKER).read_text())
    assert summary["count"] == 2 and {i["upload_id"] for i in manifest["images"]} == {ids["u1"], ids["u2"]}
    assert all(i["agreement"] == 1.0 and i["reviewers"] == 2 for i in manifest["images"])
    agreement = manifest["reviewer_agreement"]
    assert agreement == store.statistics() and agreement["ties"] == 1 and agreement["overall"]["units"] == 3
    # by hand: p_o = 2/3; a MEL 1 NV 2, b MEL 1 NV 1 BCC 1 -> p_e = (1 + 2) / 9 = 1/3; kappa = (2/3 - 1/3) / (2/3)
    assert agreement["pairs"][0]["cohen_kappa"] == pytest.approx(0.5)
