"""Pretraining a Mistral-architecture model from scratch (or from existing weights), on loop.train.

    pretrain(TrainArgs(config="demo.json", tokenizer="runs/demo", data=["corpus.txt"], out="runs/demo",
                       steps=3000, context=256, dropout=0.1))

The run folder (`out`) ends up holding model/ (the trained model: config.json, model.safetensors,
tokenizer.model; loads with ventoux.load and transformers), checkpoints/, data/ (the token cache),
tokenizer.model, metrics.jsonl and loss.png. `resume=True` continues from the newest checkpoint with the
settings the run started with; the result equals an uninterrupted run (same batches, same RNG, same state).
A larger `steps` given with resume extends the run: the cosine becomes that of a run of the new length.
Any other setting given with resume must equal the run's own (loop.resumed_args).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..api import pick_device
from ..config import PRESETS, ModelConfig, read_config
from ..errors import VentouxError
from ..model import Transformer
from ..weights import find_checkpoint, load_model, save_hf
from .data import load_corpus
from .evaluate import segment_loss
from .loop import Job, LoopArgs, add_checkpointing, check_args, draw_plot, given_fields, resume_point, train


@dataclass
class TrainArgs(LoopArgs):
    config: str | None = None  # preset name, config.json, or checkpoint folder (its architecture)
    init: str | None = None  # checkpoint folder whose weights (and architecture) start the run
    tokenizer: str | None = None  # folder holding tokenizer.model (or the file)
    data: list[str] = field(default_factory=list)
    out: str = "runs/pretrain"
    context: int = 256
    dropout: float = 0.0
    eval_tokens: int = 1 << 20  # cap on held-out tokens scored per evaluation
    val_fraction: float = 0.1


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
        except UnicodeDecodeError:  # a binary file
            raise VentouxError(f"--config {src} is not a JSON config (not text); give an HF config.json, "
                               "a preset name or a checkpoint folder") from None
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


def _setup(args: TrainArgs, given: set[str]):
    """Everything that can fail on bad input runs here, before anything is written to `out`."""
    import sentencepiece as spm

    check_args(args, counts=("context", "eval_tokens"), fractions=("dropout", "val_fraction"))
    args, last = resume_point(args, given)  # the run's own settings win: the result must equal an uninterrupted run
    out = Path(args.out)
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


def pretrain(args: TrainArgs, progress: bool = True, given: set[str] | None = None) -> Path:
    """Train (or resume) the run described by `args`; return the final model's folder (RUN/model).
    `given`: the settings the caller set explicitly (the CLI's flags); by default those unlike the defaults."""
    args, out, tok, cfg, corpus, last, device = _setup(args, given_fields(args) if given is None else given)
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
    out.mkdir(parents=True, exist_ok=True)
    if tok.resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tok, out / "tokenizer.model")

    def batch(step, micro):
        x, y = corpus.batch(args.seed, step, micro, args.batch_size, args.context)  # (B, T) each
        return x, y, x.numel()

    def validate():
        """Held-out loss per token; per character too when the whole split was scored."""
        total, n = segment_loss(model, corpus.val, args.context, args.batch_size, args.eval_tokens)
        row = dict(val_loss=total / n)
        if n == len(corpus.val) - 1:
            row["val_nats_per_char"] = total / corpus.val_chars
        return row

    def save(folder, extra_files):  # exact float32 weights to resume from
        return save_hf(model, folder, dtype=torch.float32, extra_files=[out / "tokenizer.model", *extra_files],
                       overwrite=True)

    job = Job(model, batch, save, validate if len(corpus.val) else None)
    train(job, args, out, last, device, progress)
    final = save_hf(model, out / "model", dtype=torch.float32, extra_files=[out / "tokenizer.model"], overwrite=True)
    draw_plot(out)
    return final
