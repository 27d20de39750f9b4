"""Validation cross-entropy, in nats per character, on tinyshakespeare's held-out last 10%.

    python benchmarks/eval_demo.py                                   # the shipped demonstration model
    python benchmarks/eval_demo.py --model runs/demo/model --corpus ../shared/corpus/tinyshakespeare.txt
    python benchmarks/eval_demo.py --dtype bfloat16 --quantize int8 int4-g32 int4-g64 int4-g128   # quality cost

The held-out text follows ../shared/corpus/README.md (cut at the first newline at or after the 90%
character mark); it is scored in consecutive segments of the model's training context
(config max_position_embeddings), summed token loss / number of characters (see
ventoux.train.evaluate). The corpus may also be given through the VENTOUX_CORPUS variable.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from pathlib import Path

import torch

import ventoux
from ventoux.api import DEMO_MODEL
from ventoux.train.data import split_heldout
from ventoux.train.evaluate import nats_per_char

SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "tinyshakespeare.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEMO_MODEL), help="model folder (default: the shipped demo model)")
    p.add_argument("--corpus", default=os.environ.get("VENTOUX_CORPUS", str(DEFAULT_CORPUS)))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantize", nargs="*", default=[], help="also score these schemes; prints the perplexity "
                   "increase (per token) of each against the unquantized model")
    args = p.parse_args()
    corpus = Path(args.corpus)
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()
    if digest != SHA256:
        print(f"warning: {corpus} has sha256 {digest}, not tinyshakespeare's {SHA256}")
    text = split_heldout([corpus.read_text(encoding="utf-8")], 0.1)[1][0]
    base = None
    for scheme in [None, *args.quantize]:
        llm = ventoux.load(args.model, dtype=args.dtype, device="cpu", quantize=scheme)
        t0 = time.perf_counter()
        with torch.inference_mode():
            nats = nats_per_char(llm.model, args.model, text, llm.config.max_seq_len)
        label = scheme or args.dtype
        print(f"{args.model} [{label}]: {nats:.4f} nats per character on {len(text):,} held-out characters "
              f"(context {llm.config.max_seq_len}, {time.perf_counter() - t0:.1f} s)", end="")
        if base is None:
            base, chars_per_token = nats, len(text) / len(llm.tokenizer.encode(text, bos=False))
            print()
        else:  # per-token perplexity ratio = exp(difference in nats per token)
            print(f"; perplexity {100 * math.expm1((nats - base) * chars_per_token):+.2f}% vs {args.dtype}")


if __name__ == "__main__":
    main()
