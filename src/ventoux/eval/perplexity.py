"""Perplexity by the strided sliding window of Hugging Face's perplexity guide.

    result = perplexity(llm.model, llm.tokenizer, docs, context=2048, stride=1024)
    result["perplexity"], result["bits_per_byte"]

Each document is [BOS] + its tokens. Windows of `context` tokens start every `stride` tokens; a window
scores only the tokens that no earlier window scored, so every token after BOS is scored exactly once,
predicted from at most `context` tokens before it (at least context - stride once past the first window).
stride == context is plain consecutive segments (ventoux.train.evaluate); a smaller stride gives each
token more context at the cost of more windows. This is the guide's loop with its max_length equal to
context + 1: the guide feeds max_length tokens and never uses the last one's prediction.

Reported per token (perplexity), per character and per byte of UTF-8 (bits per byte): the last two
compare models whose tokenizers differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import VentouxError
from .scoring import Request, score


def windows(ids: Sequence[int], context: int, stride: int) -> list[Request]:
    """Scoring requests covering ids[1:] exactly once: (ids[start : last + 1], number of new targets)."""
    if not 1 <= stride <= context:
        raise VentouxError(f"--stride {stride} must be between 1 and the context ({context})")
    requests, done, start = [], 0, 0  # done: the last position already scored
    while done < len(ids) - 1:
        last = min(start + context, len(ids) - 1)
        requests.append((ids[start: last + 1], last - done))
        done, start = last, start + stride
    return requests


def strided_loss(model, ids: Sequence[int], context: int, stride: int | None = None, batch_size: int = 8,
                 progress: bool = False) -> tuple[float, int]:
    """(summed loss in nats, number of scored tokens) over ids[1:]."""
    requests = windows(ids, context, stride or context)
    scores = score(model, requests, batch_size, progress=progress, desc="perplexity")
    return -sum(s for s, _ in scores), sum(n for _, n in requests)


def check_context(config, context: int) -> None:
    """A full-attention model cannot see past its trained context; a sliding-window one attends in bands. With no
    config (before the model loads), only that the context is positive."""
    if context < 1:
        raise VentouxError(f"--context {context} must be at least 1")
    if config is not None and config.sliding_window is None and context > config.max_seq_len:
        raise VentouxError(f"--context {context} is longer than the model's context of {config.max_seq_len} tokens "
                           f"(full attention): use --context {config.max_seq_len} or less")


def summary(nll: float, tokens: int, characters: int, n_bytes: int) -> dict:
    return {"tokens": tokens, "characters": characters, "bytes": n_bytes, "nll": nll,
            "nats_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
            "nats_per_character": nll / characters, "bits_per_byte": nll / math.log(2) / n_bytes}


def perplexity(model, tokenizer, docs, context: int, stride: int | None = None, batch_size: int = 8,
               progress: bool = False) -> dict:
    """Scores every document (ventoux.eval.data.Document); the totals, and one entry per file."""
    check_context(model.config, context)
    stride = stride or context
    requests, owner = [], []  # owner[i]: the document index of request i
    for d, doc in enumerate(docs):
        ids = tokenizer.encode(doc.text, bos=True)
        if len(ids) < 2:
            raise VentouxError(f"{doc.source}: the text has no tokens to score")
        reqs = windows(ids, context, stride)
        requests += reqs
        owner += [d] * len(reqs)
    scores = score(model, requests, batch_size, progress=progress, desc="perplexity")
    per_doc = [[0.0, 0] for _ in docs]
    for d, (logprob, _), (_, n) in zip(owner, scores, requests):
        per_doc[d][0] -= logprob
        per_doc[d][1] += n
    files: dict[str, list] = {}
    for doc, (nll, n) in zip(docs, per_doc):
        acc = files.setdefault(doc.file, [0.0, 0, 0, 0, 0])
        for k, v in enumerate((nll, n, len(doc.text), len(doc.text.encode("utf-8")), 1)):
            acc[k] += v
    total = [sum(f[k] for f in files.values()) for k in range(5)]
    return {**summary(*total[:4]), "documents": len(docs), "windows": len(requests), "context": context,
            "stride": stride, "files": {name: {**summary(*f[:4]), "documents": f[4]} for name, f in files.items()}}
