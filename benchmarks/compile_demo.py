"""What --compile (torch.compile of the decode step) does for the shipped demo model, eager vs compiled.

    .venv/bin/python benchmarks/compile_demo.py [--threads 2] [--tokens 200]

A small model's decode step is Python and small-op overhead more than arithmetic, which compilation
removes; for the 7B-shaped model, see `benchmarks/decode.py --techniques "bfloat16,bfloat16 compiled"`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ventoux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in args.dtypes.split(","):
        rates = {}
        for compile in (False, True):
            llm = ventoux.load(dtype=dtype, compile=compile)
            t = time.perf_counter()
            first = llm.generate("JULIET:", max_tokens=args.tokens, temperature=0)  # compiles, if asked
            first_s = time.perf_counter() - t
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                out = llm.generate("JULIET:", max_tokens=args.tokens, temperature=0)
                runs.append(len(out.tokens) / (time.perf_counter() - t))
            assert out.tokens == first.tokens
            rates[compile] = statistics.median(runs)
            print(f"{dtype:9s} compile={compile!s:5s}: first call {first_s:5.1f} s, then {rates[compile]:6.0f} tok/s "
                  f"(median of 3, {args.tokens} tokens, {args.threads} threads)", flush=True)
        print(f"{dtype:9s} compiled / eager: {rates[True] / rates[False]:.2f}x")


if __name__ == "__main__":
    main()
