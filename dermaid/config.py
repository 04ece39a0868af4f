"""Hydra config helpers: where conf/ lives, composing a command's config, and plain dicts for Ray.

Hydra stops at the Ray driver: drivers call `to_plain(cfg)` and workers see only plain values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def conf_dir() -> Path:
    """The Hydra config directory: $DERMAID_CONF, else conf/ beside the package (repo checkout)."""
    env = os.environ.get("DERMAID_CONF")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parent.parent / "conf").resolve()


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a primary config outside a Hydra app (tests, notebooks, Ray Jobs)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def to_plain(cfg: DictConfig | dict) -> dict[str, Any]:
    """Resolved plain dict (what crosses into Ray workers, model cards and results tables)."""
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def is_word(arg: str) -> bool:
    """A bare command-line word (`upgrade`, `dr_smith`), not a `key=value` override or an option."""
    return bool(arg) and "=" not in arg and not arg.startswith("-")


def action_args(argv: list[str]) -> list[str]:
    """`dermaid db upgrade k=v` -> `action=upgrade k=v`: a command's first bare word is its `action` (the
    `hydra_args` hook of dermaid.cli; `action=...` may also be given)."""
    if argv and is_word(argv[0]):
        return [f"action={argv[0]}", *argv[1:]]
    return argv
