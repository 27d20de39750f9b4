"""A benchmark result as a text table, a JSON file and a PNG bar chart.

    print(table(result)); print(ratio_table(result))
    write_json(result, "results.json"); write_chart(result, "results.png")
"""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("engine", "technique", "decode tok/s", "prefill tok/s", "TTFT ms", "GB/s", "% of bw", "peak RSS",
           "load s", "others")


def _cells(row: dict) -> list[str]:
    if "error" in row:
        return [row["engine"], row["technique"], "failed: " + row["error"][:60]] + [""] * (len(COLUMNS) - 3)
    return [row["engine"], row["technique"], f"{row['decode_tok_s']:.2f}", f"{row['prefill_tok_s']:.1f}",
            f"{row['ttft_s'] * 1000:.0f}", f"{row['gb_s']:.1f}", f"{100 * row['bandwidth_fraction']:.0f}%",
            f"{row['peak_rss_bytes'] / 2**30:.2f} GiB", f"{row['load_s']:.1f}", f"{row['others_cores']:.2f}"]


def _render(header, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    title = (f"batch {s['batch_size']}, {s['prompt_len']}-token prompt, {s['new_tokens']} new tokens, "
             f"{m['threads']} threads, medians of {s['repeats']}; measured read bandwidth "
             f"{m['read_bandwidth_gb_s']:.1f} GB/s ({m['cpu']})")
    note = ("others: cores kept busy by other processes while the engine was timed (median); "
            "well above 0, that row's figures are depressed")
    return title + "\n" + _render(COLUMNS, [_cells(r) for r in result["results"]]) + "\n" + note


def ratio_table(result: dict) -> str:
    rows = [[r["ventoux"], r["peer"], f"{r['decode']:.2f}x", f"{r['prefill']:.2f}x", f"{r['decode_by_round']:.2f}x"]
            for r in result["ratios"]]
    note = ("decode by round: the median of each round's ratio, steadier than the ratio of the medians where the "
            "machine's speed drifts between rounds")
    return ("ratios (ventoux / peer)\n" + _render(("ventoux", "peer", "decode", "prefill", "decode by round"), rows)
            + "\n" + note)


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def write_chart(result: dict, path: str | Path) -> Path | None:
    """Bars of decode and prefill tokens/s per row (GB/s written on the decode bars). None when
    matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if "error" not in r]
    labels = [f"{r['engine']}\n{r['technique']}" for r in rows]
    colors = ["tab:red" if r["engine"] == "ventoux" else "tab:gray" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 2), 4.5))
    for ax, key, name in ((axes[0], "decode_tok_s", "decode tokens/s"), (axes[1], "prefill_tok_s", "prefill tokens/s")):
        bars = ax.bar(range(len(rows)), [r[key] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(name)
        if key == "decode_tok_s":
            for bar, r in zip(bars, rows):
                ax.annotate(f"{r['gb_s']:.1f} GB/s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    s, m = result["settings"], result["machine"]
    fig.suptitle(f"batch {s['batch_size']}, prompt {s['prompt_len']}, {s['new_tokens']} new tokens, "
                 f"{m['threads']} threads; read bandwidth {m['read_bandwidth_gb_s']:.1f} GB/s", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
