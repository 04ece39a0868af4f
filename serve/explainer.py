"""The Explainer deployment: Grad-CAM overlays (dermaid.inference.Explainer) for /v1/saliency, swapped in place.

    explainer.explain.remote(image_bytes, age, sex, site, target, method, full_size)
        -> {"png", "target", "probability", "method", "layer", "width", "height", "model_version", "registry_version"}
           or {"error"}

The overlay is the upload scaled to at most overlay_max_side on its long side (width and height say its size),
or at the upload's own size when full_size is asked for; images over max_pixels (AppArgs.saliency_max_pixels)
are refused (413 image_too_large), so even a full-size overlay stays bounded.

Each concurrent call uses its own model copy and CAM object; the weights are the checkpoint's float
ones (a quantized or ONNX classifier names its float source in its card).

The model follows the Classifier's: it is part of the user_config (serve/args.py ExplainerConfig,
AppArgs.explainer_source), and a promotion redeploys both in one deploy (serve/launcher.py). reconfigure() loads
the new model beside the old one, warms it up and switches (serve/replica.py ModelSlot, the Classifier's own);
a call keeps the model it arrived with. Every answer names its model: model_version (the card's id) and
registry_version ("NAME@VERSION", null when not from the registry), also in the PNG's Description text.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ray import serve

from dermaid.errors import DermaidError
from serve.args import ExplainerArgs, ExplainerConfig, ModelSource, deployment_options
from serve.errors import describe_image_error
from serve.replica import ModelSlot, freeze_gc


@dataclass(frozen=True)
class ExplainerModel:
    """One loaded model: what a call takes when it arrives and keeps until it is answered."""

    explainer: Any            # dermaid.inference.Explainer (its model copies)
    source: ModelSource       # its checkpoint and registry version

    @property
    def predictor(self) -> Any:
        return self.explainer.predictor

    def label(self) -> str:
        """How the PNG names its model: "NAME@VERSION (card id)", or the card's id."""
        version = self.predictor.version
        return f"{self.source.version} ({version})" if self.source.version else version


def load_explainer(source: ModelSource, device: str, max_pixels: int, concurrency: int,
                   overlay_max_side: int) -> ExplainerModel:
    """The Grad-CAM explainer for `source` (its float weights: a compressed classifier's float source)."""
    from dermaid.inference import Explainer as CamExplainer
    from dermaid.inference import Predictor
    from dermaid.models.card import float_weights_for

    predictor = Predictor(float_weights_for(source.checkpoint), device=device, max_pixels=max_pixels)
    return ExplainerModel(CamExplainer(predictor, concurrency, overlay_max_side), source)


@serve.deployment(name="Explainer", **deployment_options(ExplainerArgs()))
class Explainer:
    """Grad-CAM overlays, `concurrency` calls at once, each on its own model copy."""

    def __init__(self, checkpoint: str, device: str, max_pixels: int, torch_threads: int, concurrency: int,
                 overlay_max_side: int) -> None:
        from dermaid.inference import set_thread_torch_threads

        self.started = time.time()  # info(): a swap in place keeps it
        set_thread_torch_threads(1)  # OpenMP teams only on the CAM threads (serve/lanes.py says why)
        self._load_args = (device, max_pixels, concurrency, overlay_max_side)
        self._model = ModelSlot("Explainer", load_explainer(ModelSource(checkpoint=checkpoint), *self._load_args))
        self._pool = ThreadPoolExecutor(max(1, int(concurrency)), thread_name_prefix="cam",
                                        initializer=set_thread_torch_threads, initargs=(torch_threads,))
        self._pool.submit(self._model.current.explainer.warmup).result()
        freeze_gc()

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's user_config (ExplainerConfig): when its model differs from the one serving, the new one loads and
        warms up beside it, then new calls go to it (calls already admitted finish on the old one)."""
        await self._model.switch(ExplainerConfig.model_validate(config).model, self._load, self._warmup)

    def _load(self, source: ModelSource) -> ExplainerModel:
        return load_explainer(source, *self._load_args)

    async def _warmup(self, model: ExplainerModel) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, model.explainer.warmup)  # a CAM thread, its turn

    def info(self) -> dict[str, Any]:
        model = self._model.current
        return {"model_version": model.predictor.version, "registry_version": model.source.version,
                "layer": model.explainer.target_name, "started": self.started}

    async def explain(self, data: bytes, age: float | None, sex: str | None, site: str | None, target: str | None,
                      method: str, full_size: bool = False) -> dict[str, Any]:
        """-> {"png", "target", "probability", "method", "layer", "width", "height", "model_version",
        "registry_version"} or {"error"}."""
        loop = asyncio.get_running_loop()
        model = self._model.current  # this call's model until its answer, even if a switch happens meanwhile
        try:
            return await loop.run_in_executor(self._pool, self._explain, data, age, sex, site, target, method,
                                              full_size, model)
        except DermaidError as exc:
            return {"error": describe_image_error(exc, data)}

    def _explain(self, data: bytes, age: Any, sex: Any, site: Any, target: str | None, method: str,
                 full_size: bool = False, model: ExplainerModel | None = None) -> dict[str, Any]:
        """In a CAM thread: the overlay and what it shows, by `model` (None: the current one)."""
        from dermaid.inference import saliency_png   # torch: imported by the replica, not by the app's build

        model = model or self._model.current
        saliency = model.explainer.explain(data, age, sex, site, target=target, method=method, full_size=full_size)
        return {
            "png": saliency_png(saliency, model.label(), compress_level=1),
            "target": saliency.target,
            "probability": saliency.probability,
            "method": saliency.method,
            "layer": saliency.layer,
            "width": saliency.overlay.width,
            "height": saliency.overlay.height,
            "model_version": model.predictor.version,
            "registry_version": model.source.version,
        }
