"""Prefill speed and cache memory (issue 4's prefill targets), in one run.

    .venv/bin/python benchmarks/prefill.py                 # all three parts
    .venv/bin/python benchmarks/prefill.py --parts 16k --layers 1
    .venv/bin/python benchmarks/prefill.py --parts 16k --prefill-chunk 2048   # ventoux's chunk (default: its own)

1. 4K-token prompt: prefill tokens/s of ventoux against transformers (bf16, same weights).
2. 16K-token prompt, window 4096: ventoux's chunked prefill against the same weights with full attention
   (a config without sliding window); the paper reports about 2x.
3. Cache memory at 32K tokens of Mistral 7B (32 layers, bf16): rolling buffer of W = 4096 slots against
   full attention; the paper reports 8x. Computed from KVCache.nbytes (on the meta device: nothing allocated).

Parts 1 and 2 use a random Mistral-7B-shaped checkpoint with fewer layers than the real 32 (--layers,
default 1: one 16K full-attention prefill of a 7B-wide layer takes minutes on 2 cores). Prefill cost is the
same in every layer, so the ratios are those of the full model; the absolute tokens/s are not.
"""

from __future__ import annotations

import argparse

from common import full_attention_twin, log, random_checkpoint

from ventoux.bench import Engine, Settings, run


def part_4k(folder, args) -> None:
    print(f"\n== 1. prefill of a 4096-token prompt, {args.layers}-layer model: ventoux vs transformers ==")
    engines = [Engine("ventoux", "bfloat16", str(folder), dtype="bfloat16"),
               Engine("transformers", "bfloat16", str(folder), dtype="bfloat16")]
    run(engines, _settings(args, 4096), vocab_size=32000, log=print)


def part_16k(folder, args) -> None:
    print(f"\n== 2. prefill of a 16384-token prompt, {args.layers}-layer model: window 4096 vs full attention ==")
    full = full_attention_twin(folder)
    engines = [Engine("ventoux", "bfloat16 window 4096", str(folder), dtype="bfloat16"),
               Engine("ventoux", "bfloat16 full attention", str(full), dtype="bfloat16")]
    result = run(engines, _settings(args, 16384), vocab_size=32000, log=print)
    rows = result["results"]
    if all("error" not in r for r in rows):
        print(f"\nwindowed / full attention prefill speed: {rows[0]['prefill_tok_s'] / rows[1]['prefill_tok_s']:.2f}x "
              f"(peak RSS {rows[0]['peak_rss_bytes'] / 2**30:.2f} vs {rows[1]['peak_rss_bytes'] / 2**30:.2f} GiB)")


def part_cache() -> None:
    import torch

    from ventoux.cache import KVCache
    from ventoux.config import PRESETS

    print("\n== 3. KV cache of Mistral 7B (32 layers, bf16) holding 32768 tokens ==")
    windowed = PRESETS["mistral-7b-v0.1"].config
    sizes = {}
    for name, cfg in (("window 4096", windowed), ("full attention", windowed.replace(sliding_window=None))):
        cache = KVCache(cfg, 1, dtype=torch.bfloat16, device="meta", capacity=0)
        cache.reserve(32768)
        sizes[name] = cache.nbytes
        print(f"{name:>15}: {cache.capacity:6d} slots per layer, {cache.nbytes / 2**30:.2f} GiB")
    print(f"full / windowed: {sizes['full attention'] / sizes['window 4096']:.1f}x")


def _settings(args, prompt_len: int) -> Settings:
    # Two new tokens: the first closes the prefill (time to first token), decode is not the point here.
    return Settings(prompt_len=prompt_len, new_tokens=2, threads=args.threads, repeats=args.repeats,
                    prefill_chunk=args.prefill_chunk, quiet_wait_s=120.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="4k,16k,cache", help="comma-separated: 4k, 16k, cache")
    p.add_argument("--layers", type=int, default=1, help="layers of the Mistral-7B-shaped random model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="ventoux's prefill chunk in tokens (default: generate.default_chunk)")
    args = p.parse_args()
    parts = args.parts.split(",")
    folder = random_checkpoint(n_layers=args.layers) if {"4k", "16k"} & set(parts) else None
    if folder:
        log(f"model: {folder.name} (random weights, bf16; {args.layers} of Mistral 7B's 32 layers)")
    if "4k" in parts:
        part_4k(folder, args)
    if "16k" in parts:
        part_16k(folder, args)
    if "cache" in parts:
        part_cache()


if __name__ == "__main__":
    main()
