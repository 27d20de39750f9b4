"""Microbenchmark: one (M x 4096) @ (4096 x 14336) product per weight format, in GB/s of weights read
(what bounds decoding) and GFLOP/s (what bounds prefill).

    python benchmarks/bench_linear.py                  # batch 1, 2 threads
    python benchmarks/bench_linear.py --m 128 --only bfloat16,int4   # a prefill-sized product
    python benchmarks/bench_linear.py --isa avx2           # ventoux's AVX2 kernels (VENTOUX_CPU_ISA)
    python benchmarks/bench_linear.py --hot --n 512 --only int4   # the compute ceiling: weights kept in L2

Copies of each weight, over twice the size of the last-level cache in all, are rotated so that no product
finds its weights in the cache; GB/s is the bytes of one weight (quantized: with its scales and zeros) over the
median (and best) time of one product: the figure a memory-bound decode step is held to. With --hot each weight
is read again and again, so it stays in the caches: the kernel's arithmetic ceiling, which should be well above
the DRAM figure for decode to stay bandwidth-bound on a machine with faster memory (issue 12: at least 2.5x).
--hot times the product at n/4, n/2, 3n/4 and n rows, call by call in turn (300 rounds unless --repeats says),
fits a line to the fastest time of each size against the bytes read, and prints its slope as the marginal rate
(the rate the weights stream at, beyond the fixed cost of a call: Python, the activations' quantization,
starting the threads), the fixed cost, and the marginal rate over the DRAM figure (its fastest product) of the
same format at 4096 x 14336, measured in the same run. Fastest, not median: the speed of a core shared with
another VM drifts for seconds at a time (on this project's Xeon VM, hot products ran up to 2x slower for a
whole run), and the fastest calls are the ones that had the core to themselves.
Pick --n so that each thread's share of the weights stays well inside its L2 (2 threads, 2 MB L2s: 128 for
bf16, 256 for int8, 512 for int4; halve them where a core's L2 is 1 MB, as on AMD Zen 4 and 5): a share near
the L2's size loses lines to the Python between calls, and one past it streams from L3, whose bandwidth then
bounds the rate, not the kernel.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ventoux import cpu_kernels
from ventoux.fastlinear import HalfLinear
from ventoux.qlinear import Int4Linear, Int8Linear


def timed(fn, inputs, copies, repeats):
    """(median, min) seconds of fn(x, copy) over `repeats` rounds, rotating the copies. On a shared machine the
    minimum is the better estimate of the uncontended time."""
    for c in copies[:2]:
        fn(inputs, c)  # warm up (and build any lazy kernel)
    times = []
    for _ in range(repeats):
        for c in copies:
            t = time.perf_counter()
            fn(inputs, c)
            times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=1, help="rows of the activation (1 = decode)")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--rotate-mb", type=float, default=None,
                    help="rotate through at least this many MB of weight copies (default: twice the last-level "
                         "cache the OS reports, at least 640 MB)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="rounds over the copies (default 5; --hot: 300 calls of each size, as one is short)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated parts of the row names to run (default: all)")
    ap.add_argument("--fallback", action="store_true", help="also time the (slow) dequantize-and-matmul fallback")
    ap.add_argument("--hot", action="store_true", help="one copy, read again and again: weights hot in cache")
    ap.add_argument("--isa", choices=["avx512", "avx2", "none"], default=None,
                    help="ventoux's kernel build (default: the best this CPU runs)")
    args = ap.parse_args()
    if args.isa:
        os.environ[cpu_kernels.ISA_VARIABLE] = args.isa
    if args.repeats is None:
        args.repeats = 300 if args.hot else 5
    if args.rotate_mb is None:
        args.rotate_mb = max(640, 2 * last_level_cache() / 1e6)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k, n = args.k, args.n
    master = torch.randn(n, k) / k**0.5
    full = torch.randn(DRAM_N, k) / k**0.5 if args.hot else None  # the DRAM figure's weight

    rows = []  # (name, build one weight copy from a float32 (n, k) weight, run(x, copy), activation dtype)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        rows.append((f"F.linear {str(dt)[6:]}", lambda w, dt=dt: w.to(dt), F.linear, dt))
    if cpu_kernels.library() is not None:  # ours (fastlinear.HalfLinear), float32 activations
        for dt in (torch.bfloat16, torch.float16):
            rows.append((f"half_gemv {str(dt)[6:]}", lambda w, dt=dt: w.to(dt), cpu_kernels.half_gemv, torch.float32))
        # what a bf16 model's decode runs: HalfLinear on bf16 activations (bf16 in and out; vdpbf16ps where the CPU
        # has AVX512_BF16)
        rows.append(("HalfLinear bfloat16", lambda w: HalfLinear(_linear(w.to(torch.bfloat16))), lambda x, mod: mod(x),
                     torch.bfloat16))
        for dt in (torch.bfloat16, torch.float16):  # prefill-sized products (--m 128): 16-bit activations
            rows.append((f"half_gemm {str(dt)[6:]}", lambda w, dt=dt: w.to(dt), cpu_kernels.half_gemm, dt))
    schemes = [("int8", lambda w, kernel: Int8Linear.from_float(w, kernel=kernel), Int8Linear),
               ("int8-g32", lambda w, kernel: Int8Linear.from_float(w, 32, kernel=kernel), Int8Linear)]
    for g in (32, 64, 128):
        schemes.append((f"int4-g{g}", lambda w, kernel, g=g: Int4Linear.from_float(w, g, kernel=kernel), Int4Linear))
    for name, build, cls in schemes:
        for kernel in cls.kernels("cpu"):
            if kernel == "int8pack" and name != "int8":
                continue  # PyTorch's int8 kernel takes one scale a row, not int8-g32's groups
            if kernel != "fallback" or args.fallback:
                rows.append((f"{name} {kernel}", lambda w, build=build, kernel=kernel: build(w, kernel),
                             lambda x, mod: mod(x), torch.bfloat16))
    only = set(args.only.split(",")) if args.only else None
    where = "hot in cache" if args.hot else f"from memory ({args.rotate_mb:.0f} MB of copies)"
    print(f"{args.m}x{k} @ {k}x{n}, {torch.get_num_threads()} threads, torch {torch.__version__}, ventoux kernels: "
          f"{cpu_kernels.isa()}, weights {where}")
    print(f"{'format':24s} {'MB':>7s} {'median':>8s} {'GB/s':>6s} {'best':>8s} {'GB/s':>6s} {'GFLOP/s':>8s}"
          + (f" {'marginal GB/s':>13s} {'fixed us':>8s} {'DRAM GB/s':>9s} {'x DRAM':>6s}" if args.hot else ""))
    with torch.inference_mode():
        for name, build, run, dt in rows:
            if only and not any(o in name for o in only):
                continue
            first = build(master)
            nbytes = _nbytes(first)
            x = torch.randn(args.m, k).to(dt)
            if args.hot:  # the product at n/4, n/2, 3n/4 and n rows, call by call in turn
                sizes = [first] + [build(master[: n * i // 4 // 16 * 16]) for i in (3, 2, 1)]
                times = timed_in_turn(run, x, sizes, args.repeats)
                med, best = statistics.median(times[0]), min(times[0])
            else:
                med, best = timed(run, x, copies_of(first, args.rotate_mb), args.repeats)
            line = (f"{name:24s} {nbytes / 1e6:7.1f} {med * 1e3:8.3f} {nbytes / med / 1e9:6.1f} {best * 1e3:8.3f} "
                    f"{nbytes / best / 1e9:6.1f} {2 * args.m * k * n / best / 1e9:8.1f}")
            if args.hot:
                rate, fixed = streaming_rate([_nbytes(m) for m in sizes], [min(t) for t in times])
                big = build(full)
                dram = _nbytes(big) / timed(run, x, copies_of(big, args.rotate_mb), DRAM_REPEATS)[1]
                line += (f" {rate / 1e9:13.1f} {fixed * 1e6:8.1f} {dram / 1e9:9.1f} {rate / dram:6.2f}"
                         if rate else f" {'-':>13s} {'-':>8s} {dram / 1e9:9.1f} {'-':>6s}")
                del big, sizes
            print(line, flush=True)
            del first


DRAM_N = 14336  # the outputs of --hot's DRAM figure: a Mistral 7B feed-forward matrix
DRAM_REPEATS = 5  # rounds over its copies (each round reads the rotated copies once)


def copies_of(mod, rotate_mb: float) -> list:
    """mod and copies of it, over rotate_mb MB in all: read in turn, no product finds its weights in the cache."""
    return [mod] + [copy.deepcopy(mod) for _ in range(math.ceil(rotate_mb * 1e6 / _nbytes(mod)) - 1)]


def timed_in_turn(fn, inputs, mods, repeats: int) -> list[list[float]]:
    """Each module's times of fn(inputs, module) over `repeats` rounds, one call of each a round: on a shared
    machine whose speed drifts, each round sees all of them in the same state."""
    for mod in mods:
        fn(inputs, mod)  # warm up
    times = [[] for _ in mods]
    for _ in range(repeats):
        for mod, out in zip(mods, times):
            t = time.perf_counter()
            fn(inputs, mod)
            out.append(time.perf_counter() - t)
    return times


def streaming_rate(nbytes: list[int], times: list[float]) -> tuple[float | None, float]:
    """The rate (bytes/s) at which a hot product reads its weights beyond its fixed cost a call, and that cost (s):
    the slope and intercept of a line fit to the times against the bytes read; None where noise made the
    larger products no slower. A decode step's weights are big enough (58 MB for a Mistral 7B feed-forward matrix
    in int8) that this rate, not the call's, is what faster memory would meet."""
    slope, intercept = statistics.linear_regression(nbytes, times)
    return (1 / slope if slope > 0 else None), intercept


def last_level_cache() -> int:
    """Bytes of the largest CPU cache the OS reports (0 if none). A VM may report more than the chip holds: the
    Sapphire Rapids VM of issue 12 reports a 480 MiB L3, yet a 16.8 MB bf16 weight read from rotated copies
    already reads at the DRAM rate with 134 MB of copies (13.2 GB/s, 1 thread; 27.9 with 50 MB or one copy)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            pass
    return max(sizes, default=0)


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return sum(t.numel() * t.element_size() for t in [*obj.parameters(), *obj.buffers()])


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return linear


if __name__ == "__main__":
    main()
