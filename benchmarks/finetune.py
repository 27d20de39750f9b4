"""LoRA training steps: tokens/s and peak memory, ventoux (bf16 base, int4 base) against transformers + peft.

    python benchmarks/finetune.py                                   # the issue's settings (slow on a CPU)
    python benchmarks/finetune.py --layers 1 --seq-len 128 --steps 2    # a smaller run with the same shape

Every variant runs in its own process on the same random 7B-shaped checkpoint (benchmarks/common.py), so
each peak resident memory (ru_maxrss) is its own: load, LoRA rank 16 on all seven block linears (alpha 32),
AdamW over the adapter only, one warm-up step, then --steps timed steps of --batch-size x --seq-len random
tokens, with activation checkpointing off and on. Ratios are against transformers + peft (bf16) with the
same checkpointing setting ("x bf16 memory": against ventoux's bf16 base). "tok/CPU s": tokens per second of
the process's user + system CPU time in the timed steps, the speed to compare on a shared machine (with
OMP_NUM_THREADS=1); "speed x" and "CPU x" are the wall-clock and CPU-time ratios.

Each step is timed on its own. A VM's speed can swing twofold from one minute to the next (seen on the Intel
Xeon VM: the same peft step at 71 and 166 tokens/s in two runs), so --rounds N measures every variant N times,
interleaved (round 1 runs all of them, then round 2, ...): "best" is the fastest step, the estimate of the
uncontended speed (as bench_linear.py takes the minimum), "median" the median step; the speed ratios use the
best, and the peak memory is the largest of the rounds.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, random_checkpoint  # noqa: E402

VARIANTS = ("ventoux-bf16", "ventoux-int4", "transformers-peft-bf16")
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ventoux_model(folder: Path, variant: str, checkpointing: bool, lean_memory: str = "default"):
    import torch

    from ventoux.api import load_model
    from ventoux.config import read_config
    from ventoux.lora import LoraConfig, add_adapter
    from ventoux.train import memory
    from ventoux.train.loop import add_checkpointing, summed_loss

    model = load_model(folder, read_config(folder), torch.bfloat16, "cpu",
                       quantize="int4" if variant == "ventoux-int4" else None)
    add_adapter(model, LoraConfig(rank=16, alpha=32))
    if checkpointing:
        add_checkpointing(model)
    # as `ventoux finetune` does before training (its --lean-memory)
    memory.before_training(variant == "ventoux-int4", {"default": None, "on": True, "off": False}[lean_memory])
    # the loss as `ventoux finetune` computes it (in chunks of rows when the logits are large)
    return model, lambda x, y: summed_loss(model, x, y.flatten()) / y.numel()


def peft_model(folder: Path, checkpointing: bool):
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PEFT_TARGETS))
    return model, lambda x, y: F.cross_entropy(model(input_ids=x).logits.float().flatten(0, 1), y.flatten())


def worker(args) -> None:
    import torch

    folder = Path(args.folder)
    if args.variant.startswith("ventoux"):
        model, forward = ventoux_model(folder, args.variant, args.ckpt, args.lean_memory)
    else:
        model, forward = peft_model(folder, args.ckpt)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    vocab = 32000

    def step():
        x = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=gen)
        loss = forward(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # first-use costs stay out of the timing
        step()
    def cpu():  # user + system time of this process: the kernel's work for fresh pages counts too
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    seconds, cpu_seconds = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), cpu()
        step()
        seconds.append(time.perf_counter() - t0)
        cpu_seconds.append(cpu() - c0)
    print(json.dumps(dict(variant=args.variant, checkpointing=args.ckpt,
                          trainable=sum(p.numel() for p in params), tokens=args.batch_size * args.seq_len,
                          seconds=seconds, cpu_seconds=cpu_seconds,
                          peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (0: time the first step too)")
    p.add_argument("--rounds", type=int, default=1, help="measure every variant this many times, interleaved")
    p.add_argument("--jobs", type=int, default=1, help="variants measured at once (side by side, on a shared "
                   "machine, they meet the same contention; each peak memory is its own process's)")
    p.add_argument("--checkpointing", choices=("off", "on", "both"), default="both",
                   help="activation checkpointing (recompute each block in backward): off, on, or a run of each")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--lean-memory", choices=("default", "on", "off"), default="default",
                   help="ventoux's allocator policy (`ventoux finetune --lean-memory`): default is on for the int4 "
                        "base, off for bf16; 'on' compares the bases at the same policy")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement (a worker process)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)  # the worker's checkpointing
    args = p.parse_args()
    if args.variant:
        return worker(args)
    folder = random_checkpoint(args.layers)
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        p.error(f"--variants {args.variants}: choose among {', '.join(VARIANTS)}")
    runs = [(v, c) for c in {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]
            for v in variants]

    def measure(run):
        variant, checkpointing = run
        log(f"{variant}, checkpointing {'on' if checkpointing else 'off'} ...")
        cmd = [sys.executable, __file__, "--variant", variant, "--folder", str(folder), "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--lean-memory", args.lean_memory]
        out = subprocess.run(cmd + (["--ckpt"] if checkpointing else []), capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(args.jobs) as pool:
        measured = list(pool.map(measure, runs * args.rounds))
    rows = [summarize([m for m in measured if (m["variant"], m["checkpointing"]) == run]) for run in runs]
    print(f"\nLoRA r16 on 7 targets, {args.layers}-layer Mistral-7B shape, batch {args.batch_size} x {args.seq_len}, "
          f"{args.rounds} round(s) of {args.steps} timed step(s) after {args.warmup} warm-up, {args.jobs} variant(s) "
          f"at a time, --lean-memory {args.lean_memory}; tokens/s of the best and the median step")
    print(f"{'variant':<24}{'ckpt':>5}{'best tok/s':>11}{'median':>8}{'tok/CPU s':>10}{'peak GiB':>10}{'speed x':>9}"
          f"{'CPU x':>7}{'memory x':>10}{'x bf16 memory':>14}")
    for r in rows:
        ref = next((x for x in rows if x["variant"] == VARIANTS[-1] and x["checkpointing"] == r["checkpointing"]), r)
        bf16 = next((x for x in rows if x["variant"] == VARIANTS[0] and x["checkpointing"] == r["checkpointing"]), r)
        print(f"{r['variant']:<24}{'on' if r['checkpointing'] else 'off':>5}{r['best']:>11.1f}{r['median']:>8.1f}"
              f"{r['per_cpu_s']:>10.1f}{r['peak_rss_gib']:>10.2f}{r['best'] / ref['best']:>9.2f}"
              f"{r['per_cpu_s'] / ref['per_cpu_s']:>7.2f}"
              f"{r['peak_rss_gib'] / ref['peak_rss_gib']:>10.2f}{r['peak_rss_gib'] / bf16['peak_rss_gib']:>14.2f}")


def summarize(measured: list[dict]) -> dict:
    """One variant's rounds: tokens/s of its fastest and median step and of its fastest step in CPU time, and
    its largest peak."""
    tokens = measured[0]["tokens"]
    seconds = [s for m in measured for s in m["seconds"]]
    cpu_seconds = [s for m in measured for s in m["cpu_seconds"]]
    return dict(variant=measured[0]["variant"], checkpointing=measured[0]["checkpointing"],
                best=tokens / min(seconds), median=tokens / statistics.median(seconds),
                per_cpu_s=tokens / min(cpu_seconds), peak_rss_gib=max(m["peak_rss_gib"] for m in measured))


if __name__ == "__main__":
    main()
