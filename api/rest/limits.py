"""Bounded request bodies: `BodyLimitMiddleware` reads a request's body before any route parses it, at most
ASR_API_MAX_BODY_BYTES (1 MiB by default), and answers 413 as soon as the body is known to be larger: at once
for a Content-Length above the limit, or when the bytes received pass it. The rest is never read (the server
then closes the connection), so memory holds at most the limit and one chunk, whatever the client sends."""
from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workflows import settings

logger = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 1 << 20


def max_body_bytes() -> int:
    try:
        return settings.api_max_body_bytes()
    except ValueError:
        return DEFAULT_MAX_BODY_BYTES


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        limit = max_body_bytes()
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                await _refuse(scope, receive, send, 400, "the Content-Length header is not a number")
                return
            if too_large:
                await self._too_large(scope, receive, send, limit)
                return
        chunks: list[bytes] = []
        total = 0
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the route sees that
                first = message
                break
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                await self._too_large(scope, receive, send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        pending = [first]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        client = scope.get("client")
        logger.warning("refused a request body above %d bytes: %s %s from %s", limit, scope.get("method"),
                       scope.get("path"), client[0] if client else "unknown")
        await _refuse(scope, receive, send, 413, f"the request body is larger than {limit} bytes",
                      {"Connection": "close"})


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                  headers: dict[str, str] | None = None) -> None:
    await JSONResponse({"error": message}, status_code=status, headers=headers)(scope, receive, send)
