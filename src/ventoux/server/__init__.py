"""`ventoux serve`: an OpenAI-compatible HTTP server on the continuous-batching engine, with a chat page.

    from ventoux.server import Settings, create_app
    app = create_app(Settings(served_name="demo"), load=lambda: (llm, llm.engine(max_batch=8)))

Modules: app (assembly), routes (health, models, tokenize, metrics, page), generation (chat and
completions, streaming), schemas (request bodies), errors (OpenAI's error shape), middleware (API key,
body limit), metrics (Prometheus), logprobs (token text and OpenAI's logprobs shapes), state.
"""

from .app import create_app
from .state import Settings

__all__ = ["Settings", "create_app"]
