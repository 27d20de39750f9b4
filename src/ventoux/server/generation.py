"""POST /v1/chat/completions and /v1/completions on the engine: whole responses and server-sent events.

A request submits n engine handles (choice i samples with seed + i when seeded). A client that leaves,
mid-stream or while waiting for a whole response, cancels them: a watcher reads the ASGI receive channel
for http.disconnect, so the engine frees the rows within a step even before another token is sent.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from ..errors import VentouxError
from .errors import APIError, error_body
from .logprobs import chat_logprobs, completion_logprobs
from .schemas import ChatRequest, CompletionRequest, accept, chat_ids, sampling_params

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state, req = await accept(request, ChatRequest)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    params = sampling_params(req, state.settings.max_tokens_cap,
                             logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    ids = chat_ids(state.llm.tokenizer, req.messages, req.safe_prompt)
    return await _respond(request, state, Run(state, "chat", req, ids), params, "messages")


@router.post("/v1/completions")
async def completions(request: Request):
    state, req = await accept(request, CompletionRequest)
    params = sampling_params(req, state.settings.max_tokens_cap, logprobs=req.logprobs)
    if req.prompt == "":
        raise APIError(400, "prompt is empty: give some text to continue", param="prompt")
    # token ids are checked by engine.submit (vocabulary, context), whose RequestError becomes a 400
    ids = state.llm.tokenizer.encode(req.prompt, bos=True) if isinstance(req.prompt, str) else req.prompt
    return await _respond(request, state, Run(state, "text", req, ids), params, "prompt")


async def _respond(request: Request, state, run: Run, params, prompt_param: str) -> Response:
    req = run.req
    run.submit(params, prompt_param)
    if req.stream:
        return EventStream(run)
    await run.collect(request.receive)
    return JSONResponse(run.whole())


class Run:
    """One request's choices: submits the handles, merges their events, counts tokens, builds the bodies."""

    def __init__(self, state, kind: str, req, ids: list[int]):
        if not 1 <= req.n <= state.settings.max_n:  # before anything sized by n is made
            raise APIError(400, f"n={req.n} must be in [1, {state.settings.max_n}] on this server", param="n")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        self.state, self.kind, self.req, self.ids = state, kind, req, ids
        self.adapter = state.check_model(req.model)  # a LoRA adapter served by name, or None: the model itself
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.want_logprobs = bool(req.logprobs) if kind == "chat" else req.logprobs is not None
        self.handles = []
        self.texts = [[] for _ in range(req.n)]
        self.tokens = [0] * req.n
        self.token_events = [[] for _ in range(req.n)]  # token events, kept only for logprobs
        self.finish = [None] * req.n
        self.timers = [state.metrics.timer() for _ in range(req.n)]

    def submit(self, params, prompt_param: str) -> None:
        from ..engine import QueueFull

        try:
            for i in range(self.req.n):  # seeds wrap at 64 bits, as torch takes a negative one (mod 2^64)
                seeded = params if params.seed is None else replace(params, seed=(params.seed + i) % 2**64)
                self.handles.append(self.state.engine.submit(self.ids, seeded, self.adapter))
        except QueueFull as e:
            self.cancel()
            raise APIError(429, f"the server is busy ({e}); retry after a second", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except VentouxError as e:
            self.cancel()
            raise APIError(400, str(e), param=getattr(e, "param", None) or prompt_param) from None
        self.state.metrics.prompt_tokens.inc(len(self.ids))

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self):
        """(choice index, Event) from every handle as they come, bookkept on the way."""
        if len(self.handles) == 1:  # one choice: read its handle here (no task and no queue hop per token)
            events = aiter(self.handles[0])
            while True:
                try:
                    ev = await anext(events)
                except StopAsyncIteration:
                    return
                except Exception as e:  # the engine failed this request (it serves the others on)
                    raise APIError(500, str(e), code="engine_error") from e
                self._record(0, ev)
                yield 0, ev
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, handle):
            try:
                async for ev in handle:
                    await queue.put((i, ev))
                await queue.put((i, None))
            except Exception as e:  # an engine failure ends the response instead of hanging it
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        try:
            running = len(tasks)
            while running:
                i, ev = await queue.get()
                if ev is None:
                    running -= 1
                    continue
                if isinstance(ev, Exception):  # the engine failed this request (it serves the others on)
                    raise APIError(500, str(ev), code="engine_error") from ev
                self._record(i, ev)
                yield i, ev
        finally:
            for t in tasks:
                t.cancel()

    def _record(self, i: int, ev) -> None:
        self.texts[i].append(ev.text)
        if ev.token is not None:
            self.tokens[i] += 1
            self.timers[i].token()
            if self.want_logprobs:
                self.token_events[i].append(ev)
        if ev.finish_reason is not None:
            self.finish[i] = ev.finish_reason
            self.state.metrics.requests.labels(self.kind, ev.finish_reason).inc()

    async def collect(self, receive) -> None:
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, self))
        try:
            async for _ in self.events():
                pass
        finally:
            watcher.cancel()
            self.cancel()

    def usage(self) -> dict:
        done = sum(self.tokens)
        return {"prompt_tokens": len(self.ids), "completion_tokens": done, "total_tokens": len(self.ids) + done}

    def _logprobs(self, events, offset: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.kind == "chat":
            return chat_logprobs(self.state.pieces, events)
        return completion_logprobs(self.state.pieces, events, offset)

    def whole(self) -> dict:
        choices = []
        for i in range(self.req.n):
            text = "".join(self.texts[i])
            body = {"message": {"role": "assistant", "content": text}} if self.kind == "chat" else {"text": text}
            choices.append({"index": i, **body, "logprobs": self._logprobs(self.token_events[i]),
                            "finish_reason": self.finish[i]})
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.state.settings.served_name, "choices": choices,
                "usage": self.usage()}

    async def chunks(self):
        """The SSE lines: per choice a role chunk (chat), text deltas, a finish chunk; usage last if asked."""
        opts = self.req.stream_options
        include_usage = opts is not None and opts.include_usage
        head = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.state.settings.served_name}
        tail = {"usage": None} if include_usage else {}

        def chunk(i, delta: str | None, events, finish=None, role=False) -> str:
            if self.kind == "chat":
                body = {"delta": {"role": "assistant", "content": ""} if role else
                        ({"content": delta} if delta else {})}
            else:
                body = {"text": delta or ""}
            logprobs = self._logprobs(events, sum(map(len, self.texts[i][:-1]))) if events else None
            choice = {"index": i, **body, "logprobs": logprobs, "finish_reason": finish}
            return _sse({**head, "choices": [choice], **tail})

        if self.kind == "chat":
            for i in range(self.req.n):
                yield chunk(i, None, [], role=True)
        async for i, ev in self.events():
            token_events = [ev] if self.want_logprobs and ev.token is not None else []
            if ev.text or token_events or ev.finish_reason is not None:
                yield chunk(i, ev.text, token_events, ev.finish_reason)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _cancel_on_disconnect(receive, run: Run) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    run.cancel()


class EventStream(Response):
    """text/event-stream of a Run; the handles are cancelled however the response ends (done, client gone)."""

    media_type = "text/event-stream"

    def __init__(self, run: Run):
        self.run, self.status_code, self.background = run, 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, self.run))
        chunks = self.run.chunks()
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for text in _ending_in_an_error_event(chunks):
                await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            await send({"type": "http.response.body"})  # ASGI's defaults: no body, no more_body: the end
        except OSError:  # the client left (ASGI 2.4 servers raise from send)
            pass
        finally:
            watcher.cancel()
            self.run.cancel()
            await chunks.aclose()


async def _ending_in_an_error_event(chunks):
    """The stream's lines; an engine failure mid-stream, when the status is already 200, as a last error event."""
    try:
        async for text in chunks:
            yield text
    except APIError as e:
        yield _sse(error_body(e.status, e.message, code=e.code))
