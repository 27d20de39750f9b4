"""Pretraining: AdamW, warmup + cosine, clipping, accumulation, periodic validation, checkpoints.

    pretrain(TrainArgs(config="demo.json", tokenizer="runs/demo", data=["corpus.txt"], out="runs/demo",
                       steps=3000, context=256, dropout=0.1))

The run folder (`out`) ends up holding model/ (the trained model: config.json, model.safetensors,
tokenizer.model; loads with ventoux.load and transformers), checkpoints/, data/ (the token cache),
tokenizer.model, metrics.jsonl and loss.png. `resume=True` continues from the newest checkpoint with the settings
the run started with; the result equals an uninterrupted run (same batches, same RNG, same state).
Send SIGUSR1 to redraw loss.png during a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..api import pick_device
from ..config import PRESETS, ModelConfig, read_config
from ..errors import VentouxError
from ..model import Transformer
from ..weights import find_checkpoint, load_model, save_hf
from .checkpoint import checkpoints, rng_state, save_checkpoint, set_rng_state, trainer_state
from .data import load_corpus
from .evaluate import segment_loss
from .plot import plot_run, read_metrics


@dataclass
class TrainArgs:
    config: str | None = None  # preset name, config.json, or checkpoint folder (its architecture)
    init: str | None = None  # checkpoint folder whose weights (and architecture) start the run
    tokenizer: str | None = None  # folder holding tokenizer.model (or the file)
    data: list[str] = field(default_factory=list)
    out: str = "runs/pretrain"
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    context: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.0
    clip: float = 1.0
    eval_every: int = 200
    eval_tokens: int = 1 << 20  # cap on held-out tokens scored per evaluation
    save_every: int = 200
    keep: int = 2  # checkpoints kept
    log_every: int = 10
    seed: int = 0
    val_fraction: float = 0.1
    bf16: bool | None = None  # None: on for CUDA (where it helps), off on CPU
    checkpointing: bool = False  # activation checkpointing: recompute each block in backward
    resume: bool = False
    device: str = "auto"  # auto: cuda, then mps, then cpu


def resolve_config(args: TrainArgs, vocab: int) -> ModelConfig:
    src = args.config
    if args.init:
        if not Path(args.init).is_dir():
            raise VentouxError(f"--init {args.init} is not a folder; point at a checkpoint folder "
                               "(config.json + model.safetensors)")
        cfg = read_config(Path(args.init))
    elif src is None:
        raise VentouxError("pass --config (a preset name or config.json) or --init (a checkpoint folder)")
    elif src in PRESETS:
        cfg = PRESETS[src].config
    elif Path(src).is_dir():
        cfg = read_config(Path(src))
    elif Path(src).is_file():
        try:
            cfg = ModelConfig.from_hf(json.loads(Path(src).read_text()))
        except json.JSONDecodeError as e:
            raise VentouxError(f"{src} is not valid JSON ({e.msg}); give an HF config.json") from None
    else:
        raise VentouxError(f"--config {src} is neither a preset ({', '.join(PRESETS)}) nor a file or folder")
    if cfg.vocab_size < vocab:
        raise VentouxError(f"the config's vocab_size {cfg.vocab_size} is smaller than the tokenizer's {vocab} "
                           "pieces; set vocab_size to at least that in the config")
    return cfg.replace(max_seq_len=args.context)


def init_weights(model: Transformer) -> None:
    """GPT-2 style: N(0, 0.02), residual outputs scaled by 1/sqrt(2 * layers) so depth keeps the
    residual stream's variance; PyTorch's default init trains noticeably slower here."""
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * model.config.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)


def add_dropout(model: Transformer, p: float) -> None:
    """Residual dropout (GPT-2/nanoGPT) on the embedding and every attention and feed-forward output.
    Forward hooks, not model flags: the model stays the pure inference module; the hooks do nothing
    in eval mode and are not part of the saved weights."""
    def hook(module, inputs, output):
        return F.dropout(output, p, module.training)

    for m in [model.tok_embeddings, *(b.attention for b in model.layers), *(b.feed_forward for b in model.layers)]:
        m.register_forward_hook(hook)


def add_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward instead of storing them (less memory)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(block.forward)


def schedule(args: TrainArgs):
    """Learning-rate multiplier: linear warmup, then cosine from lr down to min_lr."""
    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return (args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))) / args.lr
    return factor


def optimizer(model: Transformer, args: TrainArgs) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; norm gains do not
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def _setup(args: TrainArgs):
    """Everything that can fail on bad input runs here, before anything is written to `out`."""
    import sentencepiece as spm

    out = Path(args.out)
    found = checkpoints(out)
    if found and not args.resume:
        raise VentouxError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    last = found[-1] if found else None
    if last is not None:  # the run's own settings win: the result must equal an uninterrupted run
        saved = trainer_state(last)["args"]
        args = TrainArgs(**{**saved, "out": args.out, "resume": True})
    if args.tokenizer is None:
        raise VentouxError("pass --tokenizer DIR (a folder with tokenizer.model; see `ventoux train-tokenizer`)")
    tok = Path(args.tokenizer)
    tok = tok / "tokenizer.model" if tok.is_dir() else tok
    if not tok.is_file():
        raise VentouxError(f"{tok} does not exist; train one with `ventoux train-tokenizer` or fix --tokenizer")
    try:
        vocab = spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size()
    except (RuntimeError, OSError):
        raise VentouxError(f"{tok} is not a SentencePiece model; train one with `ventoux train-tokenizer`") from None
    cfg = read_config(last) if last is not None else resolve_config(args, vocab)
    if args.init and last is None:
        find_checkpoint(args.init)  # its weights exist, before anything is written
    device = pick_device(args.device)
    corpus = load_corpus(args.data, tok, args.val_fraction, out / "data", args.context)
    return args, out, tok, cfg, corpus, last, device


def pretrain(args: TrainArgs, progress: bool = True) -> Path:
    """Train (or resume) the run described by `args`; return the final model's folder (RUN/model)."""
    from tqdm import tqdm

    replot = _on_sigusr1()
    args, out, tok, cfg, corpus, last, device = _setup(args)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    torch.manual_seed(args.seed)
    if last is not None or args.init:
        model = load_model(last or Path(args.init), cfg, torch.float32, device)
    else:
        model = Transformer(cfg).to(device)
        init_weights(model)
    model.train()
    if args.dropout > 0:
        add_dropout(model, args.dropout)
    if args.checkpointing:
        add_checkpointing(model)
    opt = optimizer(model, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(args))
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if last is not None:
        trainer = trainer_state(last)
        opt.load_state_dict(trainer["optimizer"])
        sched.load_state_dict(trainer["scheduler"])
        set_rng_state(trainer["rng"])
        state = trainer["clock"]
    out.mkdir(parents=True, exist_ok=True)
    if tok.resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tok, out / "tokenizer.model")
    metrics = Metrics(out / "metrics.jsonl", after_step=state["step"])

    def save(step):
        trainer = dict(args=dataclasses.asdict(args), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                       rng=rng_state(), clock=dict(state))
        save_checkpoint(out, step, model, out / "tokenizer.model", trainer, args.keep)

    bar = tqdm(total=args.steps, initial=state["step"], disable=not progress, unit="step", dynamic_ncols=True)
    tokens_per_step = args.batch_size * args.grad_accum * args.context
    losses, t0, rate = [], time.perf_counter(), None
    while state["step"] < args.steps:
        step = state["step"]
        for micro in range(args.grad_accum):
            x, y = corpus.batch(args.seed, step, micro, args.batch_size, args.context)  # (B, T) each
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x.to(device))  # (B, T, vocab), float32
            loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()) / args.grad_accum
            loss.backward()
            losses.append(loss.item() * args.grad_accum)
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        state.update(step=step + 1, tokens=state["tokens"] + tokens_per_step, elapsed_s=state["elapsed_s"] + now - t0)
        rate = tokens_per_step / (now - t0) if rate is None else 0.9 * rate + 0.1 * tokens_per_step / (now - t0)
        t0 = now
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}")
        if step % args.log_every == 0 or step == args.steps:
            metrics.write(step=step, loss=sum(losses) / len(losses), lr=sched.get_last_lr()[0],
                          tokens=state["tokens"], tokens_per_s=round(rate), elapsed_s=round(state["elapsed_s"], 1))
            losses = []
        if len(corpus.val) and (step % args.eval_every == 0 or step == args.steps):
            row = validate(model, corpus, args)
            metrics.write(step=step, **row)
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
            t0 = time.perf_counter()  # evaluation time is not training throughput
        if step % args.save_every == 0 or step == args.steps:
            save(step)
            t0 = time.perf_counter()
        if replot.is_set():
            replot.clear()
            _plot(out, bar)
    bar.close()
    final = save_hf(model, out / "model", dtype=torch.float32, extra_files=[out / "tokenizer.model"], overwrite=True)
    _plot(out, bar)
    return final


def validate(model: Transformer, corpus, args: TrainArgs) -> dict:
    """Held-out loss per token; per character too when the whole split was scored."""
    total, n = segment_loss(model, corpus.val, args.context, args.batch_size, args.eval_tokens)
    row = dict(val_loss=total / n)
    if n == len(corpus.val) - 1:
        row["val_nats_per_char"] = total / corpus.val_chars
    return row


def _plot(out: Path, bar) -> None:
    try:
        plot_run(out)
    except VentouxError as e:  # matplotlib is optional (the [train] extra): the run itself succeeded
        bar.write(f"no loss.png: {e}")


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
