"""Training checkpoints: the trainable state with the trainer's state beside it.

    RUN/checkpoints/step-0000200/
        config.json, model.safetensors   # pretraining: the whole model, float32; loads in ventoux and transformers
        adapter_model.safetensors, ...   # fine-tuning: the adapter only (finetune.py)
        trainer.pt                       # step, optimizer, scheduler, RNG states, settings, clock

The job's writer (weights.save_hf, or the adapter's) writes the folder under a temporary name and renames
it into place, so a kill at any moment leaves either the complete folder or none. The data position is
the step itself: batches are a pure function of (seed, step).
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch

from ..errors import VentouxError

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


def save_checkpoint(run: Path, step: int, write, trainer: dict, keep: int) -> Path:
    """Write RUN/checkpoints/step-N atomically with write(folder, extra_files) (it writes the weights and copies
    the extra files, trainer.pt among them, into a temporary folder it renames); keep the `keep` newest."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for debris in root.glob(".*"):  # temporary folders and files of a process killed mid-save
        shutil.rmtree(debris) if debris.is_dir() else debris.unlink()
    state = root / f".state-{os.getpid()}" / "trainer.pt"
    state.parent.mkdir()
    torch.save(trainer, state)
    final = write(root / f"{_PREFIX}{step:07d}", [state])
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
    path = Path(folder) / "trainer.pt"
    try:
        return torch.load(path, weights_only=True)  # torch 2.5's default is False: a hostile file could run code
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        raise VentouxError(f"{path} is not a trainer state ventoux wrote (damaged, or holding more than tensors); "
                           f"delete {folder} to resume from the checkpoint before it") from None
