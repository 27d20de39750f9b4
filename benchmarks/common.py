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
    `changes`), built on first use and then reused from the cache. Written one layer (one shard) at a time,
    so even the full 32-layer model (14.5 GB) never sits in memory whole."""
    import torch
    from safetensors.torch import save_file

    from ventoux.config import ModelConfig
    from ventoux.model import Transformer
    from ventoux.names import to_hf
    from ventoux.weights import HF_INDEX

    cfg = ModelConfig(**{**MISTRAL_7B, "n_layers": n_layers, **changes})
    tag = "-".join(f"{k}{v}" for k, v in sorted(changes.items()))
    folder = CACHE / f"mistral7b-{n_layers}layers{'-' + tag if tag else ''}-seed{seed}"
    if (folder / "config.json").exists():
        return folder
    log(f"building the random checkpoint {folder.name} ({cfg.n_params / 1e9:.2f} B parameters, bf16) ...")
    with torch.device("meta"):
        shapes = Transformer(cfg).state_dict()
    shards: dict[str, list[str]] = {}  # one per layer, one for the embeddings, final norm and output head
    for name in shapes:
        shards.setdefault(name.split(".", 2)[1] if name.startswith("layers.") else "other", []).append(name)
    gen = torch.Generator().manual_seed(seed)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(shards.values()):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:  # norms 1, matrices N(0, 0.02) as transformers initialises them
            t = torch.empty(shapes[name].shape, dtype=torch.bfloat16)
            tensors[to_hf(name)] = t.fill_(1.0) if "norm" in name else t.normal_(0.0, 0.02, generator=gen)
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    total = sum(t.numel() * 2 for t in shapes.values())
    (tmp / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}) + "\n")
    (tmp / "config.json").write_text(json.dumps({**cfg.to_hf(), "torch_dtype": "bfloat16"}, indent=2) + "\n")
    shutil.copy(v1_tokenizer(), tmp / "tokenizer.model")
    tmp.rename(folder)
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
