"""Abstention's cost: POST /v1/classify with the card's OOD score against the same weights without (CPU).

    .venv/bin/python benchmarks/ood_overhead.py                                          # efficientnet_b0 @ 224
    .venv/bin/python benchmarks/ood_overhead.py --model mobilenetv3_small_050 --img-size 112   # the demo's backbone

One run, two checkpoints with the same untrained weights (serve_bench.create_bench_checkpoint): "plain", and
"ood", a copy calibrated as `dermaid calibrate` does it (dermaid.evaluation.calibrate fit_detectors +
choose_detector with ood.default=multilayer, the card default on the toy model, then save_statistics and
card.with_calibration + replace_card; the card's triage block is left as it was, so only the OOD score
differs). The detectors are fitted on features (predict_records_with_features, calibrate's path) of toy
lesions from dermaid.data.synth and thresholded against dermaid.data.synth_ood images, all generated here;
their quality does not matter for latency, the code path is the served one.

What it measures (serve_bench's JPEG uploads, 600x450 .. 1280x960 px, bounded loops on 127.0.0.1):
    model only   Predictor.forward against Predictor.forward_full (the OOD checkpoint, batch 1, in this
                 process, Serve down, round-robin): the forward, the forward with the feature hooks, and
                 the detector's score alone, for where the time goes
    latency      p50 / p90 of POST /v1/classify at concurrency 1, alternating request by request between the
                 two apps (100 ms idle before each, as serve_bench), first side swapped every pair   target:
                 p50 with / without < 1.10
    throughput   requests/s at concurrency 16, in alternating blocks (ABBA..., so drift hits both alike)
Both checkpoints run as two Serve apps in one Ray (launcher.start's steps, each app with its own route prefix
and its own direct-ingress port; replicas' CPU reservations scaled down to fit both on 2 cores).
Results go to benchmarks/results/ood_overhead.json, one entry per model@size (other entries are kept).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from serve_bench import REPO, Client, _multipart, create_bench_checkpoint, http_throughput, load_images  # benchmarks/

APPS = ("plain", "ood")  # app name = route prefix; "ood" serves the calibrated copy
OOD_METHOD = "multilayer"


# --- the calibrated copy --------------------------------------------------------------------------------------

def fit_rows(workdir: str, n: int) -> list[dict]:
    """Labelled toy lesions (dermaid.data.synth, seed 1: not the bench uploads) as evaluate's records."""
    from dermaid.classes import CLASS_CODES
    from dermaid.data.isic import read_records
    from dermaid.data.synth import generate
    from dermaid.files import read_bytes

    generate(f"{workdir}/fit", n=n, seed=1, size=(600, 450))
    records = read_records(f"{workdir}/fit")
    return [{"image": read_bytes(row.image_url), "age": row.age, "sex": row.sex, "site": row.site,
             "label_idx": CLASS_CODES.index(row.label)} for row in records.itertuples()]


def split_outputs(model, card, rows: list[dict], batch: int) -> dict:
    """calibrate's Outputs for rows: features, raw logits, calibrated probs (+ labels or kinds)."""
    import numpy as np
    import torch

    from dermaid.evaluation.evaluate import predict_records_with_features

    features, logits, probs = predict_records_with_features(model, rows, card.input, card.temperature, 0,
                                                            torch.device("cpu"), batch_size=batch)
    extra = {key: np.asarray([row[key] for row in rows]) for key in ("label_idx", "kind") if key in rows[0]}
    return {"features": features, "logits": logits, "probs": probs, "labels": extra.get("label_idx"),
            "kinds": extra.get("kind")}


def calibrated_copy(checkpoint: str, out: str, workdir: str, n_fit: int, ood_per_kind: int) -> dict:
    """Copy `checkpoint` to `out` and give the copy a fitted detector as `dermaid calibrate` writes it;
    returns the card's `ood` block."""
    from dermaid.config import compose, to_plain
    from dermaid.data.synth_ood import iter_ood_images
    from dermaid.evaluation.calibrate import choose_detector, fit_detectors
    from dermaid.evaluation.ood import save_statistics
    from dermaid.models.card import load_float_model, replace_card

    shutil.copytree(checkpoint, out)
    ood_cfg = to_plain(compose("calibrate", [f"checkpoint={out}", f"ood.default={OOD_METHOD}"]))["ood"]
    model, card = load_float_model(out, "cpu")
    rows = fit_rows(workdir, n_fit)
    train, val = split_outputs(model, card, rows[::2], 32), split_outputs(model, card, rows[1::2], 32)
    generated = split_outputs(model, card, [{"image": data, "kind": kind} for kind, data in iter_ood_images(
        ood_per_kind, int(ood_cfg["validation_set"]["seed"]))], 32)
    detectors = fit_detectors(ood_cfg, card, train, model.feature_layout)
    block = choose_detector(detectors, val, generated, ood_cfg, "bench")
    block["statistics"] = save_statistics(out, detectors)
    replace_card(out, card.with_calibration(block, card.triage))  # triage as it was: only the OOD score differs
    return block


# --- model only -----------------------------------------------------------------------------------------------

def round_robin_ms(steps: dict[str, Callable[[int], object]], n: int, pause_s: float) -> dict[str, list[float]]:
    """Each step n times, in turn (the first step rotates each round), `pause_s` idle before each: ms per call."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(n):
        for name in names[i % len(names):] + names[:i % len(names)]:
            time.sleep(pause_s)
            start = time.perf_counter()
            steps[name](i)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def model_only(checkpoint: str, images: list[bytes], n: int, pause_s: float) -> dict:
    """p50 ms at batch 1 of Predictor.forward, forward_full, the model with and without the feature hooks,
    and the detector's score alone (the calibrated checkpoint; Serve down)."""
    import torch

    from dermaid.inference import Predictor

    predictor = Predictor(checkpoint)
    if predictor.ood is None or predictor.ood.method != OOD_METHOD:
        raise RuntimeError(f"{checkpoint}: expected a {OOD_METHOD} detector, got {predictor.ood}")
    inputs = [(predictor.prepare(data).tensor[None], predictor.encode_metadata()[None]) for data in images]
    with torch.inference_mode():
        features, logits = predictor.model.forward_with_features(*inputs[0])  # (1, D), (1, 8)
    features, logits = features.double().numpy(), logits.double().numpy()

    def model_call(method: Callable) -> Callable[[int], object]:
        @torch.inference_mode()
        def call(i: int) -> object:
            return method(*inputs[i % len(inputs)])
        return call

    steps = {"Predictor.forward": lambda i: predictor.forward(*inputs[i % len(inputs)]),
             "Predictor.forward_full": lambda i: predictor.forward_full(*inputs[i % len(inputs)]),
             "model forward": model_call(predictor.model.forward),
             "model forward_with_features": model_call(predictor.model.forward_with_features),
             "OodScorer.score": lambda i: predictor.ood.score(features, logits)}
    round_robin_ms(steps, 3, 0.0)  # warm-up
    return {name: statistics.median(ms) for name, ms in round_robin_ms(steps, n, pause_s).items()}


# --- two apps in one Serve ------------------------------------------------------------------------------------

def free_port_pair() -> int:
    """A port p with p and p + 1 free (the two apps' direct-ingress ports)."""
    from dermaid.processes import free_port

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


def app_overrides(checkpoint: str, workdir: str, name: str, args: argparse.Namespace) -> list[str]:
    """conf/serve.yaml with both apps' CPU reservations fitting 2 cores (torch threads as `dermaid serve`)."""
    return [f"checkpoint={checkpoint}", f"storage.url={workdir}/uploads_{name}", f"app_name={name}",
            f"classifier.torch_threads={args.torch_threads}", f"classifier.max_batch_size={args.batch}",
            "classifier.num_cpus=0.5", "explainer.num_cpus=0.2", "ingress.num_cpus=0.2"]


def start_apps(checkpoints: dict[str, str], workdir: str, args: argparse.Namespace) -> dict[str, int]:
    """serve.launcher.start's steps for each checkpoint, as app `name` at route prefix /name, on one private
    Ray with direct ingress on [port, port + len): app name -> its port (asked from each port's /-/routes)."""
    from ray import serve

    from dermaid.config import compose
    from dermaid.processes import free_port
    from dermaid.ray_compat import direct_ingress_env
    from dermaid.ray_runtime import ensure_ray
    from serve.app import build_app
    from serve.launcher import _checked_app_args

    port = free_port_pair()
    os.environ.update({**direct_ingress_env(port), "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + len(checkpoints))})
    ensure_ray("local", os.cpu_count(), log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # the proxy, on a spare port
    for name, checkpoint in checkpoints.items():
        cfg = compose("serve", app_overrides(checkpoint, workdir, name, args))
        serve.run(build_app(_checked_app_args(cfg)), name=name, route_prefix=f"/{name}")
    ports = {}
    for candidate in range(port, port + len(checkpoints)):
        with urllib.request.urlopen(f"http://127.0.0.1:{candidate}/-/routes", timeout=30) as response:
            ports.update({app: candidate for app in json.loads(response.read()).values()})
    return ports


def classify(client: Client, name: str, body: tuple[bytes, str]) -> dict:
    status, payload = client.post(f"/{name}/v1/classify", *body)
    if status != 200:
        raise RuntimeError(f"/{name}/v1/classify: {status} {payload[:200]!r}")
    return json.loads(payload)


def check_apps(ports: dict[str, int], bodies: list[tuple[bytes, str]]) -> float:
    """Each app answers as it should (ood: a score; plain: null); the share of uploads the detector refuses."""
    plain = classify(Client(ports["plain"]), "plain", bodies[0])
    if plain["ood_score"] is not None:
        raise RuntimeError(f"the plain app scored OOD: {plain['ood_score']}")
    client = Client(ports["ood"])
    answers = [classify(client, "ood", body) for body in bodies]
    if any(answer["ood_score"] is None for answer in answers):
        raise RuntimeError("the ood app gave no OOD score")
    return statistics.mean(bool(answer["abstain"]) for answer in answers)


def alternating_latency_ms(ports: dict[str, int], bodies: list[tuple[bytes, str]], n: int,
                           pause_s: float) -> dict[str, list[float]]:
    """ms of each app's classify at concurrency 1: n pairs on the same upload, first side swapped each pair."""
    clients = {name: Client(port) for name, port in ports.items()}
    times: dict[str, list[float]] = {name: [] for name in APPS}
    for i in range(n):
        for name in (APPS if i % 2 == 0 else APPS[::-1]):
            time.sleep(pause_s)
            start = time.perf_counter()
            classify(clients[name], name, bodies[i % len(bodies)])
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def alternating_throughput(ports: dict[str, int], bodies: list[tuple[bytes, str]], requests: int,
                           concurrency: int, rounds: int) -> dict[str, list[float]]:
    """req/s of each app at `concurrency`, in blocks of `requests`: ABBA, BAAB, ... (`rounds` of each side)."""
    rates: dict[str, list[float]] = {name: [] for name in APPS}
    for order in itertools.islice(itertools.cycle((APPS, APPS[::-1])), rounds):
        for name in order:
            time.sleep(1.0)
            rates[name].append(http_throughput(ports[name], bodies, requests, concurrency, f"/{name}/v1/classify"))
    return rates


def served(checkpoints: dict[str, str], workdir: str, bodies: list[tuple[bytes, str]],
           args: argparse.Namespace) -> dict:
    """Both apps up in one Serve: the refused share, the latency pairs and the throughput blocks."""
    import ray
    from ray import serve

    try:
        ports = start_apps(checkpoints, workdir, args)
        refused = check_apps(ports, bodies)
        for name in APPS:  # warm-up: both apps' lanes and batches
            http_throughput(ports[name], bodies, 2 * args.concurrency, args.concurrency, f"/{name}/v1/classify")
        latency = alternating_latency_ms(ports, bodies, args.latency_n, args.pause_ms / 1000)
        throughput = alternating_throughput(ports, bodies, args.requests, args.concurrency, args.rounds)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"refused_share": refused, "latency_ms": latency, "throughput": throughput}


# --- main -----------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarise(model_ms: dict, serve: dict, block: dict) -> dict:
    """The figures: p50/p90 and req/s per side, the ratios, the model-only differences."""
    lat, rate = serve["latency_ms"], serve["throughput"]
    per_app = {name: {"p50_ms": statistics.median(lat[name]), "p90_ms": percentile(lat[name], 90),
                      "req_per_s": statistics.mean(rate[name]), "req_per_s_blocks": rate[name]} for name in APPS}
    return {
        "apps": per_app, "refused_share_of_uploads": serve["refused_share"],
        "p50_ratio": per_app["ood"]["p50_ms"] / per_app["plain"]["p50_ms"],
        "p90_ratio": per_app["ood"]["p90_ms"] / per_app["plain"]["p90_ms"],
        "paired_diff_p50_ms": statistics.median(b - a for a, b in zip(lat["plain"], lat["ood"])),
        "throughput_ratio": per_app["ood"]["req_per_s"] / per_app["plain"]["req_per_s"],
        "model_only_p50_ms": model_ms,
        "model_only_full_minus_forward_ms": model_ms["Predictor.forward_full"] - model_ms["Predictor.forward"],
        "model_only_hooks_ms": model_ms["model forward_with_features"] - model_ms["model forward"],
        "ood_block": {key: block[key] for key in ("method", "threshold", "refuse_share")},
    }


def print_table(row: dict, header: str) -> None:
    apps = row["apps"]
    print(f"\n{header}")
    print(f"{'':34} {'without OOD':>12} {'with OOD':>12} {'ratio':>7}")
    for label, key in (("classify p50 (ms), concurrency 1", "p50_ms"), ("classify p90 (ms), concurrency 1", "p90_ms"),
                       ("req/s at concurrency 16", "req_per_s")):
        ratio = apps["ood"][key] / apps["plain"][key]
        print(f"{label:34} {apps['plain'][key]:12.1f} {apps['ood'][key]:12.1f} {ratio:7.3f}")
    ms = row["model_only_p50_ms"]
    print(f"model only, batch 1 (p50 ms): Predictor.forward {ms['Predictor.forward']:.2f}, forward_full "
          f"{ms['Predictor.forward_full']:.2f} (+{row['model_only_full_minus_forward_ms']:.2f}); model forward "
          f"{ms['model forward']:.2f}, with feature hooks {ms['model forward_with_features']:.2f} "
          f"(+{row['model_only_hooks_ms']:.2f}); OodScorer.score {ms['OodScorer.score']:.3f}")
    print(f"uploads refused by the detector: {row['refused_share_of_uploads']:.0%}; median of the per-pair difference "
          f"(same upload, back to back): {row['paired_diff_p50_ms']:+.1f} ms")
    verdict = "ok" if row["p50_ratio"] < 1.10 else "MISSED"
    print(f"p50 with / without: {row['p50_ratio']:.3f} (target < 1.10: {verdict}); "
          f"throughput with / without: {row['throughput_ratio']:.3f}")


def write_row(key: str, row: dict) -> Path:
    """Merge this model's row into benchmarks/results/ood_overhead.json (rows of other models stay)."""
    out = REPO / "benchmarks" / "results" / "ood_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.exists() else {}
    rows[key] = row
    out.write_text(json.dumps(rows, indent=2))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=32, help="distinct synthetic JPEG uploads")
    parser.add_argument("--fit-images", type=int, default=96, help="toy lesions to fit (half) and threshold (half) on")
    parser.add_argument("--ood-per-kind", type=int, default=4, help="generated OOD images per kind (threshold report)")
    parser.add_argument("--latency-n", type=int, default=150, help="concurrency-1 requests per app")
    parser.add_argument("--pause-ms", type=float, default=100, help="idle time before each concurrency-1 request")
    parser.add_argument("--requests", type=int, default=96, help="requests per throughput block")
    parser.add_argument("--rounds", type=int, default=4, help="throughput blocks per app")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="the classifiers' max_batch_size")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--model-n", type=int, default=60, help="model-only calls per step")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="ood_overhead_")
    plain = create_bench_checkpoint(f"{workdir}/plain", args.model, args.img_size)
    block = calibrated_copy(plain, f"{workdir}/ood", workdir, args.fit_images, args.ood_per_kind)
    print(f"{args.model} @ {args.img_size}: {block['method']} detector, threshold {block['threshold']:.3f} "
          f"(validation AUROC {block['validation'][block['method']]['auroc']:.3f} against synth_ood, untrained weights)",
          flush=True)
    images = load_images(workdir, args.images)
    model_ms = model_only(f"{workdir}/ood", images, args.model_n, args.pause_ms / 1000)
    print(f"model only (p50 ms): {json.dumps({k: round(v, 2) for k, v in model_ms.items()})}", flush=True)
    serve = served({"plain": plain, "ood": f"{workdir}/ood"}, workdir, [_multipart(data) for data in images], args)
    row = {"model": args.model, "img_size": args.img_size, "cpus": os.cpu_count(), "torch_threads": args.torch_threads,
           "batch": args.batch, "concurrency": args.concurrency, "latency_n": args.latency_n,
           "requests_per_block": args.requests, "rounds": args.rounds,
           "measured": time.strftime("%Y-%m-%d %H:%M:%S"), **summarise(model_ms, serve, block)}
    print_table(row, f"{args.model} @ {args.img_size}, {os.cpu_count()} CPUs, torch threads {args.torch_threads}")
    print(f"-> {write_row(f'{args.model}@{args.img_size}', row)}")
    return row


if __name__ == "__main__":
    main()
