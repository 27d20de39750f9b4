"""Prefix caching: time to first token with a repeated ~1000-token system prompt, reuse on vs off.

    .venv/bin/python benchmarks/prefix_cache.py [--threads 2] [--requests 10] [--system 1000] [--dtype float32]

The demo model (window 128, so the rolling buffer wraps inside the system prompt: reuse goes through a
prefix snapshot, prefix.py). Each request is the same system prompt plus its own 20-token question,
sent one after another to an engine (llm.engine), max_tokens=1; time to first token is submit() to the
first event. Both engines run in this process on the same model; the first two requests of each are not
counted (the second is the one that leaves the snapshot). Prints the median TTFTs and their ratio, and
checks that both engines produced the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ventoux
from ventoux.sampling import SamplingParams


def ttfts(llm, prompts, prefix_cache: bool) -> tuple[list[float], list[int], int]:
    times, tokens = [], []
    with llm.engine(max_batch=4, prefix_cache=prefix_cache) as engine:
        for ids in prompts:
            t = time.perf_counter()
            events = iter(engine.submit(ids, SamplingParams(max_tokens=1)))
            first = next(events)
            times.append(time.perf_counter() - t)
            tokens.append(first.token)
            list(events)
        reused = engine.stats().prefix_tokens
    return times, tokens, reused


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--system", type=int, default=1000, help="system prompt tokens")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = ventoux.load(dtype=args.dtype)
    vocab = llm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, vocab, (args.system,), generator=g).tolist()
    prompts = [system + torch.randint(3, vocab, (20,), generator=g).tolist() for _ in range(args.requests)]
    ttfts(llm, prompts[:2], False)  # warm-up: first calls allocate and page in
    off, off_tokens, _ = ttfts(llm, prompts, prefix_cache=False)
    on, on_tokens, reused = ttfts(llm, prompts, prefix_cache=True)
    assert on_tokens == off_tokens, "prefix reuse changed the first tokens"
    off_ms, on_ms = statistics.median(off[2:]) * 1e3, statistics.median(on[2:]) * 1e3
    print(f"demo model, {args.dtype}, {args.threads} threads, system prompt {args.system} tokens + 20, "
          f"{args.requests} requests one after another (first 2 not counted)")
    print(f"time to first token, median: reuse off {off_ms:.1f} ms, reuse on {on_ms:.1f} ms "
          f"({reused} prompt tokens reused)")
    print(f"ratio off/on: {off_ms / on_ms:.1f}x")


if __name__ == "__main__":
    main()
