"""Where a prefill's time goes: torch.profiler over one 128-token prefill of the 4-layer Mistral-7B-shaped
checkpoint (bf16, 2 threads), by operator.

    .venv/bin/python benchmarks/profile_prefill.py [--tokens 128] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import torch
from common import random_checkpoint

import ventoux
from ventoux import cpu_kernels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # eager calls skip the dispatcher, and so the profiler: route ventoux's kernels through their custom ops
    for name in ("half_gemm", "half_gemv", "int8_gemv", "int4_gemv"):
        setattr(cpu_kernels, name, getattr(torch.ops.ventoux, name))
    llm = ventoux.load(str(random_checkpoint(n_layers=4)), dtype=args.dtype)
    tokens = torch.randint(3, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        llm.model(tokens, last_only=True)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            llm.model(tokens, last_only=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
