"""The Classifier deployment: dermaid.inference.Predictor behind Serve's dynamic batching.

    classifier.classify.remote(image_bytes, age, sex, site, return_input)
        -> {"probabilities": [8], "ood_score", "abstain", "operating_point", "model_version", "width", "height",
            "input_png"?} or {"error": {...}}

ood_score / abstain come from the card's OOD detector (Predictor.forward_full), null / null for a checkpoint
without one; operating_point is the card's validation-chosen triage block (null without `dermaid calibrate`).

Decoding runs in a thread pool; batches run on ForwardLanes (serve/lanes.py), so the next images decode
while batches run. Batching is the deployment's user_config (serve/args.py BatchingArgs), changed in
place by reconfigure() when `serve deploy` changes it.
"""

from __future__ import annotations

import asyncio
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from dermaid.errors import DermaidError
from serve.args import MAX_FORWARD_LANES, BatchingArgs, ClassifierArgs, deployment_options
from serve.errors import describe_image_error
from serve.lanes import ForwardLanes
from serve.replica import freeze_gc

logger = logging.getLogger("ray.serve")

# One batched item's answer: probabilities (8,), ood_score, abstain (None, None without an OOD detector).
ItemAnswer = tuple[list[float], float | None, bool | None]

DEFAULT_BATCHING = BatchingArgs()  # until reconfigure() applies the deployment's user_config


@serve.deployment(name="Classifier", **deployment_options(ClassifierArgs()))
class Classifier:
    """Predictor behind dynamic batching; batches run on `forward_lanes` threads that share the torch
    thread budget (ForwardLanes)."""

    def __init__(self, checkpoint: str, device: str, max_pixels: int, torch_threads: int, decode_threads: int,
                 forward_lanes: int) -> None:
        from dermaid.inference import Predictor, set_thread_torch_threads

        set_thread_torch_threads(1)  # no OpenMP team on this thread: the forward lanes own the replica's (ForwardLanes)
        self.predictor = Predictor(checkpoint, device=device, max_pixels=max_pixels)
        # one torch thread each, so no team: the small preprocessing ops gain nothing from one
        self._decode_pool = ThreadPoolExecutor(max(1, int(decode_threads)), thread_name_prefix="decode",
                                               initializer=set_thread_torch_threads, initargs=(1,))
        self._lanes = ForwardLanes(self._forward_batch, min(int(forward_lanes), MAX_FORWARD_LANES), torch_threads)
        self._lanes.warmup(self.predictor.warmup)
        freeze_gc()
        logger.info("Classifier loaded %s (%s)", checkpoint, self.predictor.version)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's user_config: BatchingArgs' keys (a key left out keeps its default; an unknown one fails)."""
        batching = BatchingArgs.model_validate(config)
        self.predict_batch.set_max_batch_size(batching.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        return {"model_version": self.predictor.version, "card": self.predictor.card.to_dict()}

    async def classify(self, data: bytes, age: float | None = None, sex: str | None = None,
                       site: str | None = None, return_input: bool = False) -> dict[str, Any]:
        """-> {"probabilities": [8], "ood_score", "abstain", "operating_point", "model_version", "width", "height",
        "input_png"?} or {"error": {...}}."""
        loop = asyncio.get_running_loop()
        try:
            prepared = await loop.run_in_executor(self._decode_pool, self.predictor.prepare, data)
        except DermaidError as exc:
            return {"error": describe_image_error(exc, data)}
        metadata = self.predictor.encode_metadata(age, sex, site)  # (14,)
        probabilities, ood_score, abstain = await self.predict_batch((prepared.tensor, metadata))
        out = {"probabilities": probabilities, "ood_score": ood_score, "abstain": abstain,
               "operating_point": self.predictor.card.triage, "model_version": self.predictor.version,
               "width": prepared.upload_size[0], "height": prepared.upload_size[1]}
        if return_input:
            out["input_png"] = await loop.run_in_executor(self._decode_pool, _png_bytes, prepared.model_input, 3)
        return out

    @serve.batch(max_batch_size=DEFAULT_BATCHING.max_batch_size,
                 batch_wait_timeout_s=DEFAULT_BATCHING.batch_wait_timeout_s, max_concurrent_batches=MAX_FORWARD_LANES)
    async def predict_batch(self, items: list[tuple[Any, Any]]) -> list[ItemAnswer]:
        """Per item: (probabilities [8], ood_score | None, abstain | None)."""
        batch = await self._lanes.run(items)
        if batch.ood_scores is None:
            return [(row, None, None) for row in batch.probabilities.tolist()]
        return list(zip(batch.probabilities.tolist(), batch.ood_scores.tolist(), batch.abstain.tolist()))

    def _forward_batch(self, items: list[tuple[Any, Any]]) -> Any:
        """On a forward lane (stacking there too: a big copy is a parallel op, and only lanes have teams)."""
        import torch

        images = torch.stack([image for image, _ in items])        # (B, 3, H, W)
        metadata = torch.stack([meta for _, meta in items])        # (B, 14)
        return self.predictor.forward_full(images, metadata)       # (B, 8), (B,) | None, (B,) | None


def _png_bytes(image: Any, compress_level: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
