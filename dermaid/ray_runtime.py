"""Joining or starting Ray: the one way every driver (prepare, train, tune, evaluate, pipeline, serve) does it.

Every config that uses Ray has the same two keys, `ray.address` and `ray.num_cpus` (conf/ray/default.yaml).
Address order: an explicit address, else $RAY_ADDRESS (set inside Ray Jobs), else a private local
Ray on this machine ("local", never an unrelated `ray start`ed cluster).

Ray Train logs two warnings that are known to be benign on such a Ray: its PlacementGroupCleaner polls
the State API, which needs the dashboard we do not start ("Failed to query Ray Train Controller actor
state", about once a second while a model trains), and its controller's first resource request to the
autoscaling coordinator can time out on a busy machine ("Failed to send resource request ... safe to
ignore", with a traceback). Both come from Ray worker processes, so `BenignRayLogFilter` is installed
there (a worker setup hook inherited by the workers of a Ray this process starts) and in this process;
every other warning stays visible.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from dermaid.ray_compat import BENIGN_TRAIN_LOGS

log = logging.getLogger(__name__)

_STARTUP_ATTEMPTS = 3  # a busy machine can miss Ray's fixed raylet start-up window

# logger name (private Ray modules: dermaid.ray_compat) -> message starts known to be benign without a dashboard
BENIGN_RAY_LOGS: dict[str, tuple[str, ...]] = BENIGN_TRAIN_LOGS


class BenignRayLogFilter(logging.Filter):
    """Drops the records of BENIGN_RAY_LOGS (by logger name and message start); passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        starts = BENIGN_RAY_LOGS.get(record.name, ())
        return not (starts and record.getMessage().startswith(starts))


def install_log_filters() -> None:
    """Attach BenignRayLogFilter to the loggers it knows (idempotent). Also the worker setup hook."""
    for name in BENIGN_RAY_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, BenignRayLogFilter) for f in logger.filters):
            logger.addFilter(BenignRayLogFilter())


def ensure_ray_for(config: dict[str, Any], **init_kwargs: Any) -> None:
    """Join or start Ray as a plain config's `ray` section says (`ray.address`, `ray.num_cpus`)."""
    ensure_ray(config["ray"]["address"], config["ray"]["num_cpus"], **init_kwargs)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, **init_kwargs: Any) -> None:
    """ray.init once per process; retries a local start that timed out on a loaded machine."""
    import ray

    install_log_filters()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"include_dashboard": False, **init_kwargs}
    if address == "local":
        from dermaid.ray_compat import worker_setup_hook_env

        os.environ.update(worker_setup_hook_env(f"{__name__}.install_log_filters"))  # the Ray started below inherits it
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
