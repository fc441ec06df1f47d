"""Limits on what a client may send and how slowly (the service faces networks it does not trust):

- request bodies: a declared Content-Length over the limit is answered 413 before a byte of the body is read, a
  body sent without one (chunked) is cut off as soon as it passes the limit, and a body still arriving
  `body_timeout` seconds after its request began is answered 408;
- headers: a connection that has not sent a whole request's headers within `header_timeout` seconds is closed
  (slow-loris), through the uvicorn protocol that `server_options` names;
- Host and Origin (RequestGuard): a Host header that is not a name the service answers to is a 400 (DNS
  rebinding), and a request that changes or costs something (every method but GET, HEAD, OPTIONS) from a page of
  another origin is a 403 (cross-site request forgery; a multipart or form POST needs no CORS preflight).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from duch.pipeline.config.serve import ServeConfig
from duch.pipeline.errors import spelled

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class BodyTooLarge(Exception):
    def __init__(self, limit: int, what: str = "request body", fix: str = "send a smaller image",
                 setting: str = "max_upload_mb"):
        size = f"{limit / 1e6:g} MB" if setting == "max_upload_mb" else f"{limit / 1024:g} KiB"
        super().__init__(f"the {what} is over the {size} limit; {fix} (or start the service with a larger "
                         f"`{setting}`)")
        self.limit = limit


class BodyTimeout(Exception):
    def __init__(self, seconds: float):
        super().__init__(f"the request body was not received within {seconds:g} s; send it faster (or start the "
                         "service with a larger `body_timeout`)")


async def answer(send, status: int, message: str, headers: list | tuple = ()) -> None:
    """A JSON error sent straight from an ASGI middleware, the connection closed after it."""
    body = json.dumps({"error": message, "status": status}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware; BodyTooLarge or BodyTimeout raised while a handler reads the body becomes a 413 or a 408
    (the app's handlers). A JSON body has its own, smaller limit (`json_limit`): a search request needs kilobytes,
    and a large JSON body would hold the event loop while it is parsed."""

    def __init__(self, app, limit: int, seconds: float = 60.0, json_limit: int | None = None):
        self.app, self.limit, self.seconds, self.json_limit = app, limit, seconds, json_limit

    def refusal(self, headers: dict) -> BodyTooLarge:
        """What a body over its limit is refused with: by its content type, the JSON limit or the upload limit."""
        if self.is_json(headers):
            return BodyTooLarge(self.json_limit, "JSON body", "a search request needs kilobytes", "max_json_kb")
        return BodyTooLarge(self.limit)

    def is_json(self, headers: dict) -> bool:
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        return kind == b"application/json" and self.json_limit is not None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is None and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body (HTTP/1.1): nothing to bound or wait for
        limit = self.json_limit if self.is_json(headers) else self.limit
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await answer(send, 413, spelled(str(self.refusal(headers)), "api"))
        loop = asyncio.get_running_loop()
        deadline, seen, whole = loop.time() + self.seconds, 0, False

        async def counted():
            nonlocal seen, whole
            if whole:  # the body is in: what follows is a disconnect, awaited for as long as the answer takes
                return await receive()
            message = await within(receive(), deadline - loop.time(), BodyTimeout(self.seconds))
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                whole = not message.get("more_body", False)
                if seen > limit:
                    raise self.refusal(headers)
            return message

        await self.app(scope, counted, send)


async def within(awaitable, seconds: float, error: Exception):
    """`await awaitable`, or `error` raised once `seconds` have passed. One timer that cancels the waiting task,
    as asyncio.timeout does (Python 3.11+): asyncio.wait_for would start a task for every body message."""
    task = asyncio.current_task()
    assert task is not None
    if seconds <= 0:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise error
    expired = False

    def expire():
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not expired:
            raise
        if hasattr(task, "uncancel"):
            task.uncancel()  # the cancellation was this timer's, now answered as `error`
        raise error from None
    finally:
        timer.cancel()


def split_host(value: str) -> tuple[str, int | None]:
    """`name[:port]` (an IPv6 address in brackets) -> (lower-case name, port or None); ("", None) if malformed."""
    value = value.strip().lower()
    name, port = value, ""
    if value.startswith("["):
        end = value.find("]")
        name, port = (value[:end + 1], value[end + 1:].removeprefix(":")) if end > 0 else ("", "")
    elif value.count(":") == 1:
        name, port = value.split(":")
    if not name or (port and not (port.isdigit() and len(port) <= 5)):
        return "", None
    return name, int(port) if port else None


def _ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


class RequestGuard:
    """ASGI middleware: the Host rule (400) for every request, the Origin rule (403) for the unsafe methods."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.port = app, config.port
        bound = f"[{config.host}]" if ":" in config.host else config.host.lower()
        self.names = {*LOOPBACK_NAMES, bound}  # at the port served
        self.extra = {split_host(h) for h in config.allowed_hosts}  # a port of None: at any port
        # Bound to every interface: any address of the machine reaches it; an IP literal is no rebinding.
        self.any_ip = config.host in ("0.0.0.0", "::")
        self.origins = {o.rstrip("/").lower() for o in config.cors_origins}

    def host_allowed(self, host: str, served_port: int) -> bool:
        """A Host header allowed: a name added as itself (at its port, or at any when it names none), or a name
        the service is bound to at the port it serves (no port: 80)."""
        name, port = split_host(host)
        if not name:
            return False
        if (name, port) in self.extra or (name, None) in self.extra:
            return True
        known = name in self.names or (self.any_ip and _ip_literal(name))
        return known and (port or 80) == served_port

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        host = headers.get(b"host", b"").decode("latin-1")
        served = (scope.get("server") or (None, self.port))[1] or self.port
        if b"host" in headers and not self.host_allowed(host, served):
            return await answer(send, 400, spelled(
                f"Host {host!r} is not a name this service answers to ({', '.join(sorted(self.names))} at port "
                f"{served}); reach it by one of those, or start it with `allowed_hosts` naming this one", "api"))
        origin = headers.get(b"origin")
        if origin is not None and scope["method"] not in SAFE_METHODS:
            seen = origin.decode("latin-1").rstrip("/").lower()
            own = seen.partition("://")[2] == host.lower() and seen.startswith(("http://", "https://"))
            if not own and seen not in self.origins:
                return await answer(send, 403, spelled(
                    f"a {scope['method']} from a page of another origin ({seen}) is refused (cross-site request "
                    "forgery); send it from the service's own page or without an Origin header, or start the "
                    "service with `cors_origins` naming that origin", "api"))
        await self.app(scope, receive, send)


def http_protocol() -> type:
    """uvicorn's fastest HTTP/1.1 protocol here, as its "auto" picks: httptools' parser (C), else h11's (Python,
    about a third of the throughput on small queries)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return H11Protocol
    return HttpToolsProtocol


def deadline_protocol(header_timeout: float, base: type | None = None) -> type:
    """uvicorn's HTTP/1.1 protocol (`base`, by default http_protocol()) with a deadline on a request's headers: a
    connection that has not sent them whole within `header_timeout` seconds of connecting (or of its previous
    answer) is closed."""

    class HeaderDeadline(base or http_protocol()):  # type: ignore[misc]
        headers_due = 0.0  # the loop's time by which the next request's headers must be in

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.headers_due = self.loop.time() + header_timeout
            self._arm()

        def on_response_complete(self) -> None:
            self.headers_due = self.loop.time() + header_timeout
            super().on_response_complete()  # arms uvicorn's keep-alive timer, which data arriving disarms

        def data_received(self, data: bytes) -> None:
            super().data_received(data)  # disarms the timer; a whole request's headers leave it so
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self._arm()  # headers begun, not finished: the same deadline again (not a fresh one per byte)

        def _arm(self) -> None:
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(max(0.0, self.headers_due - self.loop.time()),
                                                                    self.timeout_keep_alive_handler)

    return HeaderDeadline


def server_options(config: ServeConfig) -> dict:
    """uvicorn's settings for the service (uvicorn.Config / uvicorn.run keywords): the header deadline's
    protocol; idle keep-alive connections closed after 5 s."""
    return {"http": deadline_protocol(config.header_timeout), "timeout_keep_alive": 5}
