"""Dermatologist bearer tokens: kept hashed, compared in constant time.

    python -m dermaid.auth new dr_smith          # a fresh token (give it to the reviewer) + the hash for config
    python -m dermaid.auth hash                  # hash a token read from stdin

    tokens = ReviewerTokens.from_settings({"tokens": {"dr_smith": "sha256$9f86..."}})
    tokens.verify("the-bearer-token")            # -> "dr_smith", or None

Where tokens come from (both are merged; a reviewer name may appear once):
- configuration (`review.tokens` in conf/serve.yaml or serve/config.yaml): reviewer -> token HASH only, never
  the token itself: "sha256$<hex>" (tokens are 256-bit random strings, so one SHA-256 is enough) or
  "pbkdf2_sha256$<iterations>$<salt>$<hex>" (for tokens chosen by people).
- the environment (`DERMAID_REVIEWER_TOKENS`, e.g. the `dermaid-secrets` Kubernetes secret): comma-separated
  "name:token" entries, or bare tokens (named "reviewer-<first 8 hex digits of the token's SHA-256>", stable as
  long as the token is); the tokens are hashed as soon as they are read and the plain values are not kept.

A bearer token is checked against every entry with `hmac.compare_digest` and no early exit, so the time
taken does not tell how close a guess was or which reviewer it belongs to.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Mapping
from typing import Any

from dermaid.errors import DermaidError

TOKENS_ENV = "DERMAID_REVIEWER_TOKENS"
REVIEWER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_TOKEN_CHARS = 16          # shorter tokens are guessable; `new` makes 43-character ones (256 bits)
MAX_TOKEN_CHARS = 512         # a longer Authorization header is refused before any hashing
PBKDF2_ITERATIONS = 200_000   # for human-chosen tokens; random tokens use plain SHA-256
_SHA256 = "sha256"
_PBKDF2 = "pbkdf2_sha256"


def create_token() -> str:
    """A new random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str, scheme: str = _SHA256, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The stored form of a token: "sha256$<hex>" or "pbkdf2_sha256$<iterations>$<salt>$<hex>"."""
    _check_token_text(token)
    if scheme == _SHA256:
        return f"{_SHA256}${hashlib.sha256(token.encode()).hexdigest()}"
    if scheme == _PBKDF2:
        salt = secrets.token_hex(16)
        digest = hashlib.pbkdf2_hmac("sha256", token.encode(), salt.encode(), int(iterations)).hex()
        return f"{_PBKDF2}${int(iterations)}${salt}${digest}"
    raise DermaidError(f"token hash scheme {scheme!r} is unknown; use {_SHA256} or {_PBKDF2}")


class ReviewerTokens:
    """reviewer -> token hash; `verify(token)` returns the reviewer whose token it is, or None."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._entries: list[tuple[str, str, tuple[str, ...]]] = []
        for reviewer, stored in hashes.items():
            _check_reviewer(reviewer, "review.tokens")
            self._entries.append((reviewer, *_parse_hash(reviewer, stored)))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None = None,
                      environ: Mapping[str, str] | None = None) -> "ReviewerTokens":
        """Hashes from `settings["tokens"]` plus plain tokens from $DERMAID_REVIEWER_TOKENS (hashed here)."""
        settings = dict(settings or {})
        hashes = dict(settings.get("tokens") or {})
        env_name = settings.get("tokens_env") or TOKENS_ENV
        environ = os.environ if environ is None else environ
        for reviewer, stored in hashes_from_env(environ.get(env_name, ""), env_name).items():
            if reviewer in hashes:
                raise DermaidError(f"{env_name}: reviewer {reviewer!r} also has a token in review.tokens; keep one")
            hashes[reviewer] = stored
        return cls(hashes)

    @property
    def reviewers(self) -> list[str]:
        return [reviewer for reviewer, _, _ in self._entries]

    def hashes(self) -> dict[str, str]:
        """reviewer -> stored hash (what crosses into Serve replicas; no plain token)."""
        return {reviewer: "$".join((scheme, *parts)) for reviewer, scheme, parts in self._entries}

    def verify(self, token: str) -> str | None:
        """The reviewer holding `token`, or None. Every entry is compared; no early exit."""
        if not isinstance(token, str) or not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
            return None
        raw = token.encode()
        plain_digest = hashlib.sha256(raw).hexdigest()
        found: str | None = None
        for reviewer, scheme, parts in self._entries:
            if scheme == _SHA256:
                candidate, expected = plain_digest, parts[0]
            else:
                iterations, salt, expected = parts
                candidate = hashlib.pbkdf2_hmac("sha256", raw, salt.encode(), int(iterations)).hex()
            if hmac.compare_digest(candidate.encode(), expected.encode()) and found is None:
                found = reviewer
        return found


def hashes_from_env(value: str, env_name: str = TOKENS_ENV) -> dict[str, str]:
    """"name:token,name2:token2" (or bare tokens) -> {name: sha256 hash}; the plain tokens are dropped."""
    hashes: dict[str, str] = {}
    for i, item in enumerate(part.strip() for part in value.split(",")):
        if not item:
            continue
        reviewer, sep, token = item.partition(":")
        reviewer, token = reviewer.strip(), token.strip()
        if not sep:  # a bare token: named after its hash, so the name stays with the token
            reviewer, token = f"reviewer-{hashlib.sha256(reviewer.encode()).hexdigest()[:8]}", reviewer
        if not reviewer or not token:
            raise DermaidError(f"{env_name}: entry {i + 1} is not 'reviewer:token' or a token")
        _check_reviewer(reviewer, env_name)
        if reviewer in hashes:
            raise DermaidError(f"{env_name}: reviewer {reviewer!r} appears twice")
        try:
            hashes[reviewer] = hash_token(token)
        except DermaidError as exc:
            raise DermaidError(f"{env_name}: reviewer {reviewer!r}: {exc}") from None
    return hashes


def parse_bearer(header: str | None) -> str | None:
    """The token of an "Authorization: Bearer <token>" header, or None when there is none."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _check_reviewer(reviewer: Any, where: str) -> None:
    if not isinstance(reviewer, str) or not REVIEWER_PATTERN.match(reviewer):
        raise DermaidError(f"{where}: reviewer name {reviewer!r} must be 1-64 letters, digits or . _ @ -")


def _check_token_text(token: str) -> None:
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
        raise DermaidError(f"a reviewer token needs at least {MIN_TOKEN_CHARS} characters "
                           "(create one with `python -m dermaid.auth new NAME`)")
    if len(token) > MAX_TOKEN_CHARS or any(c.isspace() or c == "," for c in token):
        raise DermaidError(f"a reviewer token has at most {MAX_TOKEN_CHARS} characters, no spaces or commas")


def _parse_hash(reviewer: str, stored: Any) -> tuple[str, tuple[str, ...]]:
    text = str(stored or "")
    scheme, _, rest = text.partition("$")
    parts = tuple(rest.split("$")) if rest else ()
    if scheme == _SHA256 and len(parts) == 1 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
        return scheme, parts
    if (scheme == _PBKDF2 and len(parts) == 3 and parts[0].isdigit() and int(parts[0]) >= 1000
            and parts[1] and re.fullmatch(r"[0-9a-f]{64}", parts[2])):
        return scheme, parts
    raise DermaidError(f"review.tokens.{reviewer}: not a token hash (expected 'sha256$<64 hex>' or "
                       "'pbkdf2_sha256$<iterations>$<salt>$<64 hex>'; make one with `python -m dermaid.auth new`)")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["new"] and len(args) == 2:
        try:
            _check_reviewer(args[1], "reviewer")
        except DermaidError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        token = create_token()
        print(f"token for {args[1]} (give it to the reviewer; it is not stored): {token}")
        print(f"config (review.tokens):  {args[1]}: \"{hash_token(token)}\"")
        print(f"or in the environment:   {TOKENS_ENV}={args[1]}:{token}")
        return 0
    if args[:1] == ["hash"] and len(args) in (1, 2):
        try:
            print(hash_token(sys.stdin.readline().strip(), args[1] if len(args) == 2 else _SHA256))
        except DermaidError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    print("usage: python -m dermaid.auth new REVIEWER | hash [sha256|pbkdf2_sha256] < token", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
