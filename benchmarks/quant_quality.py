"""What quantization costs in perplexity, ventoux against llama.cpp, and scoring speed against transformers.

    python benchmarks/quant_quality.py                  # the demo model on tinyshakespeare's held-out 10%
    python benchmarks/quant_quality.py --no-llama-cpp   # ventoux and transformers only
    python benchmarks/quant_quality.py --timing-only    # bf16 only: the time against transformers
    python benchmarks/quant_quality.py --schemes int8,int8-g32 --rounds 0   # those rows (and their peers) only
    python benchmarks/quant_quality.py --dtype float32 ...   # ventoux's activations in float32, as llama.cpp's

One run scores the same held-out tokens (the split of benchmarks/eval_demo.py) with
  - ventoux at bf16 and quantized while loading: int8 (one scale a row), int8-g32 (one per 32 inputs, Q8_0's
    format and size), int6 (int6-g64, about Q6_K's size), int4-g32, int4-g64 (its head in int8, int4 or int6),
    int4-g128;
  - llama.cpp (llama-cpp-python built from source, bench/llamacpp.py) on GGUF files converted from the
    same weights by llama.cpp's own converter: BF16, Q8_0, Q6_K, Q4_0 (and Q4_K_M), every position's logits;
  - transformers' MistralForCausalLM at bf16, for the time (same windows, batch and threads as ventoux;
    the two alternate for --rounds rounds and each keeps its fastest, so a busy spell hits both).
Every engine is fed the same token ids in the same strided windows (ventoux.eval.perplexity) and
scored by the same code. The context defaults to the model's sliding window (128 for the demo model):
llama.cpp runs Mistral as a full-attention llama, so within one window both compute the same function.
Printed: each scheme's perplexity change against its engine's own 16-bit run, side by side with the
llama.cpp type of the same size, and the scoring-time ratio transformers / ventoux. At 8 bits that change
is as small as the rounding of 16-bit arithmetic moves it, so each row also gives the mean KL divergence of
its next-token distributions from ventoux's float32 run on the first --kld-tokens tokens (what llama.cpp's
own `llama-perplexity --kl-divergence` reports for its quantizations): the one float32 reference for both
engines, and a measure that does not let errors cancel.
llama.cpp quantizes only tensors whose rows are whole blocks of 32 and keeps the others 16-bit (the demo
model's ffn_down, 688 wide, is F16 in every GGUF file here), where ventoux quantizes every block linear.
So each ventoux scheme also runs as "<scheme>*", those same tensors left in bf16, the like-for-like row.
GGUF files are cached in benchmarks/.cache.
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
from ventoux.model import swap_modules
from ventoux.quantize import parse_quantize, quantizer
from ventoux.train.data import split_heldout

DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "tinyshakespeare.txt"
PAIRS = [("int8", "Q8_0"), ("int8-g32", "Q8_0"), ("int8-g32+output", "Q8_0"), ("int6", "Q6_K"),
         ("int4-g32", "Q4_0"), ("int4-g64", "Q4_K_M"), ("int4-g64+output", "Q4_0"), ("int4-g64+output=int6", "Q4_0"),
         ("int4-g128", None)]
# rows side by side; "+output": the head in the blocks' scheme, "+output=int6" in int6


class HFScorer(torch.nn.Module):
    """transformers' model behind the interface ventoux.eval.scoring.score calls: tokens -> float logits."""

    def __init__(self, hf):
        super().__init__()
        self.hf, self.tok_embeddings = hf, hf.model.embed_tokens

    def forward(self, tokens):
        return self.hf(tokens).logits.float()


def score_llama_cpp(path: Path, requests, context: int, threads: int, keep: int) -> tuple[float, np.ndarray]:
    """Summed log-likelihood of the requests' scored tokens, from llama.cpp's logits at every position, and
    the log-probabilities of the first `keep` scored positions (rows of the vocabulary)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=context + 1, n_batch=context + 1, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    total, kept = 0.0, []
    for tokens, n in requests:
        tokens = [int(t) for t in tokens]
        llm.reset()
        llm.eval(tokens[:-1])
        logits = np.asarray(llm.scores[len(tokens) - 1 - n: len(tokens) - 1], dtype=np.float64)
        logprobs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        total += float(logprobs[np.arange(n), tokens[-n:]].sum())
        if sum(len(k) for k in kept) < keep:
            kept.append(logprobs.astype(np.float32))
    llm.close()
    return total, np.concatenate(kept)[:keep]


@torch.inference_mode()
def ventoux_logprobs(model, requests, batch_size: int, keep: int) -> np.ndarray:
    """The log-probabilities of the first `keep` scored positions, in request order, as score() computes them."""
    kept, count = [], 0
    for start in range(0, len(requests), batch_size):
        if count >= keep:
            break
        batch = requests[start: start + batch_size]
        width = max(len(t) for t, _ in batch) - 1
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (tokens, _) in enumerate(batch):
            inputs[row, : len(tokens) - 1] = torch.as_tensor(tokens[:-1])
        logits = model(inputs)
        for row, (tokens, n) in enumerate(batch):
            end = len(tokens) - 1
            kept.append(logits[row, end - n: end].float().log_softmax(-1).numpy())
            count += n
    return np.concatenate(kept)[:keep]


def mean_kld(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over positions of KL(reference || other), in nats; both are rows of log-probabilities."""
    ref = reference.astype(np.float64)
    return float((np.exp(ref) * (ref - other.astype(np.float64))).sum(-1).mean())


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


def load_like_gguf(model: str, scheme: str, dtype: str = "bfloat16"):
    """ventoux's scheme on the tensors llama.cpp's GGUF quantizes (whole blocks of 32): the others stay 16-bit
    (or `dtype`)."""
    llm = ventoux.load(model, dtype=dtype, device="cpu")
    blocks, head = parse_quantize(scheme)
    transform = quantizer(blocks, head or False)
    swap_modules(llm.model, lambda name, m: m if getattr(m, "in_features", 0) % 32 else transform(name, m))
    return llm


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
    p.add_argument("--rounds", type=int, default=3,
                   help="timing: ventoux and transformers alternately, best of N (0: no transformers run)")
    p.add_argument("--schemes", default=None,
                   help="comma-separated ventoux schemes to score (default: all of PAIRS), with their llama.cpp peers")
    p.add_argument("--timing-only", action="store_true", help="only the bf16 runs and the time against transformers")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="ventoux's dtype (activations, unquantized tensors); the 'bf16' row is then this dtype")
    p.add_argument("--kld-tokens", type=int, default=16384, help="positions compared with the float32 run")
    args = p.parse_args()
    threads = torch.get_num_threads()
    pairs = PAIRS
    if args.schemes:
        wanted = args.schemes.split(",")
        pairs = [pair for pair in PAIRS if pair[0] in wanted]
        if len(pairs) != len(wanted):
            p.error(f"--schemes: choose among {', '.join(s for s, _ in PAIRS)}")

    base = ventoux.load(args.model, dtype=args.dtype, device="cpu")
    cfg = base.config
    context = args.context or min(cfg.sliding_window or cfg.max_seq_len, cfg.max_seq_len)
    stride = args.stride or context
    text = split_heldout([Path(args.corpus).read_text(encoding="utf-8")], 0.1)[1][0]
    ids = base.tokenizer.encode(text, bos=True)
    requests = windows(ids, context, stride)
    n_tokens = len(ids) - 1
    log(f"{args.model}: {len(text):,} held-out characters, {n_tokens:,} tokens, {len(requests)} windows "
        f"(context {context}, stride {stride}), {threads} threads, {os.uname().machine}")

    n_weights = sum(t.numel() for name, t in base.model.state_dict().items()
                    if not name.startswith("tok_embeddings"))  # as ventoux_bytes counts
    ours, bits, clocks, kld = {}, {}, {}, {}  # keyed by scheme: summed nll, bits per weight, time, KL divergence
    keep = min(args.kld_tokens, n_tokens)
    reference = ventoux_logprobs(ventoux.load(args.model, dtype="float32", device="cpu").model, requests,
                                 args.batch_size, keep)
    partial_blocks = any(m.in_features % 32 for m in base.model.modules() if isinstance(m, torch.nn.Linear))
    like_gguf = [f"{s}*" for s, _ in pairs] if partial_blocks else []
    for scheme in ["bf16", *([] if args.timing_only else [*(s for s, _ in pairs), *like_gguf])]:
        if scheme.endswith("*"):
            llm = load_like_gguf(args.model, scheme[:-1], args.dtype)
        else:
            llm = base if scheme == "bf16" else ventoux.load(args.model, dtype=args.dtype, device="cpu",
                                                             quantize=scheme)
        score(llm.model, requests[: args.batch_size], args.batch_size)  # warm-up: kernels compile on first use
        with Clock() as clocks[scheme]:
            ours[scheme] = -sum(s for s, _ in score(llm.model, requests, args.batch_size))
        bits[scheme] = bits_per_weight(ventoux_bytes(llm.model), n_weights)
        kld[scheme] = mean_kld(reference, ventoux_logprobs(llm.model, requests, args.batch_size, keep))
        log(f"ventoux {scheme} ({args.dtype}): {ours[scheme] / n_tokens:.5f} nats/token, KL {kld[scheme]:.3e} "
            f"({clocks[scheme]})")

    from transformers import MistralForCausalLM

    hf = MistralForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval() if args.rounds else None
    if hf is not None:
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
        for gguf_type in ["BF16", *dict.fromkeys(t for _, t in pairs if t)]:
            if gguf_type not in ("BF16", *llamacpp.CONVERTER_TYPES, *llamacpp.QUANTIZER_TYPES):
                log(f"llama.cpp {gguf_type}: this bench/llamacpp.py cannot make it; skipped")
                continue
            path = llamacpp.gguf_file(args.model, gguf_type, CACHE, log)
            with Clock() as clock:
                total, logprobs = score_llama_cpp(path, requests, context, threads, keep)
            theirs[gguf_type], kld[gguf_type] = -total, mean_kld(reference, logprobs)
            bits[gguf_type] = bits_per_weight(llamacpp.gguf_weight_bytes(path), n_weights)
            log(f"llama.cpp {gguf_type}: {theirs[gguf_type] / n_tokens:.5f} nats/token, KL {kld[gguf_type]:.3e} "
                f"({clock})")

    if not args.timing_only:
        print_table(ours, theirs, bits, kld, n_tokens, keep, context, stride, pairs)
    if hf is None:
        return
    ours_t, hf_t = best["ventoux"], best["transformers"]
    print(f"\ntransformers bf16: perplexity {math.exp(hf_nll / n_tokens):.4f} (ventoux bf16 "
          f"{math.exp(ours['bf16'] / n_tokens):.4f}); time to score, batch {args.batch_size}, {threads} threads, "
          f"best of {args.rounds}: transformers {hf_t}, ventoux {ours_t}: ventoux {hf_t.wall / ours_t.wall:.2f}x "
          f"as fast by the wall clock, {hf_t.cpu / ours_t.cpu:.2f}x by CPU time")


def print_table(ours, theirs, bits, kld, n_tokens, keep, context, stride, pairs=PAIRS):
    def row(name, nll, ref):
        delta = "" if name in ("bf16", "BF16") else f"{100 * math.expm1((nll - ref) / n_tokens):+.3f}%"
        return f"{name:<17}{bits[name]:>6.2f}{math.exp(nll / n_tokens):>10.4f}{delta:>10}{kld[name]:>10.2e}"

    print(f"\nperplexity per token on {n_tokens:,} held-out tokens (context {context}, stride {stride}); "
          "bits per weight of all tensors but the embedding; change against the engine's own 16-bit run; "
          f"KL: mean KL divergence (nats) from ventoux's float32 run over the first {keep:,} tokens")
    header = f"{'':<17}{'bits/w':>6}{'ppl':>10}{'change':>10}{'KL':>10}"
    print(f"{'ventoux':<53}   llama.cpp\n{header}   {header}")
    for scheme, gguf_type in [("bf16", "BF16"), *pairs, *((f"{s}*", t) for s, t in pairs)]:
        if scheme in ours:
            print(row(scheme, ours[scheme], ours["bf16"]) + "   "
                  + (row(gguf_type, theirs[gguf_type], theirs["BF16"]) if gguf_type in theirs else ""))


if __name__ == "__main__":
    main()
