"""What the Serve app tells Prometheus: the metric table, the names Ray exports, and the Ingress's recorder.

    from serve.metrics import METRICS, METRIC_NAMES     # the table; the exported series names (dashboards, tests)
    api.add_middleware(RequestMetrics)                  # serve/ingress.py: requests by route and status
    monitor = ServeMonitor(settings["monitoring"])      # in the Ingress replica: metrics + the prediction log
    monitor.observe(route, out, result, age, sex, site, consent, latency_ms)   # one answered prediction

Every metric is a `ray.serve.metrics` Counter / Histogram / Gauge, so Serve adds the `deployment`, `replica` and
`application` tags. Ray's metrics agent exports each one on the node's Prometheus endpoint
(`http://<node>:<metrics_export_port>/metrics`, scraped by the PodMonitor in cluster/) with the prefix `ray_`:

    counter    ray_<name>                 (the names below already end in _total, so nothing more is added)
    gauge      ray_<name>
    histogram  ray_<name>_bucket{le=...}, ray_<name>_sum, ray_<name>_count

METRIC_NAMES lists exactly those series names; tests/test_monitoring_serve.py scrapes a running app and checks
that they appear with the right counts. The per-request recording (`ServeMonitor.observe`) and the prediction
log's background flusher never raise into a request: a failing metric or store is logged, never a 500.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("ray.serve")

EXPORT_PREFIX = "ray_"  # Ray's Prometheus export prefixes every application metric with this


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its kind (counter | histogram | gauge), what it counts, its own tag keys (Serve adds
    deployment, replica, application) and, for a histogram, its bucket boundaries."""

    kind: str
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


LATENCY_MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
UNIT_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95: scores and normalised entropy
# OOD scores are the card's detector's raw scale (multilayer Mahalanobis sums: tens to thousands); Ray takes
# positive bounds only, so scores <= 0.1 (MSP's negative ones) share the first bucket; the report reads exact
# scores from the prediction log.
OOD_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
PIXEL_BUCKETS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)

# name -> MetricSpec: the one list of what the service reports (cluster/ dashboards use exactly these names)
METRICS: dict[str, MetricSpec] = {
    "dermaid_requests_total": MetricSpec(
        "counter", "HTTP requests answered by the Ingress, by route template and status code.", ("route", "status")),
    "dermaid_stage_latency_ms": MetricSpec(
        "histogram", "Milliseconds per stage of a prediction: decode (bytes to model input), forward (batch queue "
                     "and model), saliency (the Explainer call), request (the whole route).", ("stage",),
        LATENCY_MS_BUCKETS),
    "dermaid_predictions_total": MetricSpec(
        "counter", "Predictions answered, by route and top class code (ABSTAIN when the model refused).",
        ("route", "predicted_class")),
    "dermaid_malignancy_score": MetricSpec(
        "histogram", "Malignancy score (sum of the malignant classes' probabilities) of answered classifications.",
        (), UNIT_BUCKETS),
    "dermaid_prediction_entropy": MetricSpec(
        "histogram", "Entropy of the predicted class distribution divided by ln(8): 0 certain, 1 uniform.", (),
        UNIT_BUCKETS),
    "dermaid_ood_score": MetricSpec(
        "histogram", "Out-of-distribution score of the card's detector (higher: less like the training images).",
        (), OOD_BUCKETS),
    "dermaid_abstentions_total": MetricSpec(
        "counter", "Predictions refused because the photo does not look like a lesion photo (OOD), by route.",
        ("route",)),
    "dermaid_triage_total": MetricSpec(
        "counter", "Classifications by triage level: low, moderate, high, or abstained.", ("level",)),
    "dermaid_image_width_px": MetricSpec("histogram", "Width of the upright upload in pixels.", (), PIXEL_BUCKETS),
    "dermaid_image_height_px": MetricSpec("histogram", "Height of the upright upload in pixels.", (), PIXEL_BUCKETS),
    "dermaid_image_format_total": MetricSpec(
        "counter", "Uploads classified, by image format (JPEG, PNG, WEBP, ...).", ("format",)),
    "dermaid_metadata_given_total": MetricSpec(
        "counter", "Classifications by metadata field given (age, sex, site; none: no field).", ("field",)),
    "dermaid_prediction_log_rows_total": MetricSpec(
        "counter", "Prediction log rows by outcome: written (to the store), dropped_store_error (the store failed), "
                   "dropped_queue_full (the in-memory queue was full), dropped_day_full (the day's size bound).",
        ("outcome",)),
    "dermaid_prediction_log_pending_rows": MetricSpec(
        "gauge", "Prediction log rows waiting in this replica's memory for the next batch write."),
}


def exported_names(name: str, spec: MetricSpec) -> tuple[str, ...]:
    """The series names Ray's Prometheus endpoint shows for one metric."""
    base = EXPORT_PREFIX + name
    if spec.kind == "histogram":
        return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
    return (base,)


# every series name on the Prometheus endpoint, as dashboards and alerts must spell them
METRIC_NAMES: tuple[str, ...] = tuple(series for name, spec in METRICS.items() for series in exported_names(name, spec))


# --- settings ------------------------------------------------------------------------------------------------

from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: E402 - the table above is import-light


class MonitoringArgs(BaseModel):
    """AppArgs.monitoring (conf/monitoring/default.yaml): the metrics and the prediction log of the Ingress."""

    model_config = ConfigDict(extra="forbid")
    metrics: bool = True            # the METRICS above, on Ray's Prometheus endpoint
    # where the prediction log's Parquet partitions go (fsspec URL: local dir, gs://bucket/prefix); None: no log.
    # None here so an app built without a config writes nowhere unasked; conf/serve.yaml and serve/config.yaml set it
    url: str | None = None
    flush_rows: int = Field(500, ge=1)                 # rows per Parquet file (one batch)
    flush_interval_s: float = Field(30.0, gt=0)        # a batch is written at least this often when rows wait
    max_pending_rows: int = Field(20000, ge=1)         # rows kept in memory while the store is slow, then dropped
    max_mb_per_day: float | None = Field(256.0, gt=0)  # bound per day partition; None: none
    retention_days: float | None = Field(90.0, gt=0)   # older day partitions are deleted; None: kept

    @field_validator("url")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        from dermaid.files import absolute_url

        return absolute_url(value) if value else None  # replicas may run in another working directory


# --- recording ----------------------------------------------------------------------------------------------

_ACTIVE: "ServeMonitor | None" = None   # this process's monitor (one Ingress replica per process)


def create_metric(name: str) -> Any:
    """The ray.serve.metrics object of METRICS[name]."""
    from ray.serve import metrics as serve_metrics

    spec = METRICS[name]
    if spec.kind == "counter":
        return serve_metrics.Counter(name, description=spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return serve_metrics.Gauge(name, description=spec.description, tag_keys=spec.tag_keys)
    return serve_metrics.Histogram(name, description=spec.description, boundaries=list(spec.boundaries),
                                   tag_keys=spec.tag_keys)


class ServeMonitor:
    """The Ingress replica's metrics and prediction log (settings: MonitoringArgs as a dict)."""

    def __init__(self, settings: dict[str, Any] | None) -> None:
        global _ACTIVE

        self.args = MonitoringArgs.model_validate(settings or {})
        self.metrics = {name: create_metric(name) for name in METRICS} if self.args.metrics else None
        self.log = None
        if self.args.url:
            from dermaid.monitoring.log import PredictionLog

            a = self.args
            self.log = PredictionLog(a.url, flush_rows=a.flush_rows, flush_interval_s=a.flush_interval_s,
                                     max_pending_rows=a.max_pending_rows, max_mb_per_day=a.max_mb_per_day,
                                     retention_days=a.retention_days, on_rows=self._count_rows,
                                     on_pending=self._pending)
        _ACTIVE = self

    def observe(self, route: str, out: dict[str, Any], result: dict[str, Any] | None, age: Any, sex: Any, site: Any,
                consent: bool, started: float, saliency_ms: float | None = None) -> None:
        """One answered prediction: its metrics and its log row. Never raises (logged instead).

        out: the Classifier's answer; result: build_result's (None on /v1/saliency: the malignancy score and the
        triage are then from out's probabilities); started: time.perf_counter() when the route began."""
        try:
            self._observe(route, out, result, age, sex, site, consent, started, saliency_ms)
        except Exception:  # noqa: BLE001 - monitoring never fails a request
            logger.exception("monitoring: a prediction could not be recorded")

    def _observe(self, route: str, out: dict[str, Any], result: dict[str, Any] | None, age: Any, sex: Any,
                 site: Any, consent: bool, started: float, saliency_ms: float | None) -> None:
        from dermaid.monitoring.features import normalised_entropy, prediction_row

        timings = {**(out.get("timings") or {}), "request": (time.perf_counter() - started) * 1000.0}
        if saliency_ms is not None:
            timings["saliency"] = saliency_ms
        abstain = out.get("abstain")
        score = (result or {}).get("malignancy_score")
        triage = "abstained" if abstain else ((result or {}).get("triage") or {}).get("level")
        if self.metrics is not None:
            m = self.metrics
            for stage, ms in timings.items():
                m["dermaid_stage_latency_ms"].observe(ms, tags={"stage": stage})
            top = (result or {}).get("top") or {}
            predicted = "ABSTAIN" if abstain else top.get("code") or _top_code(out["probabilities"])
            m["dermaid_predictions_total"].inc(tags={"route": route, "predicted_class": predicted})
            if abstain:
                m["dermaid_abstentions_total"].inc(tags={"route": route})
            m["dermaid_prediction_entropy"].observe(normalised_entropy(out["probabilities"]))
            if out.get("ood_score") is not None:
                m["dermaid_ood_score"].observe(float(out["ood_score"]))
            if result is not None:  # classify: the answer people read
                if score is not None:
                    m["dermaid_malignancy_score"].observe(float(score))
                m["dermaid_triage_total"].inc(tags={"level": triage or "none"})
                m["dermaid_image_width_px"].observe(float(out["width"]))
                m["dermaid_image_height_px"].observe(float(out["height"]))
                m["dermaid_image_format_total"].inc(tags={"format": out.get("image_format") or "unknown"})
                given = [name for name, value in (("age", age), ("sex", sex), ("site", site)) if value is not None]
                for field in given or ["none"]:
                    m["dermaid_metadata_given_total"].inc(tags={"field": field})
        if self.log is not None:
            self.log.append(prediction_row(
                probabilities=out["probabilities"], ood_score=out.get("ood_score"), abstain=abstain,
                malignancy_score=score, triage=triage if result is not None else None,
                model_version=out["model_version"], route=route, width=out.get("width"), height=out.get("height"),
                image_format=out.get("image_format"), stats=out.get("stats"), age=age, sex=sex, site=site,
                consent=consent, latency_ms=timings))

    def close(self) -> None:
        """Write the log's pending rows (the replica shuts down); never raises."""
        try:
            if self.log is not None:
                self.log.close()
        except Exception:  # noqa: BLE001 - shutting down: nothing left to fail
            logger.exception("monitoring: the prediction log could not be flushed at shutdown")

    def count_request(self, route: str, status: int) -> None:
        if self.metrics is not None:
            self.metrics["dermaid_requests_total"].inc(tags={"route": route, "status": str(status)})

    def _count_rows(self, outcome: str, rows: int) -> None:
        if self.metrics is not None:
            self.metrics["dermaid_prediction_log_rows_total"].inc(rows, tags={"outcome": outcome})

    def _pending(self, rows: int) -> None:
        if self.metrics is not None:
            self.metrics["dermaid_prediction_log_pending_rows"].set(rows)


def _top_code(probabilities: Any) -> str:
    from dermaid.classes import CLASS_CODES

    probs = list(probabilities)
    return CLASS_CODES[max(range(len(probs)), key=probs.__getitem__)]


async def timed(awaitable: Any) -> tuple[Any, float]:
    """(await awaitable, milliseconds it took): a stage's latency (the Explainer call on /v1/saliency)."""
    start = time.perf_counter()
    value = await awaitable
    return value, (time.perf_counter() - start) * 1000.0


class RequestMetrics:
    """ASGI middleware: dermaid_requests_total{route, status} for every HTTP request of the Ingress (the route
    template, e.g. /v1/uploads/{ref}, so ids never become labels; `unmatched` for unknown paths)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or _ACTIVE is None or _ACTIVE.metrics is None:
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_and_note(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                status["code"] = int(message.get("status", 500))
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            try:
                _ACTIVE.count_request(route, status["code"])
            except Exception:  # noqa: BLE001 - never fail a request over a metric
                logger.exception("monitoring: a request could not be counted")
