"""What the routes share: the settings, the metrics, and the model and engine once loaded.

    state = ServerState(Settings(served_name="demo", adapters={"sql": "runs/sql/adapter"}))
    state.start_loading(lambda: (llm, llm.engine(max_batch=8)))  # a thread; /health is 503 until it is done
    engine = state.ready()                                      # or APIError(503) while loading
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import APIError
from .logprobs import TokenPieces
from .metrics import Metrics


@dataclass
class Settings:
    served_name: str
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 4096
    max_n: int = 8
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters served by name: name -> where it was read


class ServerState:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.created = int(time.time())
        self.llm = self.engine = self.pieces = None
        self.load_error: str | None = None

    def start_loading(self, load: Callable, on_error: Callable[[Exception], None] | None = None) -> None:
        """Load in a thread, so the server listens (and /health answers 503) while the weights load."""

        def run():
            try:
                llm, engine = load()
                self.llm, self.pieces = llm, TokenPieces(llm.tokenizer)
                self.engine = engine  # set last: its presence means ready
            except Exception as e:  # a VentouxError (bad --model) or a bug: either way /health says why
                self.load_error = f"the model failed to load: {e}"
                print(f"ventoux: error: {e}", file=sys.stderr, flush=True)
                if on_error is not None:
                    on_error(e)

        threading.Thread(target=run, name="ventoux-load", daemon=True).start()

    def ready(self):
        if self.engine is None:
            raise APIError(503, self.load_error or "the model is still loading: retry when GET /health is 200",
                           code="model_loading", headers=None if self.load_error else {"Retry-After": "2"})
        return self.engine

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` selects: None for the served model (or no `model`), the adapter's
        name for one served by name (vLLM's --lora-modules); anything else is a 404, never a path to open."""
        if name is None or name == self.settings.served_name:
            return None
        if name in self.settings.adapters:
            return name
        adapters = "".join(f" or {a!r}" for a in self.settings.adapters)
        raise APIError(404, f"model {name!r} is not served here: use {self.settings.served_name!r}{adapters} "
                       "(GET /v1/models)", param="model", code="model_not_found")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
