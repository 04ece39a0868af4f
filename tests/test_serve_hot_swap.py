"""A running service follows a registry stage: promotion and rollback under concurrent HTTP load, no request lost.

One app (serve.launcher.start_app, as `dermaid serve model_url=registry://derm/production` starts it) on the session's
Ray. Two registry versions hold the same calibrated weights (registering twice is cheap); the answers still name
their version ("derm@v1" / "derm@v2"), which is what the swap is judged by. The stage follower's check() is what
`dermaid serve` runs every follow_interval_s; here the test calls it right after promoting. The Explainer follows in
the same deploy: after each switch, /v1/saliency's overlay names the version too.
Also (no Ray): the Classifier's health check fails once its model cannot produce a forward.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import requests
from PIL import Image

from dermaid.processes import free_port

CONCURRENCY = 8


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (5, 6, 3), dtype=np.uint8)).resize((96, 72), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def following_app(ray_session, calibrated_checkpoint, tmp_path_factory):
    """(Started, Registry) of an app following registry://derm/production, which points at derm@v1."""
    from ray import serve

    from dermaid.config import compose
    from dermaid.registry import Registry
    from serve.launcher import start_app

    root = str(tmp_path_factory.mktemp("registry"))
    registry = Registry(root)
    for version in ("v1", "v2"):
        registry.register(calibrated_checkpoint, "derm", version)
    registry.promote("derm", "v1")
    cfg = compose("serve", [
        "model_url=registry://derm/production", f"registry_root={root}", f"port={free_port()}", "app_name=dermaid-swap",
        "blocking=false", f"storage.url={tmp_path_factory.mktemp('swap_uploads')}",
        "classifier.num_cpus=0.5", "classifier.torch_threads=1", "explainer.num_cpus=0.25",
        "explainer.torch_threads=1", "ingress.num_cpus=0.1",
    ])
    started = start_app(cfg)
    assert started.follower is not None and started.follower.current.version == "derm@v1"
    assert set(started.phases) >= {"ray", "serve", "model_load", "warmup", "total"}
    deadline = time.monotonic() + 180
    while requests.get(f"{started.url}/readyz", timeout=30).status_code != 200:  # the explainer starts after
        assert time.monotonic() < deadline, "the app never became ready"
        time.sleep(0.5)
    yield started, registry
    serve.shutdown()


def _load(base: str):
    """benchmarks/promotion_under_load.py's Load on this app: CONCURRENCY clients classifying in a loop, each
    row (client, sent, done, status, registry_version, X-DermAID-Model-Version)."""
    import sys
    from pathlib import Path

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        from promotion_under_load import Load
        from serve_bench import _multipart
    finally:
        sys.path.remove(benchmarks)
    return Load(int(base.rsplit(":", 1)[1]), [_multipart(_jpeg(i)) for i in range(CONCURRENCY)], CONCURRENCY)


def _saliency_from(base: str, version: str, timeout_s: float = 120) -> str:
    """Asks /v1/saliency until its overlay names `version` (the PNG's Description text); that text."""
    deadline, description = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        r = requests.post(f"{base}/v1/saliency", files={"image": ("a.jpg", _jpeg(99), "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        description = Image.open(io.BytesIO(r.content)).text["Description"]
        if version in description:
            assert r.headers["X-DermAID-Model-Version"] == version  # the header names the same version
            as_json = requests.post(f"{base}/v1/saliency", data={"format": "json"}, timeout=60,
                                    files={"image": ("a.jpg", _jpeg(99), "image/jpeg")}).json()
            assert as_json["registry_version"] == version, as_json
            return description
        time.sleep(0.2)
    raise AssertionError(f"/v1/saliency never named {version} within {timeout_s} s: {description}")


def test_promotion_and_rollback_under_load_switch_once_each_way_and_lose_nothing(following_app):
    from ray import serve

    started, registry = following_app
    follower = started.follower
    replica_start = serve.get_deployment_handle("Classifier", "dermaid-swap").info.remote().result()["startup"]
    explainer = serve.get_deployment_handle("Explainer", "dermaid-swap")
    explainer_start = explainer.info.remote().result()
    assert explainer_start["registry_version"] == "derm@v1"
    assert "derm@v1" in _saliency_from(started.url, "derm@v1", timeout_s=1)
    with _load(started.url) as load:
        time.sleep(1.0)
        promoted = time.monotonic()
        registry.promote("derm", "v2")
        assert follower.check().version == "derm@v2" and follower.check() is None  # deployed once
        first_v2 = load.first("derm@v2", promoted, timeout_s=120)
        _saliency_from(started.url, "derm@v2")  # the same deploy moved the Explainer: saliency names it too
        time.sleep(1.0)
        rolled_back = time.monotonic()
        assert registry.rollback("derm").version == "v1"
        assert follower.check().version == "derm@v1"
        first_v1 = load.first("derm@v1", rolled_back, timeout_s=120)
        time.sleep(1.0)
    results = sorted(load.rows, key=lambda r: r[1])
    failed = [r for r in results if r[3] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:3]}"
    assert all(r[5] == r[4] for r in results), "the X-DermAID-Model-Version header names the answer's version"
    # once any client had an answer from the new version, every request sent afterwards got it
    assert {r[4] for r in results if first_v2 < r[1] < rolled_back} == {"derm@v2"}
    assert {r[4] for r in results if r[1] > first_v1} == {"derm@v1"}
    assert {r[4] for r in results if r[2] < promoted} == {"derm@v1"}
    for i in range(CONCURRENCY):  # each client saw v1 ... v2 ... v1: exactly one switch each way
        versions = [r[4] for r in results if r[0] == i]
        changes = [(a, b) for a, b in zip(versions, versions[1:]) if a != b]
        assert changes == [("derm@v1", "derm@v2"), ("derm@v2", "derm@v1")], (i, changes)
    after = serve.get_deployment_handle("Classifier", "dermaid-swap").info.remote().result()
    assert after["startup"] == replica_start, "the replica was restarted: the swap must be in place"
    assert after["registry_version"] == "derm@v1"
    ready = requests.get(f"{started.url}/readyz", timeout=10).json()
    assert ready["registry_version"] == "derm@v1"
    assert "derm@v1" in _saliency_from(started.url, "derm@v1")
    explained = explainer.info.remote().result()
    assert explained["registry_version"] == "derm@v1" and explained["started"] == explainer_start["started"], \
        "the Explainer switched in place, without a restart"


def test_health_check_fails_when_the_model_cannot_run_a_forward(tiny_checkpoint):
    """The replica's check_health (what Serve calls every health_check_period_s), in this process: passes with the
    model as loaded, fails once its weights are NaN (a forward no longer gives probabilities)."""
    import asyncio

    import torch

    from serve.classifier import Classifier

    replica = Classifier.func_or_class(tiny_checkpoint, "cpu", 10_000_000, 1, 1, 1)

    async def check_then_break() -> None:
        await replica.check_health()
        with torch.no_grad():
            for p in replica.predictor.module.parameters():
                p.fill_(float("nan"))
        replica._last_forward_ok = 0.0  # no recent batch: the probe runs
        with pytest.raises(RuntimeError, match="non-finite"):
            await replica.check_health()

    asyncio.run(check_then_break())


def test_model_slot_switches_only_once_the_new_model_is_loaded_and_renames_without_loading():
    """serve/replica.py ModelSlot (the Classifier's and the Explainer's switch), without Ray: while the new model
    loads and warms up the old one serves, and a request holding it keeps it; switches run in order; the same
    checkpoint under another version is renamed, not loaded again."""
    import asyncio
    from dataclasses import dataclass, field
    from types import SimpleNamespace
    from typing import Any

    from serve.args import ModelSource
    from serve.replica import ModelSlot

    @dataclass(frozen=True)
    class Loaded:
        source: ModelSource
        predictor: Any = field(default_factory=lambda: SimpleNamespace(version="card"))

    loads: list[str] = []

    def load(source: ModelSource) -> Loaded:
        loads.append(source.checkpoint)
        return Loaded(source)

    async def scenario() -> None:
        slot = ModelSlot("Test", Loaded(ModelSource(checkpoint="/a", version="m@1")))
        warmed = asyncio.Event()

        async def warmup(_: Loaded) -> None:
            await warmed.wait()

        held = slot.current  # a request in flight
        to_v2 = asyncio.create_task(slot.switch(ModelSource(checkpoint="/b", version="m@2"), load, warmup))
        for _ in range(100):
            if loads:
                break
            await asyncio.sleep(0.01)
        assert loads == ["/b"] and slot.current is held, "the old model serves while the new one warms up"
        to_v3 = asyncio.create_task(slot.switch(ModelSource(checkpoint="/b", version="m@3"), load, warmup))
        await asyncio.sleep(0.01)
        assert slot.current is held, "a later switch waits for the one under way"
        warmed.set()
        assert await to_v2 and await to_v3
        assert slot.current.source == ModelSource(checkpoint="/b", version="m@3") and loads == ["/b"]
        assert held.source.version == "m@1", "the request keeps the model it arrived with"
        assert not await slot.switch(None, load, warmup) and not await slot.switch(slot.current.source, load, warmup)

    asyncio.run(scenario())
