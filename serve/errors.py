"""Every error the HTTP API answers has one JSON shape: {"error": {"code": ..., "message": ...}}.

    ApiError(status, code, message)      raised by routes; rendered with its status
    describe_image_error(exc, data)      a decoding failure in a model replica -> status, code, message
    add_error_handling(api, max_bytes, deadline_s, retry_after_s)
                                         the body-size limit, the answer deadline (503 timeout) and the exception
                                         handlers of the FastAPI app
    await guarded(call, retry_after_s)   a model deployment's answer; its full queue (Serve's BackPressureError)
                                         -> Unavailable (503 overloaded, JSON, Retry-After)
    await read_json(request, limit)      a route's JSON body, read only when the route asks (after its
                                         dependencies, e.g. the token check) and at most `limit` bytes

Client input gets a 4xx naming what was wrong and what is allowed; anything else is a logged 500
whose body says nothing about the server's insides.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from dermaid.classes import AGE_RANGE, CLASS_CODES, SEXES, SITES
from dermaid.data.images import ALLOWED_FORMATS, ImageTooLargeError, sniff_format
from dermaid.inference import CAM_METHODS, ImageShapeError
from serve.args import MIB

NO_STORE = {"Cache-Control": "no-store"}   # tokens, reviews and review data never land in a shared cache


def no_store_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer that no cache keeps (the review API, a consumer's lookup and deletion), plus `headers`."""
    return Response(json.dumps(body, default=str), status_code=status, media_type="application/json",
                    headers={**NO_STORE, **(headers or {})})

logger = logging.getLogger("ray.serve")

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 413: "body_too_large",
                415: "unsupported_media_type", 422: "invalid_field", 429: "too_many_requests", 500: "internal",
                503: "unavailable"}

# What each form field accepts (named in 422 messages).
ALLOWED_VALUES: dict[str, str] = {
    "image": "an image file in the multipart field 'image' (JPEG, PNG, WebP, GIF, BMP, TIFF)",
    "age": f"a number from {AGE_RANGE[0]} to {AGE_RANGE[1]}",
    "sex": ", ".join(SEXES),
    "site": ", ".join(SITES),
    "consent": "true or false",
    "target": ", ".join(CLASS_CODES),
    "method": ", ".join(CAM_METHODS),
    "format": "png, json",
}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):  # the body of every error (OpenAPI; a docstring would become its description)
    error: ErrorDetail


class ApiError(Exception):
    """A client-facing error: rendered as {"error": {"code", "message"}} with `status`."""

    def __init__(self, status: int, code: str, message: str, fields: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields


class TooManyRequests(ApiError):
    """429: a limit on what the public may send or store was reached (serve/quotas.py). The body names the reason
    ("rate_limit" | "daily_quota") and retry_after_s; the Retry-After header says the same in whole seconds."""

    def __init__(self, reason: str, message: str, retry_after_s: float) -> None:
        super().__init__(429, STATUS_CODES[429], message)
        self.retry_after = max(1, math.ceil(retry_after_s))
        self.reason = reason
        self.headers = {"Retry-After": str(self.retry_after)}


class Unavailable(ApiError):
    """503 with Retry-After: a model's queue is full (code "overloaded") or an answer took longer than the
    deadline (code "timeout"). The client should try again after retry_after_s seconds."""

    def __init__(self, code: str, message: str, retry_after_s: float) -> None:
        super().__init__(503, code, message)
        self.retry_after = max(0, math.ceil(retry_after_s))
        self.headers = {"Retry-After": str(self.retry_after)}


async def guarded(call: Awaitable[Any], retry_after_s: float) -> Any:
    """`await call` (a model deployment's response); a full queue (Serve's BackPressureError, raised at once by this
    replica's handle when max_queued_requests are waiting) or a deployment without replicas -> Unavailable."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    try:
        return await call
    except BackPressureError:
        raise Unavailable("overloaded", "the model is busy: too many requests are waiting; retry after the "
                                        "Retry-After seconds", retry_after_s) from None
    except DeploymentUnavailableError:
        raise Unavailable("unavailable", "the model is not available right now; retry after the Retry-After "
                                         "seconds", retry_after_s) from None


class BodyTooLarge(HTTPException):
    """Raised from the body stream once more than the limit has arrived (FastAPI re-raises HTTPExceptions)."""

    def __init__(self, limit: int) -> None:
        size = f"{limit / MIB:g} MiB" if limit >= MIB else f"{limit / 1024:g} KiB"
        super().__init__(413, f"request body is larger than the {size} limit")


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, read now and at most `limit` bytes: 413 over it (nothing is read when the declared
    Content-Length is over), 415 for another media type, 422 for text that is not JSON or is nested too deeply.

    A route that declares a Body() parameter has FastAPI read and parse the whole body before any dependency
    runs; a route that calls this instead reads nothing until its dependencies (the token check) have passed."""
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise HTTPException(415, f"send the body as application/json (got {media[:60]!r})")
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit)
    try:
        return await run_in_threadpool(json.loads, bytes(body))  # a few MiB parse in ~0.1 s: off the event loop
    except RecursionError:
        raise HTTPException(422, "body: JSON nested too deeply") from None
    except ValueError as exc:  # also UnicodeDecodeError
        raise HTTPException(422, f"body: not JSON ({str(exc)[:80]})") from None


def describe_image_error(exc: Exception, data: bytes) -> dict[str, Any]:
    """A decoding failure -> {"status", "code", "message"}: 413 too large, 415 not an allowed image, else 400."""
    message = str(exc)
    if isinstance(exc, ImageTooLargeError):
        return {"status": 413, "code": "image_too_large", "message": message}
    if not data:
        return {"status": 400, "code": "empty_image", "message": "the image is empty"}
    if isinstance(exc, ImageShapeError):
        return {"status": 400, "code": "invalid_image", "message": message}
    if sniff_format(data) not in ALLOWED_FORMATS:
        return {"status": 415, "code": "unsupported_media_type",
                "message": f"{message}; send {ALLOWED_VALUES['image']}"}
    return {"status": 400, "code": "undecodable_image", "message": message}


def add_error_handling(api: FastAPI, max_bytes: Callable[[], int], deadline_s: Callable[[], float] | None = None,
                       retry_after_s: Callable[[], int] = lambda: 1) -> None:
    """The body-size limit (`max_bytes()` read per request), the answer deadline (`deadline_s()`, None: none) and
    the JSON rendering of every error. (Serve registers its own plain-text handler for BackPressureError on the app
    when a replica starts, so a full model queue is turned into Unavailable where the model is called: guarded().)"""
    if deadline_s is not None:
        api.add_middleware(DeadlineMiddleware, deadline_s=deadline_s, retry_after_s=retry_after_s)
    api.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes)
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _internal_error)


class BodyLimitMiddleware:
    """Pure ASGI: 413 for a declared Content-Length over the limit (nothing read), and a receive stream
    that stops as soon as more than the limit has arrived (chunked bodies)."""

    def __init__(self, app: Any, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _send_json(send, 400, error_body("bad_request", "Content-Length is not a number"))
                return
            if int(declared) > limit:
                await _send_json(send, 413, error_body("body_too_large", BodyTooLarge(limit).detail))
                return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _send_json(send, 413, error_body("body_too_large", exc.detail))


class DeadlineMiddleware:
    """Pure ASGI: an answer not started within `deadline_s()` seconds is cancelled (the model call with it) and
    answered 503 {"error": {"code": "timeout"}} with Retry-After. Serve's request_timeout_s, set a little above
    (serve/launcher.py), stays the backstop; its answer is plain text."""

    def __init__(self, app: Any, deadline_s: Callable[[], float], retry_after_s: Callable[[], int]) -> None:
        self.app = app
        self.deadline_s = deadline_s
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        deadline = self.deadline_s()
        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), timeout=deadline)
        except asyncio.TimeoutError:
            if started:
                raise
            retry = max(0, int(self.retry_after_s()))
            await _send_json(send, 503, error_body("timeout", f"no answer within {deadline:g} s (the service is busy); "
                                                               "retry after the Retry-After seconds",
                                                   retry_after_s=retry), {"retry-after": str(retry)})


async def _send_json(send: Callable, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"),
                            *((k.encode(), v.encode()) for k, v in (headers or {}).items())]})
    await send({"type": "http.response.body", "body": payload})


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(_api_error_body(exc), status_code=exc.status, headers=getattr(exc, "headers", None))


async def send_api_error(send: Callable, exc: ApiError) -> None:
    """An ApiError answered from a pure ASGI middleware (nothing of the request read: the connection closes)."""
    await _send_json(send, exc.status, _api_error_body(exc), getattr(exc, "headers", None))


def _api_error_body(exc: ApiError) -> dict[str, Any]:
    extra = {"fields": exc.fields} if exc.fields else {}
    if isinstance(exc, TooManyRequests):
        extra.update(reason=exc.reason, retry_after_s=exc.retry_after)
    elif isinstance(exc, Unavailable):
        extra.update(retry_after_s=exc.retry_after)
    return error_body(exc.code, exc.message, **extra)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "query", "form")]
        field = loc[0] if loc else "request"
        got = err.get("input")
        message = str(err.get("msg", "invalid value"))
        if err.get("type") == "missing":
            message = "required"
        elif got is not None and not isinstance(got, (dict, list)):
            message += f" (got {str(got)[:80]!r})"
        fields.append({"field": field, "message": message, "allowed": ALLOWED_VALUES.get(field, "")})
    text = "; ".join(f"{f['field']}: {f['message']}" + (f"; allowed: {f['allowed']}" if f["allowed"] else "")
                     for f in fields)
    return JSONResponse(error_body("invalid_field", text or "invalid request", fields=fields), status_code=422)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = STATUS_CODES.get(exc.status_code, "error")
    return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error: %s", exc)
    return JSONResponse(error_body("internal", "internal server error"), status_code=500)
