"""Decode speed of ventoux against transformers and llama.cpp, in one run (issues 2 and 4).

    .venv/bin/python benchmarks/decode.py                       # bf16, int8, int4 vs every peer
    .venv/bin/python benchmarks/decode.py --techniques bfloat16 --compare transformers
    .venv/bin/python benchmarks/decode.py --out bench-results/decode.json --chart bench-results/decode.png
    .venv/bin/python benchmarks/decode.py --isa avx2            # as on a CPU without AVX-512 (issue 15)

The model is a random bf16 checkpoint shaped like Mistral 7B with 4 layers (dim 4096, hidden 14336,
32 heads, 8 kv heads, vocab 32000, window 4096: about 2.0 GB of non-embedding weights), built once in
benchmarks/.cache. Settings: 2 threads, batch 1, 128-token prompt, 64 new tokens, medians of 3. Each
ventoux technique is compared with transformers (bf16) and with llama.cpp at the same precision
(bf16 -> BF16 and F16, int8 -> Q8_0, int4 -> Q4_0); the GGUF files are converted once and cached.
llama.cpp is llama-cpp-python compiled from source for this CPU (bench/llamacpp.py; its system info is
printed, and a warning when its Q4_0 row reads under 75% of the measured bandwidth). With --isa avx2 every
engine runs as on an AVX2 CPU: ventoux on its AVX2 kernels, PyTorch held to AVX2 (ATEN_CPU_CAPABILITY,
DNNL_MAX_CPU_ISA), llama.cpp built for AVX2 only (-DGGML_NATIVE=OFF -DGGML_AVX2=ON ... -DGGML_AVX512=OFF) in
a folder of its own.
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
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: every engine as on a CPU without AVX-512 (ventoux's AVX2 kernels, llama.cpp for AVX2)")
    p.add_argument("--out", default=None)
    p.add_argument("--chart", default=None)
    args = p.parse_args()

    folder = random_checkpoint(n_layers=args.layers)
    isa = None if args.isa == "native" else args.isa
    ours, peers = [], []
    for tech in args.techniques.split(","):
        base = tech.removesuffix(" compiled")
        quantize = None if base in ("bfloat16", "float16", "float32") else base
        dtype = args.quant_dtype if quantize else base
        ours.append(Engine("ventoux", tech, str(folder), dtype=dtype, quantize=quantize, compile=base != tech, isa=isa))
        peers += peer_engines(folder, dtype, quantize, args.compare, CACHE, log, isa=isa)
    settings = Settings(batch_size=args.batch_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                        threads=args.threads, repeats=args.repeats, quiet_wait_s=args.wait_quiet)
    print(f"model: {folder.name} (random weights, bf16 on disk); kernels: {args.isa}")
    result = run(ours + list(dict.fromkeys(peers)), settings, vocab_size=32000, log=print)
    if args.out:
        print(f"results written to {report.write_json(result, args.out)}")
    if args.chart:
        path = report.write_chart(result, args.chart)
        print(f"chart written to {path}" if path else "no chart: matplotlib is not installed")


if __name__ == "__main__":
    main()
