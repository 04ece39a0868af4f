"""The retention purge: `dermaid uploads purge` deletes the unreviewed uploads older than storage.retention_days.

    dermaid uploads purge storage.retention_days=30                  # the server's store (conf/uploads.yaml)
    dermaid uploads purge storage.url=gs://b/uploads storage.db_url=postgresql+psycopg2://... dry_run=true
    purge(store, retention_days=30)                                  # the same from Python -> removed ids

An upload is unreviewed while it has no dermatologist label; reviewed ones are kept (their labels are training
data) until their sender deletes them. Each upload goes as DELETE /v1/uploads/{ref} removes it (blobs, row;
UploadStore.delete), and one labelled between the listing and its deletion is kept. Run it daily (cron, a
Kubernetes CronJob): the consumer page promises the retention the server is configured with.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dermaid.config import action_args
from dermaid.errors import DermaidError
from dermaid.uploads.store import UploadStore, database_url, require_database


def purge(store: UploadStore, retention_days: float, *, now: _dt.datetime | None = None,
          dry_run: bool = False) -> list[str]:
    """Delete the uploads without labels created more than `retention_days` before `now`; returns their ids
    (dry_run: the ids it would delete, nothing deleted)."""
    days = check_retention(retention_days)
    cutoff = (now or _dt.datetime.now(_dt.timezone.utc)) - _dt.timedelta(days=days)
    candidates = store.unreviewed_before(cutoff)
    if dry_run:
        return candidates
    return [upload_id for upload_id in candidates if store.delete(upload_id, only_unreviewed=True) is not None]


def check_retention(retention_days: Any) -> float:
    if retention_days is None:
        raise DermaidError("storage.retention_days is not set: nothing is purged without a retention "
                           "(e.g. `dermaid uploads purge storage.retention_days=30`)")
    try:
        days = float(retention_days)
    except (TypeError, ValueError):
        raise DermaidError(f"storage.retention_days: {retention_days!r} is not a number of days") from None
    if not days > 0:
        raise DermaidError(f"storage.retention_days: {retention_days!r} must be more than 0 days")
    return days


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid uploads purge [storage.url= storage.db_url= storage.retention_days=N] [dry_run=false]`."""
    from dermaid.files import absolute_url

    plain = OmegaConf.to_container(cfg, resolve=True)
    if plain["action"] != "purge":
        raise DermaidError(f"action={plain['action']!r}: the only action is purge (`dermaid uploads purge`)")
    storage = plain["storage"]
    days = check_retention(storage["retention_days"])
    url = absolute_url(storage["url"])
    db_url = database_url(url, storage["db_url"])
    require_database(url, db_url)          # a wrong path must not create an empty database and find nothing
    store = UploadStore(url, db_url)
    try:
        removed = purge(store, days, dry_run=bool(plain["dry_run"]))
    finally:
        store.engine.dispose()
    verb = "would remove" if plain["dry_run"] else "removed"
    for upload_id in removed:
        print(f"{verb} {upload_id}")
    print(f"{verb} {len(removed)} unreviewed upload(s) older than {days:g} day(s) from {url}")
    return {"removed": removed, "dry_run": bool(plain["dry_run"]), "retention_days": days}


hydra_args = action_args   # `dermaid uploads purge k=v` -> `action=purge k=v`
