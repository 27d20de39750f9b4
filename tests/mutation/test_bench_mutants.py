"""The benchmark harness's arithmetic and bookkeeping (ventoux/bench/__init__.py), with the workers replaced: the
medians and GB/s of a row, which rows a ratio pairs, the rounds (best bandwidth, a failed engine keeps its row,
llama.cpp left out above batch 1), the worker's environment and its last words on failure, the peers chosen
per precision, the wait for a quiet machine, and each refused setting whole. test_bench.py runs real workers."""

from __future__ import annotations

import json
import subprocess

import pytest

import ventoux.bench as bench
from ventoux.bench import Engine, Settings, ratios, report, summarize
from ventoux.errors import VentouxError


def _raw(*runs, weight_bytes=1000, peak=5, load=2.0, info=""):
    return {"runs": [dict(zip(("tokens", "decode_s", "ttft_s"), r)) for r in runs], "weight_bytes": weight_bytes,
            "peak_rss_bytes": peak, "load_s": load, "system_info": info}


def test_a_row_is_the_median_of_every_run_of_every_worker():
    engine = Engine("ventoux", "int8", "m", dtype="bfloat16", quantize="int8")
    settings = Settings(batch_size=2, prompt_len=10)
    raws = [_raw((5, 1.0, 0.5), (5, 2.0, 0.25), peak=7, load=1.0), _raw((5, 4.0, 1.0), peak=9, load=3.0)]
    row = summarize(engine, raws, settings, bandwidth=0.004)
    # decode: batch 2 x 4 tokens after the first, over 1, 2 and 4 s; prefill: 2 x 10 tokens over each TTFT
    assert row["decode_tok_s"] == 4.0 and row["prefill_tok_s"] == 40.0 and row["ttft_s"] == 0.5
    assert row["peak_rss_bytes"] == 9 and row["load_s"] == 2.0 and row["others_cores"] == 0.0
    assert row["gb_s"] == 1000 * 4.0 / 2 / 1e9  # every weight once per step, whatever the batch
    assert row["bandwidth_fraction"] == pytest.approx(row["gb_s"] / 0.004)
    assert {k: row[k] for k in ("engine", "technique", "path", "dtype", "quantize", "weight_bytes")} == dict(
        engine="ventoux", technique="int8", path="m", dtype="bfloat16", quantize="int8", weight_bytes=1000)
    assert len(row["runs"]) == 3 and row["decode_runs_tok_s"] == [8.0, 4.0, 2.0]  # each run's rate, in run order
    for run, busy in zip(raws[0]["runs"] + raws[1]["runs"], (0.5, 0.25, 0.0)):
        run["others_cores"] = busy
    assert summarize(engine, raws, settings, 1.0)["others_cores"] == 0.25


def _row(engine, technique, decode, prefill, dtype="bfloat16", quantize=None, runs=None):
    return dict(engine=engine, technique=technique, decode_tok_s=decode, prefill_tok_s=prefill, dtype=dtype,
                quantize=quantize, decode_runs_tok_s=runs or [decode])


def test_ratios_pair_each_ventoux_row_with_transformers_and_llama_cpp_of_its_precision():
    rows = [_row("ventoux", "bfloat16", 10.0, 100.0), _row("ventoux", "int4", 30.0, 60.0, quantize="int4"),
            _row("transformers", "bfloat16", 5.0, 200.0), _row("llama.cpp", "BF16", 20.0, 50.0),
            _row("llama.cpp", "Q4_0", 60.0, 30.0), {"engine": "llama.cpp", "technique": "Q8_0", "error": "boom"}]
    assert ratios(rows) == [
        {"ventoux": "ventoux bfloat16", "peer": "transformers bfloat16", "decode": 2.0, "prefill": 0.5,
         "decode_by_round": 2.0},
        {"ventoux": "ventoux bfloat16", "peer": "llama.cpp BF16", "decode": 0.5, "prefill": 2.0,
         "decode_by_round": 0.5},
        {"ventoux": "ventoux int4", "peer": "transformers bfloat16", "decode": 6.0, "prefill": 0.3,
         "decode_by_round": 6.0},
        {"ventoux": "ventoux int4", "peer": "llama.cpp Q4_0", "decode": 0.5, "prefill": 2.0, "decode_by_round": 0.5}]
    odd = [_row("ventoux", "nf4", 1.0, 1.0, quantize="nf4"), _row("llama.cpp", "Q4_0", 1.0, 1.0)]
    assert ratios(odd) == []  # a scheme without a llama.cpp counterpart is compared with none


def test_the_decode_ratio_by_round_is_the_median_of_each_rounds_ratio():
    # Rounds 1-3: 10/20, 30/10, 20/40. The medians' ratio is 20/20 = 1; the rounds' ratios 0.5, 3 and 0.5.
    ours = _row("ventoux", "bfloat16", 20.0, 1.0, runs=[10.0, 30.0, 20.0])
    peer = _row("llama.cpp", "BF16", 20.0, 1.0, runs=[20.0, 10.0, 40.0])
    [ratio] = ratios([ours, peer])
    assert ratio["decode"] == 1.0 and ratio["decode_by_round"] == 0.5


def _fake_worker(monkeypatch, failing=()):
    calls = []

    def run_worker(engine, settings, prompts):
        calls.append((engine.label, settings.repeats, prompts))
        if engine.label in failing:
            raise RuntimeError(f"{engine.label} ran out of memory")
        return _raw((settings.new_tokens, 0.5, 0.5), info="AVX512 = 1" if engine.name == "llama.cpp" else "")

    bandwidths = iter([0.3, 0.5, 0.4])
    monkeypatch.setattr(bench, "run_worker", run_worker)
    monkeypatch.setattr(bench, "measure_bandwidth", lambda threads, nbytes: calls.append((threads, nbytes))
                        or next(bandwidths))
    return calls


def test_rounds_run_every_engine_once_each_keep_the_best_bandwidth_and_a_failed_engine_its_row(monkeypatch):
    calls = _fake_worker(monkeypatch, failing={"transformers bfloat16"})
    engines = [Engine("ventoux", "bfloat16", "m", dtype="bfloat16"), Engine("transformers", "bfloat16", "m"),
               Engine("llama.cpp", "Q4_0", "m.gguf")]
    log = []
    result = bench.run(engines, Settings(prompt_len=4, new_tokens=3, repeats=3, threads=3, bandwidth_bytes=99),
                       100, log.append)
    # each round measures the bandwidth, then runs every engine but a failed one; a worker does one timed run
    bandwidth = (3, 99)
    assert [c if c == bandwidth else c[0] for c in calls] == [
        bandwidth, "ventoux bfloat16", "transformers bfloat16", "llama.cpp Q4_0",
        bandwidth, "ventoux bfloat16", "llama.cpp Q4_0", bandwidth, "ventoux bfloat16", "llama.cpp Q4_0"]
    runs = [c for c in calls if c != bandwidth]
    assert {c[1] for c in runs} == {1} and all(c[2] == runs[0][2] for c in runs)  # the same prompts for all
    assert result["machine"]["read_bandwidth_gb_s"] == 0.5 and result["machine"]["threads"] == 3
    assert result["settings"]["repeats"] == 3
    ours, failed, peer = result["results"]
    assert failed == {"engine": "transformers", "technique": "bfloat16", "path": "m",
                      "error": "transformers bfloat16 ran out of memory"}
    assert len(ours["runs"]) == 3 and ours["decode_tok_s"] == 4.0
    assert ours["bandwidth_fraction"] == pytest.approx(ours["gb_s"] / 0.5)
    assert result["ratios"] == []  # bfloat16 has no Q4_0 to compare with; the failed row none
    assert log[0] == "round 1/3: read bandwidth 0.3 GB/s (best so far)"
    assert log[1] == "  ventoux bfloat16: 4.00 tok/s decode (0 s with loading)"
    assert "  transformers bfloat16 failed: transformers bfloat16 ran out of memory" in log
    assert "round 2/3: read bandwidth 0.5 GB/s (best so far)" in log
    notes = log.index("")  # a blank line, llama.cpp's notes, then the table (no ratios: no blank line after)
    assert log[notes + 1] == "llama.cpp (native build) system info: AVX512 = 1"
    assert log[notes + 2].startswith("warning: llama.cpp Q4_0 reads ") and len(log) == notes + 4
    assert log[-1].startswith("batch 1, 4-token prompt, 3 new tokens, 3 threads, medians of 3")


def test_llama_cpp_rows_are_left_out_above_batch_one(monkeypatch):
    calls = _fake_worker(monkeypatch)
    engines = [Engine("ventoux", "int4", "m", quantize="int4"), Engine("llama.cpp", "Q4_0", "m.gguf")]
    log = []
    result = bench.run(engines, Settings(batch_size=2, prompt_len=3, repeats=1), 100, log.append)
    runs = [c for c in calls if len(c) == 3]
    assert [c[0] for c in runs] == ["ventoux int4"] and len(result["results"]) == 1
    assert log[0] == "llama.cpp rows skipped: llama-cpp-python's generator decodes one sequence at a time (batch 1)"
    assert len(runs[0][2]) == 2 and all(len(p) == 3 for p in runs[0][2])


def test_a_batch_without_llama_cpp_skips_nothing_and_prints_the_ratios_last(monkeypatch):
    _fake_worker(monkeypatch)
    engines = [Engine("ventoux", "int4", "m", quantize="int4"), Engine("transformers", "bfloat16", "m")]
    log = []
    result = bench.run(engines, Settings(batch_size=2, prompt_len=3, repeats=1), 100, log.append)
    assert len(result["results"]) == 2 and not any("skipped" in line for line in log)
    assert log[-2:] == ["", report.ratio_table(result)] and log[-1].startswith("ratios (ventoux / peer)")
    assert log[-4] == "" and log[-3].startswith("batch 2, 3-token prompt")


def test_a_busy_machine_is_waited_for_before_each_engine(monkeypatch):
    _fake_worker(monkeypatch)
    waits = []
    monkeypatch.setattr(bench, "wait_for_quiet", lambda s, log: waits.append((s, log)))
    engines = [Engine("ventoux", "bfloat16", "m"), Engine("transformers", "bfloat16", "m")]
    log = [].append
    bench.run(engines, Settings(repeats=1, quiet_wait_s=7.0), 100, log)
    assert waits == [(7.0, log), (7.0, log)]
    bench.run(engines, Settings(repeats=1), 100, log)
    assert len(waits) == 2  # 0: no waiting


def test_wait_for_quiet_returns_once_others_go_idle_or_time_is_up(monkeypatch):
    import ventoux.bench.worker as worker

    totals = [0.0, 1.0, 1.0, 3.0, 3.0, 3.125]  # busy CPU seconds over the sampled seconds: 1, 2, then 1/8
    monkeypatch.setattr(worker, "busy_cpu_s", lambda: totals.pop(0))
    sleeps = []
    monkeypatch.setattr(bench.time, "sleep", sleeps.append)
    log = []
    assert bench.wait_for_quiet(60.0, log.append) == 0.125
    assert log == ["  waiting up to 60 s: other processes keep 1.0 cores busy"] and sleeps == [1.0] * 3  # said once
    totals[:] = [0.0, 0.5, 0.5, 0.75]
    log.clear()
    assert bench.wait_for_quiet(60.0, log.append, busy_cores=0.5) == 0.25  # 0.5 cores is not under 0.5
    clock = iter([100.0, 100.0, 101.0])
    monkeypatch.setattr(bench.time, "monotonic", lambda: next(clock))
    totals[:] = [0.0, 3.0, 3.0, 6.0]
    log.clear()
    assert bench.wait_for_quiet(0.0, log.append) == 3  # no time to wait: what they used is returned
    assert log == []
    monkeypatch.setattr(worker, "busy_cpu_s", lambda: None)
    assert bench.wait_for_quiet(60.0, log.append) == 0.0  # off Linux: nothing to measure


def test_a_worker_gets_the_spec_and_threads_and_a_failure_is_its_last_line(monkeypatch):
    seen = []

    def fake_run(cmd, input, env, capture_output, text):
        assert capture_output is True and text is True
        seen.append((cmd[1:], json.loads(input), env.get("OMP_NUM_THREADS"), env.get("VENTOUX_CPU_ISA")))
        if input.count('"technique": "bad"'):
            return subprocess.CompletedProcess(cmd, 1, "loading\n", "Traceback ...\nValueError: no such file\n\n")
        if input.count('"technique": "mute"'):
            return subprocess.CompletedProcess(cmd, 3, "", "  \n")
        return subprocess.CompletedProcess(cmd, 0, "noise\n" + bench.RESULT_MARK + '{"load_s": 1}\n', "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    engine = Engine("ventoux", "int8", "m", quantize="int8")
    monkeypatch.delenv("VENTOUX_CPU_ISA", raising=False)
    assert bench.run_worker(engine, Settings(threads=3), [[5, 6]]) == {"load_s": 1}
    bench.run_worker(Engine("ventoux", "int8", "m", isa="avx2"), Settings(threads=3), [[5, 6]])
    assert seen.pop()[3] == "avx2" and seen[0][3] is None  # the AVX2 row's environment (ISA_ENVIRONMENT)
    args, spec, threads, _ = seen[0]
    assert args == ["-m", "ventoux.bench.worker"] and threads == "3"
    assert spec == {"engine": {**Engine("ventoux", "int8", "m", quantize="int8").__dict__},
                    "settings": Settings(threads=3).__dict__, "prompts": [[5, 6]]}
    with pytest.raises(RuntimeError) as e:
        bench.run_worker(Engine("ventoux", "bad", "m"), Settings(), [[1]])
    assert str(e.value) == "ValueError: no such file" and seen[1][2] is None  # not what stdout said before
    with pytest.raises(RuntimeError, match=r"^the worker exited with status 3$"):
        bench.run_worker(Engine("ventoux", "mute", "m"), Settings(), [[1]])


def test_peers_in_the_precision_of_the_ventoux_row(monkeypatch, tmp_path):
    from ventoux.bench import llamacpp

    built, converted = [], []
    monkeypatch.setattr(llamacpp, "ensure_installed", lambda build, log: built.append((build, log)))
    monkeypatch.setattr(llamacpp, "gguf_file", lambda folder, t, cache, log: converted.append((folder, cache, log))
                        or tmp_path / f"{t}.gguf")
    engines = bench.peer_engines("m", "float32", "int4", ["transformers", "llama.cpp", "transformers"], tmp_path,
                                 print)
    # transformers has no int4 CPU kernels: its row is bfloat16, whatever ventoux's dtype
    assert engines == [Engine("transformers", "bfloat16", "m", dtype="bfloat16"),
                       Engine("llama.cpp", "Q4_0", str(tmp_path / "Q4_0.gguf")),
                       Engine("llama.cpp", "Q4_K_M", str(tmp_path / "Q4_K_M.gguf"))]
    assert built == [("native", print)] and converted == [("m", tmp_path, print)] * 2
    engines = bench.peer_engines("m", "float32", None, ["transformers", "llama.cpp"], tmp_path, isa="avx2")
    assert engines == [Engine("transformers", "float32", "m", dtype="float32", isa="avx2"),
                       Engine("llama.cpp", "F32", str(tmp_path / "F32.gguf"), isa="avx2")]
    assert [b for b, _ in built] == ["native", "avx2"]
    with pytest.raises(VentouxError) as e:
        bench.peer_engines("m", "bfloat16", None, ["vllm"], tmp_path)
    assert str(e.value) == "--compare 'vllm' is not a known peer: use transformers or llama.cpp"


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "--batch-size=0 is too small: it must be at least 1"),
    ("prompt_len", 0, "--prompt-len=0 is too small: it must be at least 1"),
    ("new_tokens", 1, "--new-tokens=1 is too small: it must be at least 2"),
    ("repeats", 0, "--repeats=0 is too small: it must be at least 1"),
    ("threads", 0, "--threads=0 must be at least 1")])
def test_each_setting_too_small_is_refused_whole(field, value, message):
    Settings(batch_size=1, prompt_len=1, new_tokens=2, repeats=1, threads=1).check()  # the least allowed
    with pytest.raises(VentouxError) as e:
        Settings(**{field: value}).check()
    assert str(e.value) == message


def test_prompts_are_the_seeds_and_avoid_the_control_ids():
    a = bench.random_prompts(Settings(batch_size=3, prompt_len=50, seed=1), 40)
    assert len(a) == 3 and all(len(p) == 50 and all(3 <= t < 40 for t in p) for p in a)
    assert a == bench.random_prompts(Settings(batch_size=3, prompt_len=50, seed=1), 40)
    assert a != bench.random_prompts(Settings(batch_size=3, prompt_len=50, seed=2), 40)
    big = bench.random_prompts(Settings(prompt_len=200_000), 10**6)[0]
    assert max(big) == 31999 and min(big) == 3  # ids beyond the tokenizer's 32000 never (a Tekken vocabulary)


def test_peer_notes_print_no_build_line_for_a_worker_that_reported_none():
    engines = [Engine("llama.cpp", "Q8_0", "m.gguf"), Engine("llama.cpp", "Q4_0", "x.gguf")]
    raws = [[{}], []]  # an old worker's result; a failed engine's (no runs)
    assert bench.peer_notes(engines, raws, [{}, {"error": "boom"}]) == []


def test_the_machine_is_described_with_the_threads_asked_for_or_torchs(monkeypatch):
    import os
    import platform

    import torch

    from ventoux.cpu_kernels import cpu_model

    m = bench.describe_machine(3)
    assert m == {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": 3, "platform": platform.platform(),
                 "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                 "python": platform.python_version(), "torch": torch.__version__}
    assert bench.describe_machine(None)["threads"] == torch.get_num_threads()

    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(bench.os, "sysconf", no_sysconf)
    assert bench.describe_machine(None)["memory_bytes"] is None


def test_bandwidth_is_the_bytes_over_the_fastest_of_five_sums_with_the_threads_asked_for(monkeypatch):
    import torch

    ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 3.0, 3.0, 3.5, 4.0, 4.5, 9.0, 9.0])  # 0.5, 0.25, 1, 0.5, 0.5 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    sums, threads = [], []
    monkeypatch.setattr(torch.Tensor, "sum", lambda t: sums.append((t.dtype, t.numel())))
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    before = torch.get_num_threads()
    assert bench.measure_bandwidth(3, nbytes=4000) == 4000 / 0.25 / 1e9
    assert sums == [(torch.float32, 1000)] * 5 and threads == [3, before]  # then the old count back
    threads.clear()
    ticks = iter([0.0, 2.0])
    assert bench.measure_bandwidth(None, nbytes=4000, repeats=1) == pytest.approx(4000 / 2.0 / 1e9)
    assert threads == [before]  # torch's own count, restored all the same


def test_peer_notes_warn_only_for_a_q4_0_row_under_three_quarters_of_the_bandwidth():
    engines = [Engine("llama.cpp", "Q4_0", "a.gguf"), Engine("llama.cpp", "Q8_0", "b.gguf"),
               Engine("llama.cpp", "Q4_0", "c.gguf", isa="avx2"), Engine("llama.cpp", "Q4_0", "d.gguf")]
    info = {"system_info": "AVX2 = 1"}
    raws = [[info], [info], [info], [info]]
    rows = [{"gb_s": 20.0, "bandwidth_fraction": 0.6}, {"gb_s": 1.0, "bandwidth_fraction": 0.1},
            {"gb_s": 30.0, "bandwidth_fraction": 0.75}, {"error": "boom"}]
    assert bench.peer_notes(engines, raws, rows) == [
        "llama.cpp (native build) system info: AVX2 = 1",  # once per build: the others say the same
        "warning: llama.cpp Q4_0 reads 20.0 GB/s, 60% of the measured bandwidth (under 75%): it may be built "
        "without this CPU's instruction set, or the machine was busy; its ratios are suspect",
        "llama.cpp (avx2 build) system info: AVX2 = 1"]  # 75% is enough; an error row has no share
