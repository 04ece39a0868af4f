"""prepare: shards + manifest, deterministic versions, tags, cache, errors, ensure_prepared.

Every test prepares in this process (in_process=True, the same code per shard); one integration test
prepares on the session's Ray and checks Ray tasks give the very same version."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dermaid.classes import CLASS_CODES
from dermaid.config import compose, to_plain
from dermaid.data import prepare as prepare_mod
from dermaid.data.loading import list_versions, load_records, read_manifest, resolve_version
from dermaid.data.prepare import ensure_prepared, prepare_dataset
from dermaid.data.synth import generate
from dermaid.errors import DermaidError

REPO = Path(__file__).resolve().parent.parent


def _data_cfg(root, out, **overrides) -> dict:
    args = [f"data.root={root}", f"data.prepared_dir={out}", "data.image_size=64"]
    args += [f"data.{k}={v}" for k, v in overrides.items()]
    return to_plain(compose("prepare", args).data)


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "raw"
    generate(str(root), n=24, seed=3)
    return root


def _prepare(data_cfg: dict, out, **kwargs) -> dict:
    """prepare_dataset in this process (no Ray)."""
    return prepare_dataset(data_cfg, out=str(out), in_process=True, **kwargs)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_toy_prepared_version(toy_prepared):
    manifest = read_manifest(toy_prepared)
    assert manifest["num_records"] == 240
    assert len(manifest["version"]) == 16 and toy_prepared.endswith(manifest["version"])
    assert manifest["settings"]["image_size"] == 96
    assert sum(manifest["counts"]["class"].values()) == 240
    assert set(manifest["counts"]["class"]) == set(CLASS_CODES)
    assert set(manifest["counts"]["fold"]) == {"-1", "0", "1", "2", "3", "4"}
    assert "toy" in manifest["tags"]

    frame = load_records(toy_prepared, split="all")
    assert len(frame) == 240 and frame["image_id"].is_unique
    assert (frame[["width", "height"]].min(axis=1) == 96).all()  # shorter side resized, aspect kept
    assert (frame["width"] >= frame["height"]).all()
    img = Image.open(io.BytesIO(frame["image"].iloc[0]))
    assert img.format == "JPEG" and img.size == (frame["width"].iloc[0], frame["height"].iloc[0])
    assert frame["age"].isna().any() or frame["site"].isna().any()  # missing metadata stays missing
    assert ((frame["label_idx"] >= 0) & (frame["label"].map(CLASS_CODES.index) == frame["label_idx"])).all()

    train = load_records(toy_prepared, split="train", fold=1, with_images=False)
    val = load_records(toy_prepared, split="val", fold=1, with_images=False)
    test = load_records(toy_prepared, split="test", with_images=False)
    assert "image" not in train.columns
    assert len(train) + len(val) + len(test) == 240
    assert set(val["fold"]) == {1} and set(test["fold"]) == {-1} and not ({1, -1} & set(train["fold"]))
    lesions = lambda f: set(f["lesion_id"].dropna())  # noqa: E731
    assert not lesions(train) & lesions(val) and not lesions(train) & lesions(test)
    with pytest.raises(DermaidError, match="fold 7"):
        load_records(toy_prepared, split="val", fold=7)


def test_resolve_version_by_hash_tag_latest(toy_prepared):
    prepared_dir, version = toy_prepared.rsplit("/", 1)
    assert resolve_version(prepared_dir, version) == toy_prepared
    assert resolve_version(prepared_dir, "toy") == toy_prepared
    assert resolve_version(prepared_dir, "latest") == toy_prepared
    with pytest.raises(DermaidError, match="nope"):
        resolve_version(prepared_dir, "nope")
    with pytest.raises(DermaidError, match="manifest"):
        resolve_version(prepared_dir, "0123456789abcdef")


def test_prepare_is_deterministic_and_cached(toy_raw, toy_prepared, tmp_path, monkeypatch):
    version = read_manifest(toy_prepared)["version"]
    out = tmp_path / "again"
    again = _prepare(_data_cfg(toy_raw, out, image_size=96), out, use_cache=False)
    assert again["version"] == version  # same input, same settings -> same version
    a = load_records(toy_prepared).drop(columns=["image"])
    b = load_records(str(out / version)).drop(columns=["image"])
    pd.testing.assert_frame_equal(a, b)

    # an unchanged root is recognised from its listing: nothing is decoded again
    monkeypatch.setattr(prepare_mod, "_run_shards", lambda *a, **k: pytest.fail("decoded again"))
    cached = _prepare(_data_cfg(toy_raw, out, image_size=96), out, tag="again")
    assert cached["version"] == version and cached["tags"] == ["again"]
    assert resolve_version(str(out), "again").endswith(version)
    # a different setting is a different version
    monkeypatch.undo()
    other = _prepare(_data_cfg(toy_raw, out, image_size=96, seed=1), out)
    assert other["version"] != version
    assert {m["version"] for m in list_versions(str(out))} == {version, other["version"]}


def test_prepare_on_ray_gives_the_in_process_version(toy_raw, toy_prepared, ray_session, tmp_path):
    version = read_manifest(toy_prepared)["version"]
    out = tmp_path / "on_ray"
    on_ray = prepare_dataset(_data_cfg(toy_raw, out, image_size=96), out=str(out), use_cache=False, shard_size=64)
    assert on_ray["version"] == version and len(on_ray["shards"]) >= 4  # several Ray tasks, one version
    a = load_records(toy_prepared).drop(columns=["image"])
    b = load_records(str(out / version)).drop(columns=["image"])
    pd.testing.assert_frame_equal(a, b)


def test_changed_image_or_label_gives_new_version(small_raw, tmp_path):
    out = tmp_path / "prepared"
    base = _prepare(_data_cfg(small_raw, out), out)["version"]

    changed_image = _copy(small_raw, tmp_path / "img")
    first = sorted((changed_image / "ISIC_2019_Training_Input").glob("*.jpg"))[0]
    Image.new("RGB", (500, 450), (200, 30, 30)).save(first, quality=90)
    v_image = _prepare(_data_cfg(changed_image, out), out)["version"]

    changed_label = _copy(small_raw, tmp_path / "label")
    gt = changed_label / "ISIC_2019_Training_GroundTruth.csv"
    table = pd.read_csv(gt, dtype=str)
    row = table.iloc[0]
    old, new = ("MEL", "NV") if row["MEL"] == "1.0" else (next(c for c in CLASS_CODES if row[c] == "1.0"), "MEL")
    table.loc[0, old], table.loc[0, new] = "0.0", "1.0"
    table.to_csv(gt, index=False)
    v_label = _prepare(_data_cfg(changed_label, out), out)["version"]

    assert len({base, v_image, v_label}) == 3
    assert {m["version"] for m in list_versions(str(out))} == {base, v_image, v_label}


def test_corrupt_image_is_a_clear_error_and_writes_nothing(small_raw, tmp_path):
    raw = _copy(small_raw, tmp_path / "raw")
    victim = sorted((raw / "ISIC_2019_Training_Input").glob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:400])  # truncated JPEG
    out = tmp_path / "prepared"
    with pytest.raises(DermaidError, match=victim.name):
        _prepare(_data_cfg(raw, out), out)
    assert list_versions(str(out)) == []
    assert [p.name for p in out.iterdir()] == []  # no temporary leftovers, nothing that looks like a version


def test_prepare_cli_corrupt_image_exit_2(small_raw, tmp_path, dermaid_cli):
    import fsspec

    root, out = "memory://prep-cli/raw", "memory://prep-cli/prepared"  # memory:// is prepared in this process
    memory = fsspec.filesystem("memory")
    memory.put(str(small_raw), "/prep-cli/raw", recursive=True)
    victim = sorted(p for p in memory.find("/prep-cli/raw/ISIC_2019_Training_Input") if p.endswith(".jpg"))[5]
    memory.pipe_file(victim, b"\xff\xd8\xff\xe0 this is not really a jpeg")
    try:
        result = dermaid_cli("prepare", f"data.root={root}", f"out={out}", f"paths.root={tmp_path}", cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "error:" in result.stderr and victim.rsplit("/", 1)[-1] in result.stderr
        assert "Traceback" not in result.stderr
        assert not list_versions(out)
    finally:
        memory.rm("/prep-cli", recursive=True)


def test_ensure_prepared(toy_raw, toy_prepared, tmp_path):
    prepared_dir, version = toy_prepared.rsplit("/", 1)
    cfg = _data_cfg(toy_raw, prepared_dir, image_size=96)
    assert ensure_prepared(cfg) == toy_prepared  # cheap: the raw listing is cached
    assert ensure_prepared({**cfg, "root": None, "version": "toy"}) == toy_prepared
    assert ensure_prepared({**cfg, "root": None, "version": version}) == toy_prepared
    with pytest.raises(DermaidError, match="data.root"):
        ensure_prepared({**cfg, "root": None})


def test_prepare_memory_url_in_process(tmp_path):
    import fsspec

    root, out = "memory://prep-test/raw", "memory://prep-test/prepared"
    generate(root, n=16, seed=5)
    manifest = prepare_dataset(_data_cfg(root, out), out=out, tag="mem")
    url = resolve_version(out, "mem")
    assert url == f"{out}/{manifest['version']}"
    assert len(load_records(url)) == 16
    fsspec.filesystem("memory").rm("/prep-test", recursive=True)


def test_extra_roots_are_merged_with_source(small_raw, tmp_path):
    other = tmp_path / "uploads"
    generate(str(other), n=12, seed=9)
    # rename the ids so the two roots do not share image ids
    for name in ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"):
        path = other / name
        path.write_text(path.read_text().replace("ISIC_", "UPL_"))
    for image in (other / "ISIC_2019_Training_Input").glob("ISIC_*.jpg"):
        image.rename(image.with_name(image.name.replace("ISIC_", "UPL_")))
    out = tmp_path / "prepared"
    cfg = _data_cfg(small_raw, out)
    cfg["extra"] = [str(other)]
    manifest = _prepare(cfg, out)
    frame = load_records(str(out / manifest["version"]), with_images=False)
    assert frame["source"].value_counts().to_dict() == {"isic2019": 24, "uploads": 12}
    assert manifest["source"]["extra"][0]["source"] == "uploads"

    cfg["extra"] = [str(small_raw)]  # the same images twice would leak between folds
    with pytest.raises(DermaidError, match="more than one source"):
        _prepare({**cfg, "source": "a", "extra": [{"root": str(small_raw), "source": "b"}]}, out)
