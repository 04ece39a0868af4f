"""Wrong-token checks per second: the old check (every entry, PBKDF2) next to the new one (one digest), one run.

    .venv/bin/python benchmarks/token_check.py                          # 2, 20, 200 reviewers, in process
    DERMAID_TEST_POSTGRES_URL=postgresql+psycopg2://postgres@127.0.0.1:55433/postgres \
        .venv/bin/python benchmarks/token_check.py                      # + the database lookup on PostgreSQL
    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/token_check.py --http   # + GET /v1/review/me over HTTP

In process (a fresh random 43-character token per check, none of them valid):
    old sha256    the check before issue #13 (commit 9a16413, reproduced below): SHA-256 once, then
                  hmac.compare_digest against every entry, no early exit; entries "sha256$<hex>"
    old pbkdf2    the same loop with "pbkdf2_sha256$200000$..." entries (what the old docs advised for tokens
                  chosen by people): 200,000 PBKDF2 iterations per entry per check
    new           dermaid.auth.ReviewerTokens.verify: one SHA-256, one dict lookup, one compare_digest
    new + sqlite  what a replica does for a token not in its configuration (serve/review.py ReviewContext.reviewer):
                  ReviewerTokens.verify, then ReviewerTokenStore.lookup (one indexed query) on N database rows
    new + postgres  the same on PostgreSQL ($DERMAID_TEST_POSTGRES_URL or --postgres; a scratch database)
Each cell: the best of --repeats runs of at least --seconds (and at least one check) each.
--http: a Serve app (an untrained test_efficientnet checkpoint, 200 configuration tokens + 200 database
tokens) on 127.0.0.1 and --clients threads on keep-alive connections sending GET /v1/review/me with wrong
tokens; beside it GET /healthz (an async route, no token check) as the floor of what the server answers,
and the right token. The old check is not run over HTTP: a replica cannot answer faster than its check.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import itertools
import os
import secrets
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

OLD_PBKDF2_ITERATIONS = 200_000  # the old default (dermaid/auth.py PBKDF2_ITERATIONS before issue #13)


# --- the old check (commit 9a16413 dermaid/auth.py: hash_token + ReviewerTokens.verify), kept here to compare ---

def old_hash(token: str, scheme: str) -> str:
    """An entry of the old configuration. The pbkdf2 one holds a random digest instead of the token's (making
    200 real ones would take 45 s here): a wrong token costs the old check exactly the same either way."""
    if scheme == "sha256":
        return f"sha256${hashlib.sha256(token.encode()).hexdigest()}"
    return f"pbkdf2_sha256${OLD_PBKDF2_ITERATIONS}${secrets.token_hex(16)}${secrets.token_hex(32)}"


def old_verifier(hashes: dict[str, str]) -> Callable[[str], str | None]:
    entries = []
    for reviewer, stored in hashes.items():
        scheme, *parts = stored.split("$")
        entries.append((reviewer, scheme, tuple(parts)))

    def verify(token: str) -> str | None:
        if not isinstance(token, str) or not 16 <= len(token) <= 512:
            return None
        raw = token.encode()
        plain_digest = hashlib.sha256(raw).hexdigest()
        found: str | None = None
        for reviewer, scheme, parts in entries:
            if scheme == "sha256":
                candidate, expected = plain_digest, parts[0]
            else:
                iterations, salt, expected = parts
                candidate = hashlib.pbkdf2_hmac("sha256", raw, salt.encode(), int(iterations)).hex()
            if hmac.compare_digest(candidate.encode(), expected.encode()) and found is None:
                found = reviewer
        return found

    return verify


# --- measuring --------------------------------------------------------------------------------------------------

def checks_per_second(verify: Callable[[str], Any], seconds: float) -> float:
    """Wrong tokens (made beforehand, 4096 distinct, cycled) through `verify` for at least `seconds` and at least
    one check; checks per second. The clock is read every 16 checks at most."""
    from dermaid.auth import create_token

    wrong = itertools.cycle([create_token() for _ in range(4096)])
    done, batch, start = 0, 1, time.perf_counter()
    while True:
        for token in itertools.islice(wrong, batch):
            assert verify(token) is None
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed
        batch = min(16, batch * 2)


def database_case(db_url: str, n: int) -> tuple[Callable[[str], Any], Callable[[], None]]:
    """N configuration tokens in memory + N active rows in reviewer_tokens: ReviewContext.reviewer's check."""
    from dermaid.auth import ReviewerTokens, create_token, hash_token
    from dermaid.uploads.db import create_db_engine
    from dermaid.uploads.reviewers import ReviewerTokenStore
    from dermaid.uploads.schema import upgrade

    engine = create_db_engine(db_url)
    upgrade(engine)
    store = ReviewerTokenStore(engine)
    for i in range(n):
        store.add(f"dr_{n}_{i}")
    tokens = ReviewerTokens({f"dr_config_{i}": hash_token(create_token()) for i in range(n)})
    return (lambda token: tokens.verify(token) or store.lookup(token)), engine.dispose


def scratch_postgres(server: str) -> tuple[str, Callable[[], None]]:
    import sqlalchemy as sa

    name = f"dermaid_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return sa.make_url(server).set(database=name).render_as_string(hide_password=False), drop


def in_process(sizes: list[int], seconds: float, repeats: int, pbkdf2_max: int, postgres: str | None,
               scratch: str) -> None:
    from dermaid.auth import ReviewerTokens, create_token, hash_token

    def best(verify: Callable[[str], Any]) -> float:  # a shared machine only ever slows a run down
        return max(checks_per_second(verify, seconds) for _ in range(repeats))

    columns = ["old sha256", "old pbkdf2", "new", "new + sqlite"] + (["new + postgres"] if postgres else [])
    print(f"wrong-token checks per second (this process, one thread; best of {repeats} runs of >= {seconds:g} s)")
    print(f"{'reviewers':>9}  " + "  ".join(f"{c:>15}" for c in columns))
    pg_url, drop = scratch_postgres(postgres) if postgres else (None, None)
    try:
        for n in sizes:
            plain = [create_token() for _ in range(n)]
            row = [best(old_verifier({f"dr_{i}": old_hash(t, "sha256") for i, t in enumerate(plain)}))]
            if n <= pbkdf2_max:
                slow = {f"dr_{i}": old_hash(t, "pbkdf2") for i, t in enumerate(plain)}
                row.append(best(old_verifier(slow)))
            else:
                row.append(float("nan"))
            row.append(best(ReviewerTokens({f"dr_{i}": hash_token(t) for i, t in enumerate(plain)}).verify))
            for url in [f"sqlite:///{scratch}/tokens-{n}.db"] + ([pg_url] if pg_url else []):
                verify, close = database_case(str(url), n)
                try:
                    row.append(best(verify))
                finally:
                    close()
            print(f"{n:>9}  " + "  ".join(f"{value:>15,.2f}" if value < 100 else f"{value:>15,.0f}" for value in row),
                  flush=True)
    finally:
        if drop:
            drop()


# --- over HTTP ----------------------------------------------------------------------------------------------

def http_load(url: str, headers: Callable[[], dict[str, str]], expect: int, clients: int, seconds: float) -> float:
    """Requests per second from `clients` threads (one keep-alive session each) for `seconds`."""
    import requests

    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        with requests.Session() as session:
            while time.perf_counter() < stop:
                response = session.get(url, headers=headers(), timeout=30)
                assert response.status_code == expect, (response.status_code, response.text)
                counts[i] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


def over_http(n: int, clients: int, seconds: float, scratch: str) -> None:
    import requests
    import torch
    from ray import serve

    from dermaid.auth import create_token, hash_token
    from dermaid.models.card import build_card, save_checkpoint
    from dermaid.models.classifier import create_classifier, resolve_input_spec
    from dermaid.processes import free_port
    from dermaid.ray_runtime import ensure_ray
    from dermaid.uploads.reviewers import ReviewerTokenStore
    from serve.app import build_app

    model_cfg = {"name": "test_efficientnet", "pretrained": False, "use_metadata": True}
    model = create_classifier(model_cfg)
    checkpoint = f"{scratch}/checkpoint"
    save_checkpoint(checkpoint, build_card(model_cfg, resolve_input_spec(model, 64)), model.state_dict())
    torch.set_num_threads(1)
    right = create_token()
    storage = f"{scratch}/uploads"
    args = {"checkpoint": checkpoint, "storage": {"url": storage},
            "review": {"tokens": {"dr_right": hash_token(right),
                                  **{f"dr_config_{i}": hash_token(create_token()) for i in range(n - 1)}}},
            "classifier": {"num_cpus": 0.25, "torch_threads": 1, "decode_threads": 1},
            "explainer": {"num_cpus": 0.25, "torch_threads": 1}, "ingress": {"num_cpus": 0.1}}
    ensure_ray("local", 2)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        serve.run(build_app(args), name="token-bench", route_prefix="/")
        from ray.serve.context import _get_global_client

        base = f"http://127.0.0.1:{int(_get_global_client().http_config.port)}"
        deadline = time.time() + 180
        while requests.get(f"{base}/readyz", timeout=10).status_code != 200:
            assert time.time() < deadline, "the app never became ready"
            time.sleep(0.5)
        store = ReviewerTokenStore.open(storage)
        for i in range(n):
            store.add(f"dr_db_{i}")
        store.close()
        print(f"\nover HTTP (Serve on 127.0.0.1, 1 ingress replica; {clients} client threads on this machine too; "
              f"{n} configuration + {n} database tokens; {seconds:g} s each)")
        cases = [("GET /healthz (no token check)", f"{base}/healthz", dict, 200),
                 ("GET /v1/review/me, wrong token", f"{base}/v1/review/me",
                  lambda: {"Authorization": f"Bearer {create_token()}"}, 403),
                 ("GET /v1/review/me, right token", f"{base}/v1/review/me",
                  lambda: {"Authorization": f"Bearer {right}"}, 200)]
        for label, url, headers, expect in cases:
            http_load(url, headers, expect, clients, 2.0)  # warm-up: connections, the replica's first requests
            print(f"  {label:<34} {http_load(url, headers, expect, clients, seconds):8.0f} requests/s", flush=True)
    finally:
        serve.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviewers", default="2,20,200", help="comma-separated numbers of reviewers")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum time of one in-process run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per in-process cell (the best is shown)")
    parser.add_argument("--pbkdf2-max", type=int, default=200, help="skip old pbkdf2 above this many reviewers "
                                                                    "(200: ~15 s per check on this VM)")
    parser.add_argument("--postgres", default=os.environ.get("DERMAID_TEST_POSTGRES_URL"),
                        help="a PostgreSQL server URL (a scratch database is made and dropped)")
    parser.add_argument("--http", action="store_true", help="also measure over HTTP against a local Serve app")
    parser.add_argument("--http-reviewers", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--http-seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as scratch:
        in_process([int(n) for n in args.reviewers.split(",")], args.seconds, args.repeats, args.pbkdf2_max,
                   args.postgres, scratch)
        if args.http:
            over_http(args.http_reviewers, args.clients, args.http_seconds, scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
