"""`dermaid registry`: list, show, register, promote and roll back model versions (conf/registry.yaml).

    dermaid registry list                                  # models, their version counts and stages
    dermaid registry show isic                             # versions (metrics, card checks) and stage histories
    dermaid registry register runs/toy/best name=isic [version=v3]
    dermaid registry promote isic@v3 [stage=production] [by=alice]
    dermaid registry rollback isic [stage=production]
    dermaid registry list root=gs://bucket/registry
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from dermaid.classes import DISCLAIMER
from dermaid.config import is_word
from dermaid.errors import DermaidError
from dermaid.registry.store import Registry

ACTIONS = ("list", "show", "register", "promote", "rollback")


def run(cfg: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    action, target = str(plain["action"]), plain.get("target")
    if action not in ACTIONS:
        raise DermaidError(f"action={action!r}: expected one of {', '.join(ACTIONS)} (`dermaid registry list`)")
    registry = Registry(str(plain["root"]))
    stage, by = str(plain["stage"]), plain.get("by")
    if action == "list":
        return _list(registry)
    if not target:
        raise DermaidError(f"`dermaid registry {action}` needs its {_TARGET_HELP[action]}")
    target = str(target)
    if action == "show":
        return _show(registry, target)
    if action == "register":
        name = plain.get("name")
        if not name:
            raise DermaidError("`dermaid registry register CHECKPOINT name=NAME`: name= is missing")
        mv = registry.register(target, str(name), plain.get("version"), by=by)
        print(f"registered {mv.name}@{mv.version} -> {mv.checkpoint}")
        print("promotable" if not mv.problems else "not promotable yet:\n  - " + "\n  - ".join(mv.problems))
        return {"version": mv.version, "checkpoint": mv.checkpoint, "problems": mv.problems}
    if action == "promote":
        name, _, version = target.partition("@")
        if not version:
            raise DermaidError(f"`dermaid registry promote NAME@VERSION`: {target!r} names no version")
        current = registry.stage(name, stage)
        if current is not None and current.version == version:
            print(f"{name}/{stage} points at {version} already (since {current.promoted_at}); nothing changed")
            return {"stage": stage, "version": version, "from_version": current.from_version}
        pointer = registry.promote(name, version, stage, by=by)
    else:
        pointer = registry.rollback(target, stage, by=by)
    print(f"{pointer.name}/{pointer.stage} -> {pointer.version}  (was {pointer.from_version}; "
          f"{pointer.action} by {pointer.promoted_by} at {pointer.promoted_at})")
    print(f"checkpoint: {pointer.checkpoint}")
    print(DISCLAIMER)
    return {"stage": pointer.stage, "version": pointer.version, "from_version": pointer.from_version}


_TARGET_HELP = {"show": "model NAME", "register": "CHECKPOINT directory", "promote": "NAME@VERSION",
                "rollback": "model NAME"}


def _list(registry: Registry) -> dict[str, Any]:
    names = registry.models()
    print(f"{registry.root}: {len(names)} model{'s' if len(names) != 1 else ''}")
    rows = []
    for name in names:
        versions = registry.versions(name)
        stages = {stage: (registry.stage(name, stage) or None) for stage in registry.stages(name)}
        shown = " ".join(f"{s}={p.version}" for s, p in stages.items() if p) or "-"
        rows.append({"name": name, "versions": len(versions), "latest": versions[-1].version, "stages": shown})
    _table(rows, ("name", "versions", "latest", "stages"))
    from dermaid.registry.gc import find_garbage

    leftovers = find_garbage(registry.root)
    if leftovers:
        print(f"{len(leftovers)} leftover{'s' if len(leftovers) != 1 else ''} of interrupted writes (never read): "
              + ", ".join(g.url.rsplit("/", 1)[-1] for g in leftovers[:5])
              + f"; `dermaid gc root={registry.root}` removes them once older than its grace period")
    return {"models": rows, "leftovers": [g.url for g in leftovers]}


def _show(registry: Registry, name: str) -> dict[str, Any]:
    versions = registry.versions(name)
    if not versions:
        raise DermaidError(f"{registry.root}: no model named {name!r} (models: {registry.models()})")
    stages = {stage: registry.stage(name, stage) for stage in registry.stages(name)}
    print(f"{name} in {registry.root}")
    rows = [{"version": v.version, "created": v.created, "by": v.registered_by, "model": v.model,
             "metrics": _metrics(v.metrics), "stages": ",".join(s for s, p in stages.items() if p and
                                                                 p.version == v.version) or "-",
             "promotable": "yes" if not v.problems else f"no ({len(v.problems)} problems)"} for v in versions]
    _table(rows, ("version", "created", "by", "model", "metrics", "stages", "promotable"))
    for stage in stages:
        print(f"\nstage {stage} history:")
        _table([{"gen": p.generation, "action": p.action, "version": p.version, "from": p.from_version or "-",
                 "by": p.promoted_by, "at": p.promoted_at, "metrics": _metrics(p.metrics)}
                for p in registry.history(name, stage)], ("gen", "action", "version", "from", "by", "at", "metrics"))
    return {"versions": rows, "stages": {s: (p.version if p else None) for s, p in stages.items()}}


def _metrics(metrics: dict[str, Any]) -> str:
    keys = [k for k in ("balanced_accuracy", "test/balanced_accuracy", "val/balanced_accuracy", "auroc")
            if k in metrics] or sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))[:2]
    return " ".join(f"{k}={metrics[k]:.3f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                    for k in keys) or "-"


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """A plain aligned text table (a dependency for this is not worth it)."""
    if not rows:
        print("  (none)")
        return
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  " + "  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        print("  " + "  ".join(str(row[c]).ljust(widths[c]) for c in columns))


def hydra_args(argv: list[str]) -> list[str]:
    """`dermaid registry promote isic@v3 k=v` -> `action=promote target='isic@v3' k=v`."""
    if not argv or not is_word(argv[0]):
        return argv
    words, rest = [f"action={argv[0]}"], argv[1:]
    if rest and "=" not in rest[0] and not rest[0].startswith("-"):
        target = rest[0]
        if "'" in target:
            raise DermaidError(f"{target!r}: a quote is not allowed in a registry target")
        words.append(f"target='{target}'")
        rest = rest[1:]
    return [*words, *rest]
