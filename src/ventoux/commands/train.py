"""`ventoux train-tokenizer`, `ventoux pretrain` and `ventoux plot`.

    ventoux train-tokenizer --input corpus.txt --vocab-size 1024 --out runs/demo
    ventoux pretrain --config demo-config.json --tokenizer runs/demo --data corpus.txt --out runs/demo \\
        --steps 3000 --context 256 --dropout 0.1
    ventoux pretrain --out runs/demo --resume      # after an interruption, even kill -9
    ventoux plot runs/demo                         # redraw runs/demo/loss.png
    ventoux plot runs/demo runs/demo/long --out curve.png   # a run and the run that continued it
"""

from __future__ import annotations

import argparse
import dataclasses

from ..cli import command


def _tokenizer_args(p):
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text or JSONL ({\"text\": ...}) files")
    p.add_argument("--vocab-size", type=int, required=True, help="pieces, including 256 byte-fallback pieces")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.model into")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="leave out the last part of the characters, as pretrain --val-fraction holds them out "
                        "(default 0: train on everything)")


@command("train-tokenizer", "Train a SentencePiece BPE tokenizer in Mistral's style.", _tokenizer_args)
def run_train_tokenizer(args):
    from ..train import train_tokenizer

    path = train_tokenizer(args.input, args.vocab_size, args.out, args.val_fraction)
    print(f"wrote {path}")


def _pretrain_args(p):
    from ..train.pretrain import TrainArgs

    d = TrainArgs()
    p.add_argument("--config", help="preset name, HF config.json, or a checkpoint folder (its architecture)")
    p.add_argument("--init", help="checkpoint folder whose weights start the run")
    p.add_argument("--tokenizer", metavar="DIR", help="folder with tokenizer.model (see train-tokenizer)")
    p.add_argument("--data", nargs="+", metavar="FILE", help="text or JSONL ({\"text\": ...}) files")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: final model, checkpoints, metrics")
    for name, kind, text in [
        ("steps", int, "optimizer steps (with --resume: a larger number extends the run; the cosine then "
                       "follows a run of the new length from the step reached)"),
        ("batch-size", int, "sequences per micro-batch"),
        ("grad-accum", int, "micro-batches per step"), ("context", int, "training sequence length"),
        ("lr", float, "peak learning rate"), ("min-lr", float, "final learning rate of the cosine"),
        ("warmup", int, "linear warmup steps"), ("weight-decay", float, "AdamW decay of the matrices"),
        ("dropout", float, "residual dropout probability"), ("clip", float, "gradient-norm clip (0: off)"),
        ("eval-every", int, "steps between validation"), ("eval-tokens", int, "held-out tokens per validation"),
        ("save-every", int, "steps between checkpoints"), ("keep", int, "checkpoints kept"),
        ("log-every", int, "steps between metrics rows"), ("seed", int, "seed of init, data order, dropout"),
        ("val-fraction", float, "held-out share of the characters (last part)"),
    ]:
        default = getattr(d, name.replace("-", "_"))
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (default {default})")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on with CUDA, off on CPU where it is slower)")
    p.add_argument("--checkpointing", action="store_true", default=None, help="activation checkpointing")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, ...")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its newest checkpoint, with the run's own settings "
                        "(other flags must equal them, except --steps, --device, --keep, --log-every, "
                        "--eval-every, --save-every, --eval-tokens)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("pretrain", "Pretrain a Mistral-architecture model from scratch (or continue one).", _pretrain_args)
def run_pretrain(args):
    from ..train import TrainArgs, pretrain

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainArgs)
             if getattr(args, f.name, None) is not None}
    model = pretrain(TrainArgs(**given), progress=not args.quiet, given=set(given))
    print(f"wrote {model} (the model), with {beside(model.parent)} beside it")


def beside(run) -> str:
    """What a run folder holds next to its result: loss.png only when this run drew it (it is newer than
    the metrics it shows; an older one stays behind when matplotlib is missing)."""
    plot, metrics = run / "loss.png", run / "metrics.jsonl"
    drawn = plot.exists() and metrics.exists() and plot.stat().st_mtime_ns >= metrics.stat().st_mtime_ns
    names = ["checkpoints/", "metrics.jsonl"] + (["loss.png"] if drawn else [])
    return ", ".join(names[:-1]) + " and " + names[-1]


def _plot_args(p):
    p.add_argument("run", metavar="RUN_DIR", help="a run folder written by `ventoux pretrain`")
    p.add_argument("after", metavar="LATER_RUN", nargs="*",
                   help="runs that continued it (pretrain --init RUN_DIR/model), drawn as later phases")
    p.add_argument("--out", help="picture to write (default RUN_DIR/loss.png)")


@command("plot", "Draw a training run's loss curve (RUN_DIR/loss.png).", _plot_args)
def run_plot(args):
    from ..train.plot import plot_run

    print(f"wrote {plot_run(args.run, args.out, args.after)}")
