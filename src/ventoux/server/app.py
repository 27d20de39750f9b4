"""The FastAPI application: routes, OpenAI-shaped errors, and the middleware of a public endpoint.

    app = create_app(Settings(served_name="demo", api_key="sk-..."), load=lambda: (llm, llm.engine()))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Middleware, outermost first: CORS (only with --cors-origin: listed origins, no credentials, never a
reflected wildcard), the API key (deny by default: every route but /health and the page), the body limit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from .errors import install_handlers
from .generation import router as generation_router
from .middleware import BodyLimit, BodyTooLarge, RequireKey, too_large
from .routes import router
from .state import ServerState, Settings

OPEN_PATHS = {"/health", "/"}  # no key needed: the health probe and the chat page (which asks for the key)


def create_app(settings: Settings, load: Callable, on_load_error: Callable[[Exception], None] | None = None):
    """`load() -> (llm, engine)` runs in a thread once the app starts; app.state.ventoux is the ServerState."""
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app):
        state.start_loading(load, on_load_error)
        yield
        state.close()

    app = FastAPI(lifespan=lifespan, openapi_url=None)  # no schema, so no /docs or /redoc pages either
    app.state.ventoux = state
    install_handlers(app)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request, e):
        return too_large(settings.max_body_bytes)

    app.include_router(router)
    app.include_router(generation_router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # added first: innermost
    if settings.api_key:
        app.add_middleware(RequireKey, key=settings.api_key, open_paths=OPEN_PATHS)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    return app

