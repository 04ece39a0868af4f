"""Dermatologist tokens in the uploads database: added and revoked while the server runs, no redeploy.

    dermaid reviewers add dr_smith              # prints a new token once (give it to the reviewer)
    dermaid reviewers revoke dr_smith           # the server refuses that token from the next request on
    dermaid reviewers list                      # names, created, revoked (never tokens or digests)
    dermaid reviewers list storage.db_url=postgresql+psycopg2://...   # the server's store (conf/reviewers.yaml)

    store = ReviewerTokenStore.open("uploads")  # SQLite beside the blobs; or (storage_url, postgres URL)
    token = store.add("dr_smith"); store.lookup(token)  # -> "dr_smith"; store.revoke("dr_smith"); store.list()

Table reviewer_tokens (dermaid.uploads.db.ReviewerToken, migration 0003): reviewer, digest (dermaid.auth's
"sha256$<hex>" of a 256-bit random token, unique), created, revoked. Only the digest is stored; revoking sets
`revoked` and keeps the row for the record. A name has at most one active token: `add` refuses a second one
(revoke first), `revoke` revokes every active token of the name.

No cache on the serving side: `lookup` is one query on the unique index of `digest` (tens of microseconds on
SQLite, one round trip to PostgreSQL; benchmarks/token_check.py), far below what the HTTP request around it
costs, and without a cache a revoked token is refused by the very next request. The tokens of the
configuration route (review.tokens, $DERMAID_REVIEWER_TOKENS: dermaid.auth) are not in this table and change
with a redeploy.
"""

from __future__ import annotations

import datetime as _dt
import hmac
from typing import Any

from omegaconf import DictConfig, OmegaConf
from sqlalchemy import Engine, bindparam, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from dermaid.config import is_word
from dermaid.auth import check_reviewer, create_token, hash_token, token_digest
from dermaid.errors import DermaidError
from dermaid.uploads.db import ReviewerToken, as_utc, create_db_engine
from dermaid.uploads.schema import ensure_schema  # at import, before Hydra sets up logging (Alembic INFO lines)

ACTIONS = ("add", "revoke", "list")


class ReviewerTokenStore:
    """The reviewer_tokens table of one uploads database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._session = sessionmaker(engine, expire_on_commit=False)
        self._lookup = select(ReviewerToken.reviewer, ReviewerToken.digest).where(
            ReviewerToken.digest == bindparam("digest"), ReviewerToken.revoked.is_(None))  # built once

    @classmethod
    def open(cls, storage_url: str, db_url: str | None = None) -> "ReviewerTokenStore":
        """The server's uploads database (db_url, else $DERMAID_DATABASE_URL, else SQLite beside local blobs).

        A SQLite file that does not exist is refused (a token added there would never reach the server)."""
        from dermaid.uploads.store import database_url, require_database

        url = database_url(storage_url, db_url)
        require_database(storage_url, url)
        engine = create_db_engine(url)
        try:
            ensure_schema(engine)  # at head: nothing; an older schema: the error naming `dermaid db upgrade`
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    def add(self, reviewer: str) -> str:
        """A new token for `reviewer` (returned once; only its digest is stored). Refused while one is active."""
        reviewer = check_reviewer(reviewer)
        token = create_token()
        with self._session.begin() as session:
            active = session.scalars(select(ReviewerToken).where(
                ReviewerToken.reviewer == reviewer, ReviewerToken.revoked.is_(None))).first()
            if active is not None:
                raise DermaidError(f"reviewer {reviewer!r} already has an active token (added {_iso(active.created)}); "
                                   f"revoke it first: `dermaid reviewers revoke {reviewer}`")
            session.add(ReviewerToken(reviewer=reviewer, digest=hash_token(token), created=_now()))
        return token

    def revoke(self, reviewer: str) -> int:
        """Revoke every active token of `reviewer` (the rows stay, dated); returns how many."""
        reviewer = check_reviewer(reviewer)
        with self._session.begin() as session:
            done = session.execute(update(ReviewerToken)
                                   .where(ReviewerToken.reviewer == reviewer, ReviewerToken.revoked.is_(None))
                                   .values(revoked=_now())).rowcount
        if not done:
            raise DermaidError(f"reviewer {reviewer!r} has no active token in this database (`dermaid reviewers "
                               "list`; a token in review.tokens or the environment goes with a redeploy)")
        return int(done)

    def list(self) -> list[dict[str, Any]]:
        """Every token row, oldest first: {"reviewer", "created", "revoked"} (ISO times; never the digest)."""
        with self._session() as session:
            rows = session.scalars(select(ReviewerToken).order_by(ReviewerToken.created, ReviewerToken.id)).all()
            return [{"reviewer": row.reviewer, "created": _iso(row.created), "revoked": _iso(row.revoked)}
                    for row in rows]

    def lookup(self, token: Any) -> str | None:
        """The reviewer whose active token this is, or None: one digest, one indexed query, one constant-time
        comparison (dermaid.auth explains why this leaks nothing)."""
        digest = token_digest(token)
        if digest is None:
            return None
        with self.engine.connect() as connection:
            row = connection.execute(self._lookup, {"digest": digest}).first()
        if row is None or not hmac.compare_digest(row.digest, digest):
            return None
        return str(row.reviewer)


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid reviewers add NAME | revoke NAME | list [storage.url=URL storage.db_url=URL]`."""
    from dermaid.files import absolute_url
    from dermaid.uploads.store import database_url

    plain = OmegaConf.to_container(cfg, resolve=True)
    action, name = str(plain["action"]), plain.get("name")
    if action not in ACTIONS:
        raise DermaidError(f"action={action!r}: expected add NAME, revoke NAME or list (`dermaid reviewers list`)")
    if action != "list" and name is None:
        raise DermaidError(f"`dermaid reviewers {action} NAME`: the reviewer's name is missing")
    storage_url = absolute_url(plain["storage"]["url"])
    shown = make_url(database_url(storage_url, plain["storage"]["db_url"])).render_as_string(hide_password=True)
    store = ReviewerTokenStore.open(storage_url, plain["storage"]["db_url"])
    try:
        if action == "add":
            token = store.add(str(name))
            print(f"{name}: new token (give it to the reviewer now: it is not stored and cannot be shown again; "
                  f"a running server accepts it at once)\n{token}")
            return {"reviewer": name, "database": shown}
        if action == "revoke":
            count = store.revoke(str(name))
            print(f"{name}: {count} token{'s' if count > 1 else ''} revoked (refused by the server from now on)")
            return {"reviewer": name, "revoked": count, "database": shown}
        rows = store.list()
    finally:
        store.close()
    print(f"{shown}: {len(rows)} reviewer token{'s' if len(rows) != 1 else ''}"
          " (review.tokens and the environment's are not listed)")
    for row in rows:
        print(f"  {row['reviewer']:<24} created {row['created']}  " + (f"revoked {row['revoked']}" if row["revoked"]
                                                                       else "active"))
    return {"reviewers": rows, "database": shown}


def hydra_args(argv: list[str]) -> list[str]:
    """`dermaid reviewers add NAME k=v` -> `action=add name='NAME' k=v` (action=/name= may also be given)."""
    if not argv or not is_word(argv[0]):
        return argv
    action, rest = argv[0], argv[1:]
    words = [f"action={action}"]
    if rest and is_word(rest[0]):
        # quoted: Hydra keeps it a string (a name like 007 or dr.smith@clinic); the pattern allows no quote
        words.append(f"name='{check_reviewer(rest[0])}'")
        rest = rest[1:]
    return [*words, *rest]


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(value: _dt.datetime | None) -> str | None:
    """In UTC, ISO text (SQLite returns naive datetimes for timezone columns: they were stored in UTC)."""
    return as_utc(value).isoformat() if value is not None else None
