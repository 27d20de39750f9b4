"""`ventoux bench`: decode and prefill speed, GB/s and peak memory, against transformers and llama.cpp.

    ventoux bench --model ./ckpt --dtype bfloat16 --threads 2 --compare transformers llama.cpp
    ventoux bench --model ./ckpt --quantize int4 --compare llama.cpp --out r.json --chart r.png
"""

from __future__ import annotations

from pathlib import Path

from ..cli import add_model_args, command


def _bench_args(p):
    add_model_args(p, lora=True)
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default: 1)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine; medians are reported")
    p.add_argument("--prefill-chunk", type=int, default=None, help="ventoux's prefill chunk size")
    p.add_argument("--compare", nargs="+", action="extend", default=[], metavar="PEER",
                   choices=["transformers", "llama.cpp"],
                   help="peers run on the same weights: transformers, llama.cpp (installed on first use)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each engine, wait up to this long for other processes to go idle")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--chart", default=None, help="write a PNG bar chart here")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "ventoux" / "bench"),
                   help="where converted GGUF files are kept")


@command("bench", "Measure decode/prefill speed, GB/s and memory, optionally against peers.", _bench_args)
def run_bench(args):
    from ..api import DEMO_MODEL, pick_device
    from ..bench import Engine, Settings, peer_engines, report, run
    from ..config import read_config
    from ..errors import VentouxError
    from ..hub import resolve
    from ..weights import parse_dtype

    if args.model is None and not (DEMO_MODEL / "config.json").exists():
        raise VentouxError("the demonstration model is not shipped in this build yet: pass --model")
    folder = resolve(args.model) if args.model else DEMO_MODEL
    device = pick_device(args.device)
    dtype = str(parse_dtype(args.dtype, device)).removeprefix("torch.")
    settings = Settings(batch_size=args.batch_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                        threads=args.threads, repeats=args.repeats, device=str(device),
                        prefill_chunk=args.prefill_chunk, quiet_wait_s=args.wait_quiet)
    settings.check()
    technique = (args.quantize or dtype) + (" compiled" if args.compile else "")
    technique += " + LoRA" if args.lora else ""
    technique += " no-mmap" if not args.mmap else ""
    lora = str(Path(args.lora).resolve()) if args.lora else None  # the worker's cwd may differ
    ours = Engine("ventoux", technique, str(folder), dtype=dtype, quantize=args.quantize, compile=args.compile,
                  lora=lora, mmap=args.mmap)
    engines = [ours, *peer_engines(folder, dtype, args.quantize, args.compare, args.cache_dir)]
    result = run(engines, settings, vocab_size=read_config(folder).vocab_size)
    if args.out:
        print(f"results written to {report.write_json(result, args.out)}")
    if args.chart:
        path = report.write_chart(result, args.chart)
        print(f"chart written to {path}" if path else "no chart: matplotlib is not installed (pip install matplotlib)")
    return 1 if any("error" in r for r in result["results"]) else 0
