"""Readers of the ISIC 2019 and HAM10000 layouts (with their real quirks), the ISIC 2019 writer, the toy generator."""

from __future__ import annotations

import io
import json
import math

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermaid.classes import CLASS_CODES, SITES
from dermaid.data.isic import (
    RECORD_COLUMNS, IsicRow, read_ham10000, read_isic2019, read_records, write_isic2019,
)
from dermaid.data.synth import class_counts, generate
from dermaid.errors import DermaidError

GT_HEADER = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"
META_HEADER = "image,age_approx,anatom_site_general,lesion_id,sex"


def _jpeg(colour=(120, 80, 60), size=(12, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _one_hot(code: str) -> str:
    return ",".join("1.0" if c == code else "0.0" for c in (*CLASS_CODES, "UNK"))


def _write_isic(fs_root: str, gt_rows: list[str], meta_rows: list[str], images: list[str], fs=None) -> None:
    fs = fs or fsspec.filesystem("file")
    fs.makedirs(f"{fs_root}/ISIC_2019_Training_Input", exist_ok=True)
    for name in images:
        fs.pipe(f"{fs_root}/ISIC_2019_Training_Input/{name}.jpg", _jpeg())
    fs.pipe(f"{fs_root}/ISIC_2019_Training_Input/ATTRIBUTION.txt", b"attribution")
    fs.pipe(f"{fs_root}/ISIC_2019_Training_Input/LICENSE.txt", b"license")
    fs.pipe(f"{fs_root}/ISIC_2019_Training_GroundTruth.csv", "\n".join([GT_HEADER, *gt_rows, ""]).encode())
    fs.pipe(f"{fs_root}/ISIC_2019_Training_Metadata.csv", "\n".join([META_HEADER, *meta_rows, ""]).encode())


ISIC_GT = [
    f"ISIC_0000000,{_one_hot('NV')}",
    f"ISIC_0000001_downsampled,{_one_hot('MEL')}",
    f"ISIC_0000002,{_one_hot('BCC')}",
    f"ISIC_0000003,{_one_hot('SCC')}",
]
ISIC_META = [
    "ISIC_0000000,55.0,anterior torso,IL_0000001,female",
    "ISIC_0000001_downsampled,,lateral torso,,male",      # empty age and lesion id
    "ISIC_0000002,70.0,,IL_0000001,",                     # empty site and sex
]  # ISIC_0000003 has no metadata row at all
ISIC_IMAGES = ["ISIC_0000000", "ISIC_0000001_downsampled", "ISIC_0000002", "ISIC_0000003"]


@pytest.fixture
def isic_root(tmp_path):
    root = tmp_path / "isic"
    _write_isic(str(root), ISIC_GT, ISIC_META, ISIC_IMAGES + ["ISIC_0009999"])  # one unlisted image
    return root


def test_isic2019_reader(isic_root):
    records = read_records(str(isic_root), "isic2019")
    assert list(records.columns) == list(RECORD_COLUMNS)
    assert records["image_id"].tolist() == ISIC_IMAGES
    assert records["label"].tolist() == ["NV", "MEL", "BCC", "SCC"]
    assert records["source"].unique().tolist() == ["isic2019"]
    assert records["age"].tolist()[0] == 55.0 and math.isnan(records["age"][1]) and math.isnan(records["age"][3])
    assert records["sex"].tolist() == ["female", "male", None, None]
    assert records["site"].tolist() == ["anterior torso", "lateral torso", None, None]
    assert records["lesion_id"].tolist() == ["IL_0000001", None, "IL_0000001", None]
    assert records["image_url"][1].endswith("ISIC_2019_Training_Input/ISIC_0000001_downsampled.jpg")
    assert records.attrs["unlisted"] == ["ISIC_0009999"]  # reported, not used
    with open(records["image_url"][0], "rb") as f:
        assert f.read(2) == b"\xff\xd8"


@pytest.mark.parametrize("gt_rows, meta_rows, images, match", [
    ([f"ISIC_0000000,{_one_hot('NV')}", "ISIC_0000001,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0"], [], None,
     r"GroundTruth.csv.*not one-hot.*line 3 \(ISIC_0000001\)"),
    ([f"ISIC_0000000,{_one_hot('NV')}", "ISIC_0000001,0.5,0.5,0.0,0.0,0.0,0.0,0.0,0.0,0.0"], [], None,
     r"not one-hot.*ISIC_0000001"),
    ([f"ISIC_0000000,{_one_hot('UNK')}", f"ISIC_0000001,{_one_hot('NV')}"], [], None,
     r"UNK.*line 2 \(ISIC_0000000\)"),
    ([f"ISIC_0000000,{_one_hot('NV')}", f"ISIC_0000001,{_one_hot('NV')}", f"ISIC_0000002,{_one_hot('NV')}"], [],
     ["ISIC_0000000"], r"GroundTruth.csv: 2 listed image\(s\) not found.*ISIC_0000001.*ISIC_0000002"),
    ([f"ISIC_0000000,{_one_hot('NV')}", f"ISIC_0000001,{_one_hot('NV')}"], ["ISIC_0000077,40,,,"], None,
     r"Metadata.csv: metadata for 1 image\(s\) not in .*ISIC_0000077"),
    ([f"ISIC_0000000,{_one_hot('NV')}", f"ISIC_0000001,{_one_hot('NV')}"], ["ISIC_0000001,40,,,robot"], None,
     r"Metadata.csv: sex .*line 2 \('robot'\)"),
    ([f"ISIC_0000000,{_one_hot('NV')}", f"ISIC_0000001,{_one_hot('NV')}"], ["ISIC_0000001,old,,,"], None,
     r"Metadata.csv: age .*'old'"),
    ([f"ISIC_0000000,{_one_hot('NV')}", f"ISIC_0000001,{_one_hot('NV')}"], ["ISIC_0000001,40,elbow,,"], None,
     r"Metadata.csv: anatomical site.*'elbow'"),
    ([f"ISIC_0000000,{_one_hot('NV')}", f"ISIC_0000000,{_one_hot('NV')}"], [], None, r"duplicate image.*line 3"),
])
def test_isic2019_errors_name_file_and_rows(tmp_path, gt_rows, meta_rows, images, match):
    root = tmp_path / "bad"
    _write_isic(str(root), gt_rows, meta_rows, images if images is not None else ["ISIC_0000000", "ISIC_0000001"])
    with pytest.raises(DermaidError, match=match):
        read_isic2019(str(root))


def test_isic2019_unknown_class_column_missing_csv_and_empty_folder(tmp_path):
    root = tmp_path / "cols"
    _write_isic(str(root), [], [], ["ISIC_0000000"])
    (root / "ISIC_2019_Training_GroundTruth.csv").write_text("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,XYZ\n")
    with pytest.raises(DermaidError, match=r"GroundTruth.csv: unknown class column.*XYZ"):
        read_isic2019(str(root))

    root = tmp_path / "nocsv"
    _write_isic(str(root), [f"ISIC_0000000,{_one_hot('NV')}"], [], ["ISIC_0000000"])
    (root / "ISIC_2019_Training_Metadata.csv").unlink()
    with pytest.raises(DermaidError, match=r"ISIC_2019_Training_Metadata.csv: file not found"):
        read_isic2019(str(root))

    root = tmp_path / "empty"
    _write_isic(str(root), [f"ISIC_0000000,{_one_hot('NV')}"], [], [])
    with pytest.raises(DermaidError, match=r"no images"):
        read_isic2019(str(root))

    with pytest.raises(DermaidError, match=r"nowhere.*file not found"):
        read_records(str(tmp_path / "nowhere"))
    with pytest.raises(DermaidError, match="unknown dataset layout"):
        read_records(str(root), layout="isic2077")


def test_isic2019_reader_on_memory_url():
    fs = fsspec.filesystem("memory")
    _write_isic("/reader-test/isic", ISIC_GT, ISIC_META, ISIC_IMAGES, fs=fs)
    try:
        records = read_isic2019("memory://reader-test/isic")
        assert records["label"].tolist() == ["NV", "MEL", "BCC", "SCC"]
        assert records["image_url"][0] == "memory://reader-test/isic/ISIC_2019_Training_Input/ISIC_0000000.jpg"
        with fsspec.open(records["image_url"][0], "rb") as f:
            assert f.read(2) == b"\xff\xd8"
    finally:
        fs.rm("/reader-test", recursive=True)


def test_isic2019_writer_round_trips_through_the_reader():
    fs = fsspec.filesystem("memory")
    rows = [IsicRow("W_1", "MEL", "55.0", "head/neck", "L_1", "female"),
            IsicRow("W_2", "NV", None, None, None, None)]
    try:
        write_isic2019("memory://writer-test/isic", rows, lambda i: (_jpeg(size=(12 + i, 9)), "jpg"), workers=2)
        assert fs.cat("/writer-test/isic/ISIC_2019_Training_Metadata.csv").decode().splitlines() == [
            META_HEADER, "W_1,55.0,head/neck,L_1,female", "W_2,,,,"]
        assert fs.cat("/writer-test/isic/ISIC_2019_Training_GroundTruth.csv").decode().splitlines() == [
            GT_HEADER, f"W_1,{_one_hot('MEL')}", f"W_2,{_one_hot('NV')}"]
        records = read_isic2019("memory://writer-test/isic")
        assert records["label"].tolist() == ["MEL", "NV"] and records["age"][0] == 55.0
        assert records["sex"].tolist() == ["female", None] and records["lesion_id"].tolist() == ["L_1", None]
        with fsspec.open(records["image_url"][1], "rb") as f:
            assert Image.open(f).size == (13, 9)
    finally:
        fs.rm("/writer-test", recursive=True)


HAM_ROWS = [
    "HAM_0000118,ISIC_0027419,bkl,histo,80.0,male,scalp,vidir_modern",
    "HAM_0000118,ISIC_0025030,bkl,histo,80.0,male,scalp,vidir_modern",
    "HAM_0002730,ISIC_0026769,akiec,histo,,unknown,unknown,rosendahl",
    "HAM_0001466,ISIC_0031633,nv,follow_up,45.0,female,back,vienna_dias",
    "HAM_0007418,ISIC_0033084,vasc,consensus,35.0,female,acral,vidir_molemax",
]


def _write_ham(root, rows, header="lesion_id,image_id,dx,dx_type,age,sex,localization,dataset", images=None):
    (root / "HAM10000_images_part_1").mkdir(parents=True)
    (root / "HAM10000_images_part_2").mkdir()
    ids = images if images is not None else [r.split(",")[1] for r in rows]
    for i, image_id in enumerate(ids):
        part = "HAM10000_images_part_1" if i % 2 == 0 else "HAM10000_images_part_2"
        (root / part / f"{image_id}.jpg").write_bytes(_jpeg())
    (root / "HAM10000_metadata.csv").write_text("\n".join([header, *rows, ""]))


def test_ham10000_reader(tmp_path):
    _write_ham(tmp_path / "ham", HAM_ROWS)
    records = read_ham10000(str(tmp_path / "ham"))
    assert list(records.columns) == list(RECORD_COLUMNS)
    assert records["label"].tolist() == ["BKL", "BKL", "AK", "NV", "VASC"]
    assert records["lesion_id"].tolist()[:2] == ["HAM_0000118", "HAM_0000118"]
    assert math.isnan(records["age"][2]) and records["sex"][2] is None and records["site"][2] is None
    assert records["site"].tolist()[0] == "head/neck" and records["site"][3] == "posterior torso"
    assert records["site"][4] == "palms/soles"
    assert {u.split("/")[-2] for u in records["image_url"]} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert (records["source"] == "ham10000").all()

    # the variant without the trailing dataset column reads the same
    rows = [",".join(r.split(",")[:7]) for r in HAM_ROWS]
    _write_ham(tmp_path / "ham7", rows, header="lesion_id,image_id,dx,dx_type,age,sex,localization")
    same = read_records(str(tmp_path / "ham7"), layout="ham10000")
    pd.testing.assert_frame_equal(records.drop(columns="image_url"), same.drop(columns="image_url"))


def test_ham10000_errors(tmp_path):
    _write_ham(tmp_path / "dx", HAM_ROWS + ["HAM_1,ISIC_1,psoriasis,histo,50,male,back,x"])
    with pytest.raises(DermaidError, match=r"HAM10000_metadata.csv: unknown dx.*line 7 \(ISIC_1 dx='psoriasis'\)"):
        read_ham10000(str(tmp_path / "dx"))
    _write_ham(tmp_path / "missing", HAM_ROWS, images=[r.split(",")[1] for r in HAM_ROWS[:3]])
    with pytest.raises(DermaidError, match=r"2 listed image\(s\) not found.*ISIC_0031633"):
        read_ham10000(str(tmp_path / "missing"))


def test_synth_layout_counts_and_determinism(tmp_path):
    counts = class_counts(600)
    assert sum(counts.values()) == 600 and min(counts.values()) >= 0.04 * 600
    assert counts["NV"] == max(counts.values()) and counts["MEL"] > counts["BCC"] > counts["BKL"] > counts["AK"]

    a, b = tmp_path / "a", tmp_path / "b"
    summary = generate(str(a), n=20, seed=1)
    generate(str(b), n=20, seed=1)
    assert summary["counts"] == class_counts(20)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # deterministic for a seed
    assert (a / "ISIC_2019_Training_Input" / "ATTRIBUTION.txt").read_text().count("NOT real") == 1
    assert (a / "ISIC_2019_Training_Input" / "LICENSE.txt").exists()
    assert generate(str(a), n=20, seed=1)["reused"]  # same settings: re-used
    with pytest.raises(DermaidError, match="overwrite"):
        generate(str(a), n=21, seed=1)
    generate(str(tmp_path / "c"), n=20, seed=2)
    assert (tmp_path / "c" / "ISIC_2019_Training_GroundTruth.csv").read_text() != \
        (a / "ISIC_2019_Training_GroundTruth.csv").read_text()
    assert json.loads((a / "synth.json").read_text())["n"] == 20


def test_synth_toy_raw_reads_back(toy_raw):
    records = read_isic2019(toy_raw)
    assert len(records) == 240 and set(records["label"]) == set(CLASS_CODES)
    assert records["lesion_id"].value_counts().max() >= 2  # several images per lesion
    assert records["lesion_id"].isna().any() and records["age"].isna().any() and records["site"].isna().any()
    assert set(records["site"].dropna()) <= set(SITES)
    assert records["image_id"].str.endswith("_downsampled").any()
    assert records.groupby("lesion_id")["label"].nunique().max() == 1
    sizes = [Image.open(u).size for u in records["image_url"][:60]]
    assert min(min(s) for s in sizes) >= 450 and max(max(s) for s in sizes) > 1024
    # metadata carries signal: melanoma patients are older than nevus patients
    age = records.groupby("label")["age"].mean()
    assert age["MEL"] > age["NV"] + 10 and age["SCC"] > age["NV"] + 10
    assert np.isfinite(age).all()


def test_synth_cli(tmp_path, dermaid_cli):
    out = tmp_path / "toy"
    proc = dermaid_cli("synth", f"out={out}", "n=16", "seed=2", f"paths.root={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not real lesions" in proc.stdout
    assert len(read_isic2019(str(out))) == 16
    again = dermaid_cli("synth", f"out={out}", "n=17", "seed=2", f"paths.root={tmp_path}", cwd=tmp_path)
    assert again.returncode == 2 and "error:" in again.stderr and "overwrite" in again.stderr
