"""The Explainer deployment: Grad-CAM overlays (dermaid.inference.Explainer) for /v1/saliency.

    explainer.explain.remote(image_bytes, age, sex, site, target, method, full_size)
        -> {"png", "target", "probability", "method", "layer", "width", "height", "model_version"} or {"error"}

The overlay is the upload scaled to at most overlay_max_side on its long side (width and height say its size),
or at the upload's own size when full_size is asked for; images over max_pixels (AppArgs.saliency_max_pixels)
are refused (413 image_too_large), so even a full-size overlay stays bounded.

Each concurrent call uses its own model copy and CAM object; the weights are the checkpoint's float
ones (a quantized or ONNX classifier names its float source in its card).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from dermaid.errors import DermaidError
from dermaid.inference import saliency_png
from serve.args import ExplainerArgs, deployment_options
from serve.errors import describe_image_error
from serve.replica import freeze_gc


@serve.deployment(name="Explainer", **deployment_options(ExplainerArgs()))
class Explainer:
    """Grad-CAM overlays, `concurrency` calls at once, each on its own model copy."""

    def __init__(self, checkpoint: str, device: str, max_pixels: int, torch_threads: int, concurrency: int,
                 overlay_max_side: int) -> None:
        from dermaid.inference import Explainer as CamExplainer
        from dermaid.inference import Predictor, set_thread_torch_threads
        from dermaid.models.card import float_weights_for

        set_thread_torch_threads(1)  # OpenMP teams only on the CAM threads (serve/lanes.py says why)
        weights = float_weights_for(checkpoint)  # a compressed classifier's float source: Grad-CAM needs gradients
        self.explainer = CamExplainer(Predictor(weights, device=device, max_pixels=max_pixels), concurrency,
                                      overlay_max_side)
        self._pool = ThreadPoolExecutor(max(1, int(concurrency)), thread_name_prefix="cam",
                                        initializer=set_thread_torch_threads, initargs=(torch_threads,))
        self._pool.submit(self.explainer.warmup).result()
        freeze_gc()

    def info(self) -> dict[str, Any]:
        return {"model_version": self.explainer.predictor.version, "layer": self.explainer.target_name}

    async def explain(self, data: bytes, age: float | None, sex: str | None, site: str | None, target: str | None,
                      method: str, full_size: bool = False) -> dict[str, Any]:
        """-> {"png", "target", "probability", "method", "layer", "width", "height", "model_version"} or {"error"}."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._explain, data, age, sex, site, target, method,
                                              full_size)
        except DermaidError as exc:
            return {"error": describe_image_error(exc, data)}

    def _explain(self, data: bytes, age: Any, sex: Any, site: Any, target: str | None, method: str,
                 full_size: bool = False) -> dict:
        saliency = self.explainer.explain(data, age, sex, site, target=target, method=method, full_size=full_size)
        return {
            "png": saliency_png(saliency, self.explainer.predictor.version, compress_level=1),
            "target": saliency.target,
            "probability": saliency.probability,
            "method": saliency.method,
            "layer": saliency.layer,
            "width": saliency.overlay.width,
            "height": saliency.overlay.height,
            "model_version": self.explainer.predictor.version,
        }
