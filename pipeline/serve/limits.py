"""A limit on request bodies: a declared Content-Length over it is answered 413 before a byte of the body is read,
and a body sent without one (chunked) is cut off as soon as it passes the limit."""
from __future__ import annotations

import json


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the request body is over the {limit / 1e6:g} MB limit; send a smaller image "
                         "(or start the service with a larger `max_upload_mb`)")
        self.limit = limit


class BodyLimit:
    """ASGI middleware; BodyTooLarge raised while a handler reads the body becomes a 413 (the app's handler)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            body = json.dumps({"error": str(BodyTooLarge(self.limit)), "status": 413}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)
