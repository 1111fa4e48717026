"""ASGI middleware that refuses a request body over a size limit, shared by the labeling app and the reward-model
server (importing it loads neither's dependencies: no database, no model)."""
from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse


class BodyTooLarge(HTTPException):
    """Raised while the body is being received; FastAPI passes HTTPExceptions through its body parsing."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large(limit), headers={"Connection": "close"})


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes (the server's --max-body-bytes)"


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, holding no more than `limit` (and one chunk) of it.

    A declared Content-Length over the limit is refused before the app runs; otherwise the bytes are counted as
    they arrive. `Connection: close` tells the server to stop reading the rest instead of draining it.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"detail": _too_large(self.limit)}, 413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)
