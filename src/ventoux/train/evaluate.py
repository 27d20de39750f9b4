"""Held-out loss: token streams scored in consecutive segments of the training context.

    nats = nats_per_char(model, "runs/demo/model", text, context=256)   # the figure the README publishes

Segment k feeds ids[kT : kT+T] and scores ids[kT+1 : kT+T+1], so every token after the first is
predicted exactly once, with whatever context its segment gives it. Nats per character is the
summed token loss divided by the number of characters of the text: it compares models whose
tokenizers differ (a character-level model's figure is its plain cross-entropy).
"""

from __future__ import annotations

from pathlib import Path


def segment_loss(model, ids, context: int, batch_size: int = 16, max_tokens: int | None = None) -> tuple[float, int]:
    """(summed loss in nats, number of predicted tokens) over the 1-D id sequence `ids`: ventoux.eval's
    strided windows with the stride equal to the context."""
    from ..eval.perplexity import strided_loss

    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    was_training = model.training
    model.eval()
    try:
        return strided_loss(model, ids, context, context, batch_size)
    finally:
        model.train(was_training)


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
