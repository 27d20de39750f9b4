"""Pure ASGI middleware for a public endpoint: the API key (deny by default) and the body-size limit.

    app = RequireKey(BodyLimit(app, max_bytes=1 << 20), key="sk-...", open_paths={"/health", "/"})

Pure ASGI rather than BaseHTTPMiddleware: streaming responses and disconnects pass through untouched.
"""

from __future__ import annotations

import hmac

from .errors import error_response


class RequireKey:
    """Every HTTP request needs `Authorization: Bearer KEY` except the open paths (health, the page)."""

    def __init__(self, app, key: str, open_paths: set[str]):
        self.app, self.key, self.open_paths = app, key.encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        # compare_digest: the time taken does not tell how much of the key was right
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
            response = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def too_large(max_bytes: int):
    # Connection: close, so the server drops the connection instead of reading the rest of the body
    return error_response(413, f"the request body is over this server's limit of {max_bytes} bytes "
                          "(--max-body-bytes)", code="request_too_large", headers={"Connection": "close"})


class BodyTooLarge(Exception):
    """Raised from receive() once a request body passes the limit, inside the route reading it: the app answers
    it with 413 (create_app's exception handler), as every route reads its whole body before answering."""


class BodyLimit:
    """413 for bodies over max_bytes: at once from Content-Length, else as soon as the streamed bytes pass it,
    so an oversized body is never read whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(self.max_bytes)(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        await self.app(scope, counting_receive, send)
