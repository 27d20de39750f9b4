"""Training data: documents -> one token stream per split, tokenised once and cached as a memmap.

    data = load_corpus(["corpus.txt", "more.jsonl"], "runs/x/tokenizer.model", val_fraction=0.1,
                       cache_dir="runs/x/data", context=256)
    x, y = data.batch(seed=0, step=10, micro=0, batch_size=16, context=256)   # (B, T) each

Inputs: plain text files (one document each) and JSON lines with a "text" field (mistral-finetune's
pretraining format), read and checked by ventoux.eval's read_documents. Every document is stored as
[BOS] tokens [EOS]. The held-out split is the last `val_fraction` of the characters, cut at the first
newline at or after the mark (the convention of ../shared/corpus/README.md); nothing trains on it.
Batch order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import VentouxError
from ..eval.data import read_documents


def split_heldout(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) documents: val is the last `fraction` of characters, starting after a newline."""
    mark = int(sum(len(d) for d in docs) * (1 - fraction))
    seen = 0
    for i, doc in enumerate(docs):
        if seen + len(doc) > mark:
            cut = doc.find("\n", mark - seen)
            if cut < 0:  # no newline after the mark: the whole document trains
                return docs[: i + 1], docs[i + 1:]
            head, tail = doc[: cut + 1], doc[cut + 1:]
            return docs[:i] + [head], [tail] + docs[i + 1:]
        seen += len(doc)
    return docs, []


@dataclass
class Corpus:
    train: np.ndarray  # token ids, uint16 or uint32 (a memmap)
    val: np.ndarray
    val_chars: int  # characters of held-out text (for nats per character)

    def batch(self, seed: int, step: int, micro: int, batch_size: int, context: int):
        """Random windows of the training stream; a deterministic function of (seed, step, micro)."""
        rng = np.random.default_rng([seed, step, micro])
        starts = rng.integers(0, len(self.train) - context, size=batch_size)
        rows = np.stack([self.train[s: s + context + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def _fingerprint(docs: list[str], tokenizer: Path, fraction: float) -> str:
    """The cache's key: the documents as read (not their files again), the tokenizer and the split."""
    h = hashlib.sha256(f"v2 {fraction!r}".encode())
    h.update(hashlib.sha256(tokenizer.read_bytes()).digest())
    for doc in docs:  # each one's digest: where one document ends is part of the key
        h.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return h.hexdigest()


def _encode(docs: list[str], sp) -> np.ndarray:
    ids = sp.encode(docs) if docs else []
    dtype = np.uint16 if sp.get_piece_size() <= 2**16 else np.uint32
    flat = [t for doc in ids for t in (sp.bos_id(), *doc, sp.eos_id())]
    return np.asarray(flat, dtype=dtype)


def load_corpus(paths, tokenizer, val_fraction: float, cache_dir, context: int) -> Corpus:
    """Tokenise `paths` once (or reuse the cache in cache_dir); check the splits are usable."""
    import sentencepiece as spm

    paths, tokenizer, cache_dir = [Path(p) for p in paths], Path(tokenizer), Path(cache_dir)
    docs = [d.text for d in read_documents(paths)]  # every file read and checked, cache or not
    key = _fingerprint(docs, tokenizer, val_fraction)
    meta_path = cache_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):  # no cache yet, or one damaged by hand: tokenise again
        meta = {}
    if isinstance(meta, dict) and meta.get("key") == key:
        train, val = (_mapped(cache_dir / f"{s}.bin", meta["dtype"]) for s in ("train", "val"))
        _check(train, meta["val_chars"], val_fraction, context)
        return Corpus(train, val, meta["val_chars"])
    if not any(d.strip() for d in docs):
        raise VentouxError(f"the corpus {', '.join(map(str, paths))} holds no text; give a non-empty file")
    train_docs, val_docs = ([d for d in part if d] for part in split_heldout(docs, val_fraction))
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    train, val = _encode(train_docs, sp), _encode(val_docs, sp)
    _check(train, sum(len(d) for d in val_docs), val_fraction, context)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train", train), ("val", val)):
        arr.tofile(cache_dir / f"{name}.bin.tmp")
        os.replace(cache_dir / f"{name}.bin.tmp", cache_dir / f"{name}.bin")
    meta = dict(key=key, dtype=train.dtype.name, train_tokens=len(train), val_tokens=len(val),
                val_chars=sum(len(d) for d in val_docs), files=[str(p) for p in paths])
    (cache_dir / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(cache_dir / "meta.json.tmp", meta_path)
    return Corpus(train, val, meta["val_chars"])


def _mapped(path: Path, dtype: str) -> np.ndarray:
    """A cached split, mapped read-only; an empty one (--val-fraction 0) cannot be mapped."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


def _check(train: np.ndarray, val_chars: int, val_fraction: float, context: int) -> None:
    if len(train) < context + 1:  # a sequence's inputs and its targets, one token later
        raise VentouxError(f"the training split holds {len(train)} tokens, fewer than one sequence of --context "
                           f"{context} needs ({context + 1}); give more text or a shorter --context")
    if val_fraction > 0 and not val_chars:
        raise VentouxError(f"the held-out split (--val-fraction {val_fraction}) is empty; give more text "
                           "or a larger --val-fraction")
