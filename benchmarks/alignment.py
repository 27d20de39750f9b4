"""Where a 16-bit weight starts, and what it costs: the 4-layer Mistral-7B-shaped checkpoint in bfloat16, its
prefill (a 128-token prompt) and a one-token step (every weight read once: the decode products), with the weights
of its HalfLinear layers where loading leaves them (memory-mapped from the safetensors file: 24 bytes past a
64-byte line in this checkpoint, whose tensors start after a header padded to 8 bytes) and copied to a line's start
and to its middle. The placements alternate in one process, round after round, so all see the same spells of this
shared VM's memory bandwidth. ventoux against itself: no peer runs here (interleaved.py compares with llama.cpp).

    .venv/bin/python benchmarks/alignment.py                        # the native build
    VENTOUX_CPU_ISA=avx2 .venv/bin/python benchmarks/alignment.py   # the AVX2 build (its own bf16 prefill)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import random_checkpoint

import ventoux
from ventoux import cpu_kernels
from ventoux.fastlinear import HalfLinear


def shifted(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t whose data starts `offset` bytes past a 64-byte line."""
    buf = torch.empty(t.numel() * t.element_size() + 128, dtype=torch.uint8)
    start = -buf.data_ptr() % 64 + offset
    copy = buf[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    copy.copy_(t)
    assert copy.data_ptr() % 64 == offset
    return copy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = ventoux.load(str(random_checkpoint(n_layers=4)), dtype="bfloat16")
    layers = [m for m in llm.model.modules() if isinstance(m, HalfLinear)]
    loaded = [m.weight.data for m in layers]
    placements = {f"as loaded ({loaded[0].data_ptr() % 64})": loaded}
    placements.update({f"offset {o}": [shifted(w, o) for w in loaded] for o in (0, 32)})
    prompt = torch.randint(3, 32000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    names = list(placements)
    times = {name: {"prefill": [], "step": []} for name in names}
    with torch.inference_mode():
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # the order turns each round
                for m, w in zip(layers, placements[name]):
                    m.weight.data = w
                for what, tokens in (("prefill", prompt), ("step", prompt[:, :1])):
                    llm.model(tokens, last_only=True)  # warm: this placement's weights and code paths
                    t = time.perf_counter()
                    llm.model(tokens, last_only=True)
                    times[name][what].append(time.perf_counter() - t)
    print(f"{cpu_kernels.cpu_model()}, {args.threads} threads, kernels: {cpu_kernels.isa()}; 4-layer "
          f"Mistral-7B-shaped bf16, {args.prompt_len}-token prefill and a one-token step, {args.rounds} rounds")
    medians = {name: {what: statistics.median(ts) for what, ts in d.items()} for name, d in times.items()}
    first = medians[names[0]]
    print("medians; x: speed against the weights as loaded")
    for name, m in medians.items():
        print(f"{name:16s} prefill {args.prompt_len / m['prefill']:7.1f} tok/s ({first['prefill'] / m['prefill']:.2f}x)"
              f"   step {1e3 * m['step']:6.1f} ms ({first['step'] / m['step']:.2f}x)")


if __name__ == "__main__":
    main()
