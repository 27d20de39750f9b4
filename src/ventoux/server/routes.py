"""The small routes: GET /health, /v1/models, /metrics, the chat page at /; POST /tokenize, /detokenize."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from .errors import APIError, error_response
from .schemas import DetokenizeRequest, TokenizeRequest, accept, chat_ids

router = APIRouter()
PAGE = Path(__file__).parent / "static" / "index.html"


@router.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what load balancers' probes often send
async def health(request: Request):
    state = request.app.state.ventoux
    if state.engine is None:
        return error_response(503, state.load_error or "loading the model", code="model_loading")
    return JSONResponse({"status": "ok"})


@router.get("/")
async def page():
    return FileResponse(PAGE, media_type="text/html")


def _model_card(state, adapter: str | None = None) -> dict:
    """The served model's card, or a served adapter's: its name, with the model it adapts as parent (vLLM's)."""
    served = state.settings.served_name
    card = {"id": adapter or served, "object": "model", "created": state.created, "owned_by": "ventoux"}
    if adapter is not None:
        card.update(root=state.settings.adapters[adapter], parent=served)
    if state.llm is not None:
        card["max_model_len"] = state.llm.config.max_seq_len
    return card


@router.get("/v1/models")
async def models(request: Request):
    state = request.app.state.ventoux
    return {"object": "list", "data": [_model_card(state, a) for a in (None, *state.settings.adapters)]}


@router.get("/v1/models/{name:path}")
async def model(request: Request, name: str):
    state = request.app.state.ventoux
    return _model_card(state, state.check_model(name))


@router.get("/metrics")
async def metrics(request: Request):
    state = request.app.state.ventoux
    stats = state.engine.stats() if state.engine is not None else None
    return Response(state.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize")
async def tokenize(request: Request):
    state, req = await accept(request, TokenizeRequest)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt (text) or messages (a chat)", param="prompt")
    tok = state.llm.tokenizer
    if req.prompt is not None:
        ids = tok.encode(req.prompt, bos=req.add_special_tokens)
    else:
        ids = chat_ids(tok, req.messages)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.llm.config.max_seq_len}


@router.post("/detokenize")
async def detokenize(request: Request):
    state, req = await accept(request, DetokenizeRequest)
    vocab = state.llm.config.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return {"prompt": state.llm.tokenizer.decode(req.tokens)}
