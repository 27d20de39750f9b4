"""Training: a SentencePiece tokenizer and Mistral-architecture pretraining from scratch.

    from ventoux.train import train_tokenizer, pretrain, TrainArgs
    train_tokenizer(["corpus.txt"], vocab_size=1024, out="runs/demo")
    model_dir = pretrain(TrainArgs(config="demo.json", tokenizer="runs/demo", data=["corpus.txt"], out="runs/demo"))

tokenizer.py  SentencePiece BPE in Mistral's style (byte fallback, split digits, <unk>=0 <s>=1 </s>=2)
data.py       documents (txt, JSONL {"text"}) -> a cached token memmap with BOS/EOS, held-out split
loop.py       the training loop (AdamW, warmup + cosine, clipping, accumulation, dropout hooks)
checkpoint.py atomic HF-layout checkpoints with optimizer/scheduler/RNG state beside them
evaluate.py   validation loss and nats per character
plot.py       the loss curve (PNG) from metrics.jsonl
"""

from .loop import TrainArgs, pretrain
from .tokenizer import train_tokenizer

__all__ = ["TrainArgs", "pretrain", "train_tokenizer"]
