"""Monitoring without Ray: image statistics, the prediction log's batches and bounds, drift on generated frames,
the reference profile, the simulated shifts and the metric table's exported names."""

from __future__ import annotations

import datetime as _dt
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from dermaid.monitoring.drift import alert_list, drift_table
from dermaid.monitoring.features import FEATURES, image_statistics, prediction_row
from dermaid.monitoring.log import PredictionLog, purge_partitions, read_log


def _row(i: int = 0, when: _dt.datetime | None = None, **changes) -> dict:
    probs = np.full(8, 0.05)
    probs[i % 8] = 0.65
    row = prediction_row(probabilities=probs, ood_score=1.0, abstain=False, malignancy_score=0.3, triage="low",
                         model_version="v1", route="/v1/classify", width=600, height=450, image_format="JPEG",
                         stats={"brightness_mean": 0.5}, age=53, sex="male", site=None, consent=False, time=when)
    return {**row, **changes}


def test_image_statistics_see_brightness_colour_cast_and_blur():
    from dermaid.data.synth import lesion_image

    img = lesion_image("NV", 1, 2, (224, 224))
    base = image_statistics(img)
    assert base["brightness_mean"] < image_statistics(ImageEnhance.Brightness(img).enhance(1.4))["brightness_mean"]
    cast = Image.fromarray(np.clip(np.asarray(img, dtype=float) * [0.8, 1.0, 1.25], 0, 255).astype(np.uint8))
    assert abs(image_statistics(cast)["hue_mean"] - base["hue_mean"]) > 8
    assert image_statistics(cast)["saturation_mean"] < 0.8 * base["saturation_mean"]
    blurred = img.resize((32, 32)).resize((224, 224))
    assert image_statistics(blurred)["sharpness"] < 0.3 * base["sharpness"]


def test_a_row_holds_no_image_and_a_coarse_age():
    row = _row()
    assert row["age"] == 55.0 and row["top_class"] == "MEL" and 0 < row["entropy"] < 1
    assert not any(isinstance(value, (bytes, bytearray)) for value in row.values())


def test_the_log_writes_batches_by_day_and_reads_a_window(tmp_path):
    counts: dict[str, int] = {}
    log = PredictionLog(str(tmp_path), flush_rows=4, flush_interval_s=60,
                        on_rows=lambda outcome, n: counts.__setitem__(outcome, counts.get(outcome, 0) + n))
    day1 = _dt.datetime(2026, 11, 28, 23, 59, tzinfo=_dt.timezone.utc)
    day2 = _dt.datetime(2026, 11, 29, 0, 1, tzinfo=_dt.timezone.utc)
    for i in range(6):
        log.append(_row(i, day1 if i < 3 else day2))
    log.close()
    assert counts == {"written": 6}
    files = sorted(p.relative_to(tmp_path).parts[1] for p in tmp_path.rglob("*.parquet"))
    assert files[0] == "date=2026-11-28" and files[-1] == "date=2026-11-29" and len(files) <= 3  # batches, not rows
    frame = read_log(str(tmp_path), day1, day2 + _dt.timedelta(minutes=1))
    assert len(frame) == 6 and list(frame["top_class"][:3]) == ["MEL", "NV", "BCC"]
    assert len(read_log(str(tmp_path), day2, day2 + _dt.timedelta(hours=1), model_version="v1")) == 3
    assert read_log(str(tmp_path), day2, day2 + _dt.timedelta(hours=1), model_version="v2").empty
    assert purge_partitions(str(tmp_path), 1, now=day2 + _dt.timedelta(days=1, hours=1)) == ["2026-11-28"]


def test_a_broken_store_a_full_queue_and_a_full_day_drop_and_count_but_never_raise(tmp_path):
    counts: dict[str, int] = {}

    def count(outcome: str, n: int) -> None:
        counts[outcome] = counts.get(outcome, 0) + n

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    broken = PredictionLog(str(blocker / "log"), flush_rows=2, flush_interval_s=0.05, max_pending_rows=3, on_rows=count)
    for i in range(10):
        broken.append(_row(i))  # never raises
    broken.close()
    assert counts.get("dropped_store_error", 0) + counts.get("dropped_queue_full", 0) == 10
    assert "written" not in counts

    counts.clear()
    small = PredictionLog(str(tmp_path / "small"), flush_rows=5, flush_interval_s=60, max_mb_per_day=0.000001,
                          on_rows=count)
    for i in range(5):
        small.append(_row(i))
    small.close()
    assert counts == {"dropped_day_full": 5}


def _frame(n: int, rng: np.random.Generator, brightness: float = 0.6, classes=None) -> pd.DataFrame:
    codes = np.array(["NV", "MEL", "BKL", "BCC"])
    return pd.DataFrame({
        "brightness_mean": rng.normal(brightness, 0.05, n), "sharpness": rng.lognormal(3, 0.4, n),
        "width": rng.choice([600, 800, 1024], n), "ood_score": rng.normal(10, 2, n),
        "top_class": rng.choice(codes, n, p=classes or [0.55, 0.2, 0.15, 0.1]),
        "sex": rng.choice(["male", "female", None], n), "abstain": rng.random(n) < 0.05,
    })


def test_drift_alerts_on_the_shifted_feature_and_rarely_on_unshifted_windows():
    rng = np.random.default_rng(0)
    reference = _frame(200, rng)
    false_alarms = sum(bool(alert_list(drift_table(reference, _frame(150, rng)))) for _ in range(20))
    assert false_alarms <= 2  # Bonferroni at alpha 0.01: ~0.2 expected
    shifted = drift_table(reference, _frame(150, rng, brightness=0.7))
    assert [a["feature"] for a in alert_list(shifted)] == ["brightness_mean"]
    mix = alert_list(drift_table(reference, _frame(150, rng, classes=[0.1, 0.5, 0.1, 0.3])))
    assert [a["feature"] for a in mix] == ["top_class"] and mix[0]["statistic"] == "chi2"
    assert {"feature", "statistic", "threshold", "p_value"} <= set(mix[0])


def test_drift_says_what_it_could_not_test():
    rng = np.random.default_rng(1)
    table = drift_table(_frame(100, rng), _frame(5, rng))
    assert not table["alert"].any() and table["note"].str.startswith("not tested").all()
    assert set(table["feature"]) == {f.name for f in FEATURES}


def test_reference_profile_goes_through_the_served_path(tiny_checkpoint, toy_prepared, tmp_path):
    import shutil

    from dermaid.monitoring.reference import build_reference, read_reference, reference_source, write_reference

    checkpoint = tmp_path / "best"
    shutil.copytree(tiny_checkpoint, checkpoint)
    profile, source = build_reference(str(checkpoint), toy_prepared, fold=0)
    validation = profile[profile["route"] == "reference"]
    assert source == "raw" and len(validation) > 20  # toy_prepared's raw root (toy_raw) is readable
    metadata_only = profile[profile["route"] == "reference-metadata"]
    assert len(metadata_only) > 3 * len(validation) and metadata_only["width"].isna().all()  # the other folds
    assert metadata_only["sex"].notna().mean() > 0.8
    profile = validation
    assert profile["width"].isin([600, 800, 1024, 1280]).all() and (profile["image_format"] == "JPEG").all()
    assert profile["ood_score"].isna().all()  # tiny_checkpoint is not calibrated
    write_reference(str(checkpoint), profile, source)
    assert len(read_reference(str(checkpoint))) == len(profile) and reference_source(str(checkpoint)) == "raw"
    assert drift_table(read_reference(str(checkpoint)), profile)["alert"].sum() == 0  # itself: no drift


def test_simulated_shifts_change_what_they_claim():
    from dermaid.monitoring.simulate import shifted_uploads

    def first(shift: str) -> tuple[Image.Image, dict]:
        data, fields = next(shifted_uploads(8, shift, seed=5))
        return Image.open(io.BytesIO(data)).convert("RGB"), fields

    plain, fields = first("none")
    assert min(first("downscale")[0].size) == 64
    assert image_statistics(first("brightness")[0])["brightness_mean"] > image_statistics(plain)["brightness_mean"]
    assert set(fields) <= {"age", "sex", "site"}
    with pytest.raises(Exception, match="shift="):
        next(shifted_uploads(4, "sepia", seed=5))


def test_metric_names_are_what_ray_exports():
    from serve.metrics import METRIC_NAMES, METRICS

    assert "ray_dermaid_requests_total" in METRIC_NAMES
    assert {"ray_dermaid_stage_latency_ms_bucket", "ray_dermaid_stage_latency_ms_count"} <= set(METRIC_NAMES)
    assert all(name.startswith("dermaid_") for name in METRICS)
    assert all(name.endswith("_total") for name, spec in METRICS.items() if spec.kind == "counter")
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES))


def test_every_metric_can_be_created():
    """Ray validates names, tags and bucket bounds when a metric is made (in the Ingress replica's __init__)."""
    from serve.metrics import METRICS, create_metric

    for name in METRICS:
        create_metric(name)


def test_many_rows_go_in_few_files(tmp_path):
    log = PredictionLog(str(tmp_path), flush_rows=1000, flush_interval_s=60)
    rows = [_row(i) for i in range(2000)]
    for row in rows:
        log.append(row)
    log.close()
    assert len(list(tmp_path.rglob("*.parquet"))) == 2
    second = _dt.timedelta(seconds=1)
    assert len(read_log(str(tmp_path), rows[0]["time"] - second, rows[-1]["time"] + second)) == 2000


def test_calibrate_stores_the_reference_profile_with_the_checkpoint(calibrated_checkpoint):
    from dermaid.monitoring.reference import read_reference, reference_source

    profile = read_reference(calibrated_checkpoint)
    profile = profile[profile["route"] == "reference"]  # the validation rows (the others: metadata only)
    assert len(profile) > 20 and reference_source(calibrated_checkpoint) == "raw"
    assert profile["ood_score"].notna().all() and profile["abstain"].notna().all()  # the detector written just before
    assert 0 < profile["abstain"].mean() < 0.3 and (profile["route"] == "reference").all()
