"""`ventoux bench` (commands/bench.py) where mutation testing (mutation/README.md, through mutation/fresh_module.sh)
found it unpinned: each flag reaching the benchmark's settings and engines (the measuring is replaced by a
recorder; tests/test_bench.py runs it for real), the row's name, the demo model by default, and the exit code
when an engine fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bench import tiny_folder  # noqa: F401  (the fixture: a tiny checkpoint with Mistral's v1 tokenizer)

import ventoux.bench
from ventoux.api import DEMO_MODEL
from ventoux.bench import Engine, Settings
from ventoux.cli import main


@pytest.fixture
def bench(monkeypatch):
    """bench.run and peer_engines replaced by recorders; `results` is what run returns for each engine."""
    seen = {"results": [{}]}

    def peers(folder, dtype, quantize, compare, cache_dir):
        seen["peers"] = (folder, dtype, quantize, compare, cache_dir)
        return [Engine("transformers", dtype, str(folder))] if compare else []

    def run(engines, settings, vocab_size):
        seen.update(engines=engines, settings=settings, vocab_size=vocab_size)
        return {"results": seen["results"]}

    monkeypatch.setattr(ventoux.bench, "peer_engines", peers)
    monkeypatch.setattr(ventoux.bench, "run", run)
    return seen


def test_every_flag_reaches_the_settings_and_engines(bench, tiny_folder, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").mkdir()
    assert main(["bench", "--model", str(tiny_folder), "--dtype", "bf16", "--device", "cpu", "--quantize", "int8",
                 "--compile", "--lora", "adapter", "--no-mmap", "--batch-size", "2", "--prompt-len", "9",
                 "--new-tokens", "5", "--threads", "1", "--repeats", "4", "--prefill-chunk", "16",
                 "--wait-quiet", "2.5", "--compare", "transformers", "--compare", "llama.cpp",
                 "--cache-dir", "gguf"]) == 0
    assert bench["settings"] == Settings(batch_size=2, prompt_len=9, new_tokens=5, threads=1, repeats=4,
                                         device="cpu", prefill_chunk=16, quiet_wait_s=2.5)
    ours = Engine("ventoux", "int8 compiled + LoRA no-mmap", str(tiny_folder), dtype="bfloat16", quantize="int8",
                  compile=True, lora=str(tmp_path / "adapter"), mmap=False)  # the worker may start elsewhere: absolute
    assert bench["engines"] == [ours, Engine("transformers", "bfloat16", str(tiny_folder))]
    assert bench["peers"] == (tiny_folder, "bfloat16", "int8", ["transformers", "llama.cpp"], "gguf")
    assert bench["vocab_size"] == 32000


def test_the_defaults(bench, tiny_folder):  # noqa: F811
    assert main(["bench", "--model", str(tiny_folder), "--dtype", "float32"]) == 0
    assert bench["settings"] == Settings(batch_size=1, prompt_len=128, new_tokens=64, threads=None, repeats=3,
                                         device="cpu", prefill_chunk=None, quiet_wait_s=0.0)
    assert bench["engines"] == [Engine("ventoux", "float32", str(tiny_folder), dtype="float32")]
    assert bench["peers"] == (tiny_folder, "float32", None, [], str(Path.home() / ".cache" / "ventoux" / "bench"))


def test_the_demo_model_by_default_when_shipped(bench, monkeypatch, tmp_path, capsys):
    if not (DEMO_MODEL / "config.json").exists():
        pytest.skip("this build ships no demo model")
    assert main(["bench", "--dtype", "float32"]) == 0
    assert bench["engines"][0].path == str(DEMO_MODEL)
    monkeypatch.setattr("ventoux.api.DEMO_MODEL", tmp_path / "not-shipped")
    assert main(["bench"]) == 1
    assert capsys.readouterr().err == ("ventoux: error: the demonstration model is not shipped in this build yet: "
                                       "pass --model\n")


def test_an_engine_that_fails_fails_the_command_and_reports_are_written(bench, tiny_folder, tmp_path,  # noqa: F811
                                                                        capsys, monkeypatch):
    bench["results"] = [{}, {"error": "llama.cpp: no such file"}]
    assert main(["bench", "--model", str(tiny_folder), "--out", str(tmp_path / "r.json")]) == 1
    assert capsys.readouterr().out == f"results written to {tmp_path / 'r.json'}\n"
    assert (tmp_path / "r.json").exists()
    monkeypatch.setattr("ventoux.bench.report.write_chart", lambda result, path: None)
    bench["results"] = [{}]
    assert main(["bench", "--model", str(tiny_folder), "--chart", str(tmp_path / "r.png")]) == 0
    assert capsys.readouterr().out == "no chart: matplotlib is not installed (pip install matplotlib)\n"


def test_an_unknown_peer_is_refused(bench, tiny_folder, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", str(tiny_folder), "--compare", "vllm"])
    assert e.value.code == 2 and "argument --compare: invalid choice: 'vllm'" in capsys.readouterr().err
    assert "engines" not in bench
