"""Measuring ventoux against its peers: decode and prefill tokens/s, time to first token, achieved GB/s
against the machine's measured read bandwidth, and peak memory.

    from ventoux.bench import Engine, Settings, run, peer_engines
    engines = [Engine("ventoux", "bfloat16", folder, dtype="bfloat16"),
               *peer_engines(folder, "bfloat16", None, ["transformers", "llama.cpp"], cache_dir)]
    result = run(engines, Settings(threads=2), vocab_size=32000)   # prints the table and ratios
    report.write_json(result, "results.json"); report.write_chart(result, "results.png")

Each engine runs in its own subprocess (worker.py), one at a time, so its peak RSS is its own and no two
engines compete for the cores. Inside a worker: load, one warm-up generation, then a timed generation of
the same random prompts as every other engine. `repeats` rounds of all engines; the figures reported are
medians. Decode runs at batch `batch_size`; the first new token marks the end of prefill (TTFT), the
following ones time decode.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import VentouxError

PEERS = ("transformers", "llama.cpp")
RESULT_MARK = "VENTOUX_BENCH_RESULT "
PEER_BANDWIDTH_WARNING = 0.75  # a llama.cpp Q4_0 row reading less than this share of the bandwidth is suspect
# What a CPU without AVX-512 sees (--isa avx2): ventoux's AVX2 kernels, and PyTorch's own products held to AVX2.
ISA_ENVIRONMENT = {"avx2": {"VENTOUX_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}}


@dataclass(frozen=True)
class Engine:
    name: str  # "ventoux", or one of PEERS
    technique: str  # the row's name: "bfloat16", "int8", "Q4_0", ...
    path: str  # checkpoint folder, or a GGUF file for llama.cpp
    dtype: str | None = None
    quantize: str | None = None
    compile: bool = False  # ventoux: torch.compile the decode step
    lora: str | None = None  # ventoux: a LoRA adapter applied (always on)
    isa: str | None = None  # "avx2": ventoux's AVX2 kernels (PyTorch held to AVX2), llama.cpp built for AVX2 only
    mmap: bool = True  # False: the weights copied into memory (ventoux's --no-mmap, llama.cpp's use_mmap=False)

    @property
    def label(self) -> str:
        return f"{self.name} {self.technique}"


@dataclass
class Settings:
    batch_size: int = 1
    prompt_len: int = 128
    new_tokens: int = 64
    threads: int | None = None  # None: torch's default (the physical cores)
    repeats: int = 3
    device: str = "cpu"
    prefill_chunk: int | None = None  # ventoux's chunk size (None: its default)
    seed: int = 0
    bandwidth_bytes: int = 2**30  # the buffer read to measure bandwidth: much larger than the caches
    quiet_wait_s: float = 0.0  # before each engine, wait up to this long for other processes to go idle

    def check(self) -> None:
        for name, low in (("batch_size", 1), ("prompt_len", 1), ("new_tokens", 2), ("repeats", 1)):
            if getattr(self, name) < low:
                flag = "--" + name.replace("_", "-")
                raise VentouxError(f"{flag}={getattr(self, name)} is too small: it must be at least {low}")
        if self.threads is not None and self.threads < 1:
            raise VentouxError(f"--threads={self.threads} must be at least 1")


# ---- the machine ---------------------------------------------------------------------------------
def measure_bandwidth(threads: int | None, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of `repeats` sums over a float32 buffer far larger than the caches,
    with `threads` threads (decode reads every weight once per token, so this is its ceiling)."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(nbytes // 4, dtype=torch.float32)  # written once, so every page is resident
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t0)
        return buf.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(old)


def describe_machine(threads: int | None) -> dict:
    import torch

    from ..cpu_kernels import cpu_model

    cpu = cpu_model()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "memory_bytes": mem,
            "threads": threads or torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


# ---- the engines to compare --------------------------------------------------------------------------
def peer_engines(folder: str | Path, dtype: str, quantize: str | None, compare: list[str],
                 cache_dir: str | Path, log: Callable[[str], None] = print, isa: str | None = None) -> list[Engine]:
    """The peer rows for a ventoux run in `dtype` (a torch dtype name) or quantized with `quantize`:
    transformers in the same dtype (bfloat16 when ventoux is quantized: transformers has no such
    kernels on CPU), llama.cpp in the GGUF types of the same precision (converted once, cached), built
    from source for this CPU, or for AVX2 only with isa "avx2" (llamacpp.ensure_installed)."""
    engines = []
    for peer in dict.fromkeys(compare):
        if peer == "transformers":
            engines.append(Engine("transformers", "bfloat16" if quantize else dtype, str(folder),
                                  dtype="bfloat16" if quantize else dtype, isa=isa))
        elif peer == "llama.cpp":
            from . import llamacpp

            llamacpp.ensure_installed(llamacpp.build_for(isa), log)
            for gguf_type in llamacpp.gguf_types(dtype, quantize):
                path = llamacpp.gguf_file(folder, gguf_type, cache_dir, log)
                engines.append(Engine("llama.cpp", gguf_type, str(path), isa=isa))
        else:
            raise VentouxError(f"--compare {peer!r} is not a known peer: use {' or '.join(PEERS)}")
    return engines


def wait_for_quiet(max_wait_s: float, log: Callable[[str], None], busy_cores: float = 0.3) -> float:
    """Wait (up to max_wait_s) until other processes use less than `busy_cores` cores; returns what
    they used over the last second. On a shared machine this keeps a neighbour's burst out of a run."""
    from .worker import busy_cpu_s

    deadline, said = time.monotonic() + max_wait_s, False
    while True:
        before = busy_cpu_s()
        if before is None:
            return 0.0
        time.sleep(1.0)
        used = busy_cpu_s() - before
        if used < busy_cores or time.monotonic() >= deadline:
            return used
        if not said:
            log(f"  waiting up to {max_wait_s:.0f} s: other processes keep {used:.1f} cores busy")
            said = True


def peer_notes(engines: list[Engine], raws: list[list[dict]], rows: list[dict]) -> list[str]:
    """llama.cpp's account of its build (which instruction sets it uses), and a warning for each of its Q4_0
    rows that reads under PEER_BANDWIDTH_WARNING of the measured bandwidth: a ratio against a peer built
    without this CPU's instruction set means nothing."""
    lines, seen = [], set()
    for engine, raw, row in zip(engines, raws, rows):
        if engine.name != "llama.cpp" or not raw:
            continue
        info = raw[0].get("system_info", "")
        if info and (engine.isa, info) not in seen:
            seen.add((engine.isa, info))
            lines.append(f"llama.cpp ({engine.isa or 'native'} build) system info: {info}")
        share = row.get("bandwidth_fraction", 1.0)
        if engine.technique == "Q4_0" and share < PEER_BANDWIDTH_WARNING:
            lines.append(f"warning: llama.cpp Q4_0 reads {row['gb_s']:.1f} GB/s, {100 * share:.0f}% of the measured "
                         f"bandwidth (under {100 * PEER_BANDWIDTH_WARNING:.0f}%): it may be built without this CPU's "
                         "instruction set, or the machine was busy; its ratios are suspect")
    return lines


# ---- running -------------------------------------------------------------------------------------
def random_prompts(settings: Settings, vocab_size: int) -> list[list[int]]:
    """batch_size prompts of prompt_len token ids; ids 0-2 (unk, bos, eos) are avoided."""
    rng = random.Random(settings.seed)
    top = min(vocab_size, 32000)
    return [[rng.randrange(3, top) for _ in range(settings.prompt_len)] for _ in range(settings.batch_size)]


def run_worker(engine: Engine, settings: Settings, prompts: list[list[int]]) -> dict:
    """Run one engine in a fresh Python process; returns its raw timings (see worker.py)."""
    spec = {"engine": asdict(engine), "settings": asdict(settings), "prompts": prompts}
    env = {**os.environ, **ISA_ENVIRONMENT.get(engine.isa, {})}
    if settings.threads:
        env["OMP_NUM_THREADS"] = str(settings.threads)
    proc = subprocess.run([sys.executable, "-m", "ventoux.bench.worker"], input=json.dumps(spec),
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    # the error is stderr's last line (a traceback's), whatever the engine printed to stdout before it
    lines = [ln for ln in (proc.stdout.splitlines() + proc.stderr.splitlines()) if ln.strip()]
    raise RuntimeError(lines[-1] if lines else f"the worker exited with status {proc.returncode}")


def summarize(engine: Engine, raws: list[dict], settings: Settings, bandwidth: float) -> dict:
    """Medians over the timed runs of one engine (from one or more workers), and what follows from them."""
    b = settings.batch_size
    runs = [r for raw in raws for r in raw["runs"]]
    decode = [b * (r["tokens"] - 1) / r["decode_s"] for r in runs]
    prefill = [b * settings.prompt_len / r["ttft_s"] for r in runs]
    row = {"engine": engine.name, "technique": engine.technique, "path": engine.path, "dtype": engine.dtype,
           "quantize": engine.quantize, "decode_tok_s": statistics.median(decode), "decode_runs_tok_s": decode,
           "prefill_tok_s": statistics.median(prefill),
           "ttft_s": statistics.median(r["ttft_s"] for r in runs), "weight_bytes": raws[0]["weight_bytes"],
           "peak_rss_bytes": max(raw["peak_rss_bytes"] for raw in raws),
           "load_s": statistics.median(raw["load_s"] for raw in raws), "runs": runs,
           "others_cores": statistics.median(r.get("others_cores", 0.0) for r in runs)}  # 0 off Linux
    # Each decode step reads every non-embedding weight once, whatever the batch size.
    row["gb_s"] = row["weight_bytes"] * row["decode_tok_s"] / b / 1e9
    row["bandwidth_fraction"] = row["gb_s"] / bandwidth
    return row


def ratios(rows: list[dict]) -> list[dict]:
    """ventoux row / peer row, for decode and prefill tokens/s: every ventoux row against every
    transformers row, and against the llama.cpp rows of its own precision. decode_by_round: the median of
    each round's decode ratio (run() runs every engine once a round, so the two runs of a round lie close in
    time): on a machine whose memory bandwidth drifts by half from minute to minute, steadier than the ratio
    of the medians, whose two medians may come from different rounds."""
    from .llamacpp import gguf_types

    def comparable(ours: dict, peer: dict) -> bool:
        if peer["engine"] != "llama.cpp":
            return True
        try:
            return peer["technique"] in gguf_types(ours["dtype"], ours["quantize"])
        except (VentouxError, KeyError):
            return False

    def by_round(ours: dict, peer: dict) -> float:
        return statistics.median(a / b for a, b in zip(ours["decode_runs_tok_s"], peer["decode_runs_tok_s"]))

    ok = [r for r in rows if "error" not in r]
    return [{"ventoux": f"{a['engine']} {a['technique']}", "peer": f"{p['engine']} {p['technique']}",
             "decode": a["decode_tok_s"] / p["decode_tok_s"], "prefill": a["prefill_tok_s"] / p["prefill_tok_s"],
             "decode_by_round": by_round(a, p)}
            for a in ok if a["engine"] == "ventoux" for p in ok if p["engine"] != "ventoux" and comparable(a, p)]


def run(engines: list[Engine], settings: Settings, vocab_size: int, log: Callable[[str], None] = print) -> dict:
    """Measure the machine and every engine; prints progress, the table and the ratios.

    The repeats are rounds: each round runs every engine once, each in a fresh worker, and measures the
    bandwidth again (the best is kept), so a load that comes and goes on a shared machine spreads over
    all engines instead of falling on one. An engine that fails gets a row with its error; the others go on.
    """
    from . import report

    settings.check()
    if settings.batch_size > 1 and any(e.name == "llama.cpp" for e in engines):
        log("llama.cpp rows skipped: llama-cpp-python's generator decodes one sequence at a time (batch 1)")
        engines = [e for e in engines if e.name != "llama.cpp"]
    prompts = random_prompts(settings, vocab_size)
    one = replace(settings, repeats=1)
    raws: list[list[dict]] = [[] for _ in engines]
    errors: dict[int, str] = {}
    bandwidth = 0.0
    for round_ in range(1, settings.repeats + 1):
        bandwidth = max(bandwidth, measure_bandwidth(settings.threads, settings.bandwidth_bytes))
        log(f"round {round_}/{settings.repeats}: read bandwidth {bandwidth:.1f} GB/s (best so far)")
        for i, engine in enumerate(engines):
            if i in errors:
                continue
            if settings.quiet_wait_s:
                wait_for_quiet(settings.quiet_wait_s, log)
            t0 = time.perf_counter()
            try:
                raws[i].append(run_worker(engine, one, prompts))
            except RuntimeError as e:
                errors[i] = str(e)
                log(f"  {engine.label} failed: {e}")
                continue
            run_ = raws[i][-1]["runs"][0]
            log(f"  {engine.label}: {settings.batch_size * (run_['tokens'] - 1) / run_['decode_s']:.2f} tok/s "
                f"decode ({time.perf_counter() - t0:.0f} s with loading)")
    rows = [{"engine": e.name, "technique": e.technique, "path": e.path, "error": errors[i]} if i in errors
            else summarize(e, raws[i], settings, bandwidth) for i, e in enumerate(engines)]
    machine = {**describe_machine(settings.threads), "read_bandwidth_gb_s": bandwidth}
    result = {"machine": machine, "settings": asdict(settings), "results": rows, "ratios": ratios(rows)}
    log("")
    for line in peer_notes(engines, raws, rows):
        log(line)
    log(report.table(result))
    if result["ratios"]:
        log("")
        log(report.ratio_table(result))
    return result
