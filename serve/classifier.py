"""The Classifier deployment: dermaid.inference.Predictor behind Serve's dynamic batching, swapped in place.

    classifier.classify.remote(image_bytes, age, sex, site, return_input)
        -> {"probabilities": [8], "ood_score", "abstain", "operating_point", "model_version", "width", "height",
            "input_png"?} or {"error": {...}}

ood_score / abstain come from the card's OOD detector (Predictor.forward_full), null / null for a checkpoint
without one; operating_point is the card's validation-chosen triage block (null without `dermaid calibrate`).

The model is part of the user_config (serve/args.py ClassifierConfig): when a promotion changes it, Serve calls
reconfigure() on the live replica, which loads the new model beside the old one (off the event loop), warms it up
and then switches. Each request takes the model that is current when it arrives and finishes on it, so requests
in flight during a switch answer from the old model; every answer names its model (model_version: the card's
id; registry_version: "NAME@VERSION" when it came from the registry). check_health() fails when the model cannot
run a forward (a cached probe input, skipped while real batches succeed). The load-and-switch is serve/replica.py's
ModelSlot, which the Explainer shares.

Decoding runs in a thread pool; batches run on ForwardLanes (serve/lanes.py), so the next images decode
while batches run. Batching is the deployment's user_config (serve/args.py BatchingArgs), changed in
place by reconfigure() when `serve deploy` changes it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from dermaid.errors import DermaidError
from serve.args import MAX_FORWARD_LANES, BatchingArgs, ClassifierArgs, ClassifierConfig, ModelSource, deployment_options
from serve.errors import describe_image_error
from serve.lanes import ForwardLanes
from serve.replica import ModelSlot, freeze_gc

logger = logging.getLogger("ray.serve")

# One batched item's answer: probabilities (8,), ood_score, abstain (None, None without an OOD detector).
ItemAnswer = tuple[list[float], float | None, bool | None]

DEFAULT_BATCHING = BatchingArgs()  # until reconfigure() applies the deployment's user_config
# check_health() runs its probe forward only when no batch has succeeded for this long (Serve checks every 10 s)
HEALTH_FRESH_S = 10.0


@dataclass(frozen=True)
class ServedModel:
    """One loaded model: what a request takes when it arrives and keeps until it is answered."""

    predictor: Any            # dermaid.inference.Predictor
    source: ModelSource       # its checkpoint and registry version
    probe: tuple[Any, Any]    # a cached input for check_health: (3, H, W) zeros, (14,) no metadata


def load_model(source: ModelSource, device: str, max_pixels: int) -> ServedModel:
    """The Predictor for `source` and its probe input (in a thread: loading never blocks the event loop)."""
    import torch

    from dermaid.inference import Predictor

    predictor = Predictor(source.checkpoint, device=device, max_pixels=max_pixels)
    return ServedModel(predictor, source, (torch.zeros(*predictor.card.input_size), predictor.encode_metadata()))


@serve.deployment(name="Classifier", **deployment_options(ClassifierArgs()))
class Classifier:
    """Predictor behind dynamic batching; batches run on `forward_lanes` threads that share the torch
    thread budget (ForwardLanes)."""

    def __init__(self, checkpoint: str, device: str, max_pixels: int, torch_threads: int, decode_threads: int,
                 forward_lanes: int) -> None:
        from dermaid.inference import set_thread_torch_threads

        started = time.time()
        set_thread_torch_threads(1)  # no OpenMP team on this thread: the forward lanes own the replica's (ForwardLanes)
        self._device, self._max_pixels = device, max_pixels
        self._model = ModelSlot("Classifier", load_model(ModelSource(checkpoint=checkpoint), device, max_pixels))
        loaded = time.time()
        # one torch thread each, so no team: the small preprocessing ops gain nothing from one
        self._decode_pool = ThreadPoolExecutor(max(1, int(decode_threads)), thread_name_prefix="decode",
                                               initializer=set_thread_torch_threads, initargs=(1,))
        self._lanes = ForwardLanes(self._forward_batch, min(int(forward_lanes), MAX_FORWARD_LANES), torch_threads)
        self._lanes.warmup(self.served.predictor.warmup)
        self._last_forward_ok = 0.0  # time.monotonic() of the last batch that gave finite probabilities
        freeze_gc()
        # start-up phases (wall clock, one machine: serve/launcher.py prints them): process start, __init__, loaded, warm
        self.startup = {"process_started": _process_start_time(), "init_started": started, "model_loaded": loaded,
                        "warmed_up": time.time()}
        logger.info("Classifier loaded %s (%s)", checkpoint, self.served.predictor.version)

    @property
    def served(self) -> ServedModel:
        """The model serving new requests now."""
        return self._model.current

    @property
    def predictor(self) -> Any:
        """The Predictor serving new requests now."""
        return self.served.predictor

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's user_config (ClassifierConfig): batching, applied at once, and the model: when it differs from the
        one serving, the new one loads and warms up beside it, then new requests go to it (requests already
        admitted finish on the old one). A key left out keeps its default; an unknown one fails."""
        new = ClassifierConfig.model_validate(config)
        self.predict_batch.set_max_batch_size(new.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(new.batch_wait_timeout_s)
        await self._model.switch(new.model, self._load, self._warmup)

    def _load(self, source: ModelSource) -> ServedModel:
        return load_model(source, self._device, self._max_pixels)

    async def _warmup(self, served: ServedModel) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._lanes.warmup,
                                                         served.predictor.warmup)  # on lane 0, its turn

    async def check_health(self) -> None:
        """Serve's health check: fails (and Serve replaces the replica) when the model cannot run a forward. A
        batch that succeeded in the last HEALTH_FRESH_S seconds counts; else the cached probe runs on a lane."""
        if time.monotonic() - self._last_forward_ok < HEALTH_FRESH_S:
            return
        served = self.served
        batch = await self._lanes.run([(*served.probe, served)])
        if not bool(np.isfinite(batch.probabilities).all()):
            raise RuntimeError(f"model {served.predictor.version}: the probe forward gave non-finite probabilities")

    def info(self) -> dict[str, Any]:
        served = self.served
        return {"model_version": served.predictor.version, "registry_version": served.source.version,
                "card": served.predictor.card.to_dict(), "startup": self.startup}

    async def classify(self, data: bytes, age: float | None = None, sex: str | None = None,
                       site: str | None = None, return_input: bool = False) -> dict[str, Any]:
        """-> {"probabilities": [8], "ood_score", "abstain", "operating_point", "model_version", "width", "height",
        "image_format", "stats", "timings", "input_png"?} or {"error": {...}}. image_format, stats (image statistics
        of the model input) and timings (decode / forward ms) are for monitoring (serve/metrics.py)."""
        loop = asyncio.get_running_loop()
        served = self.served  # this request's model, from decoding to its answer, even if a switch happens meanwhile
        started = time.perf_counter()
        try:
            prepared, described = await loop.run_in_executor(self._decode_pool, self._prepare, served, data)
        except DermaidError as exc:
            return {"error": describe_image_error(exc, data)}
        decoded = time.perf_counter()
        metadata = served.predictor.encode_metadata(age, sex, site)  # (14,)
        probabilities, ood_score, abstain = await self.predict_batch((prepared.tensor, metadata, served))
        out = {"probabilities": probabilities, "ood_score": ood_score, "abstain": abstain,
               "operating_point": served.predictor.card.triage, "model_version": served.predictor.version,
               "registry_version": served.source.version,
               "width": prepared.upload_size[0], "height": prepared.upload_size[1], **described,
               "timings": {"decode": (decoded - started) * 1000.0, "forward": (time.perf_counter() - decoded) * 1000.0}}
        if return_input:
            out["input_png"] = await loop.run_in_executor(self._decode_pool, _png_bytes, prepared.model_input, 3)
        return out

    def _prepare(self, served: ServedModel, data: bytes) -> tuple[Any, dict[str, Any]]:
        """In a decode thread: the Predictor's prepare, and the upload's format and image statistics
        (dermaid.monitoring.features.describe_image: < 1 ms on the model input)."""
        from dermaid.monitoring.features import describe_image

        prepared = served.predictor.prepare(data)
        return prepared, describe_image(data, prepared.model_input)

    @serve.batch(max_batch_size=DEFAULT_BATCHING.max_batch_size,
                 batch_wait_timeout_s=DEFAULT_BATCHING.batch_wait_timeout_s, max_concurrent_batches=MAX_FORWARD_LANES)
    async def predict_batch(self, items: list[tuple[Any, Any, ServedModel]]) -> list[ItemAnswer]:
        """Items (image (3, H, W), metadata (14,), model) -> per item (probabilities [8], ood_score | None,
        abstain | None). A batch formed during a switch holds two models' items: each model runs its own."""
        answers: list[ItemAnswer | None] = [None] * len(items)
        for indices in _by_model(items):
            batch = await self._lanes.run([items[i] for i in indices])
            ood = ([None] * len(indices), [None] * len(indices)) if batch.ood_scores is None else (
                batch.ood_scores.tolist(), batch.abstain.tolist())
            for i, row, score, abstain in zip(indices, batch.probabilities.tolist(), *ood):
                answers[i] = (row, score, abstain)
        return answers  # type: ignore[return-value]

    def _forward_batch(self, items: list[tuple[Any, Any, ServedModel]]) -> Any:
        """On a forward lane (stacking there too: a big copy is a parallel op, and only lanes have teams); every
        item has the same model."""
        import torch

        images = torch.stack([image for image, _, _ in items])     # (B, 3, H, W)
        metadata = torch.stack([meta for _, meta, _ in items])     # (B, 14)
        batch = items[0][2].predictor.forward_full(images, metadata)   # (B, 8), (B,) | None, (B,) | None
        if np.isfinite(batch.probabilities).all():
            self._last_forward_ok = time.monotonic()
        return batch


def _by_model(items: list[tuple[Any, Any, ServedModel]]) -> list[list[int]]:
    """Indices of the items grouped by their model, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, (_, _, served) in enumerate(items):
        groups.setdefault(id(served), []).append(i)
    return list(groups.values())


def _process_start_time() -> float:
    """When this replica's process started (wall clock)."""
    import psutil

    return psutil.Process().create_time()


def _png_bytes(image: Any, compress_level: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
