"""Promotion under load: `dermaid serve model_url=registry://bench/production` classifying at concurrency 8 through a
promotion and a rollback. Prints requests sent, failed (target 0) and the switch times (promotion to the first
answer from the new version, rollback to the first answer from the old one again), which include the command's
poll of the stage pointer (--follow-interval) and loading the model beside the running one.

    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/promotion_under_load.py            # runs/toy/best
    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/promotion_under_load.py --checkpoint PATH --seconds 5

The checkpoint must pass the registry's promotion checks (calibrated: `make demo` leaves runs/toy/best so); it is
registered twice (bench@v1, bench@v2: the same weights), and the answers say which version made them.
Results also go to benchmarks/results/promotion_under_load.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import REPO, Client, _multipart, load_images, save_results  # noqa: E402 - benchmarks/ is not a package


def launch_serve(workdir: str, *overrides: str, timeout_s: float = 600) -> tuple[subprocess.Popen, int, float]:
    """`dermaid serve ...` in its own process group (its own Ray): (process, port, seconds to /readyz 200)."""
    from dermaid.processes import free_port, start_process_group

    port = free_port()
    cmd = [str(REPO / ".venv/bin/dermaid"), "serve", f"port={port}", f"storage.url={workdir}/uploads",
           f"hydra.run.dir={workdir}/hydra", *overrides]
    log = open(f"{workdir}/serve.log", "wb")
    started = time.perf_counter()
    proc = start_process_group(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    import http.client

    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"dermaid serve exited {proc.returncode}; see {workdir}/serve.log")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc, port, time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("dermaid serve did not become ready")


def stop_serve(proc: subprocess.Popen) -> None:
    from dermaid.processes import stop_process_group

    stop_process_group(proc, signal.SIGINT, timeout_s=60)


class Load:
    """`concurrency` keep-alive clients classifying in a loop: rows (client, sent, done, status, version, header),
    version the answer's registry_version (or the error text), header its X-DermAID-Model-Version. Also drives
    tests/test_serve_hot_swap.py."""

    def __init__(self, port: int, bodies: list, concurrency: int) -> None:
        self.port, self.bodies, self.stop, self.rows = port, bodies, threading.Event(), []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(concurrency)]

    def _run(self, i: int) -> None:
        client = Client(self.port, retries=0)  # never sent twice: a dropped request counts as failed
        n = 0
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                status, payload = client.post("/v1/classify", *self.bodies[(i + n) % len(self.bodies)])
                version = json.loads(payload).get("registry_version") if status == 200 else payload[:200].decode()
                header = client.headers.get("X-DermAID-Model-Version")
            except (OSError, http.client.HTTPException) as exc:  # a broken answer is a failed request too
                status, version, header = -1, repr(exc), None
            with self.lock:
                self.rows.append((i, sent, time.monotonic(), status, version, header))
            n += 1

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def first(self, version: str, after: float, timeout_s: float = 300) -> float:
        """Completion time of the first answer from `version` sent after `after`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                done = [r[2] for r in self.rows if r[4] == version and r[1] >= after]
            if done:
                return min(done)
            time.sleep(0.02)
        raise RuntimeError(f"no answer from {version} within {timeout_s} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(REPO / "runs/toy/best"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="load before, between and after the two switches")
    parser.add_argument("--follow-interval", type=float, default=1.0, help="dermaid serve's follow_interval_s")
    args = parser.parse_args(argv)

    from dermaid.registry import Registry

    workdir = tempfile.mkdtemp(prefix="promotion_bench_")
    registry = Registry(f"{workdir}/registry")
    for version in ("v1", "v2"):
        registry.register(args.checkpoint, "bench", version)
    registry.promote("bench", "v1")
    bodies = [_multipart(data) for data in load_images(workdir, 16)]
    proc, port, ready_s = launch_serve(workdir, "model_url=registry://bench/production",
                                       f"registry_root={workdir}/registry", f"follow_interval_s={args.follow_interval}")
    print(f"dermaid serve ready in {ready_s:.1f} s; concurrency {args.concurrency}", flush=True)
    try:
        with Load(port, bodies, args.concurrency) as load:
            time.sleep(args.seconds)
            promoted = time.monotonic()
            registry.promote("bench", "v2")
            promotion_s = load.first("bench@v2", promoted) - promoted
            time.sleep(args.seconds)
            rolled_back = time.monotonic()
            registry.rollback("bench")
            rollback_s = load.first("bench@v1", rolled_back) - rolled_back
            time.sleep(args.seconds)
    finally:
        stop_serve(proc)
    rows = sorted(load.rows, key=lambda r: r[1])
    failed = [r for r in rows if r[3] != 200]
    per_client = [[r[4] for r in rows if r[0] == i and r[3] == 200] for i in range(args.concurrency)]
    switches = [sum(a != b for a, b in zip(v, v[1:])) for v in per_client]
    results = {"checkpoint": args.checkpoint, "concurrency": args.concurrency, "requests": len(rows),
               "failed": len(failed), "failed_examples": [r[3:5] for r in failed[:5]],
               "promotion_to_first_new_answer_s": promotion_s, "rollback_to_first_old_answer_s": rollback_s,
               "follow_interval_s": args.follow_interval, "switches_per_client": switches}
    print(f"requests sent {len(rows)}, failed {len(failed)} (target 0)")
    print(f"promotion -> first answer from bench@v2: {promotion_s:.2f} s; rollback -> first from bench@v1: "
          f"{rollback_s:.2f} s (poll interval {args.follow_interval:g} s included)")
    print(f"version switches seen per client (target 2: once each way): {switches}")
    save_results("promotion_under_load", results)
    return results


if __name__ == "__main__":
    main()
