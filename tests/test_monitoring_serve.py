"""Monitoring over real HTTP: Ray's Prometheus endpoint after real requests, the prediction log (no image, every
request), a broken log store, and the papermill report flagging a shifted simulated stream and not an unshifted one.

One Serve instance (the session's Ray) serves conftest's calibrated_checkpoint (OOD detector and reference profile)
for the module, started the way `dermaid serve` starts it; shut down at the end.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image


APP = "dermaid-monitoring"


@pytest.fixture(scope="module")
def monitored(ray_session, calibrated_checkpoint, tmp_path_factory):
    """(base URL, storage URL, log URL) of a running app with metrics and a fast-flushing prediction log."""
    from ray import serve

    from conftest import start_test_app

    storage = str(tmp_path_factory.mktemp("monitoring_uploads"))
    log = str(tmp_path_factory.mktemp("monitoring_log"))
    base = start_test_app(calibrated_checkpoint, APP, tmp_path_factory, f"storage.url={storage}",
                          f"monitoring.url={log}", "monitoring.flush_interval_s=0.5", ready_s=120)
    yield base, storage, log
    serve.shutdown()


def _jpeg(seed: int, size: tuple[int, int] = (96, 72), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (5, 6, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _post(base: str, data: bytes, **fields) -> requests.Response:
    return requests.post(f"{base}/v1/classify", files={"image": ("x", data)},
                         data={k: str(v) for k, v in fields.items()}, timeout=60)


def _scrape(name: str, labels: dict[str, str]) -> float:
    """Sum of the series `name` (as exported, e.g. ray_dermaid_requests_total) whose labels include these."""
    import re

    import ray

    url = f"http://127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}/metrics"
    pattern = re.compile(rf"^{name}{{(.*)}} (\S+)$")
    total = 0.0
    for line in requests.get(url, timeout=10).text.splitlines():
        match = pattern.match(line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            total += float(match.group(2))
    return total


def _wait(check, timeout_s: float = 60.0, what: str = ""):
    deadline = time.time() + timeout_s
    while True:
        value = check()
        if value is not None and value is not False:  # a DataFrame counts as found
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)


def _log_rows(log: str):
    from dermaid.monitoring.log import read_log

    now = _dt.datetime.now(_dt.timezone.utc)
    return read_log(log, now - _dt.timedelta(hours=1), now + _dt.timedelta(hours=1))


def test_metrics_count_real_requests_and_every_request_leaves_an_image_free_log_row(monitored):
    from dermaid.monitoring.log import LOG_SCHEMA
    from dermaid.uploads.store import UploadStore
    from serve.metrics import METRIC_NAMES

    base, storage, log = monitored
    app = {"application": APP}
    before_rows = len(_log_rows(log))
    answers = [_post(base, _jpeg(1), age=55, sex="male"), _post(base, _jpeg(2)), _post(base, _jpeg(3, fmt="PNG")),
               _post(base, _jpeg(4), consent="true", site="head/neck")]
    assert [r.status_code for r in answers] == [200] * 4
    assert _post(base, b"not an image at all").status_code == 415

    _wait(lambda: _scrape("ray_dermaid_requests_total", {**app, "route": "/v1/classify", "status": "200"}) == 4,
          what="4 answered classify requests counted")
    assert _scrape("ray_dermaid_requests_total", {**app, "route": "/v1/classify", "status": "415"}) == 1
    _wait(lambda: _scrape("ray_dermaid_predictions_total", app) == 4, what="4 predictions")
    assert _scrape("ray_dermaid_stage_latency_ms_count", {**app, "stage": "decode"}) == 4
    assert _scrape("ray_dermaid_stage_latency_ms_count", {**app, "stage": "forward"}) == 4
    assert _scrape("ray_dermaid_image_format_total", {**app, "format": "PNG"}) == 1
    assert _scrape("ray_dermaid_image_format_total", {**app, "format": "JPEG"}) == 3
    assert _scrape("ray_dermaid_metadata_given_total", {**app, "field": "none"}) == 2
    assert _scrape("ray_dermaid_metadata_given_total", {**app, "field": "age"}) == 1
    assert _scrape("ray_dermaid_ood_score_count", app) == 4 and _scrape("ray_dermaid_image_width_px_count", app) == 4
    assert sum(_scrape("ray_dermaid_triage_total", {**app, "level": level})
               for level in ("low", "moderate", "high", "abstained")) == 4
    rows = _wait(lambda: (lambda f: f if len(f) >= before_rows + 4 else None)(_log_rows(log)), what="4 log rows")
    new = rows.iloc[before_rows:]
    assert list(new["consent"]) == [False, False, False, True]  # consented or not, every answered request
    assert set(new["image_format"]) == {"JPEG", "PNG"} and (new["width"] == 96).all()
    assert new["ood_score"].notna().all() and new["brightness_mean"].between(0, 1).all()
    assert new["age"].iloc[0] == 55.0 and np.isnan(new["age"].iloc[1]) and new["sex"].iloc[0] == "male"
    assert not any(str(t) in ("binary", "large_binary") for t in LOG_SCHEMA.types)  # no image can be in a row
    # no image anywhere: the log folder holds Parquet files only, the store only the consented upload
    assert {p.suffix for p in Path(log).rglob("*") if p.is_file()} == {".parquet"}
    assert UploadStore(storage).count() == 1
    _wait(lambda: _scrape("ray_dermaid_prediction_log_rows_total", {**app, "outcome": "written"}) >= 4,
          what="rows written counted")
    # every classification either abstained or has a malignancy score (these noise images are often refused)
    assert (_scrape("ray_dermaid_abstentions_total", app)
            + _scrape("ray_dermaid_malignancy_score_count", app)) == 4
    # every exported name of the table is on the endpoint (the dashboard's names are these)
    import ray

    text = requests.get(f"http://127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}/metrics",
                        timeout=10).text
    missing = [name for name in METRIC_NAMES if f"\n{name}{{" not in text
               and "abstentions" not in name and "malignancy" not in name]
    assert not missing, missing


def test_a_failing_log_store_does_not_fail_requests(monitored, calibrated_checkpoint, tmp_path):
    from ray import serve

    from serve.app import build_app
    from serve.args import AppArgs

    base, _, _ = monitored
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the log's folder should be: every write fails")
    args = AppArgs.model_validate({
        "checkpoint": calibrated_checkpoint, "storage": {"url": str(tmp_path / "uploads")},
        "monitoring": {"url": str(blocker / "log"), "flush_interval_s": 0.5},
        "classifier": {"num_cpus": 0.1, "torch_threads": 1, "forward_lanes": 1},
        "explainer": {"num_cpus": 0.05, "torch_threads": 1}, "ingress": {"num_cpus": 0.05},
    })
    serve.run(build_app(args), name="dermaid-broken-log", route_prefix="/broken")
    try:
        answers = [_post(f"{base}/broken", _jpeg(10 + i)) for i in range(3)]
        assert [r.status_code for r in answers] == [200] * 3 and all(r.json()["probabilities"] for r in answers)
        _wait(lambda: _scrape("ray_dermaid_prediction_log_rows_total",
                              {"application": "dermaid-broken-log", "outcome": "dropped_store_error"}) >= 3,
              what="dropped rows counted")
        assert _post(f"{base}/broken", _jpeg(20)).status_code == 200
        saliency = requests.post(f"{base}/broken/v1/saliency", files={"image": ("x", _jpeg(21))},
                                 data={"format": "json"}, timeout=60)
        assert saliency.status_code == 200 and saliency.json()["target"]  # its prediction is logged (and dropped) too
    finally:
        serve.delete("dermaid-broken-log")


def test_the_report_flags_a_shifted_stream_and_not_an_unshifted_one(monitored, calibrated_checkpoint, dermaid_cli,
                                                                    tmp_path):
    from dermaid.monitoring.simulate import simulate

    base, _, log = monitored

    def report(name: str, since: _dt.datetime, *extra: str) -> tuple[int, dict]:
        end = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=5)
        hours = (end - since).total_seconds() / 3600
        out = tmp_path / name
        result = dermaid_cli("report", "monitoring", f"checkpoint={calibrated_checkpoint}", f"monitoring.url={log}",
                             f"window_end={end.replace(tzinfo=None).isoformat()}", f"window_hours={hours}",
                             "fail_on_alert=true", f"out={out}", *extra, cwd=tmp_path)
        assert (out / "report.html").exists(), result.stderr[-2000:]
        return result.returncode, json.loads((out / "key_figures.json").read_text())

    def logged(n: int) -> None:
        _wait(lambda: len(_log_rows(log)) >= n, what=f"{n} log rows")

    start = _dt.datetime.now(_dt.timezone.utc)
    rows = len(_log_rows(log))
    assert simulate(base, n=60, seed=101)["status"] == {"200": 60}
    logged(rows + 60)
    code, figures = report("unshifted", start)
    assert code == 0 and figures["alerts"] == [] and figures["rows"] == 60, figures

    middle = _dt.datetime.now(_dt.timezone.utc)
    simulate(base, n=60, seed=102, shift="brightness")
    logged(rows + 120)
    code, figures = report("brightness", middle)
    assert code == 1 and figures["rows"] == 60
    assert "brightness_mean" in {alert["feature"] for alert in figures["alerts"]}, figures["alerts"]
    alert = next(a for a in figures["alerts"] if a["feature"] == "brightness_mean")
    assert alert["statistic"] == "ks" and alert["p_value"] < alert["threshold"]

    code, figures = report("empty", middle, "model_version=no-such-version")
    assert code == 0 and figures["empty"] is True and figures["rows"] == 0
    assert "no predictions" in (tmp_path / "empty" / "report.html").read_text().lower()
