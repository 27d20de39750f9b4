"""Decode with the kernels' weights on 2 MB pages or on ordinary ones (cpu_kernels.empty_on_huge_pages): the 4-layer
Mistral-7B-shaped checkpoint quantized at load, once with VENTOUX_HUGE_PAGES=0 and once without, both in one
process; each round measures the read bandwidth, then decodes with each model in turn (the order turns each round),
so both see the same spells of this shared VM's memory bandwidth. ventoux against itself: no peer runs here
(interleaved.py compares with llama.cpp).

    .venv/bin/python benchmarks/huge_pages.py                        # int4-g64
    .venv/bin/python benchmarks/huge_pages.py --quantize int8 --rounds 12
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path

import torch
from common import random_checkpoint

import ventoux
from ventoux import cpu_kernels
from ventoux.bench import measure_bandwidth


def anon_huge_mb() -> int:
    """This process's anonymous memory on huge pages, MB (Linux)."""
    status = Path("/proc/self/smaps_rollup")
    found = re.search(r"AnonHugePages:\s+(\d+)", status.read_text()) if status.exists() else None
    return int(found.group(1)) // 1024 if found else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantize", default="int4-g64")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=48)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models, loads = {}, {}
    for name, value in (("ordinary pages", "0"), ("2 MB pages", "1")):
        os.environ[cpu_kernels.HUGE_PAGES_VARIABLE] = value
        before, t = anon_huge_mb(), time.perf_counter()
        models[name] = ventoux.load(str(random_checkpoint(n_layers=4)), dtype="bfloat16", quantize=args.quantize)
        loads[name] = (time.perf_counter() - t, anon_huge_mb() - before)
    prompt = list(range(100, 108))  # a short prompt: the time is the decode steps'
    rates = {name: [] for name in models}
    for r in range(args.rounds):
        probe = measure_bandwidth(args.threads, 2**29, 3)
        names = list(models)
        for name in names[r % 2:] + names[:r % 2]:
            t = time.perf_counter()
            models[name].generate(prompt, max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
            rates[name].append(args.new_tokens / (time.perf_counter() - t))
        print(f"round {r + 1}/{args.rounds}: read bandwidth {probe:.1f} GB/s, "
              + ", ".join(f"{name} {v[-1]:.2f} tok/s" for name, v in rates.items()), flush=True)
    print(f"{cpu_kernels.cpu_model()}, {args.threads} threads, kernels: {cpu_kernels.isa()}; 4-layer "
          f"Mistral-7B-shaped, {args.quantize}, {args.new_tokens} new tokens, {args.rounds} rounds")
    for name, (seconds, huge) in loads.items():
        print(f"{name:15s} load {seconds:5.1f} s ({huge} MB on huge pages), decode median "
              f"{statistics.median(rates[name]):.2f} tok/s")
    ratios = [b / a for a, b in zip(*rates.values())]
    print(f"2 MB / ordinary pages: decode, median of the rounds' ratios {statistics.median(ratios):.3f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
