"""Generation as a stack: Batch (rows: chunked prefill, batched decode step, per-row sampling) -> stream()
events -> generate() completions. The serving engine (engine.py) drives the same Batch from its thread.

    for ev in stream(model, tokenizer, [ids_a, ids_b], [params_a, params_b]):
        print(ev.index, ev.text, end="")
    completions = generate(model, tokenizer, prompts, params)

stream() gives each prompt a row of one Batch, prefills them, then steps the batch in the caller's thread
until every row has finished: the one decode loop (batch.py) serves the CLI, the Python API and the server.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch

from .batch import Batch, Request, default_chunk  # noqa: F401  (default_chunk: re-exported)
from .engine import check_request
from .events import Completion, Event
from .lora import set_rows
from .sampling import SamplingParams


def stream(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams],
           decode=None, adapters: list[str | None] | None = None) -> Iterator[Event]:
    """Prefill each prompt, then decode every row together (with `decode`, a compiled model, if given).
    adapters: each prompt's LoRA adapter name (None: the model's active ones; lora.py). A request that cannot
    run raises here, before the first event is asked for (the CLI has not echoed the prompt yet)."""
    if not prompts:
        from .errors import VentouxError

        raise VentouxError("no prompt given: pass a string, a list of token ids, or a list of prompts")
    checked = [check_request(model.config, ids, p, f"prompt {i}", tokenizer.vocab_size)
               for i, (ids, p) in enumerate(zip(prompts, params))]
    batch = Batch(model, tokenizer, max_batch=len(prompts), decode=decode, prefix_cache=False)
    batch.reserve(len(prompts), max(need for need, _ in checked))  # exactly what the longest row can use
    events: deque[Event] = deque()
    for i, (ids, p, (need, max_new)) in enumerate(zip(prompts, params, checked)):
        adapter = adapters[i] if adapters else None
        admitted = batch.admit(Request(list(ids), p, need, max_new, emit=events.append, index=i, adapter=adapter))
        assert admitted  # the budget is max_batch rows of the largest need
    return _run(model, batch, events)


def _run(model, batch: Batch, events: deque[Event]) -> Iterator[Event]:
    try:
        while True:
            with torch.inference_mode():
                batch.step()
            for ev in events:
                if isinstance(ev, Exception):  # that prompt failed (Batch._deliver): so does the call
                    raise ev
                yield ev
            events.clear()
            if not batch.active():
                return
    finally:
        set_rows(model, None)  # the rows' adapter choice ends with them (lora.py)


def generate(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams],
             decode=None, adapters: list[str | None] | None = None) -> list[Completion]:
    out = [Completion("", [], "length", len(ids)) for ids in prompts]
    for p, c in zip(params, out):
        if p.logprobs is not None:
            c.logprobs, c.top_logprobs = [], []
    for ev in stream(model, tokenizer, prompts, params, decode, adapters):
        c = out[ev.index]
        c.text += ev.text
        if ev.token is not None:
            c.tokens.append(ev.token)
            if c.logprobs is not None:
                c.logprobs.append(ev.logprob)
                c.top_logprobs.append(ev.top_logprobs)
        if ev.finish_reason:
            c.finish_reason = ev.finish_reason
    return out
