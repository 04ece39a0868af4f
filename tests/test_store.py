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
from dermaid.uploads.store import UploadStore, default_db_url


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
                age=55.0, sex="male", site="head/neck", width=40, height=30)
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
    assert store.read_blob(row["blobs"]["image"]) == _jpeg(0)
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
    """The same bytes again (any metadata): the first upload's id, nothing written; other bytes are stored."""
    store = UploadStore(str(tmp_path / "up"))
    first = _save(store, seed=1)
    again = _save(store, seed=1, age=30.0, sex="female", site="palms/soles", probabilities=PROBS[::-1])
    assert again == first and store.count() == 1
    assert len(list((tmp_path / "up" / "blobs").iterdir())) == 1
    assert store.get(first)["age"] == 55.0 and store.get(first)["top_class"] == "MEL"  # the first one's stay
    assert _save(store, seed=2) != first and store.count() == 2
    assert store.find_duplicate(hashlib.sha256(_jpeg(1)).hexdigest()) == first
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
    assert store.read_blob(store.get(upload_id)["blobs"]["image"]) == _jpeg(0)


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
