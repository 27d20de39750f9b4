"""The loss curve of a run: train and validation loss against step, from RUN/metrics.jsonl.

    plot_run("runs/demo")            # writes runs/demo/loss.png
    ventoux plot runs/demo           # the same, from the command line (or: kill -USR1 <pid>)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import VentouxError


def plot_run(run, out=None) -> Path:
    """Draw RUN/metrics.jsonl into RUN/loss.png (or `out`); returns the picture's path."""
    try:
        import matplotlib
    except ImportError:
        raise VentouxError("drawing the loss curve needs matplotlib: pip install 'ventoux[train]'") from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    run = Path(run)
    path = run / "metrics.jsonl"
    if not path.exists():
        raise VentouxError(f"{path} does not exist; point at a run folder written by `ventoux pretrain`")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    per_char = [r["val_nats_per_char"] for r in rows if "val_nats_per_char" in r]
    title = f"{run.name}: best validation {min(per_char):.3f} nats/char" if per_char else run.name
    ax.set(xlabel="step", ylabel="cross-entropy (nats per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out else run / "loss.png"
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
