"""`ventoux bench` end to end on a tiny random model, against transformers: the figures are not
asserted (they are noise on a shared machine), the shape of the JSON result is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ventoux.cli import main
from ventoux.config import ModelConfig
from ventoux.errors import VentouxError
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
        assert r["decode_runs_tok_s"] == pytest.approx([(run["tokens"] - 1) / run["decode_s"] for run in r["runs"]])
    # Bytes read per token: every weight but the embedding table, in float32, for both engines.
    per_layer = 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160 + 2 * 64)
    expected = TINY.n_layers * per_layer + 4 * (64 * 32000 + 64)
    assert [r["weight_bytes"] for r in rows] == [expected, expected]
    round_ratios = [a / b for a, b in zip(rows[0]["decode_runs_tok_s"], rows[1]["decode_runs_tok_s"])]
    assert result["ratios"] == [{"ventoux": "ventoux float32", "peer": "transformers float32",
                                 "decode": pytest.approx(rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"]),
                                 "prefill": pytest.approx(rows[0]["prefill_tok_s"] / rows[1]["prefill_tok_s"]),
                                 "decode_by_round": pytest.approx(sum(round_ratios) / 2)}]  # the median of two
    assert "decode tok/s" in printed and "ratios" in printed
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_settings(tiny_folder, capsys):
    assert main(["bench", "--model", str(tiny_folder), "--new-tokens", "1"]) == 1
    assert "--new-tokens=1" in capsys.readouterr().err


def test_llama_cpp_is_built_from_source_for_this_cpu_or_for_avx2(tmp_path, monkeypatch):
    # Never a wheel built elsewhere: pip compiles it (--no-binary, --no-cache-dir) with the build's flags, into a
    # folder keyed by the build and this CPU; the AVX2 build lives apart from the native one
    from ventoux.bench import llamacpp

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake_pip(cmd, env, **kwargs):
        calls.append((cmd, env["CMAKE_ARGS"]))
        target = Path(cmd[cmd.index("--target") + 1])
        (target / "llama_cpp").mkdir(parents=True)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(llamacpp.subprocess, "run", fake_pip)
    quiet = lambda s: None  # noqa: E731
    native, avx2 = llamacpp.ensure_installed("native", quiet), llamacpp.ensure_installed("avx2", quiet)
    assert native != avx2 and native.parent == avx2.parent == tmp_path / "ventoux" / "llama-cpp"
    assert str(native) in sys.path and str(avx2) in sys.path
    for (cmd, cmake), build in zip(calls, ("native", "avx2")):
        assert "--no-binary" in cmd and cmd[cmd.index("--no-binary") + 1] == "llama-cpp-python"
        assert "--no-cache-dir" in cmd and cmake == llamacpp.cmake_args(build)
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AVX512=OFF"} <= set(calls[1][1].split())
    assert llamacpp.ensure_installed("avx2", quiet) == avx2 and len(calls) == 2  # built once
    sys.path.remove(str(native))
    sys.path.remove(str(avx2))


def test_native_llama_cpp_build_is_march_native_except_amx():
    """-march=native where the CPU lacks AMX; with AMX (whose llama.cpp backend segfaults here), every other
    instruction set the CPU has, named, and AMX off."""
    from ventoux.bench import llamacpp

    zen4 = frozenset({"avx", "avx2", "fma", "f16c", "bmi2", "sse4_2", "avx512f", "avx512_vnni", "avx512_bf16"})
    assert llamacpp.cmake_args("native", zen4) == "-DGGML_NATIVE=ON"
    spr = llamacpp.cmake_args("native", zen4 | {"amx_int8", "amx_tile", "amx_bf16", "avx_vnni"}).split()
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
            "-DGGML_AVX_VNNI=ON", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_TILE=OFF"} <= set(spr)
    assert llamacpp.cmake_args("avx2", zen4) == llamacpp.AVX2_ONLY
    with pytest.raises(VentouxError, match="unknown llama.cpp build"):
        llamacpp.cmake_args("sse2")


def test_peer_notes_print_llama_cpp_build_and_warn_on_a_slow_q4_0():
    from ventoux.bench import Engine, peer_notes

    engines = [Engine("ventoux", "int4", "m"), Engine("llama.cpp", "Q4_0", "m.gguf"), Engine("llama.cpp", "Q8_0", "x")]
    raws = [[{}], [{"system_info": "CPU : AVX2 = 1 | AVX512 = 1"}], [{"system_info": "CPU : AVX2 = 1 | AVX512 = 1"}]]
    rows = [{"gb_s": 30.0, "bandwidth_fraction": 0.6}, {"gb_s": 20.0, "bandwidth_fraction": 0.5},
            {"gb_s": 20.0, "bandwidth_fraction": 0.5}]
    notes = peer_notes(engines, raws, rows)
    assert notes[0] == "llama.cpp (native build) system info: CPU : AVX2 = 1 | AVX512 = 1"  # printed once
    assert len(notes) == 2 and notes[1].startswith("warning: llama.cpp Q4_0 reads 20.0 GB/s, 50%")
    rows[1]["bandwidth_fraction"] = 0.8
    assert len(peer_notes(engines, raws, rows)) == 1  # a Q4_0 at 80% of the bandwidth is believed


def test_the_avx2_run_holds_every_engine_to_avx2(monkeypatch):
    import ventoux.bench as bench

    seen = []

    def fake_run(cmd, input, env, **kwargs):
        seen.append({k: env.get(k) for k in ("VENTOUX_CPU_ISA", "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA")})
        return subprocess.CompletedProcess(cmd, 0, bench.RESULT_MARK + "{}", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.delenv("VENTOUX_CPU_ISA", raising=False)
    bench.run_worker(bench.Engine("ventoux", "int4", "m", isa="avx2"), bench.Settings(), [[1]])
    bench.run_worker(bench.Engine("ventoux", "int4", "m"), bench.Settings(), [[1]])
    assert seen[0] == {"VENTOUX_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}
    assert seen[1]["VENTOUX_CPU_ISA"] is None
