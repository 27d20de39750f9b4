"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, for every failure a client sees.

    raise APIError(400, "temperature must be >= 0", param="temperature")
    return error_response(401, "missing or wrong API key")        # from middleware, outside the routes
"""

from __future__ import annotations

from starlette.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """A failure to answer with `status` and the OpenAI error body (headers: e.g. Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def install_handlers(app) -> None:
    """Every exception that reaches FastAPI leaves as an OpenAI-shaped error; a bug is a 500, not a crash."""
    from starlette.exceptions import HTTPException

    from ..errors import VentouxError

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(VentouxError)
    async def ventoux_error(request, e: VentouxError):
        return error_response(400, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown routes (404), wrong methods (405)
        message = "no such route: see GET /v1/models, POST /v1/chat/completions" if e.status_code == 404 else e.detail
        return error_response(e.status_code, message, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return error_response(500, f"internal error ({type(e).__name__}); the server keeps serving")
