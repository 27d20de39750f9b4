"""`ventoux bench` end to end on a tiny random model, against transformers: the figures are not
asserted (they are noise on a shared machine), the shape of the JSON result is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ventoux.cli import main
from ventoux.config import ModelConfig
from ventoux.model import Transformer
from ventoux.weights import save_hf

TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=32000, head_dim=16,
                   sliding_window=16, max_seq_len=256)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    import mistral_common

    root = tmp_path_factory.mktemp("bench")
    tok = root / "tokenizer.model"
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tok)
    torch.manual_seed(0)
    return save_hf(Transformer(TINY), root / "tiny", extra_files=[tok])


def test_bench_cli_writes_json_and_chart(tiny_folder, tmp_path, capsys):
    out, chart = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "--model", str(tiny_folder), "--dtype", "float32", "--threads", "1", "--prompt-len", "20",
               "--new-tokens", "6", "--repeats", "2", "--compare", "transformers", "--out", str(out),
               "--chart", str(chart)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    result = json.loads(out.read_text())
    assert set(result) == {"machine", "settings", "results", "ratios"}
    assert result["machine"]["read_bandwidth_gb_s"] > 0 and result["machine"]["threads"] == 1
    assert result["settings"]["prompt_len"] == 20 and result["settings"]["new_tokens"] == 6
    rows = result["results"]
    assert [(r["engine"], r["technique"]) for r in rows] == [("ventoux", "float32"), ("transformers", "float32")]
    for r in rows:
        assert "error" not in r, r
        assert len(r["runs"]) == 2 and all(run["tokens"] == 6 for run in r["runs"])
        for key in ("decode_tok_s", "prefill_tok_s", "ttft_s", "gb_s", "bandwidth_fraction", "load_s"):
            assert r[key] > 0, key
        assert r["peak_rss_bytes"] > 2**20 and r["others_cores"] >= 0
    # Bytes read per token: every weight but the embedding table, in float32, for both engines.
    per_layer = 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160 + 2 * 64)
    expected = TINY.n_layers * per_layer + 4 * (64 * 32000 + 64)
    assert [r["weight_bytes"] for r in rows] == [expected, expected]
    assert result["ratios"] == [{"ventoux": "ventoux float32", "peer": "transformers float32",
                                 "decode": pytest.approx(rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"]),
                                 "prefill": pytest.approx(rows[0]["prefill_tok_s"] / rows[1]["prefill_tok_s"])}]
    assert "decode tok/s" in printed and "ratios" in printed
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_settings(tiny_folder, capsys):
    assert main(["bench", "--model", str(tiny_folder), "--new-tokens", "1"]) == 1
    assert "--new-tokens=1" in capsys.readouterr().err
