"""Decode and prefill of ventoux against llama.cpp at one precision, both loaded in one process and run in turn,
round after round: the ratio to trust on a VM whose memory bandwidth moves by half from one minute to the next.

    .venv/bin/python benchmarks/interleaved.py --technique bfloat16              # against llama.cpp BF16
    .venv/bin/python benchmarks/interleaved.py --technique int4-g64 --rounds 16  # against Q4_0 (the same size)
    .venv/bin/python benchmarks/interleaved.py --technique int8 --isa avx2
    .venv/bin/python benchmarks/interleaved.py --technique int4-g64,int4-g64+output=int6   # two heads, one peer
    .venv/bin/python benchmarks/interleaved.py --technique bfloat16 --no-mmap   # also the weights copied (mmap=False)

decode.py runs each engine in a process of its own, one after the other, so two engines' runs lie a minute or
more apart; on this project's shared VMs the read bandwidth of both cores moved between about 34 and 58 GB/s
over such spans, and one engine's row could land in a fast spell while its peer's landed in a slow one. Here each
round runs every engine in turn on the same prompt (32 new tokens by default, a few seconds each), so all see the
same spell; the figure to read is the median over the rounds of each round's ratio. The order turns by one each
round, so that no engine always runs right after another: in a fixed order the same ventoux row loaded twice decoded
40.2 tok/s where it ran right after llama.cpp, 47.2 where it ran second (8 rounds, 2-core AMD EPYC VM; without
llama.cpp the two copies ran alike, so the cause is not known). Each round first measures the read bandwidth
(ventoux.bench.measure_bandwidth), so each engine's share of it is taken within the spell it ran in, not against the
best spell of the run. The prompt's prefill is timed in each run too (prompt tokens over the time to the first
token), and its ratio reported the same way. The model and the GGUF files are decode.py's (the random 4-layer
Mistral-7B-shaped checkpoint, converted once and cached); the runners are the benchmark worker's, so timings are
taken as in decode.py. Several ventoux rows of one precision (--technique A,B) each compare with the same peer run.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import replace

from common import CACHE, log, random_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--technique", default="bfloat16",
                   help="the ventoux rows, comma-separated, of one precision: a dtype (bfloat16, float16, float32) "
                        "or a scheme (int8, int4-g64, int4-g64+output=int6, ...)")
    p.add_argument("--gguf", default=None, help="llama.cpp's type (default: the first of the same precision)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--isa", choices=["native", "avx2"], default="native")
    p.add_argument("--no-mmap", action="store_true",
                   help="also each ventoux row, and llama.cpp, with its weights copied into memory (ventoux's "
                        "--no-mmap, llama.cpp's use_mmap=False), each row against the peer loaded as it is")
    args = p.parse_args()
    isa = None if args.isa == "native" else args.isa
    from ventoux.bench import ISA_ENVIRONMENT  # torch is not imported yet: it reads its ISA when it is

    os.environ.update(ISA_ENVIRONMENT.get(isa, {}))
    import torch

    from ventoux.bench import Engine, Settings, describe_machine, measure_bandwidth, peer_engines, random_prompts
    from ventoux.bench.worker import LlamaCppRunner, VentouxRunner

    torch.set_num_threads(args.threads)

    folder = random_checkpoint()
    techniques = args.technique.split(",")
    quantize = None if techniques[0] in ("bfloat16", "float16", "float32") else techniques[0]
    dtype = "bfloat16" if quantize else techniques[0]
    peers = peer_engines(folder, dtype, quantize, ["llama.cpp"], CACHE, log, isa=isa)
    peer = next((e for e in peers if e.technique == args.gguf), None) if args.gguf else peers[0]
    if peer is None:
        types = ", ".join(e.technique for e in peers)
        raise SystemExit(f"--gguf {args.gguf}: not a llama.cpp type of this precision (use one of {types})")
    settings = Settings(prompt_len=args.prompt_len, new_tokens=args.new_tokens, threads=args.threads)
    prompts = random_prompts(settings, vocab_size=32000)
    ours = [Engine("ventoux", t + (" no-mmap" if not mmap else ""), str(folder), dtype="bfloat16" if quantize else t,
                   quantize=t if quantize else None, mmap=mmap)
            for t in techniques for mmap in ([True, False] if args.no_mmap else [True])]
    peers = {True: peer, **({False: replace(peer, technique=peer.technique + " no-mmap", mmap=False)}
                            if args.no_mmap else {})}  # by mmap: each ventoux row meets the peer loaded alike
    llamas = {p.label: LlamaCppRunner(vars(p), vars(settings)) for p in peers.values()}
    runners = {**{e.label: VentouxRunner(vars(e), vars(settings)) for e in ours}, **llamas}  # the peers last
    for runner in runners.values():  # warm-up, as the worker does
        runner.generate(prompts, 4)

    rates: dict[str, list[float]] = {name: [] for name in runners}
    prefills: dict[str, list[float]] = {name: [] for name in runners}  # prompt tokens over the time to the first
    bandwidths = []
    names = list(runners)
    for r in range(args.rounds):
        bandwidths.append(measure_bandwidth(args.threads, repeats=3))  # the spell the round runs in
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: none always follows the same one
            run = runners[name].generate(prompts, args.new_tokens)
            rates[name].append((run["tokens"] - 1) / run["decode_s"])
            prefills[name].append(args.prompt_len / run["ttft_s"])
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.2f} tok/s" for n, v in rates.items())
            + f", read bandwidth {bandwidths[-1]:.1f} GB/s")
    machine = describe_machine(args.threads)
    print(f"{machine['cpu']}, {args.threads} threads, kernels: {args.isa}; batch 1, {args.prompt_len}-token prompt, "
          f"{args.new_tokens} new tokens, {args.rounds} rounds, each engine in turn; read bandwidth "
          f"{statistics.median(bandwidths):.1f} GB/s (median; range {min(bandwidths):.1f}-{max(bandwidths):.1f})")
    print(f"llama.cpp system info: {next(iter(llamas.values())).system_info.strip()}")
    for (name, values), runner in zip(rates.items(), runners.values()):
        shares = [runner.weight_bytes * v / 1e9 / bw for v, bw in zip(values, bandwidths)]  # GB/s over the round's
        print(f"{name}: median {statistics.median(values):.2f} tok/s (range {min(values):.2f}-{max(values):.2f}), "
              f"{runner.weight_bytes * statistics.median(values) / 1e9:.1f} GB/s of weights, "
              f"{100 * statistics.median(shares):.0f}% of the round's read bandwidth (median)")
    for e in ours:
        peer = peers[e.mmap]
        ratios = [a / b for a, b in zip(rates[e.label], rates[peer.label])]
        prefill_ratios = [a / b for a, b in zip(prefills[e.label], prefills[peer.label])]
        print(f"{e.label} / {peer.label}: decode, median of the rounds' ratios {statistics.median(ratios):.2f}x "
              f"(range {min(ratios):.2f}-{max(ratios):.2f}); prefill {statistics.median(prefill_ratios):.2f}x "
              f"(range {min(prefill_ratios):.2f}-{max(prefill_ratios):.2f})")
    print("prefill: " + ", ".join(f"{name} {statistics.median(v):.1f} tok/s" for name, v in prefills.items()))

if __name__ == "__main__":
    main()
