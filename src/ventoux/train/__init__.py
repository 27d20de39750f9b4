"""Training: a SentencePiece tokenizer, Mistral-architecture pretraining, and LoRA fine-tuning.

    from ventoux.train import train_tokenizer, pretrain, TrainArgs, finetune, FinetuneArgs
    train_tokenizer(["corpus.txt"], vocab_size=1024, out="runs/demo")
    model_dir = pretrain(TrainArgs(config="demo.json", tokenizer="runs/demo", data=["corpus.txt"], out="runs/demo"))
    adapter_dir = finetune(FinetuneArgs(model="runs/demo/model", data=["chat.jsonl"], out="runs/chat"))

tokenizer.py  SentencePiece BPE in Mistral's style (byte fallback, split digits, <unk>=0 <s>=1 </s>=2)
data.py       documents (txt, JSONL {"text"}) -> a cached token memmap with BOS/EOS, held-out split
sft_data.py   mistral-finetune's data ({"text"}, {"messages"}, tools) -> tokens and loss masks; validation
loop.py       the one training loop (AdamW over trainable tensors, warmup + cosine, clipping, resume)
pretrain.py   pretraining on the loop (whole-model checkpoints, dropout hooks)
finetune.py   LoRA fine-tuning on the loop (adapter-only checkpoints, PEFT-format adapter)
checkpoint.py atomic checkpoints with optimizer/scheduler/RNG state beside them
evaluate.py   validation loss and nats per character
plot.py       the loss curve (PNG) from metrics.jsonl
memory.py     glibc's heap in training: large tensors mapped on their own, freed pages returned
"""

from .finetune import FinetuneArgs, finetune
from .pretrain import TrainArgs, pretrain
from .tokenizer import train_tokenizer

__all__ = ["FinetuneArgs", "TrainArgs", "finetune", "pretrain", "train_tokenizer"]
