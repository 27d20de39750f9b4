"""A/B of the decode products' C kernels (vx_int4_gemv, vx_int8_gemv, vx_half_gemv) against those of a git
revision, called straight through ctypes, with the weights hot in the caches: the kernels' arithmetic, without the
Python a module call adds (about 25 us a call on this project's 2-core VM, a third of a hot 2.6 MB product). With
--copies, several copies of each weight are read in turn: enough of them (over twice the last-level cache) and every
call reads its weights from memory, the rate a decode step is held to.

    .venv/bin/python benchmarks/kernel_ab.py --base HEAD~1
    .venv/bin/python benchmarks/kernel_ab.py --base 6a04a12 --formats int4 --rows 1,2,4 --n 512,1024
    .venv/bin/python benchmarks/kernel_ab.py --base ff2f9ec --formats bf16,fp16,int8 --n 14336 --copies 6 --rounds 10

bf16 is the decode path of a bf16 model (bf16 weights, activations and outputs); bf16-f32 and fp16 take float32
activations (bf16-f32: the path of a bf16 model on CPUs without AVX512_BF16, which run the float32 product).

Each round calls the base's kernel and this tree's in turn, on the same weights and activations; the medians over
the rounds give each side's GB/s (weights with their scales and zeros over the time of a call). Both must give
the same bits unless the change means to alter the arithmetic ("same bits" says). ventoux against itself: no peer
runs here (benchmarks/bench_linear.py and decode.py compare with PyTorch and llama.cpp).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ventoux import cpu_kernels
from ventoux.qlinear import DEFAULT_GROUP_SIZE, INT6_GROUP_SIZE, quantize_int4, quantize_int6, quantize_int8

ROOT = Path(__file__).resolve().parent.parent


def build_at(rev: str, isa: str, folder: Path):
    """The kernel library of one build (cpu_kernels.SOURCES) as it was at git revision rev."""
    csrc = cpu_kernels.CSRC.relative_to(ROOT)
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{csrc}"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        (folder / name).write_bytes(subprocess.run(["git", "show", f"{rev}:{csrc}/{name}"], cwd=ROOT, check=True,
                                                   capture_output=True).stdout)
    out = folder / "base.so"
    subprocess.run([cpu_kernels.compiler(), *cpu_kernels.FLAGS, *cpu_kernels.isa_flags(isa), "-o", str(out),
                    str(folder / cpu_kernels.SOURCES[isa].name)], check=True)
    lib, typed = ctypes.CDLL(str(out)), cpu_kernels.build(isa)
    for name in PRODUCTS:  # typed as this tree's; an older revision may lack some (int6 before it existed)
        if hasattr(lib, name):
            getattr(lib, name).argtypes, getattr(lib, name).restype = getattr(typed, name).argtypes, None
    return lib


PRODUCTS = ("vx_int8_gemv", "vx_int6_gemv", "vx_int4_gemv", "vx_half_gemv")


HALF = {"bf16": torch.bfloat16, "bf16-f32": torch.bfloat16, "fp16": torch.float16}  # 16-bit weights


def product(lib, fmt: str, x: torch.Tensor, tiles: tuple, group: int, n: int, y: torch.Tensor) -> None:
    """One call of the format's kernel: y = x @ w^T (x and y bfloat16 for bf16, else float32)."""
    threads, bf16_io = torch.get_num_threads(), int(fmt == "bf16")
    if fmt in HALF:
        lib.vx_half_gemv(x.data_ptr(), *x.shape, tiles[0].data_ptr(), int(HALF[fmt] == torch.bfloat16), n,
                         y.data_ptr(), threads, bf16_io)
        return
    gemv = getattr(lib, f"vx_{fmt[:4]}_gemv")
    gemv(x.data_ptr(), *x.shape, *(t.data_ptr() for t in tiles), group, n, y.data_ptr(), threads, 0)


def tiles_of(fmt: str, w: torch.Tensor) -> tuple[tuple, int]:
    """The format's tiled tensors (cpu_kernels.tile_int4 / tile_int8) of w, and its group size; a 16-bit format's
    weight as it is (no group)."""
    if fmt in HALF:
        return (w.to(HALF[fmt]),), 0
    default = {"int4": DEFAULT_GROUP_SIZE, "int6": INT6_GROUP_SIZE}.get(fmt[:4], w.shape[1])
    group = int(fmt.partition("-g")[2] or default)
    if fmt.startswith("int4"):
        return cpu_kernels.tile_int4(*quantize_int4(w, group)), group
    if fmt.startswith("int6"):
        return cpu_kernels.tile_int6(*quantize_int6(w, group)), group
    return cpu_kernels.tile_int8(*quantize_int8(w, None if group == w.shape[1] else group)), group


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="HEAD", help="the git revision to compare with (default: HEAD)")
    p.add_argument("--formats", default="int4,int8,int8-g32",
                   help="comma-separated: int4[-gG], int6[-gG], int8[-gG], bf16, bf16-f32, fp16")
    p.add_argument("--rows", default="1,2,4", help="activation rows (decode: up to 8)")
    p.add_argument("--n", default="1024", help="outputs (pick a size that fits the L2 caches: 1024 int4, 512 int8)")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--copies", type=int, default=1,
                   help="copies of each weight read in turn (1: hot in cache; over twice the last-level cache: memory)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", choices=["avx512", "avx2"], default=cpu_kernels.isa())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sides = {args.base: build_at(args.base, args.isa, Path(tmp)), "this tree": cpu_kernels.build(args.isa)}
        where = ("one copy of each weight (hot in cache where it fits)" if args.copies == 1
                 else f"{args.copies} copies of each weight read in turn")
        print(f"{cpu_kernels.cpu_model()}, {args.threads} threads, {args.isa} build, {where}")
        print(f"{'format':10s} {'rows':>4s} {'n':>6s} {'MB':>6s} " + " ".join(f"{s[:12]:>12s}" for s in sides)
              + f" {'change':>7s} {'same bits':>9s}   (GB/s, medians of {args.rounds * args.copies} calls)")
        gen = torch.Generator().manual_seed(0)
        for fmt in args.formats.split(","):
            for n in map(int, args.n.split(",")):
                copies = [tiles_of(fmt, torch.randn(n, args.k, generator=gen) / args.k**0.5)
                          for _ in range(args.copies)]
                group = copies[0][1]
                nbytes = sum(t.numel() * t.element_size() for t in copies[0][0])
                dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
                for m in map(int, args.rows.split(",")):
                    x = torch.randn(m, args.k, generator=gen).to(dtype)
                    runs = {s: lib for s, lib in sides.items() if fmt in HALF or hasattr(lib, f"vx_{fmt[:4]}_gemv")}
                    ys = {s: torch.empty(m, n, dtype=dtype) for s in runs}
                    times = {s: [] for s in runs}
                    for _ in range(args.rounds):
                        for s, lib in runs.items():
                            for tiles, _ in copies:
                                t = time.perf_counter()
                                product(lib, fmt, x, tiles, group, n, ys[s])
                                times[s].append(time.perf_counter() - t)
                    rates = [nbytes / statistics.median(times[s]) / 1e9 if s in runs else None for s in sides]
                    cells = " ".join(f"{r:12.1f}" if r else f"{'-':>12s}" for r in rates)  # -: the base lacks it
                    both = None not in rates
                    change, same = (rates[1] / rates[0] - 1, torch.equal(*ys.values())) if both else (0, True)
                    print(f"{fmt:10s} {m:4d} {n:6d} {nbytes / 1e6:6.2f} {cells} {change:+7.1%} "
                          f"{'yes' if same else 'NO':>9s}", flush=True)


if __name__ == "__main__":
    main()
