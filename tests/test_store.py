"""The uploads store: blobs through fsspec + one SQL row per upload, atomic, concurrent-safe (no Ray)."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from dermaid.classes import CLASS_CODES
from dermaid.errors import DermaidError
from dermaid.files import exists
from dermaid.uploads.store import UploadStore, clean_image, default_db_url, lookup_digest


def _jpeg(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


PROBS = [0.5, 0.2, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03]


def _save(store: UploadStore, seed: int = 0, **kwargs) -> str:
    args = dict(image=_jpeg(seed), model_input_png=_png(), probabilities=PROBS, model_version="m-float-abc",
                age=55.0, sex="male", site="head/neck")
    args.update(kwargs)
    return store.save(**args)


def test_absolute_url_pins_local_paths_and_keeps_urls(tmp_path, monkeypatch):
    from dermaid.files import absolute_url

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute_url("runs/toy/best/") == str(tmp_path / "runs/toy/best")
    assert absolute_url("~/data") == str(tmp_path / "home/data")
    assert absolute_url("/abs/x/") == "/abs/x"
    assert absolute_url("gs://bucket/prefix/") == "gs://bucket/prefix"
    assert absolute_url("gs://") == "gs://" and absolute_url("memory://") == "memory://"
    assert absolute_url("file:///tmp/x/") == "file:///tmp/x" and absolute_url("file:///") == "file:///"
    assert absolute_url("") == ""  # "not set" stays detectable (prepare's "no output directory")


def test_save_then_read_back(tmp_path):
    store = UploadStore(str(tmp_path / "up"))
    upload_id = _save(store)
    assert uuid.UUID(upload_id).version == 4
    row = store.get(upload_id)
    assert row["model_version"] == "m-float-abc" and row["top_class"] == "MEL"
    assert row["probabilities"] == dict(zip(CLASS_CODES, PROBS))
    assert row["malignancy_score"] == pytest.approx(0.5 + 0.1 + 0.03)
    assert 0 < row["entropy"] < np.log(8)
    assert (row["age"], row["sex"], row["site"], row["image_format"], row["consent"]) == (55.0, "male", "head/neck",
                                                                                         "JPEG", True)
    stored = store.read_blob(row["blobs"]["image"])
    assert stored == clean_image(_jpeg(0)).data and (row["width"], row["height"]) == (40, 30)
    assert row["sha256"] == hashlib.sha256(stored).hexdigest()  # of the stored photo, not of the bytes sent
    assert Image.open(io.BytesIO(store.read_blob(row["blobs"]["input"]))).size == (16, 16)
    record = json.loads(store.read_blob(row["blobs"]["record"]))
    assert record["prediction"]["top_class"] == "MEL" and record["metadata"]["site"] == "head/neck"
    assert store.count() == 1 and store.find_orphans() == []
    assert (tmp_path / "up" / "uploads.db").exists()


def test_ids_are_random_and_never_from_input(tmp_path):
    store = UploadStore(str(tmp_path / "up"))
    ids = [_save(store, seed=seed) for seed in range(3)]  # identical metadata
    assert len(set(ids)) == 3 and store.count() == 3 and all(uuid.UUID(i).version == 4 for i in ids)
    other = UploadStore(str(tmp_path / "elsewhere"))
    assert _save(other, seed=0) not in ids  # the same bytes elsewhere: another random id


def test_an_exact_duplicate_is_not_stored_again(tmp_path):
    """The same photo again (any metadata): nothing written; its sender gets neither the first upload's
    reference nor a token (save() alone names the first upload, for the server's own use)."""
    store = UploadStore(str(tmp_path / "up"))
    first = _save(store, seed=1)
    again = _save(store, seed=1, age=30.0, sex="female", site="palms/soles", probabilities=PROBS[::-1])
    assert again == first and store.count() == 1
    duplicate = store.save_with_token(image=_jpeg(1), model_input_png=_png(), probabilities=PROBS, model_version="m")
    assert (duplicate.upload_id, duplicate.lookup_token, duplicate.duplicate_of) == (None, None, first)
    assert len(list((tmp_path / "up" / "blobs").iterdir())) == 1
    assert store.get(first)["age"] == 55.0 and store.get(first)["top_class"] == "MEL"  # the first one's stay
    assert _save(store, seed=2) != first and store.count() == 2
    assert store.find_duplicate(hashlib.sha256(clean_image(_jpeg(1)).data).hexdigest()) == first
    assert store.find_duplicate(hashlib.sha256(_jpeg(1)).hexdigest()) is None  # the bytes sent leave no trace
    assert store.find_duplicate("0" * 64) is None


def test_stored_bytes_counts_every_writers_blobs_since_a_time(tmp_path):
    """The daily quota's figure: the blobs' sizes of the uploads since a time, including another writer's."""
    import datetime as dt

    url = str(tmp_path / "up")
    store, other = UploadStore(url), UploadStore(url)
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)

    def on_disk() -> int:
        return sum(f.stat().st_size for f in (tmp_path / "up" / "blobs").rglob("*") if f.is_file())

    assert store.stored_bytes(start) == 0
    _save(store, seed=1)
    assert store.stored_bytes(start) == on_disk() > len(_jpeg(1))  # photo + model input + record
    _save(other, seed=2)   # another replica's upload
    _save(other, seed=2)   # a duplicate: nothing more
    assert store.stored_bytes(start) == on_disk()
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    assert store.stored_bytes(later) == 0  # a new day starts from nothing
    next(iter((tmp_path / "up" / "blobs").glob("*/input.png"))).unlink()  # a blob removed by hand counts 0
    assert UploadStore(url).stored_bytes(start) == on_disk()


def test_without_consent_nothing_is_written(tmp_path):
    store = UploadStore(str(tmp_path / "up"))
    with pytest.raises(DermaidError, match="consent"):
        _save(store, consent=False)
    assert store.count() == 0 and not (tmp_path / "up" / "blobs").exists()


def test_failed_insert_leaves_no_row_and_no_counted_blobs(tmp_path, monkeypatch):
    store = UploadStore(str(tmp_path / "up"))
    _save(store)

    real = store._session

    class Broken:
        def __call__(self):  # reads still work (the duplicate lookup before the blobs are written)
            return real()

        def begin(self):
            raise RuntimeError("database went away")

    monkeypatch.setattr(store, "_session", Broken())
    with pytest.raises(RuntimeError, match="went away"):
        _save(store, seed=2)
    monkeypatch.undo()
    assert store.count() == 1
    assert store.find_orphans() == []  # the failed upload's blobs were removed


def test_crash_between_blobs_and_row_leaves_an_uncounted_orphan(tmp_path):
    store = UploadStore(str(tmp_path / "up"))
    _save(store)
    # A process killed after writing blobs, before the insert: blobs exist, no row.
    orphan = tmp_path / "up" / "blobs" / str(uuid.uuid4())
    orphan.mkdir(parents=True)
    (orphan / "image.jpg").write_bytes(_jpeg(3))
    assert store.count() == 1
    assert store.find_orphans() == [f"blobs/{orphan.name}"]


def test_failed_blob_write_inserts_no_row(tmp_path, monkeypatch):
    store = UploadStore(str(tmp_path / "up"))
    import dermaid.uploads.store as uploads

    calls = []

    def flaky_write(url, data):
        calls.append(url)
        if len(calls) == 2:
            raise OSError("disk full")
        return uploads.__dict__["_real_write"](url, data)

    monkeypatch.setitem(uploads.__dict__, "_real_write", uploads.write_bytes)
    monkeypatch.setattr(uploads, "write_bytes", flaky_write)
    with pytest.raises(OSError, match="disk full"):
        _save(store)
    assert store.count() == 0


def test_fifty_concurrent_writers_all_stored(tmp_path):
    store = UploadStore(str(tmp_path / "up"))
    with ThreadPoolExecutor(50) as pool:
        ids = list(pool.map(lambda i: _save(store, seed=i), range(50)))
    assert len(set(ids)) == 50 and store.count() == 50
    for upload_id in ids:
        row = store.get(upload_id)
        assert all(exists(store.url(key)) for key in row["blobs"].values())
    assert store.find_orphans() == []


def _write_many(args: tuple[str, int, int]) -> list[str]:
    url, first, n = args
    store = UploadStore(url)
    return [_save(store, seed=i) for i in range(first, first + n)]


def test_concurrent_processes_share_one_sqlite_file(tmp_path):
    url = str(tmp_path / "up")
    UploadStore(url)  # create the tables once
    with multiprocessing.get_context("fork").Pool(3) as pool:
        ids = [i for chunk in pool.map(_write_many, [(url, 10 * k, 10) for k in range(3)]) for i in chunk]
    assert len(set(ids)) == 30 and UploadStore(url).count() == 30


def test_remote_blobs_need_a_database_url(tmp_path):
    with pytest.raises(DermaidError, match="db_url"):
        default_db_url("memory://uploads")
    store = UploadStore("memory://dermaid-test-uploads", f"sqlite:///{tmp_path}/index.db")
    upload_id = _save(store)
    assert store.read_blob(store.get(upload_id)["blobs"]["image"]) == clean_image(_jpeg(0)).data


def test_bad_database_url_is_a_clear_error(tmp_path):
    with pytest.raises(DermaidError, match="db_url"):
        UploadStore(str(tmp_path / "up"), "not a url")


def test_postgres_index_with_concurrent_writers(tmp_path, postgres_url):
    store = UploadStore(str(tmp_path / "up"), postgres_url)
    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(lambda i: _save(store, seed=i), range(20)))
    assert store.count() == 20
    row = store.get(ids[0])
    assert row["probabilities"] == dict(zip(CLASS_CODES, PROBS)) and row["sex"] == "male"
    assert store.find_orphans() == []
    saved = store.save_with_token(image=_jpeg(99), model_input_png=_png(), probabilities=PROBS, model_version="m")
    assert store.holds_token(saved.upload_id, saved.lookup_token) and not store.holds_token(ids[0], saved.lookup_token)
    from dermaid.uploads.labels import LabelStore

    LabelStore(store).add(saved.upload_id, "dr_a", "MEL")
    assert store.delete(saved.upload_id).labels == 1 and store.get(saved.upload_id) is None  # FOR UPDATE, FK order


# --- issue #13: the consumer's photo: no metadata, lookup and deletion by token, retention -------------------

def _phone_jpeg() -> bytes:
    """A phone photo as sent: EXIF with GPS position, device and time, orientation 6 (turn 90 degrees clockwise
    to show), an XMP packet and a JPEG comment; the left half red, the right half blue as stored in the file."""
    from PIL import ExifTags

    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (220, 30, 30)
    pixels[:, 20:] = (30, 30, 220)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = "PhoneCo", "Pocket 7"
    exif[ExifTags.Base.DateTime] = "2026:05:04 09:10:11"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef], gps[ExifTags.GPS.GPSLatitude] = "N", (52.0, 31.0, 12.5)
    gps[ExifTags.GPS.GPSLongitudeRef], gps[ExifTags.GPS.GPSLongitude] = "E", (13.0, 24.0, 0.0)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif, comment=b"Anna's arm",
                                 xmp=b"<x:xmpmeta><rdf:Description dc:creator='Anna'/></x:xmpmeta>")
    return buf.getvalue()


def test_a_phone_photo_is_stored_without_exif_gps_or_device_and_upright(tmp_path):
    from PIL import ExifTags

    sent = _phone_jpeg()
    before = Image.open(io.BytesIO(sent))
    assert before.getexif().get_ifd(ExifTags.IFD.GPSInfo) and {"comment", "xmp"} <= set(before.info)  # the test's premise

    store = UploadStore(str(tmp_path / "up"))
    row = store.get(_save(store, image=sent))
    data = store.read_blob(row["blobs"]["image"])
    stored = Image.open(io.BytesIO(data))
    assert stored.format == "JPEG" and row["image_format"] == "JPEG" and row["blobs"]["image"].endswith(".jpg")
    assert not stored.getexif() and not stored.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    assert set(stored.info) <= {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi"}  # no exif, xmp, comment
    for secret in (b"Exif", b"PhoneCo", b"Pocket 7", b"2026:05:04", b"Anna", b"xmpmeta"):
        assert secret not in data
    # the orientation is in the pixels now: 40x30 stored turned clockwise is 30 wide, 40 high, red on top
    assert stored.size == (30, 40) and (row["width"], row["height"]) == (30, 40)
    pixels = np.asarray(stored.convert("RGB"), dtype=int)
    assert np.abs(pixels[:15].mean(axis=(0, 1)) - (220, 30, 30)).max() < 12
    assert np.abs(pixels[25:].mean(axis=(0, 1)) - (30, 30, 220)).max() < 12
    # the original bytes are kept nowhere under the store, nor their hash
    assert all(sent not in f.read_bytes() for f in (tmp_path / "up").rglob("*") if f.is_file())
    assert row["sha256"] != hashlib.sha256(sent).hexdigest()


def test_other_formats_keep_pixels_and_an_rgb_colour_profile_only(tmp_path):
    from PIL import ImageCms, PngImagePlugin

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb = np.random.default_rng(3).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    text = PngImagePlugin.PngInfo()
    text.add_text("Author", "Anna")
    exif = Image.Exif()
    exif[0x010F] = "PhoneCo"  # Make
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", pnginfo=text, icc_profile=srgb, exif=exif)
    assert {"Author", "exif"} <= set(Image.open(io.BytesIO(buf.getvalue())).info)  # the test's premise
    png = clean_image(buf.getvalue())
    back = Image.open(io.BytesIO(png.data))
    assert png.format == "PNG" and set(back.info) == {"icc_profile"} and back.info["icc_profile"] == srgb
    assert np.array_equal(np.asarray(back), rgb)  # lossless
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "TIFF")
    assert clean_image(buf.getvalue()).format == "PNG"
    grey = io.BytesIO()
    Image.fromarray(rgb[..., 0]).save(grey, "JPEG", icc_profile=ImageCms.ImageCmsProfile(
        ImageCms.createProfile("LAB")).tobytes())  # a profile for another colour space than the stored RGB
    assert "icc_profile" not in Image.open(io.BytesIO(clean_image(grey.getvalue()).data)).info
    with pytest.raises(DermaidError):
        clean_image(b"not an image")


def test_the_lookup_token_is_checked_against_its_digest_only(tmp_path):
    store = UploadStore(str(tmp_path / "up"))
    saved = store.save_with_token(image=_jpeg(5), model_input_png=_png(), probabilities=PROBS, model_version="m")
    other = store.save_with_token(image=_jpeg(6), model_input_png=_png(), probabilities=PROBS, model_version="m")
    assert len(saved.lookup_token) >= 43 and saved.lookup_token != other.lookup_token
    assert store.holds_token(saved.upload_id, saved.lookup_token)
    assert store.holds_token(saved.upload_id.replace("-", ""), saved.lookup_token)  # the same id without dashes
    for ref, token in [(saved.upload_id, other.lookup_token), (other.upload_id, saved.lookup_token),
                       (saved.upload_id, None), (saved.upload_id, ""), (saved.upload_id, saved.lookup_token[:-1]),
                       (str(uuid.uuid4()), saved.lookup_token), ("../uploads.db", saved.lookup_token),
                       (None, saved.lookup_token), (saved.upload_id, "x" * 100_000)]:
        assert not store.holds_token(ref, token), (ref, token)
    with store.engine.connect() as connection:  # only the digest is stored
        import sqlalchemy as sa

        digest = connection.execute(sa.text("SELECT lookup_digest FROM uploads WHERE id = :id"),
                                    {"id": saved.upload_id}).scalar()
    assert digest == lookup_digest(saved.lookup_token) == hashlib.sha256(saved.lookup_token.encode()).hexdigest()
    on_disk = b"".join(f.read_bytes() for f in (tmp_path / "up").rglob("*") if f.is_file())
    assert saved.lookup_token.encode() not in on_disk


def test_delete_removes_blobs_labels_and_row_and_reports_an_export(tmp_path):
    from dermaid.uploads.export import export_dataset
    from dermaid.uploads.labels import LabelStore
    from dermaid.uploads.validation import UnknownUpload

    store = UploadStore(str(tmp_path / "up"))
    labels = LabelStore(store)
    kept, exported, fresh = (_save(store, seed=seed) for seed in (10, 11, 12))
    for upload_id, code in ((kept, "NV"), (exported, "MEL")):
        labels.add(upload_id, "dr_a", code)
    assert export_dataset(labels, str(tmp_path / "export-1"), min_agreement=1.0)["count"] == 2
    assert store.get(exported)["exported"] is not None and store.get(fresh)["exported"] is None

    blob_dir = tmp_path / "up" / "blobs" / exported
    assert blob_dir.is_dir()
    deleted = store.delete(exported)
    assert (deleted.upload_id, deleted.labels) == (exported, 1) and deleted.exported is not None
    assert store.get(exported) is None and not blob_dir.exists()
    with pytest.raises(UnknownUpload):
        labels.history(exported)
    assert [h["code"] for h in labels.history(kept)] == ["NV"]  # other uploads untouched
    assert store.delete(exported) is None  # gone: nothing more to delete

    summary = export_dataset(labels, str(tmp_path / "export-2"), min_agreement=1.0)  # the next export leaves it out
    ids = {image["upload_id"] for image in json.loads((tmp_path / "export-2" / "labels.json").read_text())["images"]}
    assert summary["count"] == 1 and ids == {kept}
    fresh_deleted = store.delete(fresh)
    assert (fresh_deleted.labels, fresh_deleted.exported) == (0, None) and store.count() == 1


def test_a_failed_blob_removal_deletes_nothing(tmp_path, monkeypatch):
    store = UploadStore(str(tmp_path / "up"))
    upload_id = _save(store)

    def refuse(blobs):
        raise PermissionError("read-only bucket")

    monkeypatch.setattr(store, "_remove_blobs", refuse)
    with pytest.raises(PermissionError):
        store.delete(upload_id)
    assert store.get(upload_id) is not None  # the row is back: the transaction rolled back


def _age(store: UploadStore, upload_id: str, days: float) -> None:
    """Date an upload `days` in the past (as if stored then)."""
    import datetime as dt

    import sqlalchemy as sa

    with store.engine.begin() as connection:
        connection.execute(sa.text("UPDATE uploads SET created = :created WHERE id = :id"),
                           {"created": dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days), "id": upload_id})


def test_purge_removes_unreviewed_uploads_older_than_the_retention(tmp_path):
    from dermaid.uploads.labels import LabelStore
    from dermaid.uploads.purge import purge

    store = UploadStore(str(tmp_path / "up"))
    old, old_reviewed, recent = (_save(store, seed=seed) for seed in (20, 21, 22))
    _age(store, old, 40)
    _age(store, old_reviewed, 40)
    _age(store, recent, 5)
    LabelStore(store).add(old_reviewed, "dr_a", "BKL")
    assert purge(store, 30, dry_run=True) == [old] and store.count() == 3
    assert purge(store, 30) == [old]
    assert store.get(old) is None and not (tmp_path / "up" / "blobs" / old).exists()
    assert store.get(old_reviewed) is not None and store.get(recent) is not None
    assert purge(store, 30) == [] and purge(store, 1) == [recent] and store.count() == 1
    with pytest.raises(DermaidError, match="retention_days is not set"):
        purge(store, None)
    with pytest.raises(DermaidError, match="more than 0"):
        purge(store, 0)


def test_uploads_purge_command(tmp_path, dermaid_cli):
    storage = tmp_path / "up"
    store = UploadStore(str(storage))
    old, recent = _save(store, seed=30), _save(store, seed=31)
    _age(store, old, 10)
    store.engine.dispose()
    args = ("uploads", "purge", f"storage.url={storage}")
    unset = dermaid_cli(*args, cwd=tmp_path)
    assert unset.returncode == 2 and "retention_days is not set" in unset.stderr
    dry = dermaid_cli(*args, "storage.retention_days=7", "dry_run=true", cwd=tmp_path)
    assert dry.returncode == 0 and f"would remove {old}" in dry.stdout and UploadStore(str(storage)).count() == 2
    done = dermaid_cli(*args, "storage.retention_days=7", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"removed {old}" in done.stdout and "removed 1 unreviewed upload(s) older than 7 day(s)" in done.stdout
    assert UploadStore(str(storage)).get(recent) is not None and UploadStore(str(storage)).count() == 1
    nowhere = dermaid_cli("uploads", "purge", f"storage.url={tmp_path / 'nowhere'}", "storage.retention_days=7",
                          cwd=tmp_path)
    assert nowhere.returncode == 2 and "no uploads database" in nowhere.stderr
    assert not (tmp_path / "nowhere").exists()
    assert "action= is required" in dermaid_cli("uploads", cwd=tmp_path).stderr


def test_the_consumers_view_of_each_state(tmp_path):
    """upload_state: waiting (with the purge date when a retention is set), a tie waits for another opinion,
    reviewed names the diagnosis in words, NONE is not reviewable; always the disclaimer."""
    from dermaid.classes import BY_CODE, DISCLAIMER, NOT_A_LESION
    from dermaid.uploads.consumer import upload_state
    from dermaid.uploads.labels import LabelStore

    store = UploadStore(str(tmp_path / "up"))
    labels = LabelStore(store)
    upload_id = _save(store, seed=40)
    _age(store, upload_id, 2)
    waiting = upload_state(store, upload_id, retention_days=30)
    assert waiting["state"] == "waiting_for_review" and waiting["disclaimer"] == DISCLAIMER
    import datetime as dt

    days_left = dt.datetime.fromisoformat(waiting["delete_after"]) - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=27.9) < days_left < dt.timedelta(days=28.1) and "deleted" in waiting["message"]
    assert upload_state(store, upload_id)["delete_after"] is None
    labels.add(upload_id, "dr_a", "BCC")
    reviewed = upload_state(store, upload_id, retention_days=30)
    assert reviewed["state"] == "reviewed" and reviewed["class"]["name"] == BY_CODE["BCC"].name
    assert "not a diagnosis" in reviewed["message"] and "delete_after" not in reviewed
    labels.add(upload_id, "dr_b", "SCC")
    tie = upload_state(store, upload_id)
    assert (tie["state"], tie["reason"], tie["reviewers"]) == ("waiting_for_review", "tie", 2)
    labels.add(upload_id, "dr_c", NOT_A_LESION)
    labels.add(upload_id, "dr_b", NOT_A_LESION)  # dr_b changes their mind: NONE 2 of 3
    unusable = upload_state(store, upload_id)
    assert (unusable["state"], unusable["reason"]) == ("not_reviewable", "not_a_lesion")
    store.delete(upload_id)
    assert upload_state(store, upload_id) is None
