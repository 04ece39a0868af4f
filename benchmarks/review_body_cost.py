"""What one unauthenticated POST to the review API costs the Ingress replica in memory (issue #18, item 1).

    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/review_body_cost.py [--mib 19] [--json out.json]

Starts a private local Ray and a real DermAID Serve app (build_app: Classifier, Explainer and Ingress on an
untrained test_efficientnet checkpoint, uploads in a temporary directory), then sends, over a raw socket, a
JSON body of `--mib` MiB of empty lists ("[[],[],...]", under the 20 MiB upload limit) to
POST /v1/review/labelstudio/import and POST /v1/review/uploads/{id}/labels: without a token, with a wrong
token and (import only) with a dermatologist's token. For each it reports the status and the memory of the
Ingress replica process, found by its Ray process title (`ray::ServeReplica:<app>:Ingress`, psutil):
RSS before, the highest RSS sampled every 2 ms while the request ran, and the growth of the kernel's
high-water mark (VmHWM in /proc/<pid>/status: the true peak, not a sample). The Serve proxy's RSS is
reported beside it (it holds whatever the client sent that the replica has not asked for).

The code measured is whatever `serve` imports (printed as "code"): to measure the code before a change, run
the script from a checkout of that commit with PYTHONPATH pointing at it (Ray's workers put the driver's
working directory first on sys.path), e.g.
    git worktree add --detach /tmp/before <commit> && cd /tmp/before && PYTHONPATH=/tmp/before \
      flock /tmp/dermaid-ray.lock /work/main/.venv/bin/python /work/main/benchmarks/review_body_cost.py
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import requests

MIB = 1024 * 1024
APP = "review-body-cost"


def create_checkpoint(out: str) -> str:
    """An untrained test_efficientnet at 64 px (the tests' tiny checkpoint): the Ingress does not care."""
    import torch

    from dermaid.models.card import build_card, save_checkpoint
    from dermaid.models.classifier import create_classifier, resolve_input_spec

    torch.manual_seed(0)
    model_cfg = {"name": "test_efficientnet", "pretrained": False, "use_metadata": True}
    model = create_classifier(model_cfg)
    save_checkpoint(out, build_card(model_cfg, resolve_input_spec(model, 64)), model.state_dict())
    return out


def start_app(workdir: str, token_hash: str) -> str:
    """A local Ray + Serve running build_app; the base URL once /readyz answers."""
    import ray
    from ray import serve

    from dermaid.processes import free_port
    from serve.app import build_app

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "checkpoint": create_checkpoint(f"{workdir}/checkpoint"),
        "storage": {"url": f"{workdir}/uploads"},
        "review": {"tokens": {"dr_bench": token_hash}},
        "classifier": {"num_cpus": 0.25, "torch_threads": 1, "decode_threads": 1},
        "explainer": {"num_cpus": 0.25, "torch_threads": 1},
        "ingress": {"num_cpus": 0.1},
    }
    serve.run(build_app(args), name=APP, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while requests.get(f"{base}/readyz", timeout=10).status_code != 200:
        if time.time() > deadline:
            raise SystemExit("the app never became ready")
        time.sleep(0.5)
    return base


def process_titled(fragment: str) -> psutil.Process:
    """The one live process whose title (Ray sets `ray::<actor>`) contains `fragment`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if fragment in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if len(found) != 1:
        raise SystemExit(f"expected one process titled {fragment!r}, found {len(found)}")
    return found[0]


def high_water_mark(pid: int) -> int:
    """Peak RSS of the process so far, in bytes (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc: this measurement needs Linux")


def post_raw(port: int, path: str, body: bytes, token: str | None) -> int:
    """POST `body` as JSON over a raw socket; the status, even when the server answers before the whole body
    is sent (what requests would report as a broken pipe)."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head)
        try:
            for start in range(0, len(body), MIB):
                sock.sendall(body[start:start + MIB])
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (and closed) before the rest was sent
        response = b""
        while b"\r\n" not in response:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            response += part
    return int(response.split(b" ", 2)[1]) if response else 0


def measure(ingress: psutil.Process, proxy: psutil.Process, send) -> dict:
    """Status, RSS before / sampled peak / after, VmHWM growth of the Ingress; the proxy's RSS growth."""
    time.sleep(1.0)  # let the replica settle after the previous request
    before, hwm_before, proxy_before = ingress.memory_info().rss, high_water_mark(ingress.pid), proxy.memory_info().rss
    peak = {"ingress": before, "proxy": proxy_before}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["ingress"] = max(peak["ingress"], ingress.memory_info().rss)
            peak["proxy"] = max(peak["proxy"], proxy.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    status = send()
    seconds = time.perf_counter() - start
    time.sleep(0.5)  # a replica still parsing after answering would show here
    done.set()
    sampler.join()
    return {"status": status, "seconds": round(seconds, 3),
            "ingress_rss_before_mb": round(before / 1e6, 1),
            "ingress_rss_peak_growth_mb": round((peak["ingress"] - before) / 1e6, 1),
            "ingress_hwm_growth_mb": round((high_water_mark(ingress.pid) - hwm_before) / 1e6, 1),
            "ingress_rss_after_growth_mb": round((ingress.memory_info().rss - before) / 1e6, 1),
            "proxy_rss_peak_growth_mb": round((peak["proxy"] - proxy_before) / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=19.0, help="body size (MiB), under the 20 MiB upload limit")
    parser.add_argument("--json", help="also write the results here")
    opts = parser.parse_args()

    import serve as serve_package
    from ray import serve

    from dermaid.auth import create_token, hash_token

    token = create_token()
    n = int(opts.mib * MIB) // 3
    body = b"[" + b"[]," * (n - 1) + b"[]]"  # n empty lists: ~21x their size as Python objects
    with tempfile.TemporaryDirectory() as workdir:
        base = start_app(workdir, hash_token(token))
        port = int(base.rsplit(":", 1)[1])
        try:
            ingress = process_titled(f"ServeReplica:{APP}:Ingress")
            proxy = process_titled("ProxyActor")
            label_path = f"/v1/review/uploads/{uuid.uuid4()}/labels"
            cases = {
                "import, no token": lambda: post_raw(port, "/v1/review/labelstudio/import", body, None),
                "import, wrong token": lambda: post_raw(port, "/v1/review/labelstudio/import", body, create_token()),
                "label, no token": lambda: post_raw(port, label_path, body, None),
                "import, reviewer token": lambda: post_raw(port, "/v1/review/labelstudio/import", body, token),
            }
            results = {"code": str(Path(serve_package.__file__).parent.parent), "body_mib": round(len(body) / MIB, 2),
                       "cases": {name: measure(ingress, proxy, send) for name, send in cases.items()}}
        finally:
            serve.shutdown()
    print(json.dumps(results, indent=2))
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
