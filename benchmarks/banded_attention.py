"""Training-time attention over long sequences: model.banded_attention (block by block) against
scaled_dot_product_attention with the (T, T) banded mask, forward + backward, in one run.

    .venv/bin/python benchmarks/banded_attention.py     # the demo model's heads: 8 (2 kv) of 32, window 128
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ventoux.model import banded_attention, banded_causal_mask


def timed(attend, repeats: int, *inputs) -> float:
    """Best seconds of attend(*inputs).sum().backward()."""
    attend(*inputs).sum().backward()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        attend(*inputs).sum().backward()
        best = min(best, time.perf_counter() - t)
    return best


def masked_attention(q, k, v, mask, gqa):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gqa = args.heads != args.kv_heads
    print(f"batch {args.batch}, {args.heads} heads ({args.kv_heads} kv) of {args.head_dim}, window {args.window}, "
          f"{args.threads} threads; forward + backward, best of {args.repeats}")
    for t in map(int, args.lengths.split(",")):
        q = torch.randn(args.batch, args.heads, t, args.head_dim, requires_grad=True)
        k, v = (torch.randn(args.batch, args.kv_heads, t, args.head_dim, requires_grad=True) for _ in range(2))
        mask = banded_causal_mask(t, args.window, "cpu")
        masked = timed(masked_attention, args.repeats, q, k, v, mask, gqa)
        blocks = timed(banded_attention, args.repeats, q, k, v, args.window, gqa)
        print(f"T={t:5d}: masked SDPA {masked * 1e3:7.1f} ms, banded_attention {blocks * 1e3:7.1f} ms, "
              f"{masked / blocks:.2f}x")


if __name__ == "__main__":
    main()
