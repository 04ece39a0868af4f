"""The search space: `hparams_search.space` (Hydra config) -> Tune sampling functions, checked before any
trial starts, and one trial's sampled values -> its plain `dermaid train` config.

A space maps dotted config keys to Tune's samplers: `optim.lr: {loguniform: [1e-4, 1e-2]}`,
`model.name: {choice: [...]}`; a bare config-group name (`augment: {choice: [none, light]}`) chooses
among that group's options (conf/<group>/<option>.yaml). An unknown key, backbone, sampler or option,
and an empty or inverted range, is a DermaidError naming `hparams_search.space.<key>`.
"""

from __future__ import annotations

import json
from typing import Any

from omegaconf import OmegaConf

from dermaid.config import conf_dir
from dermaid.errors import DermaidError

# sampler -> (number of arguments, Tune function name). Arguments follow Tune's signatures.
SAMPLERS: dict[str, tuple[int | None, str]] = {
    "uniform": (2, "uniform"),
    "loguniform": (2, "loguniform"),
    "quniform": (3, "quniform"),
    "qloguniform": (3, "qloguniform"),
    "randint": (2, "randint"),        # [low, high): high excluded, as in tune.randint
    "choice": (None, "choice"),
    "grid_search": (None, "grid_search"),
}
# Config groups whose options a search may choose between (a bare key in the space).
SEARCHABLE_GROUPS = ("augment", "model", "optim")
# Keys a search must not touch: they name where things go, not how a model trains.
FORBIDDEN_KEYS = ("out", "paths", "data", "scaling", "run", "logger", "tune", "hparams_search", "resume")


def build_search_space(search: dict[str, Any], base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict]]:
    """`hparams_search` -> (Tune param_space {dotted key: sampler}, {group: {option: group config}}).

    Raises DermaidError naming `hparams_search.space.<key>` for an unknown key, an unknown backbone,
    an unknown sampler or group option, and an empty or inverted range.
    """
    import ray.tune

    space_cfg = search.get("space")  # checked here: a user-written search may lack it
    if not isinstance(space_cfg, dict) or not space_cfg:
        raise DermaidError("hparams_search.space: empty; give at least one `key: {sampler: args}`")
    space: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, spec in space_cfg.items():
        where = f"hparams_search.space.{key}"
        sampler, args = _parse_spec(where, spec)
        if key.split(".")[0] in FORBIDDEN_KEYS:
            raise DermaidError(f"{where}: {key.split('.')[0]!r} is not a hyperparameter (it says where data, "
                               "runs or workers go); search optim, train, model or augment keys")
        if "." not in key:
            groups[key] = _group_options(where, key, args, sampler)
        else:
            _check_key(where, key, base)
        _check_values(where, key, sampler, args)
        count, function = SAMPLERS[sampler]
        space[key] = getattr(ray.tune, function)(*([args] if count is None else args))
    return space, groups


def apply_trial_config(base: dict[str, Any], sampled: dict[str, Any], groups: dict[str, dict]) -> dict[str, Any]:
    """The plain `dermaid train` config of one trial: base + sampled values (group choices replace the group)."""
    plain = json.loads(json.dumps(base))  # a deep copy of plain values
    for key, value in sampled.items():
        if key in groups:
            plain[key] = json.loads(json.dumps(groups[key][value]))
            continue
        node = plain
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value.item() if hasattr(value, "item") else value  # numpy scalar -> Python
    return plain


def _parse_spec(where: str, spec: Any) -> tuple[str, list]:
    """`{sampler: [args]}` -> (sampler, args), with the argument count checked."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise DermaidError(f"{where}: expected one `sampler: args` pair (samplers: {sorted(SAMPLERS)}), got {spec!r}")
    sampler, args = next(iter(spec.items()))
    if sampler not in SAMPLERS:
        raise DermaidError(f"{where}: unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    if not isinstance(args, list):
        raise DermaidError(f"{where}: {sampler} takes a list, got {args!r}")
    count = SAMPLERS[sampler][0]
    if count is None and not args:
        raise DermaidError(f"{where}: empty {sampler}: give at least one value")
    if count is not None and len(args) != count:
        raise DermaidError(f"{where}: {sampler} takes {count} numbers, got {args!r}")
    return sampler, args


def _check_key(where: str, key: str, base: dict[str, Any]) -> None:
    """A dotted key must name a value (not a section) of the train config."""
    node: Any = base
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            section = ".".join(key.split(".")[:i]) or "the train config"
            known = sorted(node) if isinstance(node, dict) else []
            raise DermaidError(f"{where}: unknown key {key!r} ({part!r} is not in {section}; known: {known})")
        node = node[part]
    if isinstance(node, dict):
        raise DermaidError(f"{where}: {key!r} is a section, not a value; search one of its keys {sorted(node)}")


def _check_values(where: str, key: str, sampler: str, args: list) -> None:
    """Numeric samplers: numbers, a non-empty range, a positive low bound for log scales, a step that fits."""
    if SAMPLERS[sampler][0] is not None:
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise DermaidError(f"{where}: {sampler} takes numbers, got {args!r}")
        low, high = args[0], args[1]
        if not low < high:
            raise DermaidError(f"{where}: empty range [{low}, {high}]: low must be below high")
        if "log" in sampler and low <= 0:
            raise DermaidError(f"{where}: {sampler} needs a positive low bound, got {low}")
        if sampler.startswith("q") and not 0 < args[2] <= high - low:
            raise DermaidError(f"{where}: step q={args[2]} must be positive and fit in [{low}, {high}]")
        if sampler == "randint" and not all(float(a).is_integer() for a in args):
            raise DermaidError(f"{where}: randint takes integers, got {args!r}")
    if key == "model.name":
        for name in args:
            _check_backbone(where, name)


def _check_backbone(where: str, name: Any) -> None:
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = timm.list_models(f"*{str(name)[:6]}*")[:5] if isinstance(name, str) else []
        raise DermaidError(f"{where}: unknown backbone {name!r} (not a timm model)"
                           + (f"; similar: {close}" if close else ""))


def _group_options(where: str, group: str, options: list, sampler: str) -> dict[str, Any]:
    """A bare key chooses between config-group options: load each conf/<group>/<option>.yaml."""
    if group not in SEARCHABLE_GROUPS:
        raise DermaidError(f"{where}: unknown key {group!r}: a bare key must be a config group "
                           f"({list(SEARCHABLE_GROUPS)}); for a value use its dotted key (e.g. optim.lr)")
    if sampler not in ("choice", "grid_search"):
        raise DermaidError(f"{where}: a config group takes choice or grid_search of its options, not {sampler}")
    folder = conf_dir() / group
    available = sorted(p.stem for p in folder.glob("*.yaml"))
    loaded: dict[str, Any] = {}
    for option in options:
        if not isinstance(option, str) or option not in available:
            raise DermaidError(f"{where}: unknown {group} option {option!r}; available: {available}")
        values = OmegaConf.to_container(OmegaConf.load(folder / f"{option}.yaml"), resolve=True)
        values.pop("defaults", None)
        if group == "model":
            _check_backbone(where, values.get("name"))  # checked, not defaulted: a model option without a name fails
        loaded[option] = values
    return loaded
