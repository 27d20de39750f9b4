"""What quantization costs in perplexity, ventoux against llama.cpp, and scoring speed against transformers.

    python benchmarks/quant_quality.py                  # the demo model on tinyshakespeare's held-out 10%
    python benchmarks/quant_quality.py --no-llama-cpp   # ventoux and transformers only
    python benchmarks/quant_quality.py --timing-only    # bf16 only: the time against transformers

One run scores the same held-out tokens (the split of benchmarks/eval_demo.py) with
  - ventoux at bf16 and quantized while loading: int8, int4-g32, int4-g64, int4-g128;
  - llama.cpp (llama-cpp-python built from source, bench/llamacpp.py) on GGUF files converted from the
    same weights by llama.cpp's own converter: BF16, Q8_0, Q4_0 (and Q4_K_M), every position's logits;
  - transformers' MistralForCausalLM at bf16, for the time (same windows, batch and threads as ventoux;
    the two alternate for --rounds rounds and each keeps its fastest, so a busy spell hits both).
Every engine is fed the same token ids in the same strided windows (ventoux.eval.perplexity) and
scored by the same code. The context defaults to the model's sliding window (128 for the demo model):
llama.cpp runs Mistral as a full-attention llama, so within one window both compute the same function.
Printed: each scheme's perplexity change against its engine's own 16-bit run, side by side with the
llama.cpp type of the same size, and the scoring-time ratio transformers / ventoux. GGUF files are cached
in benchmarks/.cache.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from common import CACHE, log

import ventoux
from ventoux.api import DEMO_MODEL
from ventoux.eval.perplexity import windows
from ventoux.eval.scoring import score
from ventoux.train.data import split_heldout

DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "tinyshakespeare.txt"
PAIRS = [("int8", "Q8_0"), ("int4-g32", "Q4_0"), ("int4-g64", "Q4_K_M"), ("int4-g128", None)]  # rows side by side


class HFScorer(torch.nn.Module):
    """transformers' model behind the interface ventoux.eval.scoring.score calls: tokens -> float logits."""

    def __init__(self, hf):
        super().__init__()
        self.hf, self.tok_embeddings = hf, hf.model.embed_tokens

    def forward(self, tokens):
        return self.hf(tokens).logits.float()


def score_llama_cpp(path: Path, requests, context: int, threads: int) -> float:
    """Summed log-likelihood of the requests' scored tokens, from llama.cpp's logits at every position."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=context + 1, n_batch=context + 1, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    total = 0.0
    for tokens, n in requests:
        tokens = [int(t) for t in tokens]
        llm.reset()
        llm.eval(tokens[:-1])
        logits = np.asarray(llm.scores[len(tokens) - 1 - n: len(tokens) - 1], dtype=np.float64)
        logz = np.logaddexp.reduce(logits, axis=-1)
        total += float((logits[np.arange(n), tokens[-n:]] - logz).sum())
    llm.close()
    return total


class Clock:
    """Wall time and this process's CPU time (all threads): on a shared machine the CPU time is the steadier."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def __str__(self):
        return f"{self.wall:.1f} s, CPU {self.cpu:.1f} s"


def bits_per_weight(n_bytes: int, n_weights: int) -> float:
    return 8 * n_bytes / n_weights


def ventoux_bytes(model) -> int:
    """Bytes of every tensor but the token embedding (as gguf_weight_bytes counts llama.cpp's)."""
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
               if not name.startswith("tok_embeddings"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--corpus", default=os.environ.get("VENTOUX_CORPUS", str(DEFAULT_CORPUS)))
    p.add_argument("--context", type=int, default=None, help="default: the model's sliding window (or context)")
    p.add_argument("--stride", type=int, default=None, help="default: the context (consecutive windows)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="timing: ventoux and transformers alternately, best of N")
    p.add_argument("--timing-only", action="store_true", help="only the bf16 runs and the time against transformers")
    args = p.parse_args()
    threads = torch.get_num_threads()

    base = ventoux.load(args.model, dtype="bfloat16", device="cpu")
    cfg = base.config
    context = args.context or min(cfg.sliding_window or cfg.max_seq_len, cfg.max_seq_len)
    stride = args.stride or context
    text = split_heldout([Path(args.corpus).read_text(encoding="utf-8")], 0.1)[1][0]
    ids = base.tokenizer.encode(text, bos=True)
    requests = windows(ids, context, stride)
    n_tokens = len(ids) - 1
    log(f"{args.model}: {len(text):,} held-out characters, {n_tokens:,} tokens, {len(requests)} windows "
        f"(context {context}, stride {stride}), {threads} threads, {os.uname().machine}")

    n_weights = ventoux_bytes(base.model) // 2  # bf16: two bytes a weight
    ours, bits, clocks = {}, {}, {}  # keyed by scheme: summed nll, bits per weight, time to score
    for scheme in ["bf16", *([] if args.timing_only else (s for s, _ in PAIRS))]:
        llm = base if scheme == "bf16" else ventoux.load(args.model, dtype="bfloat16", device="cpu", quantize=scheme)
        score(llm.model, requests[: args.batch_size], args.batch_size)  # warm-up: kernels compile on first use
        with Clock() as clocks[scheme]:
            ours[scheme] = -sum(s for s, _ in score(llm.model, requests, args.batch_size))
        bits[scheme] = bits_per_weight(ventoux_bytes(llm.model), n_weights)
        log(f"ventoux {scheme}: {ours[scheme] / n_tokens:.5f} nats/token ({clocks[scheme]})")

    from transformers import MistralForCausalLM

    hf = MistralForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        hf_nll = -sum(s for s, _ in score(HFScorer(hf), requests, args.batch_size))
    best = {}  # engine -> its fastest Clock: the two alternate, so a busy spell of the machine hits both
    for _ in range(args.rounds):
        for engine, model in (("ventoux", base.model), ("transformers", HFScorer(hf))):
            with torch.inference_mode(), Clock() as clock:
                score(model, requests, args.batch_size)
            log(f"time to score, {engine}: {clock}")
            best[engine] = min(best.get(engine, clock), clock, key=lambda c: c.wall)

    theirs = {}
    if not (args.no_llama_cpp or args.timing_only):
        from ventoux.bench import llamacpp

        llamacpp.ensure_installed("native", log)
        for gguf_type in ["BF16", *(t for _, t in PAIRS if t)]:
            if gguf_type not in ("BF16", *llamacpp.CONVERTER_TYPES, *llamacpp.QUANTIZER_TYPES):
                log(f"llama.cpp {gguf_type}: this bench/llamacpp.py cannot make it; skipped")
                continue
            path = llamacpp.gguf_file(args.model, gguf_type, CACHE, log)
            with Clock() as clock:
                theirs[gguf_type] = -score_llama_cpp(path, requests, context, threads)
            bits[gguf_type] = bits_per_weight(llamacpp.gguf_weight_bytes(path), n_weights)
            log(f"llama.cpp {gguf_type}: {theirs[gguf_type] / n_tokens:.5f} nats/token ({clock})")

    if not args.timing_only:
        print_table(ours, theirs, bits, n_tokens, context, stride)
    ours_t, hf_t = best["ventoux"], best["transformers"]
    print(f"\ntransformers bf16: perplexity {math.exp(hf_nll / n_tokens):.4f} (ventoux bf16 "
          f"{math.exp(ours['bf16'] / n_tokens):.4f}); time to score, batch {args.batch_size}, {threads} threads, "
          f"best of {args.rounds}: transformers {hf_t}, ventoux {ours_t}: ventoux {hf_t.wall / ours_t.wall:.2f}x "
          f"as fast by the wall clock, {hf_t.cpu / ours_t.cpu:.2f}x by CPU time")


def print_table(ours, theirs, bits, n_tokens, context, stride):
    def row(name, nll, ref):
        delta = "" if name in ("bf16", "BF16") else f"{100 * math.expm1((nll - ref) / n_tokens):+.3f}%"
        return f"{name:<11}{bits[name]:>6.2f}{math.exp(nll / n_tokens):>10.4f}{delta:>10}"

    print(f"\nperplexity per token on {n_tokens:,} held-out tokens (context {context}, stride {stride}); "
          "bits per weight of all tensors but the embedding; change against the engine's own 16-bit run")
    header = f"{'':<11}{'bits/w':>6}{'ppl':>10}{'change':>10}"
    print(f"{'ventoux':<37}   llama.cpp\n{header}   {header}")
    for scheme, gguf_type in [("bf16", "BF16"), *PAIRS]:
        print(row(scheme, ours[scheme], ours["bf16"]) + "   "
              + (row(gguf_type, theirs[gguf_type], theirs["BF16"]) if gguf_type in theirs else ""))


if __name__ == "__main__":
    main()
