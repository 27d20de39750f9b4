"""Decode with the kernels' weights on 2 MB pages or on ordinary ones (cpu_kernels.empty_on_huge_pages): the 4-layer
Mistral-7B-shaped checkpoint quantized at load, once with VENTOUX_HUGE_PAGES=0 and once without, both in one
process; each round measures the read bandwidth, then decodes with each model in turn (the order turns each round),
so both see the same spells of this shared VM's memory bandwidth. ventoux against itself: no peer runs here
(interleaved.py compares with llama.cpp).

    .venv/bin/python benchmarks/huge_pages.py                        # int4-g64
    .venv/bin/python benchmarks/huge_pages.py --quantize int8 --rounds 12
    .venv/bin/python benchmarks/huge_pages.py --quantize none        # bf16: mmap=False (--no-mmap) or not

A bf16 model's kernels read its weights in place from the files' memory maps, on the page cache's folios. With
--quantize none the model loads three times: as by default, with mmap=False (its weights copied into memory, on
2 MB pages: weights.into_memory), and with mmap=False on ordinary pages (VENTOUX_HUGE_PAGES=0), each against the
first.
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
    quantize = None if args.quantize == "none" else args.quantize
    variants = [("ordinary pages", "0", True), ("2 MB pages", "1", True)]  # (name, VENTOUX_HUGE_PAGES, mmap)
    if quantize is None:
        variants = [("file maps", "1", True), ("no-mmap 2 MB", "1", False), ("no-mmap 4 KB", "0", False)]
    models, loads = {}, {}
    for name, value, mmap in variants:
        os.environ[cpu_kernels.HUGE_PAGES_VARIABLE] = value
        before, t = anon_huge_mb(), time.perf_counter()
        models[name] = ventoux.load(str(random_checkpoint(n_layers=4)), dtype="bfloat16", quantize=quantize, mmap=mmap)
        loads[name] = (time.perf_counter() - t, anon_huge_mb() - before)
    prompt = list(range(100, 108))  # a short prompt: the time is the decode steps'
    rates = {name: [] for name in models}
    for r in range(args.rounds):
        probe = measure_bandwidth(args.threads, 2**29, 3)
        names = list(models)
        for name in names[r % len(names):] + names[:r % len(names)]:
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
    first, *others = rates
    for name in others:
        ratios = [b / a for a, b in zip(rates[first], rates[name])]
        print(f"{name} / {first}: decode, median of the rounds' ratios {statistics.median(ratios):.3f}x "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
