"""Decode speed of ventoux against transformers and llama.cpp, in one run (issues 2 and 4).

    .venv/bin/python benchmarks/decode.py                       # bf16, int8, int4 vs every peer
    .venv/bin/python benchmarks/decode.py --techniques bfloat16 --compare transformers
    .venv/bin/python benchmarks/decode.py --out bench-results/decode.json --chart bench-results/decode.png

The model is a random bf16 checkpoint shaped like Mistral 7B with 4 layers (dim 4096, hidden 14336,
32 heads, 8 kv heads, vocab 32000, window 4096: about 2.0 GB of non-embedding weights), built once in
benchmarks/.cache. Settings: 2 threads, batch 1, 128-token prompt, 64 new tokens, medians of 3. Each
ventoux technique is compared with transformers (bf16) and with llama.cpp at the same precision
(bf16 -> BF16 and F16, int8 -> Q8_0, int4 -> Q4_0); the GGUF files are converted once and cached.
The machine is shared and noisy: the ratios of one run are the figures to read.
"""

from __future__ import annotations

import argparse

from common import CACHE, log, random_checkpoint

from ventoux.bench import Engine, Settings, peer_engines, report, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--techniques", default="bfloat16,int8,int4",
                   help="ventoux rows, comma-separated: a dtype (bfloat16, float16, float32) or a quantization scheme "
                        "(int4, int4+output, ...), each optionally followed by ' compiled' (torch.compile)")
    p.add_argument("--quant-dtype", default="bfloat16", help="activation dtype of the quantized rows")
    p.add_argument("--compare", nargs="*", default=["transformers", "llama.cpp"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--wait-quiet", type=float, default=120.0,
                   help="seconds to wait, before each engine, for other processes to go idle")
    p.add_argument("--out", default=None)
    p.add_argument("--chart", default=None)
    args = p.parse_args()

    folder = random_checkpoint(n_layers=args.layers)
    ours, peers = [], []
    for tech in args.techniques.split(","):
        base = tech.removesuffix(" compiled")
        quantize = None if base in ("bfloat16", "float16", "float32") else base
        dtype = args.quant_dtype if quantize else base
        ours.append(Engine("ventoux", tech, str(folder), dtype=dtype, quantize=quantize, compile=base != tech))
        peers += peer_engines(folder, dtype, quantize, args.compare, CACHE, log)
    settings = Settings(batch_size=args.batch_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                        threads=args.threads, repeats=args.repeats, quiet_wait_s=args.wait_quiet)
    print(f"model: {folder.name} (random weights, bf16 on disk)")
    result = run(ours + list(dict.fromkeys(peers)), settings, vocab_size=32000, log=print)
    if args.out:
        print(f"results written to {report.write_json(result, args.out)}")
    if args.chart:
        path = report.write_chart(result, args.chart)
        print(f"chart written to {path}" if path else "no chart: matplotlib is not installed")


if __name__ == "__main__":
    main()
