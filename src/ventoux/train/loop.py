"""The one training loop of pretraining and fine-tuning: AdamW over the trainable tensors only, warmup +
cosine, clipping, accumulation, periodic validation, metrics.jsonl, atomic checkpoints, exact resume.

    job = Job(model, batch=lambda step, micro: (x, y, n_tokens), validate=lambda: {"val_loss": ...},
              save=lambda folder, extra_files: ...)
    train(job, args, out=Path("runs/x"), last=None, device=torch.device("cpu"), progress=True)  # last: to resume

A pretraining job trains every parameter and checkpoints the whole model (pretrain.py); a fine-tuning
job trains the adapter and checkpoints only the adapter (finetune.py). Batches are a pure function of
(step, micro), and a checkpoint holds the optimizer, scheduler, RNG and clock, so a resumed run ends
exactly where an uninterrupted one does. Targets of -100 carry no loss (prompt turns, padding).
Send SIGUSR1 to redraw loss.png during a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import finite_number
from ..errors import VentouxError
from .checkpoint import checkpoints, rng_state, save_checkpoint, set_rng_state, trainer_state
from .plot import plot_run, read_metrics


@dataclass
class LoopArgs:
    """The loop's settings, shared by pretrain (TrainArgs) and finetune (FinetuneArgs)."""
    out: str = "runs/train"
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int = 200
    save_every: int = 200
    keep: int = 2  # checkpoints kept
    log_every: int = 10
    seed: int = 0
    bf16: bool | None = None  # None: on for CUDA (where it helps), off on CPU
    checkpointing: bool = False  # activation checkpointing: recompute each block in backward
    resume: bool = False
    device: str = "auto"  # auto: cuda, then mps, then cpu

    FLAGS: ClassVar[dict[str, str]] = {}  # settings whose CLI flag is not --the-name (finetune: --accumulate)


def flag(args, name: str) -> str:
    """The command-line flag of a setting, as the user typed it."""
    return args.FLAGS.get(name) or "--" + name.replace("_", "-")


def require(args, name: str, ok: bool, want: str) -> None:
    """A one-line error naming the flag unless `ok`."""
    if not ok:
        raise VentouxError(f"{flag(args, name)} must be {want}, not {getattr(args, name)!r}")


def check_args(args: LoopArgs, counts: tuple[str, ...] = (), fractions: tuple[str, ...] = ()) -> None:
    """Refuse settings the loop cannot train with, before anything is loaded or written. Floats must be
    finite: NaN passes no comparison and would train NaN weights without a word. `counts`: the caller's
    integer settings that must be at least 1; `fractions`: its settings in [0, 1)."""
    for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every", "keep", *counts):
        require(args, name, getattr(args, name) >= 1, "at least 1")
    if args.steps is not None:  # finetune: None counts the steps from --epochs
        require(args, "steps", args.steps >= 1, "at least 1")
    require(args, "warmup", args.warmup >= 0, "at least 0")
    require(args, "seed", args.seed >= 0, "at least 0")
    require(args, "lr", finite_number(args.lr) and args.lr > 0, "a positive number, e.g. 1e-4")
    for name in ("min_lr", "weight_decay", "clip"):
        require(args, name, finite_number(getattr(args, name)) and getattr(args, name) >= 0, "a finite number >= 0")
    for name in fractions:
        require(args, name, finite_number(getattr(args, name)) and 0 <= getattr(args, name) < 1, "in [0, 1)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise VentouxError(f"--out {out} is a file; --out must be a folder (the run folder): choose another path")


# float32 logits per chunk of summed_loss (16 MB): rows = LOGIT_CHUNK // vocab. Against 64 MB chunks, on the
# 4-layer 7B-shaped LoRA step (2048 tokens, AMD EPYC, 2 threads): the int4 base's peak 2.20 -> 2.13 GiB; the
# loss's time is the same for a bf16 head (2.8 s) and 3.5 -> 5.2 s for an int8 one, whose backward dequantizes
# the whole head once a chunk (estimated at 1% of a 32-layer model's step).
LOGIT_CHUNK = 2**22


def summed_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the model's next-token logits for tokens x (B, T) against targets y (B*T,).

    The float32 logits, their log-softmax and their gradient are 3 x rows x vocab x 4 bytes (1.5 GiB for
    4 x 512 tokens and a 32K vocabulary): more than a LoRA's activations. When they exceed a chunk, the
    head and the loss run a chunk of rows at a time, so only one chunk's exist at once; the loss is the same
    sum, in a different order. A frozen head (LoRA) gets each chunk's gradient to the hidden states right away,
    in the forward (as Liger's fused linear cross-entropy); a trained one recomputes each chunk in backward
    (as torchtune's chunked cross-entropy), which costs one more pass of the head.
    """
    vocab = model.config.vocab_size
    rows = max(1, LOGIT_CHUNK // vocab)
    if x.numel() <= rows:
        return F.cross_entropy(model(x).flatten(0, 1), y, ignore_index=-100, reduction="sum")
    hidden = model.hidden_states(x).flatten(0, 1)  # (B*T, dim)

    def chunk_loss(h, target):
        return F.cross_entropy(model.logits(h), target, ignore_index=-100, reduction="sum")

    head = [*model.norm.parameters(), *model.output.parameters()]
    if torch.is_grad_enabled() and not any(p.requires_grad for p in head):
        return _GradientInForward.apply(hidden, chunk_loss, y, rows)
    return sum(torch.utils.checkpoint.checkpoint(chunk_loss, hidden[i: i + rows], y[i: i + rows], use_reentrant=False)
               for i in range(0, hidden.shape[0], rows))


class _GradientInForward(torch.autograd.Function):
    """The sum of chunk_loss over chunks of rows, each chunk's gradient to its rows taken in the forward and
    kept (rows x dim, 16 MB for 2048 tokens of 4096 in bf16) until backward scales it by the loss's gradient."""

    @staticmethod
    def forward(ctx, hidden, chunk_loss, y, rows):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for i in range(0, hidden.shape[0], rows):
            h = hidden[i: i + rows].detach().requires_grad_(grad is not None)
            with torch.enable_grad():
                loss = chunk_loss(h, y[i: i + rows])
            if grad is not None:
                grad[i: i + rows] = torch.autograd.grad(loss, h)[0]
            total += loss.detach()
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx, g):
        return None if ctx.grad is None else ctx.grad * g, None, None, None


# Settings a resumed run may change: they decide what is logged, kept and where it runs, not the weights.
FREE_ON_RESUME = {"out", "resume", "device", "keep", "log_every", "eval_every", "save_every", "eval_tokens",
                  "lean_memory"}


@dataclass
class Job:
    model: nn.Module  # its parameters with requires_grad are trained; the others stay frozen
    batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor, int]]  # (step, micro) -> inputs, targets, tokens
    save: Callable[[Path, list[Path]], Path]  # write a checkpoint folder (atomically) with these extra files
    validate: Callable[[], dict] | None = None  # held-out metrics, e.g. {"val_loss": 2.1}


def resumed_args(args, saved: dict, given: set[str], done: int):
    """The settings of a resumed run: the saved ones, plus the given flags that may change (FREE_ON_RESUME)
    and a new --steps (the schedule becomes that of a run of the new length). Any other given flag that
    differs from the saved run is refused, each one named."""
    conflicts = []
    for name in sorted(given - FREE_ON_RESUME - {"steps"}):
        mine, theirs = getattr(args, name), saved.get(name)
        if _normal(mine) != _normal(theirs):
            conflicts.append(f"{flag(args, name)} {_show(mine)} (the run has {_show(theirs)})")
    if conflicts:
        raise VentouxError(f"--resume continues {args.out} with its own settings, but these flags differ: "
                           f"{'; '.join(conflicts)}; drop them, or start a new run with another --out")
    keep = {name: getattr(args, name) for name in given & FREE_ON_RESUME}
    steps = args.steps if "steps" in given else saved["steps"]
    if steps <= done:
        hint = "" if "steps" in given else f"; pass --steps N (more than {done}) to train it further"
        raise VentouxError(f"the run in {args.out} is at step {done}; --steps {steps} leaves nothing to train{hint}")
    return type(args)(**{**saved, **keep, "steps": steps, "out": args.out, "resume": True})


def resume_point(args, given: set[str]):
    """(settings, newest checkpoint or None) of the run in args.out: a run there needs --resume, --resume
    needs a run there (a mistyped --out must not start a new run), and a resumed run keeps its settings."""
    out = Path(args.out)
    found = checkpoints(out)
    if found and not args.resume:
        raise VentouxError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if args.resume and not found:
        raise VentouxError(f"--resume: {out} holds no checkpoint to resume; check --out, or drop --resume "
                           "to start a new run")
    if not found:
        return args, None
    trainer = trainer_state(found[-1])
    return resumed_args(args, trainer["args"], given, trainer["clock"]["step"]), found[-1]


def _normal(value):
    """Paths compare by where they point; lists element by element."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, str) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def given_fields(args) -> set[str]:
    """Without an explicit list of the flags a caller set: the fields that differ from the defaults."""
    default = type(args)()
    return {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != getattr(default, f.name)}


def add_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them (less memory)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(block.forward)


def schedule(args: LoopArgs):
    """Learning-rate multiplier: linear warmup, then cosine from lr down to min_lr at args.steps."""
    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)  # in [0, 1]: a run never passes its steps
        return (args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))) / args.lr
    return factor


def optimizer(model: nn.Module, args: LoopArgs) -> torch.optim.AdamW:
    """AdamW over the trainable tensors only: matrices decay, norm gains do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise VentouxError("the model has no trainable parameters")
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95))


def train(job: Job, args: LoopArgs, out: Path, last: Path | None, device: torch.device, progress: bool) -> None:
    """Run the steps left until args.steps; checkpoints go to out/checkpoints, metrics to out/metrics.jsonl."""
    from tqdm import tqdm

    replot = _on_sigusr1()
    model = job.model
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(model, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(args))
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if last is not None:
        trainer = trainer_state(last)
        opt.load_state_dict(trainer["optimizer"])
        sched.load_state_dict(trainer["scheduler"])
        set_rng_state(trainer["rng"])
        state = trainer["clock"]
    metrics = Metrics(out / "metrics.jsonl", after_step=state["step"])

    def save(step):
        trainer = dict(args=dataclasses.asdict(args), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                       rng=rng_state(), clock=dict(state))
        save_checkpoint(out, step, job.save, trainer, args.keep)

    bar = tqdm(total=args.steps, initial=state["step"], disable=not progress, unit="step", dynamic_ncols=True)
    losses, t0, rate = [], time.perf_counter(), None
    while state["step"] < args.steps:
        step, step_loss = state["step"], 0.0
        micros = [job.batch(step, micro) for micro in range(args.grad_accum)]  # (x, y, real tokens), (B, T) each
        # the step's loss is the mean over all its targets, however they fall into micro-batches (a short one's
        # tokens weigh what a long one's do); no target: no loss, no gradient
        targets = max(1, sum(int((y != -100).sum()) for _, y, _ in micros))
        for x, y, _ in micros:
            y = y.to(device).flatten()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = summed_loss(model, x.to(device), y) / targets
            loss.backward()
            step_loss += loss.item()
            if not math.isfinite(step_loss):  # diverged: every later step and the weights written would be NaN
                bar.close()
                raise VentouxError(f"the training loss became {step_loss} at step {step + 1} (the run diverged; no "
                                   f"model written): start a new run, another --out, with a lower --lr than {args.lr}")
        losses.append(step_loss)
        tokens = sum(n for _, _, n in micros)
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        state.update(step=step + 1, tokens=state["tokens"] + tokens, elapsed_s=state["elapsed_s"] + now - t0)
        rate = tokens / (now - t0) if rate is None else 0.9 * rate + 0.1 * tokens / (now - t0)
        t0 = now
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}")
        if step % args.log_every == 0 or step == args.steps:
            metrics.write(step=step, loss=sum(losses) / len(losses), lr=sched.get_last_lr()[0],
                          tokens=state["tokens"], tokens_per_s=round(rate), elapsed_s=round(state["elapsed_s"], 1))
            losses = []
        if job.validate is not None and (step % args.eval_every == 0 or step == args.steps):
            row = job.validate()
            metrics.write(step=step, **row)
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
            t0 = time.perf_counter()  # evaluation time is not training throughput
        if step % args.save_every == 0 or step == args.steps:
            save(step)
            t0 = time.perf_counter()
        if replot.is_set():
            replot.clear()
            draw_plot(out, bar.write)
    bar.close()


def draw_plot(out: Path, say=None) -> None:
    """Draw out/loss.png, or say why it cannot be drawn (`say`: a line's printer; stderr by default)."""
    try:
        plot_run(out)
    except VentouxError as e:  # matplotlib is optional (the [train] extra): the run itself succeeded
        (say or (lambda line: print(line, file=sys.stderr)))(f"no loss.png: {e}")


class Metrics:
    """metrics.jsonl, one JSON object per line; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, after_step: int):
        self.path = path
        kept = [r for r in read_metrics(path) if r["step"] <= after_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _on_sigusr1() -> threading.Event:
    event = threading.Event()
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda *_: event.set())
    return event
