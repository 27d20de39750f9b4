"""Training checkpoints: an HF-layout model folder with the trainer's state beside it.

    RUN/checkpoints/step-0000200/
        config.json, model.safetensors   # float32; loads in ventoux and in transformers
        tokenizer.model
        trainer.pt                       # step, optimizer, scheduler, RNG states, settings, clock

weights.save_hf writes the folder under a temporary name and renames it into place, so a kill at
any moment leaves either the complete folder or none. The data position is the step itself:
batches are a pure function of (seed, step), see data.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..weights import save_hf

_PREFIX = "step-"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Path, step: int, model, tokenizer: Path, trainer: dict, keep: int = 2) -> Path:
    """Write RUN/checkpoints/step-N atomically; keep only the `keep` newest checkpoints."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for debris in root.glob(".*"):  # temporary folders and files of a process killed mid-save
        shutil.rmtree(debris) if debris.is_dir() else debris.unlink()
    state = root / f".state-{os.getpid()}" / "trainer.pt"
    state.parent.mkdir()
    torch.save(trainer, state)
    final = save_hf(model, root / f"{_PREFIX}{step:07d}", dtype=torch.float32,  # exact weights to resume from
                    extra_files=[tokenizer, state], overwrite=True)
    shutil.rmtree(state.parent)
    for old in checkpoints(run)[:-keep]:
        shutil.rmtree(old)
    return final


def checkpoints(run: Path) -> list[Path]:
    """The checkpoints of a run, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "trainer.pt").exists())


def trainer_state(folder: Path) -> dict:
    return torch.load(Path(folder) / "trainer.pt", weights_only=True)
