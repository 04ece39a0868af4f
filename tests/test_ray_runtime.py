"""dermaid.ray_runtime: the filter that quiets Ray Train's known-benign warnings keeps every other record."""

from __future__ import annotations

import logging

from dermaid.ray_runtime import BENIGN_RAY_LOGS, BenignRayLogFilter, install_log_filters

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
COORDINATOR = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"


def _record(logger: str, message: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(logger, level, __file__, 1, message, None, None)


def test_benign_ray_warnings_are_dropped_and_others_kept():
    keep = BenignRayLogFilter().filter
    assert not keep(_record(CLEANER, "Failed to query Ray Train Controller actor state. State API may be "
                                     "temporarily unavailable. Continuing to monitor."))
    assert not keep(_record(COORDINATOR, "Failed to send resource request for train-1. If this only happens "
                                         "transiently ... it's safe to ignore this error."))
    assert keep(_record(CLEANER, "Controller actor died; removing placement group pg-1"))  # a real event
    assert keep(_record("ray.train", "Failed to query Ray Train Controller actor state"))  # another logger
    assert keep(_record("dermaid.training", "Failed to send resource request"))


def test_filters_installed_once_on_the_named_loggers(caplog):
    install_log_filters()
    install_log_filters()
    for name in BENIGN_RAY_LOGS:
        assert sum(isinstance(f, BenignRayLogFilter) for f in logging.getLogger(name).filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger(CLEANER).warning("Failed to query Ray Train Controller actor state. Continuing.")
        logging.getLogger(CLEANER).warning("Cleaning up placement group pg-2")
    assert [r.getMessage() for r in caplog.records] == ["Cleaning up placement group pg-2"]
