"""The benchmark worker (ventoux/bench/worker.py) in this process: the clock around a run, what other processes
used meanwhile, /proc readings, the bytes each engine reads per token, every row decoding its new tokens
(EOS or not), the llama.cpp runner's settings, and main's warm-up, repeats and result line.
test_bench.py runs real workers in child processes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from test_bench import TINY, tiny_folder  # noqa: F401  (the fixture: a tiny checkpoint with Mistral's v1 tokenizer)

import ventoux
import ventoux.bench.worker as worker
from ventoux.bench import RESULT_MARK
from ventoux.events import Event


def _clock(monkeypatch, *times):
    ticks = iter(times)
    monkeypatch.setattr(worker.time, "perf_counter", lambda: next(ticks))


def test_timed_counts_from_the_start_to_the_first_item_then_to_the_last(monkeypatch):
    _clock(monkeypatch, 10.0, 10.5, 13.5)  # the start, the first item, after the last
    assert worker._timed(iter("abcdef"), 4) == {"ttft_s": 0.5, "decode_s": 3.0, "tokens": 4}  # stops at 4
    _clock(monkeypatch, 0.0, 2.0, 2.25)
    assert worker._timed(iter("ab"), 9) == {"ttft_s": 2.0, "decode_s": 0.25, "tokens": 2}  # fewer than asked


def test_a_timed_run_counts_the_cores_other_processes_kept_busy(monkeypatch):
    class Runner:
        def generate(self, prompts, new_tokens):
            seen.append((prompts, new_tokens))
            return {"tokens": new_tokens}

    seen = []
    busy, own = iter([100.0, 106.0]), iter([1.0, 3.0])
    monkeypatch.setattr(worker, "busy_cpu_s", lambda: next(busy))
    monkeypatch.setattr(worker, "_own_cpu_s", lambda: next(own))
    _clock(monkeypatch, 50.0, 52.0)
    # the machine was busy 6 s, 2 of them ours, over 2 s: others kept 2 cores busy
    assert worker._timed_run(Runner(), [[1, 2]], 7) == {"tokens": 7, "others_cores": 2.0}
    assert seen == [([[1, 2]], 7)]
    busy, own = iter([100.0, 101.0]), iter([1.0, 3.0])
    _clock(monkeypatch, 50.0, 52.0)
    assert worker._timed_run(Runner(), [[1]], 3)["others_cores"] == 0.0  # never below 0 (clock ticks apart)
    monkeypatch.setattr(worker, "busy_cpu_s", lambda: None)
    monkeypatch.setattr(worker, "_own_cpu_s", lambda: 0.0)
    _clock(monkeypatch, 50.0, 52.0)
    assert worker._timed_run(Runner(), [[1]], 3) == {"tokens": 3}  # off Linux: not measured


def test_busy_cpu_is_every_state_but_idle_and_iowait_of_proc_stat(monkeypatch):
    lines = {"/proc/stat": "cpu  10 20 30 400 50 60 70 80 90 100\ncpu0 1 2 3 4 5 6 7 8 9 10\n"}
    monkeypatch.setattr(worker, "open", lambda path: io.StringIO(lines[path]), raising=False)
    monkeypatch.setattr(worker.os, "sysconf", lambda name: {"SC_CLK_TCK": 100}[name])
    assert worker.busy_cpu_s() == pytest.approx((10 + 20 + 30 + 60 + 70 + 80) / 100)  # guest times not counted
    lines["/proc/stat"] = "cpu  x y\n"
    assert worker.busy_cpu_s() is None
    lines.clear()  # no such file
    monkeypatch.setattr(worker, "open", lambda path: (_ for _ in ()).throw(FileNotFoundError(path)), raising=False)
    assert worker.busy_cpu_s() is None


def test_own_cpu_is_user_plus_system_time(monkeypatch):
    usage = types.SimpleNamespace(ru_utime=1.5, ru_stime=0.25, ru_maxrss=7)
    monkeypatch.setattr(worker.resource, "getrusage", lambda who: usage if who == worker.resource.RUSAGE_SELF else 0)
    assert worker._own_cpu_s() == 1.75


def test_peak_rss_is_vmhwm_in_bytes_else_ru_maxrss(monkeypatch):
    status = "Name:\tpython\nVmPeak:\t 999 kB\nVmHWM:\t  2048 kB\nVmRSS:\t 1024 kB\n"
    monkeypatch.setattr(worker, "open", lambda path: io.StringIO(status) if path == "/proc/self/status" else None,
                        raising=False)
    assert worker.peak_rss() == 2048 * 1024
    monkeypatch.setattr(worker, "open", lambda path: (_ for _ in ()).throw(OSError(path)), raising=False)
    monkeypatch.setattr(worker.resource, "getrusage",
                        lambda who: types.SimpleNamespace(ru_maxrss=4321 if who == worker.resource.RUSAGE_SELF else 0))
    assert worker.peak_rss() == 4321


def test_steps_are_one_item_per_decode_step_of_the_live_rows():
    def ev(index, token=7):
        return Event(index, "", token)

    # two rows, then row 0 alone, then a closing event that only flushes text
    events = [ev(0), ev(1), ev(0), ev(1), ev(0), ev(1, None), ev(0), ev(0, None)]
    assert [e.index for e in worker._steps(iter(events))] == [0, 0, 0, 0]
    assert [e.index for e in worker._steps(iter([ev(1), ev(0), ev(1)]))] == [1, 0]  # row 1 first, then a new step


SETTINGS = {"device": "cpu", "prefill_chunk": None, "threads": 1, "prompt_len": 6, "new_tokens": 5}
ENGINE = {"path": None, "dtype": "float32", "quantize": None}


def test_ventoux_reads_every_weight_but_the_embedding_and_decodes_greedily_past_eos(tiny_folder, monkeypatch):  # noqa: F811
    runner = worker.VentouxRunner({**ENGINE, "path": str(tiny_folder)}, {**SETTINGS, "prefill_chunk": 4})
    per_layer = 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160 + 2 * 64)
    assert runner.weight_bytes == TINY.n_layers * per_layer + 4 * (64 * 32000 + 64)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    greedy = [c.tokens for c in runner.llm.generate(prompts, max_tokens=5)]
    # the first token the model picks becomes its end of sequence: a run that stopped there would decode nothing
    runner.llm.tokenizer.eos_id = greedy[0][0]
    assert runner.llm.generate(prompts[0], max_tokens=5).tokens == []
    streams, real = [], runner.llm.stream

    def stream(prompt, **kw):
        streams.append((prompt, kw))
        events = list(real(prompt, **kw))
        streams.append([[e.token for e in events if e.index == i and e.token is not None] for i in range(2)])
        return iter(events)

    monkeypatch.setattr(runner.llm, "stream", stream)
    run = runner.generate(prompts[:1], 5)
    assert run["tokens"] == 5 and run["ttft_s"] > 0 and run["decode_s"] > 0
    assert streams[0] == (prompts[:1], dict(max_tokens=5, temperature=0.0, prefill_chunk=4, ignore_eos=True))
    assert streams[1][0] == greedy[0]
    assert runner.generate(prompts, 4)["tokens"] == 4  # a batch: one item per step
    assert streams[3] == [g[:4] for g in greedy]


def test_ventoux_is_loaded_with_the_engines_settings_and_counts_buffers(tiny_folder, monkeypatch):  # noqa: F811
    loads = []
    real = ventoux.load
    monkeypatch.setattr(ventoux, "load", lambda path, **kw: loads.append((path, kw)) or real(path, dtype="float32"))
    runner = worker.VentouxRunner({"path": str(tiny_folder), "dtype": "bfloat16", "quantize": "int8", "compile": True,
                                   "lora": "runs/a", "mmap": False}, {**SETTINGS, "prefill_chunk": 3})
    assert loads == [(str(tiny_folder), dict(dtype="bfloat16", device="cpu", quantize="int8", compile=True,
                                        lora="runs/a", mmap=False))]
    assert runner.chunk == 3
    worker.VentouxRunner({**ENGINE, "path": str(tiny_folder)}, SETTINGS)
    assert [loads[1][1][k] for k in ("compile", "lora", "mmap")] == [False, None, True]  # absent from an older spec
    # a quantized layer's packed weights and scales are buffers: they count, but not the embedding's
    llm = ventoux.load(str(tiny_folder), dtype="float32")
    llm.model.layers[0].register_buffer("packed", torch.zeros(1000, dtype=torch.uint8))
    llm.model.tok_embeddings.register_buffer("packed", torch.zeros(500, dtype=torch.uint8))
    monkeypatch.setattr(ventoux, "load", lambda path, **kw: llm)
    packed = worker.VentouxRunner({**ENGINE, "path": str(tiny_folder)}, SETTINGS)
    assert packed.weight_bytes == runner.weight_bytes + 1000


def test_transformers_reads_the_same_bytes_and_decodes_greedily_every_new_token(tiny_folder, monkeypatch):  # noqa: F811
    runner = worker.TransformersRunner({**ENGINE, "path": str(tiny_folder), "dtype": "bfloat16"}, SETTINGS)
    assert runner.model.dtype == torch.bfloat16 and not runner.model.training
    per_layer = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160 + 2 * 64)
    assert runner.weight_bytes == TINY.n_layers * per_layer + 2 * (64 * 32000 + 64)
    prompt = [5, 6, 7, 8, 9, 10]
    with torch.no_grad():
        greedy = runner.model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)[0].tolist()
    runner.model.generation_config.do_sample = True  # as some checkpoints' generation_config.json say
    made, real = [], runner.model.generate
    monkeypatch.setattr(runner.model, "generate", lambda ids, **kw: made.append(real(ids, **kw)) or made[-1])
    ticks = iter(range(10, 100))  # the clock: t0 = 10, then one tick per step the streamer is given
    monkeypatch.setattr(worker.time, "perf_counter", lambda: float(next(ticks)))
    # streamer: the prompt at 11, the first new token at 12, the last at 16
    assert runner.generate([prompt], 5) == {"ttft_s": 2.0, "decode_s": 4.0, "tokens": 5}
    assert made[0].tolist() == [greedy]
    runner.model.generation_config.eos_token_id = greedy[len(prompt)]  # it would stop at the first new token
    assert runner.generate([prompt], 5)["tokens"] == 5 and made[1].shape == (1, len(prompt) + 5)


def test_llama_cpp_runs_its_build_with_the_threads_and_a_context_for_prompt_and_tokens(monkeypatch):
    from ventoux.bench import llamacpp

    made, used = [], []

    class Llama:
        def __init__(self, **kw):
            made.append(kw)

        def reset(self):
            used.append("reset")

        def generate(self, tokens, **kw):
            used.append((tokens, kw))
            return iter(range(100))

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=Llama))
    monkeypatch.setattr(llamacpp, "install_dir", lambda build: f"dir-{build}")
    monkeypatch.setattr(llamacpp, "use", used.append)
    monkeypatch.setattr(llamacpp, "system_info", lambda: "AVX2 = 1")
    monkeypatch.setattr(llamacpp, "gguf_weight_bytes", lambda path: len(path))
    runner = worker.LlamaCppRunner({"path": "m.gguf", "isa": "avx2"}, {**SETTINGS, "threads": 3})
    assert used == ["dir-avx2"] and runner.system_info == "AVX2 = 1" and runner.weight_bytes == len("m.gguf")
    assert made == [dict(model_path="m.gguf", n_ctx=6 + 5 + 8, n_threads=3, n_threads_batch=3, use_mmap=True,
                         verbose=False)]
    assert worker.LlamaCppRunner({"path": "m", "mmap": False}, SETTINGS) and used[-1] == "dir-native"
    assert made[-1]["use_mmap"] is False
    used.clear()
    assert runner.generate([[4, 5]], 7)["tokens"] == 7
    assert used == ["reset", ([4, 5], dict(top_k=1, temp=0.0, reset=True))]


@pytest.fixture(autouse=True)
def _threads():
    """main() sets torch's threads: back to this process's afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _main(monkeypatch, capsys, engine, settings, prompts):
    calls = []

    class Runner:
        weight_bytes = 123
        if "system_info" in engine:
            system_info = engine["system_info"]

        def __init__(self, e, s):
            calls.append(("init", e, dict(s)))

        def generate(self, p, n):
            calls.append((p, n))
            return {"tokens": n}

    monkeypatch.setitem(worker.RUNNERS, "fake", Runner)
    monkeypatch.setattr(worker, "busy_cpu_s", lambda: None)
    monkeypatch.setattr(worker, "peak_rss", lambda: 4096)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"engine": {"name": "fake", **engine},
                                                              "settings": settings, "prompts": prompts})))
    worker.main()
    out = capsys.readouterr().out
    assert out.startswith(RESULT_MARK) and out.endswith("\n") and out.count("\n") == 1
    return calls, json.loads(out[len(RESULT_MARK):])


def test_main_warms_up_on_short_prompts_then_times_each_repeat(monkeypatch, capsys):
    prompts = [list(range(600)), [1, 2]]
    calls, result = _main(monkeypatch, capsys, {}, {"threads": 1, "new_tokens": 9, "repeats": 2}, prompts)
    assert calls[0] == ("init", {"name": "fake"}, {"threads": 1, "new_tokens": 9, "repeats": 2})
    assert calls[1] == ([list(range(512)), [1, 2]], 4)  # the warm-up: at most 512 prompt tokens, 4 new ones
    assert calls[2:] == [(prompts, 9), (prompts, 9)]
    assert set(result) == {"load_s", "weight_bytes", "peak_rss_bytes", "runs", "system_info"}
    assert result["weight_bytes"] == 123 and result["peak_rss_bytes"] == 4096 and result["system_info"] == ""
    assert result["runs"] == [{"tokens": 9}, {"tokens": 9}] and 0 <= result["load_s"] < 60


def test_main_sets_the_threads_or_reports_torchs_and_warms_a_compiled_step_on_the_timed_shapes(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    calls, _ = _main(monkeypatch, capsys, {"compile": True}, {"threads": 3, "new_tokens": 5, "repeats": 1}, [[7] * 600])
    assert seen == [3] and calls[1] == ([[7] * 600], 5)
    calls, result = _main(monkeypatch, capsys, {"system_info": "AVX2 = 1"}, {"threads": None, "new_tokens": 5,
                                                                           "repeats": 1}, [[7]])
    assert seen == [3] and calls[0][2]["threads"] == torch.get_num_threads()  # None: torch's default, reported
    assert result["system_info"] == "AVX2 = 1"


def test_the_result_line_is_flushed_before_the_worker_ends():
    """llama.cpp's library can crash the worker as it exits: the line must be out by then (stdout is a pipe)."""
    child = """
import io, json, os, sys
import ventoux.bench.worker as worker
class Runner:
    weight_bytes = 1
    def __init__(self, engine, settings): pass
    def generate(self, prompts, n): return {"tokens": n}
worker.RUNNERS["fake"] = Runner
sys.stdin = io.StringIO(json.dumps({"engine": {"name": "fake"}, "settings": {"threads": 1, "new_tokens": 2,
                                                                            "repeats": 1}, "prompts": [[1]]}))
worker.main()
os._exit(0)  # as a crash would: no flush at exit
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe is block-buffered
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, env=env).stdout
    assert out.startswith(RESULT_MARK) and json.loads(out[len(RESULT_MARK):])["runs"][0]["tokens"] == 2
