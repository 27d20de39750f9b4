"""`ventoux finetune`: train a LoRA adapter on mistral-finetune data (see ventoux/train/finetune.py).

    ventoux finetune --model runs/demo/model --data train.jsonl --eval-data eval.jsonl --out runs/chat \\
        --rank 16 --alpha 32 --epochs 3 --lr 1e-3
    ventoux finetune --model ./Mistral-7B-v0.3 --quantize int4 --data chat.jsonl --out runs/q --checkpointing
    ventoux finetune --data train.jsonl --validate-only      # every bad line, then samples/tokens/steps
    ventoux finetune --out runs/chat --resume                 # after an interruption, even kill -9
    ventoux generate --model runs/demo/model --lora runs/chat/adapter "..."
"""

from __future__ import annotations

import argparse
import dataclasses

from ..cli import command
from .train import beside


def _finetune_args(p):
    from ..train.finetune import FinetuneArgs

    d = FinetuneArgs()
    p.add_argument("--model", "-m", help="base checkpoint folder or HF repo id (default: the shipped demo model)")
    p.add_argument("--data", nargs="+", metavar="FILE", help='JSON lines: {"messages": [...]} or {"text": ...}')
    p.add_argument("--eval-data", nargs="+", metavar="FILE", help="held-out JSON lines, scored every --eval-every")
    p.add_argument("--out", metavar="DIR", help="run folder: adapter/, checkpoints/, metrics.jsonl, loss.png")
    p.add_argument("--targets", type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()), default=None,
                   help=f"linears to adapt, comma-separated (default {','.join(d.targets)})")
    p.add_argument("--quantize", help="int8, int4, int4-g64, ...: quantize the frozen base (QLoRA-style)")
    p.add_argument("--dtype", help="the base's dtype (default float32 on a CPU, bfloat16 elsewhere)")
    for name, kind, text in [
        ("rank", int, "LoRA rank"), ("alpha", float, "LoRA alpha (scaling alpha/rank)"),
        ("dropout", float, "dropout on the adapters' input"), ("seq-len", int, "longest sample accepted, in tokens"),
        ("batch-size", int, "samples per micro-batch (padded to the longest)"),
        ("steps", int, "optimizer steps, instead of --epochs (with --resume: a larger number extends the run; "
                       "the cosine then follows a run of the new length from the step reached)"),
        ("epochs", float, "passes over the data, instead of --steps (default 1)"),
        ("lr", float, "peak learning rate"), ("min-lr", float, "final learning rate of the cosine"),
        ("warmup", int, "linear warmup steps"), ("weight-decay", float, "AdamW decay of the adapter matrices"),
        ("clip", float, "gradient-norm clip (0: off)"), ("seed", int, "seed of the adapter init, order, dropout"),
        ("eval-every", int, "steps between evaluations"), ("save-every", int, "steps between checkpoints"),
        ("log-every", int, "steps between metrics rows"), ("keep", int, "checkpoints kept"),
    ]:
        default = getattr(d, name.replace("-", "_"))
        p.add_argument(f"--{name}", type=kind, default=None,
                       help=text if default is None else f"{text} (default {default})")
    p.add_argument("--accumulate", type=int, default=None, dest="grad_accum",
                   help=f"micro-batches per optimizer step (default {d.grad_accum})")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on with CUDA, off on CPU)")
    p.add_argument("--checkpointing", action="store_true", default=None,
                   help="activation checkpointing: recompute each block in backward (less memory)")
    p.add_argument("--lean-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="each large tensor its own memory mapping, returned on free: a lower peak (a quarter "
                        "less, measured) for about a quarter more time in fresh pages (default: on with "
                        "--quantize, off otherwise)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, ...")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its newest checkpoint, with the run's own settings "
                        "(other flags must equal them, except --steps, --device, --keep, --log-every, "
                        "--eval-every, --save-every)")
    p.add_argument("--validate-only", action="store_true",
                   help="check the data (every bad line with file and line number, then a summary) and stop")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("finetune", "Fine-tune a LoRA adapter on chat or text data (mistral-finetune's formats).", _finetune_args)
def run_finetune(args):
    from ..errors import VentouxError
    from ..train.finetune import FinetuneArgs, check_data, check_settings, finetune, model_folder

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneArgs)
             if getattr(args, f.name, None) is not None}
    settings = FinetuneArgs(**given)
    if args.validate_only:
        check_settings(settings)  # --batch-size 0 would divide by zero in the report
        from ..tokenizer import load_tokenizer

        train, evals, report = check_data(settings, load_tokenizer(model_folder(settings.model)).mistral)
        print(report)
        return 1 if train.problems or (evals is not None and evals.problems) else 0
    if args.out is None:
        raise VentouxError("pass --out DIR, the run folder (or --validate-only to check the data alone)")
    adapter = finetune(settings, progress=not args.quiet, given=set(given))
    print(f"wrote {adapter} (the adapter, PEFT format), with {beside(adapter.parent)} beside it")
