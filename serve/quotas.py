"""What the public may send and store: requests per client address (an option), consented uploads per client
address, and stored bytes per UTC day.

    api.add_middleware(RequestLimitMiddleware, limit=lambda: <the replica's RequestLimit or None>)
    guard = UploadGuard(settings["storage"], store)    # in the Ingress replica (StorageArgs as a dict)
    guard.admit(request)                               # the per-client rate limit: TooManyRequests (429) past it
    await run_in_threadpool(guard.check_quota, size)   # the daily quota (database + blob store): 429 past it

Anyone may send `consent=true`, and each such request stores up to max_upload_mb: without these limits a
loop fills the disk or the bucket and the dermatologists' queue with what the sender chose. A refused
upload is answered 429 with Retry-After and the JSON error shape (serve/errors.py TooManyRequests), before
the model runs: the request asked to store, so it fails whole rather than returning a classification that
its sender might take for stored; the message says to try later or to classify without consent, which
stores nothing and is not limited here.

The rate limit is a moving one-hour window per client address from `limits` (a maintained library; its
in-memory storage, so each Ingress replica counts its own clients: with N replicas a client may store up
to N x the limit). An IPv6 client is counted by its /64, the block one subscriber gets. The client address
is the TCP peer's; X-Forwarded-For is read only when that peer is a configured trusted proxy.

The request limit (ingress.requests_per_client_per_minute; off unless set) counts every request of a client
address in a moving minute, the same way, except the probes (/healthz, /readyz) and the dermatologists' token-
checked API (/v1/review/...). It answers 429 + Retry-After in the JSON error shape before the body is read (a pure
ASGI middleware: a flood costs no multipart parsing and no model time). A load balancer's limit (Cloud Armor on GKE,
cluster/README.md) can stand in front of it; this one works wherever the app runs.

The daily quota is counted from the database (every replica's uploads) and the blob sizes
(UploadStore.stored_bytes), so it holds across replicas, up to the uploads in flight at the same moment.

Metrics (Ray's Prometheus export, prefixed ray_): dermaid_uploads_refused_total{reason="rate_limit" |
"daily_quota"} and dermaid_uploads_stored_bytes_today (the bytes stored since midnight UTC, as this
replica last counted them).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import time
from typing import Any, Callable

from limits import RateLimitItemPerHour, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.requests import Request

from serve.args import MIB
from serve.errors import TooManyRequests, send_api_error

logger = logging.getLogger("ray.serve")

IPV6_CLIENT_PREFIX = 64   # one subscriber's IPv6 block: counting single addresses would give them 2^64 limits
# Not counted by the request limit: the load balancer's and Kubernetes' probes, and the review API (each request
# carries a dermatologist's token, checked first; a leaked token is revoked, not rate limited)
UNLIMITED_PATHS = ("/healthz", "/readyz")
UNLIMITED_PREFIXES = ("/v1/review/",)


class ClientWindow:
    """A moving-window count per client address (`limits`, in this replica's memory): `item` hits per window."""

    def __init__(self, item: Any, trusted_proxies: list[str] | None) -> None:
        self.item = item   # a limits RateLimitItem: RateLimitItemPerMinute(120), RateLimitItemPerHour(60)
        self.trusted = [ipaddress.ip_network(net, strict=False) for net in trusted_proxies or []]
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def over(self, request: Any) -> float | None:
        """Count one hit of this request's client: None while within the limit, else the seconds until the
        window frees a slot (the hit past the limit is not counted)."""
        client = client_key(request, self.trusted)
        if self.limiter.hit(self.item, client):
            return None
        return self.limiter.get_window_stats(self.item, client).reset_time - time.time()


class RequestLimit:
    """ingress.requests_per_client_per_minute of one Ingress replica: a moving minute per client address."""

    def __init__(self, per_minute: int, trusted_proxies: list[str]) -> None:
        self.window = ClientWindow(RateLimitItemPerMinute(int(per_minute)), trusted_proxies)

    def refusal(self, request: Any) -> TooManyRequests | None:
        """Count this request of its client; the 429 to answer once the minute's limit is used, else None."""
        path, root = request.scope["path"], request.scope.get("root_path") or ""
        path = path[len(root):] if root and path.startswith(root) else path   # an app under a route prefix
        if path in UNLIMITED_PATHS or path.startswith(UNLIMITED_PREFIXES):
            return None
        retry_after_s = self.window.over(request)
        if retry_after_s is None:
            return None
        return TooManyRequests("rate_limit", f"this address has sent {self.window.item.amount} requests in the last "
                                             "minute, the most allowed; try again after the Retry-After seconds",
                               retry_after_s)


class RequestLimitMiddleware:
    """Pure ASGI: the replica's RequestLimit (`limit()`, None: off) checked before anything of the request is read."""

    def __init__(self, app: Any, limit: Callable[[], RequestLimit | None]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        limit = self.limit() if scope["type"] == "http" else None
        refusal = limit.refusal(Request(scope)) if limit is not None else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await send_api_error(send, refusal)


class UploadGuard:
    """The rate limit and the daily quota of one Ingress replica (settings: StorageArgs as a dict)."""

    def __init__(self, storage: dict[str, Any], store: Any) -> None:
        from ray.serve.metrics import Counter, Gauge

        self.store = store
        per_hour = storage.get("uploads_per_client_per_hour")
        quota_mb = storage.get("daily_quota_mb")
        self.per_hour = (ClientWindow(RateLimitItemPerHour(int(per_hour)), storage.get("trusted_proxies"))
                         if per_hour else None)
        self.quota_bytes = int(float(quota_mb) * MIB) if quota_mb else None
        self.refused = Counter("dermaid_uploads_refused_total", tag_keys=("reason",),
                               description="Consented uploads refused with 429, by reason (rate_limit, daily_quota).")
        self.stored_today = Gauge("dermaid_uploads_stored_bytes_today",
                                  description="Bytes of upload blobs stored since midnight UTC (all replicas).")

    def admit(self, request: Any) -> None:
        """Count one consented upload of this request's client; TooManyRequests once the hour's limit is used."""
        if self.per_hour is None:
            return
        retry_after_s = self.per_hour.over(request)
        if retry_after_s is None:
            return
        self._refuse("rate_limit", f"this address has sent {self.per_hour.item.amount} photos for review in the "
                                   "last hour, the most allowed; try again later, or classify without consent "
                                   "(nothing is stored then)", retry_after_s)

    def check_quota(self, size: int) -> None:
        """TooManyRequests when `size` more bytes would pass today's quota (blocking: database + blob store).
        When the stores cannot be read the upload goes on (its store then fails and the answer says stored
        false; the rate limit still holds): a broken database must not turn classification into 500s."""
        try:
            used = self.stored()
        except Exception:  # noqa: BLE001 - logged; see the docstring
            logger.exception("counting today's stored bytes failed; the daily quota is not checked")
            return
        if self.quota_bytes is not None and used + size > self.quota_bytes:
            self._refuse("daily_quota", "today's storage for photos sent for review is full; try again after "
                                        "midnight UTC, or classify without consent (nothing is stored then)",
                         seconds_to_midnight())

    def stored(self) -> int:
        """Bytes stored today by every replica (blocking), also set on the gauge."""
        used = self.store.stored_bytes(today())
        self.stored_today.set(used)
        return used

    def _refuse(self, reason: str, message: str, retry_after_s: float) -> None:
        self.refused.inc(tags={"reason": reason})
        raise TooManyRequests(reason, message, retry_after_s)


def client_key(request: Any, trusted: list[Any]) -> str:
    """The address a rate limit counts: the TCP peer, or from a trusted proxy the rightmost X-Forwarded-For
    entry that is not itself a trusted proxy (entries left of it are whatever the client wrote); IPv6 as its /64."""
    peer = request.client.host if request.client else "unknown"
    address = peer
    if trusted and _is_trusted(peer, trusted):
        hops = [hop.strip() for line in request.headers.getlist("x-forwarded-for") for hop in line.split(",")]
        for hop in reversed([hop for hop in hops if hop]):
            address = hop
            if not _is_trusted(hop, trusted):
                break
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]  # not an address (a test client, a proxy's "unknown"): counted as written
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(ip)


def today() -> _dt.datetime:
    """Midnight UTC of today: where the daily quota starts."""
    return _dt.datetime.now(_dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


def seconds_to_midnight() -> float:
    """Seconds until the daily quota starts again."""
    return (today() + _dt.timedelta(days=1) - _dt.datetime.now(_dt.timezone.utc)).total_seconds()


def _is_trusted(address: str, trusted: list[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted if net.version == ip.version)
