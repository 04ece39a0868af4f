"""What monitoring costs the classify route: throughput with and without the prediction log, measured in one run.

    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/monitoring_overhead.py
    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/monitoring_overhead.py --rounds 3 --requests 480

The app is started by serve.launcher.start as `dermaid serve` starts it (efficientnet_b0 @ 224, untrained, direct
ingress), on JPEG uploads from `dermaid synth` (600x450 .. 1280x960), at concurrency 16 on keep-alive connections
(serve_bench.py's load generator). Three variants, redeployed in turn and interleaved over --rounds rounds so
the machine's drift hits all alike:
    log       metrics + the prediction log (the default: monitoring.url set)
    no_log    metrics only (monitoring.url=null)
    off       neither (monitoring.metrics=false, monitoring.url=null)
Printed: req/s of each (mean over rounds), log / no_log (target: >= 0.95, i.e. the log costs < 5%) and log / off
(all of monitoring in the Ingress), the image statistics' cost per upload (computed in the Classifier's decode
threads in every variant) and the log row's cost in the Ingress (built and queued; written by a background
thread), both against the request's CPU (2 cores / the "off" rate). On a shared machine the throughput ratios
carry a few % of noise either way; the per-request costs bound what the log can take. Results also go to benchmarks/results/monitoring_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import _multipart, create_bench_checkpoint, http_throughput, load_images, save_results  # noqa: E402

VARIANTS = {
    "log": [],
    "no_log": ["monitoring.url=null"],
    "off": ["monitoring.url=null", "monitoring.metrics=false"],
}


def statistics_ms(images: list[bytes], checkpoint: str) -> float:
    """ms per upload of dermaid.monitoring.features.describe_image on the model input (one thread)."""
    from dermaid.inference import Predictor
    from dermaid.monitoring.features import describe_image

    predictor = Predictor(checkpoint)
    prepared = [(data, predictor.prepare(data).model_input) for data in images]
    start = time.perf_counter()
    for _ in range(5):
        for data, crop in prepared:
            describe_image(data, crop)
    return (time.perf_counter() - start) / (5 * len(prepared)) * 1000


def log_row_us(workdir: str, n: int = 5000) -> float:
    """Microseconds the Ingress spends per request on the log: building the row and queueing it (the writes
    run on the flusher thread)."""
    import numpy as np

    from dermaid.monitoring.features import prediction_row
    from dermaid.monitoring.log import PredictionLog

    log = PredictionLog(f"{workdir}/row-cost", flush_rows=1000, flush_interval_s=60)
    stats = {"brightness_mean": 0.5, "brightness_std": 0.1, "saturation_mean": 0.3, "saturation_std": 0.1,
             "hue_mean": 20.0, "hue_std": 4.0, "sharpness": 50.0}
    probs = np.full(8, 0.125).tolist()
    start = time.perf_counter()
    for _ in range(n):
        log.append(prediction_row(probabilities=probs, ood_score=3.0, abstain=False, malignancy_score=0.4,
                                  triage="moderate", model_version="v", route="/v1/classify", width=800, height=600,
                                  image_format="JPEG", stats=stats, age=50, sex="male", site=None, consent=False,
                                  latency_ms={"request": 80.0, "decode": 10.0, "forward": 30.0}))
    elapsed = (time.perf_counter() - start) / n * 1e6
    log.close()
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--requests", type=int, default=320, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from dermaid.config import compose
    from dermaid.processes import free_port
    from dermaid.ray_compat import direct_ingress_env
    from dermaid.ray_runtime import ensure_ray
    from serve.launcher import start

    workdir = args.workdir or tempfile.mkdtemp(prefix="monitoring_overhead_")
    checkpoint = create_bench_checkpoint(f"{workdir}/ckpt", args.model, args.img_size)
    images = load_images(workdir, args.images)
    bodies = [_multipart(data, {"age": "55", "sex": "female"}) for data in images]
    stats_ms = statistics_ms(images, checkpoint)
    row_us = log_row_us(workdir)
    port = free_port()
    os.environ.update(direct_ingress_env(port))
    ensure_ray("local", os.cpu_count(), log_to_driver=False)
    base = [f"checkpoint={checkpoint}", f"port={port}", f"storage.url={workdir}/uploads", "app_name=bench",
            "blocking=false", f"monitoring.url={workdir}/monitoring", "monitoring.flush_interval_s=5"]
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for round_ in range(args.rounds):
            order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                start(compose("serve", [*base, *VARIANTS[name]]))
                http_throughput(port, bodies, 2 * args.concurrency, args.concurrency)  # warm-up
                rates[name].append(http_throughput(port, bodies, args.requests, args.concurrency))
                print(f"round {round_ + 1} {name:<7} {rates[name][-1]:.1f} req/s", flush=True)
                serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    mean = {name: statistics.mean(values) for name, values in rates.items()}
    log_rows = sum(1 for _ in Path(workdir, "monitoring").rglob("*.parquet"))
    request_cpu_ms = 1000.0 * (os.cpu_count() or 1) / mean["off"]
    results = {"model": args.model, "img_size": args.img_size, "concurrency": args.concurrency,
               "requests": args.requests, "rounds": args.rounds, "cpus": os.cpu_count(), "req_per_s": rates,
               "mean_req_per_s": mean, "log_over_no_log": mean["log"] / mean["no_log"],
               "log_over_off": mean["log"] / mean["off"], "image_statistics_ms": stats_ms,
               "request_cpu_ms": request_cpu_ms, "parquet_files": log_rows, "log_row_us": row_us}
    print()
    print(f"{'log / no_log (throughput)':<38} {results['log_over_no_log']:.3f}   target >= 0.95  "
          f"{'ok' if results['log_over_no_log'] >= 0.95 else 'MISSED'}")
    print(f"{'log / off (all monitoring in Ingress)':<38} {results['log_over_off']:.3f}   reported")
    print(f"{'image statistics per upload (ms)':<38} {stats_ms:.2f}    vs ~{request_cpu_ms:.0f} ms of CPU per request "
          f"({100 * stats_ms / request_cpu_ms:.1f}%)")
    print(f"{'log row built + queued per request (us)':<38} {row_us:.0f}    "
          f"({100 * row_us / 1000 / request_cpu_ms:.2f}% of the request's CPU)")
    print(f"parquet files written: {log_rows}")
    save_results("monitoring_overhead", results)
    return results


if __name__ == "__main__":
    main()
