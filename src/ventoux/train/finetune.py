"""LoRA fine-tuning on the shared loop: a frozen base (float or int8/int4), an adapter trained on
mistral-finetune data, checkpoints of the adapter only, the final adapter in PEFT's format.

    adapter = finetune(FinetuneArgs(model="runs/demo/model", data=["train.jsonl"], eval_data=["eval.jsonl"],
                                    out="runs/chat", rank=16, alpha=32, epochs=3, lr=1e-3))
    llm = ventoux.load("runs/demo/model", lora=adapter)

The run folder holds adapter/ (adapter_config.json + adapter_model.safetensors, as PEFT writes them),
checkpoints/step-N/ (the adapter's tensors under ventoux's names + trainer.pt), metrics.jsonl and
loss.png. Bad data lines are all reported (file:line) before anything is loaded or written; see
sft_data.py for the formats. `resume=True` ends with exactly the adapter of an uninterrupted run; it
refuses data that changed since the run started (a fingerprint in each checkpoint's adapter file).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import finite_number
from ..errors import VentouxError
from . import memory
from .loop import Job, LoopArgs, add_checkpointing, check_args, draw_plot, given_fields, require, resume_point, train
from .sft_data import SFTData, collate

ADAPTER_STATE = "adapter_state.safetensors"  # a checkpoint's adapter tensors, under the model's own names


@dataclass
class FinetuneArgs(LoopArgs):
    model: str | None = None  # checkpoint folder or HF repo id (None: the shipped demo model)
    data: list[str] = field(default_factory=list)
    eval_data: list[str] = field(default_factory=list)
    out: str = "runs/finetune"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    quantize: str | None = None  # int8, int4, ...: the frozen base quantized (QLoRA-style)
    lean_memory: bool | None = None  # each large tensor its own mapping (memory.py); None: on with quantize
    dtype: str | None = None  # the base's dtype; None: float32 on a CPU, bfloat16 elsewhere
    seq_len: int = 2048  # the longest sample accepted
    steps: int | None = None  # None: from epochs
    epochs: float | None = None  # None with steps None: one epoch
    batch_size: int = 8
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup: int = 10
    weight_decay: float = 0.0  # decay would shrink A even where no token trains
    eval_every: int = 100
    save_every: int = 100

    FLAGS: ClassVar[dict[str, str]] = {"grad_accum": "--accumulate"}


def check_data(args: FinetuneArgs, tokenizer) -> tuple[SFTData, SFTData | None, str]:
    """Read and encode the training and evaluation data; (train, eval, report). The report lists every bad
    line of both, then a summary; the caller decides whether bad lines stop it."""
    if not args.data:
        raise VentouxError("no training data: pass --data FILE.jsonl ({\"messages\": [...]} or {\"text\": ...})")
    data = SFTData.load(args.data, tokenizer, args.seq_len)
    evals = SFTData.load(args.eval_data, tokenizer, args.seq_len) if args.eval_data else None
    lines = [data.report(args.batch_size, args.grad_accum, args.seed)]
    if evals is not None:
        lines.append("evaluation data: " + evals.report(args.batch_size, 1, seed=None))  # eval_loss: in order
    return data, evals, "\n".join(lines)


def check_settings(args: FinetuneArgs) -> None:
    """Every setting in range, each bad one a one-line error naming its flag; before anything is loaded."""
    if args.steps is not None and args.epochs is not None:
        raise VentouxError("give --steps or --epochs, not both")
    check_args(args, counts=("rank", "seq_len"), fractions=("dropout",))
    if args.epochs is not None:
        require(args, "epochs", finite_number(args.epochs) and args.epochs > 0, "a positive number")
    require(args, "alpha", finite_number(args.alpha) and args.alpha > 0,
            "a positive number (the scaling is alpha/rank)")


def finetune(args: FinetuneArgs, progress: bool = True, given: set[str] | None = None) -> Path:
    """Train (or resume) a LoRA adapter; return its PEFT folder (RUN/adapter). `given`: the settings the caller
    set explicitly (the CLI's flags); by default those unlike the defaults."""
    from ..api import load_model, pick_device
    from ..config import read_config
    from ..lora import LoraConfig, add_adapter, load_lora_state_dict, lora_state_dict
    from ..lora_files import save_adapter
    from ..tokenizer import load_tokenizer
    from ..weights import _write_atomically, parse_dtype

    check_settings(args)
    args, last = resume_point(args, given_fields(args) if given is None else given)
    folder = model_folder(args.model)
    tokenizer = load_tokenizer(folder)
    data, evals, report = check_data(args, tokenizer.mistral)
    if data.problems or (evals is not None and evals.problems):
        print(report, file=sys.stderr)
        bad = len(data.problems) + len(evals.problems if evals else [])
        raise VentouxError(f"{bad} bad data lines (listed above with file and line); fix them, "
                           "then check with --validate-only")
    if not data.samples:
        raise VentouxError(f"{', '.join(args.data)} holds no samples; give at least one JSON line")
    if evals is not None and not any(any(s.trained) for s in evals.samples):  # else its loss would read 0.0
        raise VentouxError(f"the evaluation data {', '.join(args.eval_data)} holds no samples to score (none with an "
                           "assistant turn of weight > 0); give at least one, or leave out --eval-data")
    digest = data.fingerprint() + (evals.fingerprint() if evals else "")
    if last is not None and _saved_digest(last) != digest:
        raise VentouxError(f"the data of the run in {args.out} changed since it started "
                           f"({' '.join(args.data + args.eval_data)}); resuming would not give the run's adapter: "
                           "restore the files, or start a new run with another --out")
    if args.steps is None:
        args.steps = math.ceil((args.epochs or 1) * data.steps_per_epoch(args.batch_size, args.grad_accum))
    lora = LoraConfig(args.rank, args.alpha, args.dropout, tuple(args.targets)).check()
    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype or ("float32" if device.type == "cpu" else "bfloat16"), device)
    model = load_model(folder, read_config(folder), dtype, device, quantize=args.quantize)
    torch.manual_seed(args.seed)  # the adapter's A, then dropout
    add_adapter(model, lora)
    if last is not None:
        from safetensors.torch import load_file

        load_lora_state_dict(model, load_file(last / ADAPTER_STATE, device=str(device)))
    model.train()
    if args.checkpointing:
        add_checkpointing(model)
    memory.before_training(args.quantize is not None, args.lean_memory)  # --lean-memory (memory.py)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pad = tokenizer.eos_id

    def batch(step, micro):
        return data.batch(args.seed, step, micro, args.batch_size, args.grad_accum, pad)

    def validate():
        return {"val_loss": eval_loss(model, evals, args.batch_size, pad)}

    def save(folder, extra_files):
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
        return _write_atomically(folder, lambda tmp: save_file(state, str(tmp / ADAPTER_STATE), {"data": digest}),
                                 extra_files, True)

    train(Job(model, batch, save, validate if evals else None), args, out, last, device, progress)
    adapter = save_adapter(model, out / "adapter", base_model_name_or_path=str(args.model or folder),
                           overwrite=True)
    draw_plot(out)
    return adapter


@torch.no_grad()
def eval_loss(model, data: SFTData, batch_size: int, pad_id: int) -> float:
    """Mean loss per trained token of `data`, in order (no randomness: resume stays exact)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(data.samples), batch_size):
        x, y, _ = collate(data.samples[i: i + batch_size], pad_id)
        y = y.to(device).flatten()
        logits = model(x.to(device))
        total += F.cross_entropy(logits.flatten(0, 1), y, ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    model.train(was)
    return total / max(1, count)


def _saved_digest(checkpoint: Path) -> str | None:
    """The fingerprint of the data a checkpoint was trained on (its adapter file's metadata)."""
    from safetensors import safe_open

    with safe_open(str(checkpoint / ADAPTER_STATE), "pt") as f:
        return (f.metadata() or {}).get("data")


def model_folder(source: str | None) -> Path:
    from ..api import DEMO_MODEL
    from ..config import PRESETS
    from ..hub import resolve

    if source is None:
        return DEMO_MODEL
    return Path(resolve(PRESETS[source].repo_id if source in PRESETS else source))
