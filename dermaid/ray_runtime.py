"""Joining or starting Ray: one place for every driver (prepare, train, tune, evaluate, pipeline).

Address order: an explicit address, else $RAY_ADDRESS (set inside Ray Jobs), else a private local
Ray on this machine ("local", never an unrelated `ray start`ed cluster).
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

_STARTUP_ATTEMPTS = 3  # a busy machine can miss Ray's fixed raylet start-up window


def ensure_ray(address: str | None = None, num_cpus: int | None = None, **init_kwargs: Any) -> None:
    """ray.init once per process; retries a local start that timed out on a loaded machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"include_dashboard": False, **init_kwargs}
    if address == "local":
        if num_cpus:
            kwargs["num_cpus"] = int(num_cpus)
    log.info("starting or joining Ray (address=%s)", address)
    for attempt in range(_STARTUP_ATTEMPTS):
        try:
            ray.init(address=address, **kwargs)
            return
        except Exception as exc:  # ray raises a bare Exception for a start-up timeout
            if "timed out during startup" not in str(exc) or attempt == _STARTUP_ATTEMPTS - 1:
                raise
            log.warning("Ray start-up timed out (busy machine?); retrying")
            ray.shutdown()
