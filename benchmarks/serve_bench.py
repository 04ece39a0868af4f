"""Serving benchmark: the Ray Serve app next to the bare in-process pipeline, measured in one run (CPU).

    .venv/bin/python benchmarks/serve_bench.py                     # efficientnet_b0 @ 224, untrained
    .venv/bin/python benchmarks/serve_bench.py --requests 480 --batch 8 --concurrency 16

What it measures (JPEG uploads from `dermaid synth`, 600x450 .. 1280x960 px, bounded loops on 127.0.0.1):
    throughput   POST /v1/classify at concurrency 16 vs. the bare pipeline (Predictor.prepare = decode +
                 preprocess, then batched Predictor.forward at the same batch size, same threads)  target >= 0.8
    batching     the same load with max_batch_size=1 (the app redeployed): the gain of batching
    latency      concurrency 1: p50 of classify minus p50 of the bare single-image pipeline     target <= 15 ms
                 (the two alternate request by request in this process, 100 ms apart: drift and Serve's own
                 background threads hit both alike); also reported against the fresh-process bare p50
                 measured with Serve down, also 100 ms apart (that gap adds what merely running Ray +
                 Serve costs a forward)
    saliency     p50 of POST /v1/saliency (gradcam) / p50 of classify, same model               target <= 3
    cold start   seconds from launching `dermaid serve` to its first successful classify (reported), and the
                 phases `dermaid serve` prints (Ray, Serve, replica start, model load, warm-up)
    FastAPI peer the same Predictor behind a plain FastAPI + uvicorn process (what the original project ran: one
                 process, a sync route in FastAPI's thread pool, a batch-of-1 forward per request, the same
                 build_result JSON), measured with Serve down: Serve / peer throughput at concurrency 16
                 (target >= 1) and Serve p50 - peer p50 at concurrency 1, 100 ms apart (target <= 5 ms)
The bare throughput loop runs in fresh processes before and after the Serve measurements, with OpenMP's
default wait policy (spin briefly, then sleep), ACTIVE (spin) and PASSIVE (sleep); before/after are
averaged (a shared machine drifts) and the best policy is the baseline, so the ratio is conservative.
The app is started by serve.launcher.start, as `dermaid serve` starts it (direct ingress on the port).
The load generator (16 threads on keep-alive connections) shares the machine's cores with the server.
Results also go to benchmarks/results/serve_bench.json.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from fastapi import UploadFile  # module level: the peer's route annotation is resolved in this module's globals

REPO = Path(__file__).resolve().parent.parent
RAY_START_TIMEOUT = "timed out during startup"  # Ray's message when its agents start too slowly
DEFAULT_POLICY = "default"  # OMP_WAIT_POLICY unset: OpenMP spins briefly at a barrier, then sleeps


def create_bench_checkpoint(out: str, model: str, img_size: int) -> str:
    """An untrained timm model (pretrained=false) saved as a DermAID checkpoint."""
    import torch

    from dermaid.models.card import build_card, save_checkpoint
    from dermaid.models.classifier import create_classifier, resolve_input_spec

    torch.manual_seed(0)
    model_cfg = {"name": model, "pretrained": False, "use_metadata": True}
    net = create_classifier(model_cfg)
    save_checkpoint(out, build_card(model_cfg, resolve_input_spec(net, img_size)), net.state_dict())
    return out


def synth_image_dir(workdir: str) -> str:
    """Where load_images' toy JPEGs are (the ISIC 2019 input folder of a synth set)."""
    from dermaid.data.isic import ISIC2019_INPUT_DIR

    return f"{workdir}/synth/{ISIC2019_INPUT_DIR}"


def load_images(workdir: str, n: int) -> list[bytes]:
    from dermaid.data.synth import generate

    generate(f"{workdir}/synth", n=n, seed=0)
    files = sorted(Path(synth_image_dir(workdir)).glob("*.jpg"))
    return [f.read_bytes() for f in files[:n]]


# --- the bare in-process pipeline ----------------------------------------------------------------------------

def bare_throughput(predictor, images: list[bytes], total: int, batch: int) -> float:
    """Images/s of decode + preprocess + batched forward in a plain loop."""
    import torch

    stream = itertools.islice(itertools.cycle(images), total)
    start = time.perf_counter()
    done = 0
    while done < total:
        chunk = list(itertools.islice(stream, batch))
        tensors = torch.stack([predictor.prepare(data).tensor for data in chunk])  # (B, 3, H, W)
        metadata = torch.stack([predictor.encode_metadata() for _ in chunk])  # (B, 14)
        predictor.forward(tensors, metadata)
        done += len(chunk)
    return total / (time.perf_counter() - start)


def bare_single_s(predictor, data: bytes) -> float:
    """Seconds for one image through the bare pipeline (batch of 1)."""
    start = time.perf_counter()
    tensor = predictor.prepare(data).tensor[None]  # (1, 3, H, W)
    predictor.forward(tensor, predictor.encode_metadata()[None])
    return time.perf_counter() - start


def bare_latency_ms(predictor, images: list[bytes], n: int, pause_s: float) -> float:
    """p50 of one image through the bare pipeline, each after `pause_s` idle (as the served requests)."""
    times = []
    for data in itertools.islice(itertools.cycle(images), n):
        time.sleep(pause_s)
        times.append(bare_single_s(predictor, data))
    return statistics.median(times) * 1000


def bare_in_subprocess(checkpoint: str, image_dir: str, args: argparse.Namespace, omp_wait_policy: str) -> dict:
    """The bare measurements in a fresh process (the OpenMP wait policy is read at process start)."""
    cmd = [sys.executable, __file__, "--bare-only", checkpoint, image_dir, "--images", str(args.images),
           "--requests", str(args.requests), "--batch", str(args.batch), "--torch-threads", str(args.torch_threads),
           "--latency-n", str(args.latency_n), "--pause-ms", str(args.pause_ms)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if omp_wait_policy != DEFAULT_POLICY:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _bare_only(checkpoint: str, image_dir: str, args: argparse.Namespace) -> None:
    import torch

    from dermaid.inference import Predictor

    torch.set_num_threads(args.torch_threads)
    images = [f.read_bytes() for f in sorted(Path(image_dir).glob("*.jpg"))[: args.images]]
    predictor = Predictor(checkpoint)
    predictor.warmup(args.batch)
    result = {"img_per_s": bare_throughput(predictor, images, args.requests // 2, args.batch),
              "single_p50_ms": bare_latency_ms(predictor, images, args.latency_n, args.pause_ms / 1000)}
    print(json.dumps(result))


# --- HTTP load ------------------------------------------------------------------------------------------------

def _multipart(data: bytes, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in (fields or {}).items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"lesion.jpg\"\r\n"
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Client:
    """One keep-alive HTTP connection (cheap on the shared CPU: no per-request client overhead)."""

    def __init__(self, port: int, retries: int = 1) -> None:
        self.port = port
        self.retries = retries  # a request sent again on a fresh connection after a connection error
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers: http.client.HTTPMessage | None = None  # the last answer's headers (case-insensitive .get)

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        for attempt in range(self.retries + 1):
            try:
                self.conn.request("POST", path, body=body, headers={"Content-Type": content_type})
                response = self.conn.getresponse()
                self.headers = response.headers
                return response.status, response.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt == self.retries:
                    raise
        raise RuntimeError("unreachable")


def http_throughput(port: int, bodies: list[tuple[bytes, str]], total: int, concurrency: int,
                    path: str = "/v1/classify") -> float:
    """Requests/s of POST `path` with `concurrency` clients until `total` requests are answered."""
    counter = itertools.count()
    errors: list[int] = []

    def worker() -> None:
        client = Client(port)
        while (i := next(counter)) < total:
            status, _ = client.post(path, *bodies[i % len(bodies)])
            if status != 200:
                errors.append(status)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:5]}")
    return total / elapsed


def interleaved_latency_ms(predictor, port: int, images: list[bytes], bodies: list[tuple[bytes, str]],
                           n: int, pause_s: float) -> tuple[float, float]:
    """(bare p50, classify p50) at concurrency 1, alternating image by image so drift hits both alike.

    A pause before each measurement lets the other side's OpenMP threads stop spinning (they spin for
    milliseconds after a forward, on the same two cores), so neither side is timed against the other's.
    """
    client = Client(port)
    bare, served = [], []
    for i in range(n):
        time.sleep(pause_s)
        bare.append(bare_single_s(predictor, images[i % len(images)]))
        time.sleep(pause_s)
        start = time.perf_counter()
        status, payload = client.post("/v1/classify", *bodies[i % len(bodies)])
        served.append(time.perf_counter() - start)
        if status != 200:
            raise RuntimeError(f"/v1/classify: {status} {payload[:200]!r}")
    return statistics.median(bare) * 1000, statistics.median(served) * 1000


def http_latency_ms(port: int, path: str, bodies: list[tuple[bytes, str]], n: int, pause_s: float = 0.0) -> float:
    client = Client(port)
    times = []
    for body in itertools.islice(itertools.cycle(bodies), n):
        time.sleep(pause_s)
        start = time.perf_counter()
        status, payload = client.post(path, *body)
        times.append(time.perf_counter() - start)
        if status != 200:
            raise RuntimeError(f"{path}: {status} {payload[:200]!r}")
    return statistics.median(times) * 1000


# --- the plain FastAPI + uvicorn peer ---------------------------------------------------------------------------

def create_peer_app(checkpoint: str, torch_threads: int):
    """The Predictor behind plain FastAPI: POST /v1/classify (multipart image) -> the same result JSON as the app's."""
    import torch
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from dermaid.classes import DISCLAIMER, MALIGNANT_CODES
    from dermaid.inference import DEFAULT_TRIAGE, Predictor, build_result

    torch.set_num_threads(torch_threads)
    predictor = Predictor(checkpoint)
    predictor.warmup()
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(image: UploadFile) -> JSONResponse:  # a sync route: FastAPI runs it in its thread pool
        prepared = predictor.prepare(image.file.read())
        batch = predictor.forward_full(prepared.tensor[None], predictor.encode_metadata()[None])  # (1, 3, H, W)
        scores = None if batch.ood_scores is None else batch.ood_scores.tolist()[0]
        abstain = None if batch.abstain is None else batch.abstain.tolist()[0]
        result = build_result(batch.probabilities[0].tolist(), list(MALIGNANT_CODES), dict(DEFAULT_TRIAGE),
                              operating_point=predictor.card.triage, ood_score=scores, abstain=abstain)
        return JSONResponse({"model_version": predictor.version, **result, "disclaimer": DISCLAIMER})

    return app


def _peer_only(checkpoint: str, port: str, torch_threads: int) -> None:
    import uvicorn

    uvicorn.run(create_peer_app(checkpoint, torch_threads), host="127.0.0.1", port=int(port), log_level="warning")


def measure_peer(checkpoint: str, bodies: list[tuple[bytes, str]], args: argparse.Namespace) -> dict:
    """Throughput at args.concurrency and p50 at concurrency 1 of the FastAPI peer, in its own process."""
    from dermaid.processes import free_port, start_process_group, stop_process_group

    port = free_port()
    proc = start_process_group([sys.executable, __file__, "--peer-only", checkpoint, str(port),
                                "--torch-threads", str(args.torch_threads)], cwd=REPO)
    try:
        deadline = time.perf_counter() + 300
        while True:
            try:
                if Client(port).post("/v1/classify", *bodies[0])[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError("the FastAPI peer did not start")
            time.sleep(0.5)
        http_throughput(port, bodies, 2 * args.concurrency, args.concurrency)  # warm-up
        rate = http_throughput(port, bodies, args.requests, args.concurrency)
        p50 = http_latency_ms(port, "/v1/classify", bodies, args.latency_n, args.pause_ms / 1000)
    finally:
        stop_process_group(proc, signal.SIGINT, timeout_s=30)
    return {"req_per_s": rate, "p50_ms": p50}


# --- cold start -----------------------------------------------------------------------------------------------

def cold_start_s(checkpoint: str, workdir: str, image: bytes, timeout_s: float = 600) -> tuple[float, dict]:
    """(Seconds from launching `dermaid serve` to its first successful POST /v1/classify, the start-up phases it
    printed)."""
    from dermaid.processes import free_port, start_process_group, stop_process_group

    port = free_port()
    body = _multipart(image)
    cmd = [str(REPO / ".venv/bin/dermaid"), "serve", f"checkpoint={checkpoint}", f"port={port}",
           f"storage.url={workdir}/cold_uploads", f"hydra.run.dir={workdir}/cold_hydra"]
    start = time.perf_counter()
    log = open(f"{workdir}/cold_start.log", "wb")
    proc = start_process_group(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        while time.perf_counter() - start < timeout_s:
            if proc.poll() is not None:
                log.flush()
                reason = RAY_START_TIMEOUT if RAY_START_TIMEOUT in Path(f"{workdir}/cold_start.log").read_text() else ""
                raise RuntimeError(f"dermaid serve exited with {proc.returncode} {reason}; see {workdir}/cold_start.log")
            try:
                status, _ = Client(port).post("/v1/classify", *body)
                if status == 200:
                    return time.perf_counter() - start, _printed_phases(f"{workdir}/cold_start.log")
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("dermaid serve did not answer in time")
    finally:
        stop_process_group(proc, signal.SIGINT, timeout_s=60)
        log.close()


def _printed_phases(log_path: str, timeout_s: float = 30) -> dict:
    """The phases `dermaid serve` printed ("start-up seconds: ray 9.1, serve 5.0, ..."), waiting for the line."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        for line in Path(log_path).read_text(errors="replace").splitlines():
            if line.startswith("start-up seconds: "):
                pairs = (item.rsplit(" ", 1) for item in line[len("start-up seconds: "):].split(", "))
                return {name: float(value) for name, value in pairs}
        time.sleep(0.2)
    return {}


def _retry(fn, attempts: int = 5):
    """Ray's start-up can time out on a heavily shared machine (its agents import slowly): try again."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for a start-up timeout
            if attempt == attempts - 1 or RAY_START_TIMEOUT not in str(exc):
                raise
            print(f"Ray start-up timed out; retrying ({attempt + 1}/{attempts - 1})", flush=True)
            time.sleep(10)


# --- main -----------------------------------------------------------------------------------------------------

def save_results(name: str, results: dict) -> None:
    """benchmarks/results/NAME.json: what a benchmark measured, for docs/benchmarks.md (the serve benchmarks share it)."""
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=32, help="distinct synthetic JPEGs")
    parser.add_argument("--requests", type=int, default=320, help="requests per throughput measurement")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size of the classifier and the bare loop")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--omp-wait-policy", default=None, help="the classifier's OpenMP wait policy (default: the app's)")
    parser.add_argument("--forward-lanes", type=int, default=None, help="the classifier's forward_lanes (default: the app's)")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="the classifier's batch_wait_timeout_s in ms "
                        "(default: the app's)")
    parser.add_argument("--via-proxy", action="store_true", help="Serve's proxy actor in front of the ingress "
                        "(direct_ingress=false), as on a Ray started elsewhere")
    parser.add_argument("--latency-n", type=int, default=60)
    parser.add_argument("--pause-ms", type=float, default=100, help="idle time before each concurrency-1 request")
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--skip-peer", action="store_true", help="no FastAPI + uvicorn peer")
    parser.add_argument("--bare-only", nargs=2, metavar=("CHECKPOINT", "IMAGE_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--peer-only", nargs=2, metavar=("CHECKPOINT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_only:
        _bare_only(*args.bare_only, args)
        return {}
    if args.peer_only:
        _peer_only(*args.peer_only, args.torch_threads)
        return {}

    import ray
    from ray import serve

    from dermaid.config import compose
    from dermaid.processes import free_port
    from dermaid.ray_compat import direct_ingress_env
    from dermaid.ray_runtime import ensure_ray
    from serve.launcher import start

    workdir = args.workdir or tempfile.mkdtemp(prefix="serve_bench_")
    checkpoint = create_bench_checkpoint(f"{workdir}/ckpt", args.model, args.img_size)
    images = load_images(workdir, args.images)
    bodies = [_multipart(data) for data in images]
    print(f"{len(images)} JPEGs, {args.model} @ {args.img_size}, batch {args.batch}, "
          f"concurrency {args.concurrency}, {os.cpu_count()} CPUs", flush=True)

    results: dict = {"model": args.model, "img_size": args.img_size, "batch": args.batch,
                     "concurrency": args.concurrency, "requests": args.requests, "cpus": os.cpu_count()}
    image_dir = synth_image_dir(workdir)
    policies = (DEFAULT_POLICY, "ACTIVE", "PASSIVE")
    bare_runs: dict[str, list[dict]] = {p: [] for p in policies}
    for policy in policies:
        bare_runs[policy].append(bare_in_subprocess(checkpoint, image_dir, args, policy))
        print(f"bare ({policy}): {bare_runs[policy][-1]}", flush=True)

    import torch

    from dermaid.inference import Predictor

    torch.set_num_threads(args.torch_threads)
    predictor = Predictor(checkpoint)  # the bare side of the interleaved latency
    predictor.warmup()
    port = free_port()
    if not args.via_proxy:
        os.environ.update(direct_ingress_env(port))  # as `dermaid serve` starts its private Ray
    ensure_ray("local", os.cpu_count(), log_to_driver=False)  # retries a start-up timeout itself
    overrides = [f"checkpoint={checkpoint}", f"port={port}", f"storage.url={workdir}/uploads", "app_name=bench",
                 "blocking=false", f"direct_ingress={str(not args.via_proxy).lower()}",
                 f"classifier.torch_threads={args.torch_threads}", f"classifier.max_batch_size={args.batch}"]
    if args.omp_wait_policy:
        overrides.append(f"classifier.omp_wait_policy={args.omp_wait_policy}")
    if args.forward_lanes is not None:
        overrides.append(f"classifier.forward_lanes={args.forward_lanes}")
    if args.batch_wait_ms is not None:
        overrides.append(f"classifier.batch_wait_timeout_s={args.batch_wait_ms / 1000}")
    try:
        start(compose("serve", overrides))  # the app exactly as `dermaid serve` runs it
        http_throughput(port, bodies, 2 * args.concurrency, args.concurrency)  # warm-up
        served = http_throughput(port, bodies, args.requests, args.concurrency)
        print(f"serve: {served:.1f} req/s at concurrency {args.concurrency}", flush=True)
        bare_latency, classify_p50 = interleaved_latency_ms(predictor, port, images, bodies, args.latency_n,
                                                             args.pause_ms / 1000)
        serve_c1_p50 = http_latency_ms(port, "/v1/classify", bodies, args.latency_n, args.pause_ms / 1000)
        saliency_p50 = http_latency_ms(port, "/v1/saliency", bodies, max(10, args.latency_n // 2))
        print(f"serve p50: classify {classify_p50:.1f} ms (bare alongside {bare_latency:.1f} ms), "
              f"saliency {saliency_p50:.1f} ms", flush=True)
        serve.delete("bench")
        start(compose("serve", [*overrides, "classifier.max_batch_size=1"]))
        http_throughput(port, bodies, args.concurrency, args.concurrency)
        unbatched = http_throughput(port, bodies, args.requests, args.concurrency)
        print(f"serve max_batch_size=1: {unbatched:.1f} req/s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    for policy in policies:
        bare_runs[policy].append(bare_in_subprocess(checkpoint, image_dir, args, policy))
        print(f"bare ({policy}) after: {bare_runs[policy][-1]}", flush=True)
    # the baseline is the best policy (before/after averaged): a conservative ratio
    rates = {p: statistics.mean(r["img_per_s"] for r in runs) for p, runs in bare_runs.items()}
    bare = max(rates.values())
    if not args.skip_peer:
        peer = measure_peer(checkpoint, bodies, args)
        print(f"FastAPI peer: {peer['req_per_s']:.1f} req/s at concurrency {args.concurrency}, p50 "
              f"{peer['p50_ms']:.1f} ms at concurrency 1 (Serve: {served:.1f} req/s, p50 {serve_c1_p50:.1f} ms)",
              flush=True)
        results.update({"peer_req_per_s": peer["req_per_s"], "peer_p50_ms": peer["p50_ms"],
                        "serve_c1_p50_ms": serve_c1_p50, "serve_over_peer_throughput": served / peer["req_per_s"],
                        "serve_minus_peer_p50_ms": serve_c1_p50 - peer["p50_ms"]})
    if not args.skip_cold_start:
        results["cold_start_s"], results["cold_start_phases"] = _retry(
            lambda: cold_start_s(checkpoint, workdir, images[0]))
        print(f"cold start: {results['cold_start_s']:.1f} s; phases {results['cold_start_phases']}", flush=True)

    fresh_bare = statistics.mean(r["single_p50_ms"] for r in bare_runs[args.omp_wait_policy or DEFAULT_POLICY])
    results.update({
        "bare_img_per_s": bare, "bare_runs": bare_runs,
        "serve_req_per_s": served, "throughput_ratio": served / bare,
        "serve_unbatched_req_per_s": unbatched, "batching_gain": served / unbatched,
        "bare_single_p50_ms": bare_latency, "classify_p50_ms": classify_p50,
        "latency_overhead_ms": classify_p50 - bare_latency,
        "fresh_bare_single_p50_ms": fresh_bare, "latency_overhead_vs_fresh_ms": classify_p50 - fresh_bare,
        "saliency_p50_ms": saliency_p50, "saliency_over_classify": saliency_p50 / classify_p50,
    })
    checks = [
        ("throughput ratio (serve / bare)", results["throughput_ratio"], ">= 0.8", results["throughput_ratio"] >= 0.8),
        ("batching gain (batch / batch=1)", results["batching_gain"], "reported", True),
        ("classify p50 - bare p50 (ms)", results["latency_overhead_ms"], "<= 15", results["latency_overhead_ms"] <= 15),
        ("classify p50 - bare p50, Serve down", results["latency_overhead_vs_fresh_ms"], "reported", True),
        ("saliency p50 / classify p50", results["saliency_over_classify"], "<= 3", results["saliency_over_classify"] <= 3),
    ]
    if "peer_req_per_s" in results:
        checks.append(("throughput Serve / FastAPI peer, c=16", results["serve_over_peer_throughput"], ">= 1",
                       results["serve_over_peer_throughput"] >= 1))
        checks.append(("p50 Serve - FastAPI peer, c=1 (ms)", results["serve_minus_peer_p50_ms"], "<= 5",
                       results["serve_minus_peer_p50_ms"] <= 5))
    if "cold_start_s" in results:
        checks.append(("cold start (s)", results["cold_start_s"], "< 30", results["cold_start_s"] < 30))
    print()
    for name, value, target, ok in checks:
        print(f"{name:<36} {value:8.2f}   target {target:<9} {'ok' if ok else 'MISSED'}")
    save_results("serve_bench", results)
    return results


if __name__ == "__main__":
    main()
