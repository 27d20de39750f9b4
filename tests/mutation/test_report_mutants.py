"""The benchmark report (ventoux/bench/report.py): the text tables cell by cell, the JSON file, and the PNG chart's
bars, labels, colours, titles and size, read back from the figure matplotlib drew."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from ventoux.bench import report

ROW = dict(engine="ventoux", technique="int4", decode_tok_s=12.345, prefill_tok_s=150.26, ttft_s=0.4994, gb_s=7.25,
           bandwidth_fraction=0.625, peak_rss_bytes=3 * 2**29, load_s=1.26, others_cores=0.125)
PEER = dict(ROW, engine="llama.cpp", technique="Q4_0", decode_tok_s=30.0, prefill_tok_s=90.0, gb_s=18.5)
FAILED = {"engine": "transformers", "technique": "bfloat16", "error": "x" * 70}
RESULT = {"settings": {"batch_size": 1, "prompt_len": 128, "new_tokens": 64, "repeats": 3},
          "machine": {"threads": 2, "read_bandwidth_gb_s": 24.84, "cpu": "Some CPU"},
          "results": [ROW, FAILED, PEER],
          "ratios": [{"ventoux": "ventoux int4", "peer": "llama.cpp Q4_0", "decode": 0.4115, "prefill": 1.6695,
                      "decode_by_round": 0.8555}]}


def test_the_table_has_a_title_a_header_a_rule_a_row_per_result_and_a_note():
    # Each column as wide as its widest cell, cells left-aligned and two spaces apart, no trailing blanks
    x60 = "x" * 60
    assert report.table(RESULT).splitlines() == [
        "batch 1, 128-token prompt, 64 new tokens, 2 threads, medians of 3; measured read bandwidth 24.8 GB/s "
        "(Some CPU)",
        "engine        technique  decode tok/s" + " " * 56 + "  prefill tok/s  TTFT ms  GB/s  % of bw  peak RSS  "
        "load s  others",
        "------------  ---------  " + "-" * 68 + "  -------------  -------  ----  -------  --------  ------  ------",
        "ventoux       int4       12.35" + " " * 63 + "  150.3          499      7.2   62%      1.50 GiB  1.3     0.12",
        "transformers  bfloat16   failed: " + x60,
        "llama.cpp     Q4_0       30.00" + " " * 63 + "  90.0           499      18.5  62%      1.50 GiB  1.3     0.12",
        "others: cores kept busy by other processes while the engine was timed (median); well above 0, that row's "
        "figures are depressed"]


def test_the_ratio_table_gives_each_ratio_to_two_decimals():
    assert report.ratio_table(RESULT).splitlines() == [
        "ratios (ventoux / peer)",
        "ventoux       peer            decode  prefill  decode by round",
        "------------  --------------  ------  -------  ---------------",
        "ventoux int4  llama.cpp Q4_0  0.41x   1.67x    0.86x",
        NOTE]
    assert report.ratio_table(dict(RESULT, ratios=[])).splitlines()[1:] == [
        "ventoux  peer  decode  prefill  decode by round", "-------  ----  ------  -------  ---------------", NOTE]


NOTE = ("decode by round: the median of each round's ratio, steadier than the ratio of the medians where the machine's "
        "speed drifts between rounds")


def test_the_json_file_is_the_result_indented_in_its_new_folder(tmp_path):
    path = report.write_json(RESULT, tmp_path / "new" / "folder" / "r.json")
    assert path == tmp_path / "new" / "folder" / "r.json"
    assert path.read_text() == json.dumps(RESULT, indent=2) + "\n"
    assert report.write_json(RESULT, str(tmp_path / "s.json")) == tmp_path / "s.json"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture()
def drawn(monkeypatch):
    """The figures write_chart closes, kept open to be read."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    for fig in figures:
        plt.Figure.clear(fig)


def test_the_chart_draws_decode_and_prefill_bars_of_the_rows_that_ran(tmp_path, drawn):
    import matplotlib

    path = report.write_chart(RESULT, tmp_path / "new" / "folder" / "chart.png")
    assert path == tmp_path / "new" / "folder" / "chart.png" and matplotlib.get_backend().lower() == "agg"
    assert _png_size(path) == (8 * 120, int(4.5 * 120))  # figsize (8, 4.5) at 120 dpi for two rows
    (fig,) = drawn
    decode, prefill = fig.axes
    left, right = decode.get_position(), prefill.get_position()
    assert left.x1 < right.x0 and left.y0 == right.y0  # side by side
    assert fig._suptitle.get_text() == ("batch 1, prompt 128, 64 new tokens, 2 threads; "
                                        "read bandwidth 24.8 GB/s")
    assert fig._suptitle.get_fontsize() == 9
    for ax, title, key in ((decode, "decode tokens/s", "decode_tok_s"), (prefill, "prefill tokens/s", "prefill_tok_s")):
        assert ax.get_title() == title
        bars = ax.patches
        assert [b.get_height() for b in bars] == [ROW[key], PEER[key]]
        assert [b.get_x() + b.get_width() / 2 for b in bars] == [0, 1]
        assert [tuple(b.get_facecolor()) for b in bars] == [matplotlib.colors.to_rgba(c)
                                                             for c in ("tab:red", "tab:gray")]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["ventoux\nint4", "llama.cpp\nQ4_0"]
        assert list(ax.get_xticks()) == [0, 1] and all(t.get_fontsize() == 8 for t in ax.get_xticklabels())
    notes = decode.texts
    assert [n.get_text() for n in notes] == ["7.2 GB/s", "18.5 GB/s"] and len(prefill.texts) == 0
    for note, bar in zip(notes, decode.patches):
        assert note.xy == (bar.get_x() + bar.get_width() / 2, bar.get_height())
        assert (note.get_ha(), note.get_va(), note.get_fontsize()) == ("center", "bottom", 7)


def test_a_chart_of_many_rows_widens_and_closes_its_figure(tmp_path):
    import matplotlib.pyplot as plt

    rows = [dict(ROW, technique=f"t{i}") for i in range(5)]
    before = len(plt.get_fignums())
    path = report.write_chart(dict(RESULT, results=rows), str(tmp_path / "wide.png"))
    assert _png_size(path) == (int((1.6 * 5 + 2) * 120), int(4.5 * 120))
    assert len(plt.get_fignums()) == before


def test_no_chart_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert report.write_chart(RESULT, tmp_path / "c.png") is None and not (tmp_path / "c.png").exists()
