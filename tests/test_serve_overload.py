"""Serve's own safeguards under a burst far above capacity, over real HTTP on the session's Ray: the classifier's
bounded queue answers fast JSON 503s with Retry-After, nothing else fails, /readyz stays cheap, and the service
recovers by itself. The deadline and overload answers themselves (serve/errors.py) are also checked without Ray.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image


BURST = 64  # concurrent clients, against 2 running + 2 queued classifications


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_app(ray_session, tiny_checkpoint, tmp_path_factory):
    """Base URL of an app whose classifier takes 2 requests at a time and queues 2 more per caller."""
    from ray import serve

    from conftest import start_test_app

    base = start_test_app(
        tiny_checkpoint, "dermaid-overload", tmp_path_factory, "classifier.max_ongoing_requests=2",
        "classifier.max_queued_requests=2", "classifier.max_batch_size=2")
    yield base
    serve.shutdown()


def _classify(base: str, image: bytes) -> tuple[int, float, dict, Any]:
    started = time.monotonic()
    r = requests.post(f"{base}/v1/classify", files={"image": ("a.png", image, "image/png")}, timeout=120)
    return r.status_code, time.monotonic() - started, r.json(), r.headers  # case-insensitive names


def test_a_burst_far_above_capacity_gets_fast_json_503s_and_the_service_recovers(small_app):
    base, image = small_app, _png()
    assert _classify(base, image)[0] == 200
    with ThreadPoolExecutor(BURST + 1) as pool:
        burst = [pool.submit(_classify, base, image) for _ in range(BURST * 3)]
        time.sleep(0.2)
        ready_started = time.monotonic()
        ready = requests.get(f"{base}/readyz", timeout=30)  # during the burst
        ready_s = time.monotonic() - ready_started
        answers = [f.result() for f in burst]
    statuses = {status for status, *_ in answers}
    assert statuses <= {200, 503}, statuses  # no 5xx of another kind, nothing lost
    rejected = [a for a in answers if a[0] == 503]
    served = [a for a in answers if a[0] == 200]
    assert len(rejected) >= len(answers) // 4 and served, (len(rejected), len(served))
    for _, _, body, headers in rejected:
        assert body["error"]["code"] == "overloaded" and "retry" in body["error"]["message"].lower()
        assert int(headers["Retry-After"]) >= 1 and body["error"]["retry_after_s"] == int(headers["Retry-After"])
    # how fast the rejections are (they never wait for the model) is measured by benchmarks/overload.py, not here
    assert ready.status_code == 200 and ready.json()["status"] == "ready", (ready.text, ready_s)
    deadline = time.monotonic() + 60
    while _classify(base, image)[0] != 200:  # recovers by itself
        assert time.monotonic() < deadline, "the service did not recover"
        time.sleep(0.2)
    assert all(_classify(base, image)[0] == 200 for _ in range(5))


def test_deadline_and_backpressure_answers_are_json_503_with_retry_after():
    """serve/errors.py on a plain FastAPI app (no Ray): an answer later than the deadline, and a model call that
    Serve's handle refuses with BackPressureError (guarded), both become the one JSON error shape, 503, Retry-After."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from ray.serve.exceptions import BackPressureError

    from serve.errors import add_error_handling, guarded

    api = FastAPI()
    add_error_handling(api, max_bytes=lambda: 1024, deadline_s=lambda: 0.2, retry_after_s=lambda: 3)

    @api.get("/slow")
    async def slow() -> dict:
        await asyncio.sleep(5)
        return {}

    @api.get("/full")
    async def full() -> dict:
        async def refused() -> dict:
            raise BackPressureError(num_queued_requests=8, max_queued_requests=8)

        return await guarded(refused(), 3)

    client = TestClient(api)
    started = time.monotonic()
    slow_answer = client.get("/slow")
    assert time.monotonic() - started < 3
    full_answer = client.get("/full")
    for answer, code in ((slow_answer, "timeout"), (full_answer, "overloaded")):
        assert answer.status_code == 503 and answer.headers["retry-after"] == "3", answer.text
        assert answer.json()["error"]["code"] == code and answer.json()["error"]["retry_after_s"] == 3
