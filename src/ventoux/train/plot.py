"""The loss curve of a run: train and validation loss against step, from RUN/metrics.jsonl.

    plot_run("runs/demo")            # writes runs/demo/loss.png
    ventoux plot runs/demo           # the same, from the command line (or: kill -USR1 <pid>)
    ventoux plot runs/demo runs/demo/long --out docs/demo-loss.png   # a run, then the run that continued it
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import VentouxError


def plot_run(run, out=None, after=()) -> Path:
    """Draw RUN/metrics.jsonl into RUN/loss.png (or `out`); returns the picture's path. `after`: runs that
    continued this one (`ventoux pretrain --init RUN/model`), drawn as later phases of one curve."""
    try:
        import matplotlib
    except ImportError:
        raise VentouxError("drawing the loss curve needs matplotlib: pip install 'ventoux[train]'") from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    runs = [Path(run), *map(Path, after)]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    offset, per_char = 0, []
    for r in runs:
        path = r / "metrics.jsonl"
        if not path.exists():
            raise VentouxError(f"{path} does not exist; point at a run folder written by `ventoux pretrain`")
        rows = read_metrics(path)
        phase = f" ({r.name})" if len(runs) > 1 else ""
        train = [(offset + x["step"], x["loss"]) for x in rows if "loss" in x]
        val = [(offset + x["step"], x["val_loss"]) for x in rows if "val_loss" in x]
        if train:
            ax.plot(*zip(*train), label="train" + phase, linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation" + phase, markersize=3)
        per_char = [x["val_nats_per_char"] for x in rows if "val_nats_per_char" in x] or per_char
        offset += max((x["step"] for x in rows), default=0)
    name = " + ".join(r.name for r in runs)
    # the last phase's figure: an earlier phase may have been scored in other segments
    title = f"{name}: validation {per_char[-1]:.4f} nats/char at the end" if per_char else name
    ax.set(xlabel="step", ylabel="cross-entropy (nats per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out else runs[0] / "loss.png"
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] if there is none), skipping a line cut short by a kill or being written."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows
