"""Dermatologist bearer tokens: random, kept as one digest each, checked with one digest and one lookup.

    python -m dermaid.auth new dr_smith          # a fresh token (give it to the reviewer) + its hash for config
    python -m dermaid.auth hash                  # hash a token read from stdin (refused if it is guessable)
    dermaid reviewers add dr_smith               # or: a token in the uploads database, no redeploy (reviewers.py)

    tokens = ReviewerTokens.from_settings({"tokens": {"dr_smith": "sha256$9f86..."}})
    tokens.verify("the-bearer-token")            # -> "dr_smith", or None

Where tokens come from (a server accepts all three; a reviewer name may appear once in the first two):
- configuration (`review.tokens` in conf/serve.yaml or serve/config.yaml): reviewer -> token HASH only, never
  the token itself: "sha256$<64 hex>". The old "pbkdf2_sha256$..." form is refused (see below).
- the environment (`DERMAID_REVIEWER_TOKENS`, e.g. the `dermaid-secrets` Kubernetes secret): comma-separated
  "name:token" entries, hashed as soon as they are read (the plain values are not kept). A name is required:
  labels are recorded under it, so it has to mean something to the people who read them, and anything
  computed from the token alone (the old "reviewer-<8 hex of its SHA-256>") hands every reader of a label a
  way to test guesses of the token, while a keyed derivation would need one more secret in every replica
  only to produce names nobody recognises.
- the uploads database (table reviewer_tokens: `dermaid reviewers add|revoke|list`, dermaid.uploads.reviewers):
  added and revoked while the server runs.

Why one SHA-256 and not PBKDF2 or HMAC: the tokens are random with at least 128 bits of entropy
(`create_token` makes 256; a plain token is checked wherever this code sees one, and a configured hash
is trusted to come from `new`), so nobody can invert a digest or search the token space for one, with or
without salt, key or iterations. A slow hash protects guessable secrets only, and it made every wrong
token cost 200,000 iterations per stored entry: a flood of made-up tokens exhausted the CPU. A key (HMAC)
would add a secret that the `dermaid reviewers` command and every replica must share, for no gain at this
entropy. So tokens people chose are refused instead (`check_token`: at least MIN_TOKEN_CHARS characters and
MIN_TOKEN_BITS bits by the Shannon estimate of their own characters; it catches short, repetitive and
few-symbol tokens, not every passphrase: the tools above make random ones).

Checking a presented token costs the same for every request and every number of reviewers: one SHA-256,
one dict lookup by that digest, one `hmac.compare_digest` against the entry found (or a dummy). The lookup's
timing depends only on the digest of the attacker's own token, and learning how close SHA-256(guess) comes
to a stored digest does not help to find a token with that digest (preimage resistance).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import os
import re
import secrets
import sys
from collections.abc import Mapping
from typing import Any

from dermaid.errors import DermaidError

TOKENS_ENV = "DERMAID_REVIEWER_TOKENS"
REVIEWER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_TOKEN_CHARS = 32          # `create_token` makes 43 characters, `openssl rand -hex 32` 64
MIN_TOKEN_BITS = 128          # Shannon estimate (length x entropy of its characters); 43-char random tokens: ~208
MAX_TOKEN_CHARS = 512         # a longer Authorization header is refused before any hashing
NEW_TOKEN_HINT = "make one with `python -m dermaid.auth new NAME` (or `dermaid reviewers add NAME`)"
_SHA256 = "sha256"
_NO_MATCH = f"{_SHA256}${'0' * 64}"  # compared when no entry matches, so both outcomes do the same work


def create_token() -> str:
    """A new random bearer token (256 bits, URL-safe, 43 characters)."""
    return secrets.token_urlsafe(32)


def token_digest(token: Any) -> str | None:
    """The stored form of a presented token, "sha256$<hex>"; None when it cannot be a token (length)."""
    if not isinstance(token, str) or not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        return None
    return f"{_SHA256}${hashlib.sha256(token.encode()).hexdigest()}"


def hash_token(token: str) -> str:
    """The stored form of a token being issued, "sha256$<hex>"; a guessable token is refused (`check_token`)."""
    check_token(token)
    return str(token_digest(token))


def check_token(token: Any) -> None:
    """Refuse a token that is too short, too long, has spaces or commas, or draws on too few symbols."""
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
        raise DermaidError(f"a reviewer token needs at least {MIN_TOKEN_CHARS} random characters; {NEW_TOKEN_HINT}")
    if len(token) > MAX_TOKEN_CHARS or any(c.isspace() or c == "," for c in token):
        raise DermaidError(f"a reviewer token has at most {MAX_TOKEN_CHARS} characters, no spaces or commas")
    if estimated_bits(token) < MIN_TOKEN_BITS:
        raise DermaidError(f"this reviewer token looks guessable (about {estimated_bits(token):.0f} bits, "
                           f"{MIN_TOKEN_BITS} needed: repeated or too few distinct characters); {NEW_TOKEN_HINT}")


def estimated_bits(token: str) -> float:
    """len(token) x the Shannon entropy of its character frequencies: too generous for what a person typed
    (words are not random letters), close to the truth for random tokens (43 URL-safe characters: ~208;
    64 hex: ~245; 48 hex: ~180; 32 hex, 128 random bits: ~115, refused: use 256 bits)."""
    counts = collections.Counter(token)
    return -sum(n * math.log2(n / len(token)) for n in counts.values())


class ReviewerTokens:
    """reviewer -> token hash; `verify(token)` returns the reviewer whose token it is, or None."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._by_digest: dict[str, str] = {}
        for reviewer, stored in hashes.items():
            check_reviewer(reviewer, "review.tokens")
            digest = _parse_hash(reviewer, stored)
            if digest in self._by_digest:
                raise DermaidError(f"review.tokens: {self._by_digest[digest]!r} and {reviewer!r} have the same token; "
                                   f"give each reviewer their own ({NEW_TOKEN_HINT})")
            self._by_digest[digest] = reviewer

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
        return sorted(self._by_digest.values())

    def hashes(self) -> dict[str, str]:
        """reviewer -> stored hash (what crosses into Serve replicas; no plain token)."""
        return {reviewer: digest for digest, reviewer in self._by_digest.items()}

    def verify(self, token: Any) -> str | None:
        """The reviewer holding `token`, or None: one digest, one lookup, one constant-time comparison."""
        digest = token_digest(token)
        if digest is None:
            return None
        reviewer = self._by_digest.get(digest)
        expected = _NO_MATCH if reviewer is None else digest
        return reviewer if hmac.compare_digest(digest, expected) else None


def hashes_from_env(value: str, env_name: str = TOKENS_ENV) -> dict[str, str]:
    """"name:token,name2:token2" -> {name: sha256 hash}; the plain tokens are dropped."""
    hashes: dict[str, str] = {}
    for i, item in enumerate(part.strip() for part in value.split(",")):
        if not item:
            continue
        reviewer, sep, token = item.partition(":")
        reviewer, token = reviewer.strip(), token.strip()
        if not sep:
            raise DermaidError(f"{env_name}: entry {i + 1} is a token without a name; write it as 'name:token' "
                               "(labels are recorded under the name)")
        if not reviewer or not token:
            raise DermaidError(f"{env_name}: entry {i + 1} is not 'name:token'")
        check_reviewer(reviewer, env_name)
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


def check_reviewer(reviewer: Any, where: str = "reviewer") -> str:
    """A reviewer name: 1-64 letters, digits or . _ @ - (labels are recorded under it)."""
    if not isinstance(reviewer, str) or not REVIEWER_PATTERN.match(reviewer):
        raise DermaidError(f"{where}: reviewer name {reviewer!r} must be 1-64 letters, digits or . _ @ -")
    return reviewer


def _parse_hash(reviewer: str, stored: Any) -> str:
    text = str(stored or "")
    if re.fullmatch(rf"{_SHA256}\$[0-9a-f]{{64}}", text):
        return text
    if text.startswith("pbkdf2_sha256$"):
        raise DermaidError(f"review.tokens.{reviewer}: pbkdf2_sha256 hashes are no longer accepted (each wrong "
                           f"token cost 200,000 iterations per entry); {NEW_TOKEN_HINT} and give the reviewer "
                           "the new token")
    raise DermaidError(f"review.tokens.{reviewer}: not a token hash (expected 'sha256$<64 hex>'); {NEW_TOKEN_HINT}")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["new"] and len(args) == 2:
            check_reviewer(args[1])
            token = create_token()
            print(f"token for {args[1]} (give it to the reviewer; it is not stored): {token}")
            print(f"config (review.tokens):  {args[1]}: \"{hash_token(token)}\"")
            print(f"or in the environment:   {TOKENS_ENV}={args[1]}:{token}")
            return 0
        if args == ["hash"]:
            print(hash_token(sys.stdin.readline().strip()))
            return 0
    except DermaidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("usage: python -m dermaid.auth new REVIEWER | hash < token", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
