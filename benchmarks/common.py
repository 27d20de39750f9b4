"""Shared pieces of the benchmark scripts: the random checkpoints they measure, and the cache folder.

    folder = random_checkpoint(n_layers=4)           # Mistral-7B-shaped, 4 layers, bf16 (built once)
    full = full_attention_twin(folder)               # the same weights, config without sliding window

The checkpoints have random weights (N(0, 0.02), as transformers initialises them) and the real v1
tokenizer of mistral-common as tokenizer.model (vocabulary 32000), so ventoux, transformers and
llama.cpp's GGUF converter all load them. Everything lands in benchmarks/.cache (not in git).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"

# Mistral 7B v0.1 (see ../shared/reference/MISTRAL.md), with fewer layers to fit these machines.
MISTRAL_7B = dict(dim=4096, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=32000,
                  norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, max_seq_len=32768)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def v1_tokenizer() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def random_checkpoint(n_layers: int = 4, seed: int = 0, **changes) -> Path:
    """An HF-layout bf16 checkpoint shaped like Mistral 7B with `n_layers` layers (and any config
    `changes`), built on first use and then reused from the cache."""
    import torch

    from ventoux.config import ModelConfig
    from ventoux.model import Transformer
    from ventoux.weights import save_hf

    cfg = ModelConfig(**{**MISTRAL_7B, "n_layers": n_layers, **changes})
    tag = "-".join(f"{k}{v}" for k, v in sorted(changes.items()))
    folder = CACHE / f"mistral7b-{n_layers}layers{'-' + tag if tag else ''}-seed{seed}"
    if (folder / "config.json").exists():
        return folder
    log(f"building the random checkpoint {folder.name} ({cfg.n_params / 1e9:.2f} B parameters, bf16) ...")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu").to(torch.bfloat16)  # allocated straight in bf16, never in float32
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    with tempfile.TemporaryDirectory() as tmp:  # save_hf copies extra files under their own name
        tokenizer = Path(tmp) / "tokenizer.model"
        shutil.copy(v1_tokenizer(), tokenizer)
        save_hf(model, folder, extra_files=[tokenizer])
    return folder


def full_attention_twin(folder: Path) -> Path:
    """The same weights with full attention (sliding_window null): a sibling folder of links."""
    twin = folder.with_name(folder.name + "-full")
    if (twin / "config.json").exists():
        return twin
    twin.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name != "config.json" and not (twin / f.name).exists():
            (twin / f.name).symlink_to(f.resolve())
    config = json.loads((folder / "config.json").read_text())
    config["sliding_window"] = None
    (twin / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return twin
