"""The `tune` config group (conf/tune/*.yaml) -> Ray Tune's TuneConfig: metric and mode, the scheduler
that stops weak trials (ASHA, or FIFO: every trial runs all its epochs), the search algorithm (random or
Optuna's TPE), the number of samples, concurrency and the time budget."""

from __future__ import annotations

from typing import Any

from dermaid.errors import DermaidError


def build_tune_config(tune_cfg: dict[str, Any], space: dict[str, Any], max_t: int):
    """TuneConfig for `tune_cfg` (the composed `tune` group); max_t is train.epochs."""
    import ray.tune

    scheduler = _build_scheduler(tune_cfg["scheduler"], max_t)
    search_alg, concurrency = _build_search_alg(tune_cfg, space)
    budget = tune_cfg["time_budget_s"]
    return ray.tune.TuneConfig(
        metric=tune_cfg["metric"],
        mode=tune_cfg["mode"],
        scheduler=scheduler,
        search_alg=search_alg,
        num_samples=int(tune_cfg["num_samples"]),
        max_concurrent_trials=concurrency or None,
        time_budget_s=float(budget) if budget else None,
    )


def _build_scheduler(scheduler_cfg: dict[str, Any], max_t: int):
    """ASHA over epochs (training_iteration), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    name = scheduler_cfg["name"]
    if name == "fifo":
        return FIFOScheduler()
    if name != "asha":
        raise DermaidError(f"tune.scheduler.name={name!r}: expected asha or fifo")
    grace = int(scheduler_cfg["grace_period"])
    if not 0 < grace <= max_t:
        raise DermaidError(f"tune.scheduler.grace_period={grace}: must be between 1 and train.epochs={max_t}")
    # max_t one past the last epoch: a trial that reaches its last epoch ends on its own (its trainer
    # writes summary.json) rather than being stopped by the scheduler at the finish line
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t + 1, grace_period=grace,
                         reduction_factor=float(scheduler_cfg["reduction_factor"]))


def _build_search_alg(tune_cfg: dict[str, Any], space: dict[str, Any]) -> tuple[Any, int]:
    """(search algorithm, the concurrency limit TuneConfig should still apply: 0 for none)."""
    from ray.tune.search import BasicVariantGenerator

    search_cfg = tune_cfg["search_alg"]
    algorithm = search_cfg["name"]
    seed = int(tune_cfg["seed"])
    concurrency = int(tune_cfg["max_concurrent_trials"] or 0)
    if algorithm == "random":
        # the variant generator limits concurrency itself (TuneConfig's limit only wraps Searchers)
        return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency), 0
    if algorithm != "optuna":
        raise DermaidError(f"tune.search_alg.name={algorithm!r}: expected random or optuna")
    if any(isinstance(v, dict) and "grid_search" in v for v in space.values()):
        raise DermaidError("tune.search_alg=optuna cannot take grid_search dimensions; use choice")
    if "n_startup_trials" not in search_cfg:
        raise DermaidError("tune.search_alg.n_startup_trials is missing: choose optuna with tune=optuna "
                           "(conf/tune/optuna.yaml), not tune.search_alg.name=optuna alone")
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(search_cfg["n_startup_trials"]))
    return OptunaSearch(sampler=sampler), concurrency
