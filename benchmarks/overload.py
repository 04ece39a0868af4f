"""Overload: a burst far above capacity against `dermaid serve` (its default limits: the classifier runs 32 and
queues 64 per caller). Prints the share of 503s, their p50 / p99 latency against the answered requests', any other
status (target: none), /readyz during the burst, and the recovery time (end of the burst to the next 200).

    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/overload.py                      # runs/toy/best
    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/overload.py --burst 400 --checkpoint PATH

Each of --burst clients sends one classify at once (threads on their own connections).
Results also go to benchmarks/results/overload.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from promotion_under_load import launch_serve, stop_serve  # noqa: E402 - benchmarks/ is not a package
from serve_bench import REPO, Client, _multipart, load_images, save_results  # noqa: E402


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(REPO / "runs/toy/best"))
    parser.add_argument("--burst", type=int, default=400, help="concurrent clients, one request each")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="overload_bench_")
    bodies = [_multipart(data) for data in load_images(workdir, 16)]
    proc, port, ready_s = launch_serve(workdir, f"checkpoint={args.checkpoint}")
    print(f"dermaid serve ready in {ready_s:.1f} s; burst of {args.burst}", flush=True)

    def one(i: int) -> tuple[int, float, float]:
        started = time.monotonic()
        try:
            status, _ = Client(port).post("/v1/classify", *bodies[i % len(bodies)])
        except OSError:
            status = -1
        return status, started, time.monotonic()

    def readyz() -> tuple[int, float]:
        import http.client

        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/readyz")
        return conn.getresponse().status, time.monotonic() - started

    try:
        Client(port).post("/v1/classify", *bodies[0])  # warm
        with ThreadPoolExecutor(args.burst + 1) as pool:
            futures = [pool.submit(one, i) for i in range(args.burst)]
            time.sleep(0.5)
            ready = pool.submit(readyz).result()
            rows = [f.result() for f in futures]
        burst_end = max(r[2] for r in rows)
        while Client(port).post("/v1/classify", *bodies[0])[0] != 200:
            time.sleep(0.05)
        recovery_s = time.monotonic() - burst_end
    finally:
        stop_serve(proc)
    rejected = [r[2] - r[1] for r in rows if r[0] == 503]
    served = [r[2] - r[1] for r in rows if r[0] == 200]
    other = sorted({r[0] for r in rows} - {200, 503})
    results = {"burst": args.burst, "checkpoint": args.checkpoint, "share_503": len(rejected) / len(rows),
               "p50_503_ms": _percentile(rejected, 50) * 1000, "p99_503_ms": _percentile(rejected, 99) * 1000,
               "p50_200_ms": _percentile(served, 50) * 1000, "p99_200_ms": _percentile(served, 99) * 1000,
               "answered_200": len(served), "other_statuses": other, "readyz_status": ready[0],
               "readyz_ms": ready[1] * 1000, "recovery_s": recovery_s}
    print(f"503: {len(rejected)}/{len(rows)} = {results['share_503']:.0%}; p50 {results['p50_503_ms']:.0f} ms, "
          f"p99 {results['p99_503_ms']:.0f} ms (200s: {len(served)}, p50 {results['p50_200_ms']:.0f} ms, "
          f"p99 {results['p99_200_ms']:.0f} ms); other statuses {other or 'none'}")
    print(f"/readyz during the burst: {ready[0]} in {ready[1] * 1000:.0f} ms; recovery after the burst: "
          f"{recovery_s:.2f} s")
    save_results("overload", results)
    return results


if __name__ == "__main__":
    main()
