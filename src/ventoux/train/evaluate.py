"""Held-out loss: token streams scored in consecutive segments of the training context.

    nats = nats_per_char(model, "runs/demo/model", text, context=256)   # the figure the README publishes

Segment k feeds ids[kT : kT+T] and scores ids[kT+1 : kT+T+1], so every token after the first is
predicted exactly once, with whatever context its segment gives it. Nats per character is the
summed token loss divided by the number of characters of the text: it compares models whose
tokenizers differ (a character-level model's figure is its plain cross-entropy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def segment_loss(model, ids, context: int, batch_size: int = 16, max_tokens: int | None = None) -> tuple[float, int]:
    """(summed loss in nats, number of predicted tokens) over the 1-D id sequence `ids`."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    device = next(model.parameters()).device
    n = (len(ids) - 1) // context  # whole segments
    x = ids[: n * context].view(n, context)  # (N, T)
    y = ids[1: n * context + 1].view(n, context)  # (N, T)
    batches = [(x[i: i + batch_size], y[i: i + batch_size]) for i in range(0, n, batch_size)]
    if len(ids) - 1 > n * context:  # the shorter last segment
        batches.append((ids[n * context: -1][None], ids[n * context + 1:][None]))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for xb, yb in batches:
        logits = model(xb.to(device))  # (B, T, vocab), float32
        total += F.cross_entropy(logits.flatten(0, 1), yb.to(device).flatten(), reduction="sum").item()
        count += yb.numel()
    model.train(was_training)
    return total, count


def nats_per_char(model, tokenizer, text: str, context: int, batch_size: int = 16) -> float:
    """Cross-entropy of `text` in nats per character: [BOS] + encode(text), every text token scored.
    `tokenizer` is a sentencepiece model file (or folder holding tokenizer.model) or processor."""
    import sentencepiece as spm

    sp = tokenizer
    if not isinstance(sp, spm.SentencePieceProcessor):
        path = Path(tokenizer)
        sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model" if path.is_dir() else path))
    ids = [sp.bos_id(), *sp.encode(text)]
    total, _ = segment_loss(model, ids, context, batch_size)
    return total / len(text)
