"""Does the monitoring report catch what changes, and only that? Simulated streams through the running service.

    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/monitoring_drift.py --checkpoint runs/toy/best
    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/monitoring_drift.py --checkpoint runs/toy/best --window 150

The checkpoint (a trained toy run, e.g. the demo's runs/toy/best) is copied and calibrated (`dermaid calibrate`'s
function: OOD detector and the monitoring reference profile of its validation fold), then served by
serve.launcher.start as `dermaid serve` serves it, with the prediction log on. `dermaid monitor simulate`'s
simulate() sends --windows unshifted windows of --window toy uploads (new seeds), then one window per shift
(brightness, colour_cast, downscale, class_mix, non_lesion). Each window's log rows go through the report's
drift test (dermaid.monitoring.drift.drift_table, the defaults: KS / chi-square, Bonferroni alpha 0.01, effect
>= 0.1). Printed: the false-alarm rate (unshifted windows with any alert) and, per shift, the alerting features
and whether the feature the shift changes is among them. Results also go to benchmarks/results/monitoring_drift.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# shift -> the feature(s) it changes: at least one must alert
EXPECTED = {
    "brightness": {"brightness_mean"},
    "colour_cast": {"hue_mean", "saturation_mean"},
    "downscale": {"width", "height", "sharpness"},
    "class_mix": {"top_class", "malignancy_score"},
    "non_lesion": {"ood_score", "abstain"},
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(REPO / "runs/toy/best"), help="a trained float checkpoint")
    parser.add_argument("--prepared-dir", default=None, help="its data.prepared_dir (default: the card's)")
    parser.add_argument("--window", type=int, default=100, help="uploads per window")
    parser.add_argument("--windows", type=int, default=20, help="unshifted windows")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--in-process", action="store_true", help="no Serve: each upload through the served path "
                        "in this process (dermaid.monitoring.reference.profile_uploads), e.g. when Ray is busy")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from dermaid.config import compose
    from dermaid.evaluation.calibrate import calibrate
    from dermaid.monitoring.log import read_log
    from dermaid.monitoring.reference import read_reference
    from dermaid.monitoring.simulate import simulate
    from dermaid.processes import free_port
    from dermaid.ray_runtime import ensure_ray
    from serve.launcher import start

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="monitoring_drift_"))
    checkpoint = workdir / "best"
    shutil.copytree(args.checkpoint, checkpoint, dirs_exist_ok=True)
    overrides = [f"checkpoint={checkpoint}"] + ([f"data.prepared_dir={args.prepared_dir}"] if args.prepared_dir else [])
    began = time.perf_counter()
    calibrate(compose("calibrate", overrides))
    reference = read_reference(str(checkpoint))
    print(f"calibrated with a reference profile of {int((reference['route'] == 'reference').sum())} validation "
          f"images (+ the metadata of {len(reference)} labelled ones) in "
          f"{time.perf_counter() - began:.0f} s", flush=True)

    if args.in_process:
        return _report(args, reference, _in_process_windows(args, str(checkpoint)))
    log = workdir / "monitoring"
    port = free_port()
    ensure_ray("local", None, log_to_driver=False)
    start(compose("serve", [f"checkpoint={checkpoint}", f"port={port}", "app_name=drift", "blocking=false",
                            f"storage.url={workdir}/uploads", f"monitoring.url={log}", "monitoring.flush_interval_s=1"]))
    base = f"http://127.0.0.1:{port}"
    windows: list[tuple[str, int, _dt.datetime, _dt.datetime]] = []
    try:
        for shift, seed in _plan(args):
            t0 = _dt.datetime.now(_dt.timezone.utc)
            sent = simulate(base, n=args.window, shift=shift, seed=seed, concurrency=args.concurrency)
            time.sleep(0.01)
            windows.append((shift, seed, t0, _dt.datetime.now(_dt.timezone.utc)))
            print(f"sent {shift:<11} seed {seed}: {sent['status']}", flush=True)
        time.sleep(3)  # the last batch's flush
    finally:
        serve.shutdown()
        ray.shutdown()

    return _report(args, reference, [(shift, seed, read_log(str(log), t0, t1 + _dt.timedelta(milliseconds=5)))
                                     for shift, seed, t0, t1 in windows])


def _plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    return [("none", 1000 + i) for i in range(args.windows)] + [(shift, 2000 + i) for i, shift in enumerate(EXPECTED)]


def _in_process_windows(args: argparse.Namespace, checkpoint: str) -> list:
    """(shift, seed, rows) per window, each upload through the served path in this process."""
    from dermaid.inference import Predictor
    from dermaid.monitoring.reference import profile_uploads
    from dermaid.monitoring.simulate import shifted_uploads

    predictor = Predictor(checkpoint)
    windows = []
    for shift, seed in _plan(args):
        uploads = [(data, fields.get("age"), fields.get("sex"), fields.get("site"))
                   for data, fields in shifted_uploads(args.window, shift, seed)]
        windows.append((shift, seed, profile_uploads(predictor, uploads, route="/v1/classify")))
        print(f"profiled {shift:<11} seed {seed}: {len(uploads)} uploads", flush=True)
    return windows


def _report(args: argparse.Namespace, reference, windows: list) -> dict:
    from dermaid.monitoring.drift import alert_list, drift_table

    results: dict = {"checkpoint": args.checkpoint, "reference_rows": len(reference), "window": args.window,
                     "mode": "in-process" if args.in_process else "http", "unshifted": [], "shifts": {}}
    for shift, seed, frame in windows:
        alerts = alert_list(drift_table(reference, frame))
        features = sorted({a["feature"] for a in alerts})
        if shift == "none":
            results["unshifted"].append({"seed": seed, "rows": len(frame), "alerts": features})
        else:
            results["shifts"][shift] = {"rows": len(frame), "alerts": features,
                                        "caught": bool(EXPECTED[shift] & set(features)),
                                        "detail": [{k: a[k] for k in ("feature", "statistic", "value", "p_value",
                                                                      "threshold")} for a in alerts]}
    false_alarms = sum(bool(w["alerts"]) for w in results["unshifted"])
    results["false_alarm_rate"] = false_alarms / max(1, len(results["unshifted"]))
    print()
    print(f"unshifted windows with an alert: {false_alarms}/{len(results['unshifted'])} "
          f"(false-alarm rate {results['false_alarm_rate']:.2f}); alerting features: "
          f"{sorted({f for w in results['unshifted'] for f in w['alerts']}) or 'none'}")
    for shift, row in results["shifts"].items():
        print(f"{shift:<12} rows {row['rows']:>4}  {'caught' if row['caught'] else 'MISSED'}  "
              f"(expects one of {sorted(EXPECTED[shift])}); alerts: {', '.join(row['alerts']) or 'none'}")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "monitoring_drift.json").write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
