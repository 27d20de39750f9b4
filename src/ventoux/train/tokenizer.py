"""Train a SentencePiece BPE tokenizer in Mistral's style and save it as `tokenizer.model`.

    train_tokenizer(["tinyshakespeare.txt"], vocab_size=1024, out="runs/demo", val_fraction=0.1)

Settings follow Mistral's v1 tokenizer: BPE, byte fallback (no text is ever <unk>), digits split,
<unk>=0 <s>=1 </s>=2, no pad, identity normalisation (the text round-trips exactly).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import VentouxError
from ..eval.data import read_documents
from .data import split_heldout

# SentencePiece trains on "sentences"; feeding whole lines joined into chunks (newlines kept)
# lets it learn pieces such as ":\n" instead of spending a byte token on every newline. It skips a sentence
# longer than max_sentence_length bytes without a word, so a longer line (a JSONL document is often one line)
# is cut at spaces first: no chunk exceeds _CHUNK_CHARS characters, 4 bytes each at most in UTF-8.
_CHUNK_CHARS = 2000


def _short_lines(text: str) -> Iterator[str]:
    for line in text.splitlines(keepends=True):
        while len(line) > _CHUNK_CHARS:
            cut = line.rfind(" ", 0, _CHUNK_CHARS) + 1 or _CHUNK_CHARS  # after a space; mid-word if there is none
            yield line[:cut]
            line = line[cut:]
        yield line


def _chunks(texts: list[str]) -> Iterator[str]:
    for text in texts:
        buf = ""
        for line in _short_lines(text):
            if buf and len(buf) + len(line) > _CHUNK_CHARS:
                yield buf
                buf = ""
            buf += line
        if buf:
            yield buf


def train_tokenizer(inputs, vocab_size: int, out, val_fraction: float = 0.0) -> Path:
    """Train on the text files / JSONL files `inputs`, less the held-out last `val_fraction` of the characters
    (the split `pretrain --val-fraction` makes: the tokenizer never sees the validation text either);
    write out/tokenizer.model atomically."""
    import sentencepiece as spm

    if not 0 <= val_fraction < 1:
        raise VentouxError(f"--val-fraction {val_fraction} must be at least 0 and below 1")
    paths = [Path(p) for p in inputs]
    docs = [d.text for d in read_documents(paths)]  # reads and validates every input before writing
    chunks = list(_chunks(split_heldout(docs, val_fraction)[0]))
    if not any(c.strip() for c in chunks):
        raise VentouxError(f"the corpus {', '.join(map(str, paths))} holds no text; give a non-empty file")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, allow_whitespace_only_pieces=True, max_sentence_length=4 * _CHUNK_CHARS,
            num_threads=os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is too high (5000). Please set it to a value <= 1234."
        reason = str(e).strip().splitlines()[-1].split("] ")[-1]  # drop sentencepiece's source location
        raise VentouxError(f"--vocab-size {vocab_size} does not fit this corpus: {reason}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.model.tmp"
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out / "tokenizer.model")
    return out / "tokenizer.model"
