"""The loss curve (train/plot.py) and the training heap's tuning (train/memory.py), where mutation testing
(mutation/README.md) found them unpinned: which points the picture shows, under which labels and title, for
one run and for a run with the runs that continued it; and which glibc calls the tuning makes, with which
values, when. The heap's effect itself is measured in tests/test_train.py (a freed 16 MB tensor leaves the
resident memory)."""

from __future__ import annotations

import ctypes
import json
import sys

import pytest
from matplotlib.figure import Figure

from ventoux.errors import VentouxError
from ventoux.train import memory
from ventoux.train.plot import plot_run, read_metrics


def write_metrics(folder, rows, tail=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return folder


@pytest.fixture
def figures(monkeypatch):
    """Every figure plot_run saves, kept for reading back its lines."""
    saved, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: (saved.append(fig), save(fig, path, **kw)))
    return saved


def curves(fig):
    (ax,) = fig.axes
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_marker())
            for line in ax.get_lines()}


def test_one_run(tmp_path, figures):
    run = write_metrics(tmp_path / "demo", [
        {"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.5, "val_loss": 2.75, "val_nats_per_char": 0.875},
        {"step": 30, "loss": 2.25}], tail='{"step": 40, "lo')  # the last line cut short by a kill
    assert plot_run(run) == run / "loss.png"
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in run.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temporary file left
    (fig,) = figures
    assert curves(fig) == {"train": ([10, 20, 30], [3.0, 2.5, 2.25], "None"), "validation": ([20], [2.75], "o")}
    ax = fig.axes[0]
    assert ax.get_title() == "demo: validation 0.8750 nats/char at the end"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "cross-entropy (nats per token)")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]


def test_a_run_and_the_runs_that_continued_it_are_one_curve(tmp_path, figures):
    first = write_metrics(tmp_path / "demo", [{"step": 10, "loss": 3.0}, {"step": 20, "val_loss": 2.5,
                                                                          "val_nats_per_char": 0.75}])
    second = write_metrics(tmp_path / "long", [{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.5,
                                                                         "val_loss": 1.75, "val_nats_per_char": 0.5}])
    third = write_metrics(tmp_path / "tail", [{"step": 4, "loss": 1.25}])  # not scored: the title keeps 0.5
    out = tmp_path / "curve.png"
    assert plot_run(str(first), str(out), [str(second), str(third)]) == out and out.exists()
    assert not (first / "loss.png").exists()
    (fig,) = figures
    assert curves(fig) == {"train (demo)": ([10], [3.0], "None"), "validation (demo)": ([20], [2.5], "o"),
                           "train (long)": ([25, 30], [2.0, 1.5], "None"), "validation (long)": ([30], [1.75], "o"),
                           "train (tail)": ([34], [1.25], "None")}
    assert fig.axes[0].get_title() == "demo + long + tail: validation 0.5000 nats/char at the end"


def test_a_run_killed_before_its_first_row_then_the_run_that_continued_it(tmp_path, figures):
    first = write_metrics(tmp_path / "demo", [])
    second = write_metrics(tmp_path / "long", [{"step": 5, "loss": 2.0}])
    plot_run(first, after=[second])
    assert curves(figures[0]) == {"train (long)": ([5], [2.0], "None")}  # from step 0: the first run made none
    assert figures[0].axes[0].get_title() == "demo + long"


def test_a_run_never_scored_is_titled_by_its_name(tmp_path, figures):
    run = write_metrics(tmp_path / "demo", [{"step": 1, "loss": 4.0}])
    plot_run(run)
    assert figures[0].axes[0].get_title() == "demo"
    empty = write_metrics(tmp_path / "new", [])  # a run killed before its first row: an empty picture, no error
    plot_run(empty)
    assert curves(figures[1]) == {} and figures[1].axes[0].get_title() == "new"


def test_what_cannot_be_drawn_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(VentouxError) as e:
        plot_run(tmp_path / "nowhere")
    assert str(e.value) == (f"{tmp_path / 'nowhere' / 'metrics.jsonl'} does not exist; point at a run folder "
                            "written by `ventoux pretrain`")
    first = write_metrics(tmp_path / "demo", [{"step": 1, "loss": 4.0}])
    with pytest.raises(VentouxError, match="long.metrics.jsonl does not exist"):
        plot_run(first, after=[tmp_path / "long"])
    assert not (first / "loss.png").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    with pytest.raises(VentouxError) as e:
        plot_run(first)
    assert str(e.value) == "drawing the loss curve needs matplotlib: pip install 'ventoux[train]'"


def test_read_metrics_skips_what_is_not_a_row(tmp_path):
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    write_metrics(tmp_path, [{"step": 1}, {"step": 2}], tail="not json\n")
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1}, {"step": 2}]


class FakeLibc:
    def __init__(self, ok=1):
        self.calls, self.ok = [], ok

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value.value))
        return self.ok

    def malloc_trim(self, pad):
        assert isinstance(pad, ctypes.c_size_t)
        self.calls.append(("malloc_trim", pad.value))
        return self.ok


@pytest.mark.parametrize("quantized, lean, mapped", [(False, None, False), (True, None, True), (False, True, True),
                                                     (True, False, False)])
def test_before_training_releases_then_maps_where_lean(monkeypatch, quantized, lean, mapped):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    assert memory.before_training(quantized, lean) is mapped
    assert libc.calls == [("malloc_trim", 0)] + ([("mallopt", -3, 4 << 20)] if mapped else [])


def test_the_calls_report_what_glibc_did(monkeypatch):
    libc = FakeLibc(ok=0)  # glibc refused
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    assert memory.map_large_tensors(1 << 20) is False and memory.release_freed() is False
    assert libc.calls == [("mallopt", -3, 1 << 20), ("malloc_trim", 0)]
    monkeypatch.setattr(memory, "_glibc", lambda: None)  # musl, macOS: nothing to do
    assert memory.map_large_tensors() is False and memory.release_freed() is False
    assert memory.before_training(True) is False


def test_glibc_is_found_only_with_both_calls(monkeypatch):
    class Lib:
        mallopt = malloc_trim = None

    class Half:
        malloc_trim = None

    for found, expected in ((Lib(), True), (Half(), False)):
        monkeypatch.setattr(ctypes, "CDLL", lambda name, found=found: found)
        assert (memory._glibc.__wrapped__() is found) is expected

    def missing(name):
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert memory._glibc.__wrapped__() is None
    monkeypatch.undo()
    if sys.platform.startswith("linux"):
        assert memory._glibc() is not None  # this machine's glibc
