"""A/B of a decode step's blocks as one kernel call (fastblock.KernelBlock) against model.Block's path, in one
process: the rounds alternate the two, and each reports the median time a token.

    .venv/bin/python benchmarks/block_ab.py                        # int4, 4 rounds, batch 1
    .venv/bin/python benchmarks/block_ab.py --techniques int8,bfloat16 --rounds 3 --rows 4

The model is decode.py's 4-layer Mistral-7B-shaped checkpoint (benchmarks/.cache). ventoux against itself, so no
peer runs here: benchmarks/decode.py compares with llama.cpp. Both sides must give the same greedy tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import random_checkpoint

import ventoux
from ventoux.fastblock import KernelBlock
from ventoux.model import Block, swap_class


def ms_per_token(llm, prompts, new_tokens: int) -> tuple[float, list[int]]:
    """Median ms between row 0's tokens, and row 0's tokens."""
    times, tokens, last = [], [], None
    for ev in llm.stream(prompts, max_tokens=new_tokens, temperature=0.0):
        if ev.token is None or ev.index != 0:
            continue
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
        tokens.append(ev.token)
    return statistics.median(times) * 1e3, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--techniques", default="int4", help="comma-separated: bfloat16 or a quantization scheme")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rows", type=int, default=1, help="rows decoded together (the engine's batch)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    folder = random_checkpoint(n_layers=4)
    prompts = [list(range(100 + 7 * i, 100 + 7 * i + args.prompt_len)) for i in range(args.rows)]
    sides = {"Block.forward": Block, "one call a block": KernelBlock}
    for tech in args.techniques.split(","):
        llm = ventoux.load(str(folder), dtype="bfloat16", quantize=None if tech == "bfloat16" else tech)
        ms, tokens = {name: [] for name in sides}, {}
        order = ["one call a block"] + [name for r in range(args.rounds)  # a warm-up, then alternating rounds
                                        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1])]
        for i, name in enumerate(order):
            swap_class(llm.model, KernelBlock if sides[name] is Block else Block, sides[name])
            t, tokens[name] = ms_per_token(llm, prompts, args.new_tokens)
            if i:
                ms[name].append(t)
        before, after = (statistics.median(ms[name]) for name in sides)
        same = tokens["Block.forward"] == tokens["one call a block"]
        print(f"{tech}, {args.rows} row(s): Block.forward {before:.2f} ms a step, one call a block {after:.2f} "
              f"({after / before - 1:+.0%}); rounds {ms}; same tokens: {same}")

if __name__ == "__main__":
    main()
