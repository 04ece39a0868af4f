"""Dermatologist tokens in the uploads database (dermaid.uploads.reviewers): `dermaid reviewers add|revoke|list`
and the library, on SQLite and PostgreSQL, and the serving side's check (serve/review.py ReviewContext) without
Serve. Over HTTP: tests/test_web.py test_database_tokens_work_and_are_refused_at_once."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi import HTTPException
from starlette.requests import Request

from dermaid.auth import create_token, hash_token
from dermaid.errors import DermaidError
from dermaid.uploads.reviewers import ReviewerTokenStore


def _exercise_store(store: ReviewerTokenStore) -> None:
    """add -> works at once; a second active token refused; revoke -> refused at once; add again -> a new token."""
    token = store.add("dr_ana")
    assert store.lookup(token) == "dr_ana" and store.lookup(create_token()) is None
    assert store.lookup(token[:-1]) is None and store.lookup(None) is None and store.lookup("x" * 10_000) is None
    with store.engine.connect() as connection:  # only the digest is stored, never the token
        (row,) = connection.execute(sa.text("SELECT reviewer, digest, revoked FROM reviewer_tokens")).all()
    assert row == ("dr_ana", hash_token(token), None)
    with pytest.raises(DermaidError, match="'dr_ana' already has an active token.*dermaid reviewers revoke dr_ana"):
        store.add("dr_ana")
    ben = store.add("dr.ben@clinic")
    assert store.revoke("dr_ana") == 1
    assert store.lookup(token) is None and store.lookup(ben) == "dr.ben@clinic"  # refused from the next check on
    with pytest.raises(DermaidError, match="'dr_ana' has no active token"):
        store.revoke("dr_ana")
    again = store.add("dr_ana")
    assert again != token and store.lookup(again) == "dr_ana" and store.lookup(token) is None
    rows = store.list()
    assert [(r["reviewer"], r["revoked"] is None) for r in rows] == [("dr_ana", False), ("dr.ben@clinic", True),
                                                                     ("dr_ana", True)]
    assert all(set(r) == {"reviewer", "created", "revoked"} for r in rows)
    assert dt.datetime.fromisoformat(rows[0]["revoked"]) >= dt.datetime.fromisoformat(rows[0]["created"])
    assert dt.datetime.fromisoformat(rows[0]["created"]).utcoffset() == dt.timedelta(0)
    for bad in ("bad name", "", "x" * 65, "dr/../a"):
        with pytest.raises(DermaidError, match="reviewer name"):
            store.add(bad)


def test_reviewer_tokens_in_sqlite(tmp_path):
    from dermaid.uploads.schema import migrate_uploads_database

    migrate_uploads_database(str(tmp_path / "uploads"))
    store = ReviewerTokenStore.open(str(tmp_path / "uploads"))
    try:
        _exercise_store(store)
    finally:
        store.close()


def test_reviewer_tokens_in_postgresql(postgres_url, tmp_path):
    store = ReviewerTokenStore.open(str(tmp_path / "blobs"), postgres_url)  # a new database: migrated on open
    try:
        _exercise_store(store)
    finally:
        with store.engine.begin() as connection:
            connection.execute(sa.text("DELETE FROM reviewer_tokens"))
        store.close()


def test_a_missing_sqlite_database_is_refused(tmp_path):
    """A token added to a file the server never reads would be lost: the store must exist (dermaid db upgrade)."""
    with pytest.raises(DermaidError, match="no uploads database at"):
        ReviewerTokenStore.open(str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere" / "uploads.db").exists()


def _token_of(stdout: str) -> str:
    lines = stdout.strip().splitlines()
    assert "cannot be shown again" in lines[-2], stdout
    return lines[-1].strip()


def _cli_round_trip(dermaid_cli, cwd: Path, *storage: str) -> None:
    added = dermaid_cli("reviewers", "add", "dr.cli@clinic", *storage, cwd=cwd)
    assert added.returncode == 0, added.stderr
    token = _token_of(added.stdout)
    db_url = next((s.split("=", 1)[1] for s in storage if s.startswith("storage.db_url=")), None)
    store = ReviewerTokenStore.open(next(s.split("=", 1)[1] for s in storage if s.startswith("storage.url=")), db_url)
    try:
        assert store.lookup(token) == "dr.cli@clinic"
        twice = dermaid_cli("reviewers", "add", "dr.cli@clinic", *storage, cwd=cwd)
        assert twice.returncode == 2 and "already has an active token" in twice.stderr
        listed = dermaid_cli("reviewers", "list", *storage, cwd=cwd)
        assert listed.returncode == 0, listed.stderr
        assert "1 reviewer token " in listed.stdout and "dr.cli@clinic" in listed.stdout and "active" in listed.stdout
        assert token not in listed.stdout and hash_token(token).split("$")[1] not in listed.stdout
        revoked = dermaid_cli("reviewers", "revoke", "dr.cli@clinic", *storage, cwd=cwd)
        assert revoked.returncode == 0 and "1 token revoked" in revoked.stdout, revoked.stderr
        assert store.lookup(token) is None
        listed = dermaid_cli("reviewers", "list", *storage, cwd=cwd)
        assert "revoked 20" in listed.stdout and "active" not in listed.stdout
        unknown = dermaid_cli("reviewers", "revoke", "dr_nobody", *storage, cwd=cwd)
        assert unknown.returncode == 2 and "'dr_nobody' has no active token" in unknown.stderr
    finally:
        store.close()
    # the token was printed once: Hydra's run folders (outputs/reviewers/...) hold neither it nor its digest
    written = [path for path in (cwd / "outputs" / "reviewers").rglob("*") if path.is_file()]
    assert written
    for path in written:
        text = path.read_text(errors="replace")
        assert token not in text and hash_token(token).split("$")[1] not in text, path


def test_reviewers_command_on_sqlite(dermaid_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("DERMAID_HOME", str(tmp_path))  # Hydra's outputs/ land here
    storage = f"storage.url={tmp_path / 'uploads'}"
    missing = dermaid_cli("reviewers", "list", storage, cwd=tmp_path)
    assert missing.returncode == 2 and "no uploads database" in missing.stderr
    assert dermaid_cli("db", "upgrade", storage, cwd=tmp_path).returncode == 0
    _cli_round_trip(dermaid_cli, tmp_path, storage)
    for args, message in [(("add",), "the reviewer's name is missing"), (("add", "bad/name"), "reviewer name"),
                          (("frobnicate",), "expected add NAME, revoke NAME or list")]:
        wrong = dermaid_cli("reviewers", *args, storage, cwd=tmp_path)
        assert wrong.returncode == 2 and message in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr
    named = dermaid_cli("reviewers", "add", "007", storage, cwd=tmp_path)  # Hydra would make 007 the int 7
    assert named.returncode == 0 and named.stdout.startswith("007: new token"), named.stderr


def test_reviewers_command_on_postgresql(dermaid_cli, postgres_url, tmp_path, monkeypatch):
    monkeypatch.setenv("DERMAID_HOME", str(tmp_path))
    storage = (f"storage.url={tmp_path / 'blobs'}", f"storage.db_url={postgres_url}")
    try:
        _cli_round_trip(dermaid_cli, tmp_path, *storage)
    finally:
        engine = sa.create_engine(postgres_url)
        with engine.begin() as connection:
            connection.execute(sa.text("DELETE FROM reviewer_tokens"))
        engine.dispose()


def _request(token: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/v1/review/me", "root_path": "",
                    "headers": [(b"authorization", f"Bearer {token}".encode())]})


def test_the_review_routes_check_both_routes_and_say_503_when_the_database_is_gone(tmp_path):
    """serve/review.py's check in a replica (no Serve here): the deploy's tokens and the database's; a database
    that cannot be read is a 503, never a 500 or a pass."""
    from dermaid.uploads.store import UploadStore
    from serve.review import create_review_context, require_reviewer

    config_token = create_token()
    uploads = UploadStore(str(tmp_path / "uploads"))
    context = create_review_context(uploads, {"tokens": {"dr_config": hash_token(config_token)}})
    db_token = ReviewerTokenStore(uploads.engine).add("dr_db")
    assert require_reviewer(_request(config_token), context) == "dr_config"
    assert require_reviewer(_request(db_token), context) == "dr_db"
    with pytest.raises(HTTPException) as wrong:
        require_reviewer(_request(create_token()), context)
    assert wrong.value.status_code == 403
    with uploads.engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE reviewer_tokens"))
    assert require_reviewer(_request(config_token), context) == "dr_config"  # the deploy's tokens need no database
    with pytest.raises(HTTPException) as down:
        require_reviewer(_request(db_token), context)
    assert down.value.status_code == 503 and "try again" in down.value.detail
    uploads.engine.dispose()
