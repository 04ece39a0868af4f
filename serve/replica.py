"""What every model replica (Classifier, Explainer) shares: the model it serves now and the switch to another one
(ModelSlot), and what it does once its model has loaded (freeze_gc)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from serve.args import ModelSource

logger = logging.getLogger("ray.serve")


class Served(Protocol):
    """A loaded model as a replica keeps it: a frozen dataclass with its source and its Predictor."""

    source: ModelSource
    predictor: Any   # dermaid.inference.Predictor (its card's id: predictor.version)


M = TypeVar("M", bound=Served)


class ModelSlot(Generic[M]):
    """The model a replica serves now and the switch to another one (its reconfigure(), from the user_config).

    `current` is what a request takes when it arrives and keeps until it is answered; switch() loads the new model
    beside it (off the event loop), warms it up and then replaces `current` in one assignment, so requests in flight
    finish on the old model and the old one is freed with its last request. Switches run one at a time, in the order
    they were asked for; the same checkpoint under another source (a registry version naming the same files) is
    renamed without a second load."""

    def __init__(self, name: str, current: M) -> None:
        self.name, self.current = name, current
        self._switching = asyncio.Lock()

    async def switch(self, source: ModelSource | None, load: Callable[[ModelSource], M],
                     warmup: Callable[[M], Awaitable[Any]]) -> bool:
        """Serve `source` (None: keep the current model): load(source) in a thread, then await warmup(loaded),
        then switch. True when `current` changed."""
        if source is None or source == self.current.source:
            return False
        async with self._switching:
            old = self.current
            if source == old.source:
                return False
            if source.checkpoint == old.source.checkpoint:  # the same files under a name: no second load
                self.current = dataclasses.replace(old, source=source)
                return True
            started = time.perf_counter()
            loaded = await asyncio.get_running_loop().run_in_executor(None, load, source)
            await warmup(loaded)
            self.current = loaded
            logger.info("%s switched %s (%s) -> %s (%s) after %.1f s loading beside it", self.name, _label(old),
                        old.source.checkpoint, _label(loaded), source.checkpoint, time.perf_counter() - started)
            return True


def _label(served: Served) -> str:
    return served.source.version or served.predictor.version


def freeze_gc() -> None:
    """After loading a model: its many long-lived objects leave the collector's scans, so no request pays
    for a full collection walking them."""
    gc.collect()
    gc.freeze()
