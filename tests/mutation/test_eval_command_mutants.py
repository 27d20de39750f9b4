"""`ventoux eval` (commands/eval.py) in process, where mutation testing (mutation/README.md, through
mutation/fresh_module.sh) sees it: perplexity with the default context and with --context/--stride against
transformers' scores (Hugging Face's perplexity guide), the printed summary and JSON, --out, and what the tasks
command hands each task and prints."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import TINY_FULL
from test_eval import DATA, TEXT, full_model_dir, hf_guide_nll, pair  # noqa: F401  (full_model_dir: the fixture)

import ventoux
from ventoux.cli import main
from ventoux.errors import VentouxError
from ventoux.eval import tasks as eval_tasks

DATA_TEXT = TEXT * 3  # about 220 tokens: more than two of the model's 96-token contexts


@pytest.fixture(scope="module")
def hf():
    return pair(TINY_FULL)[0]  # the same seed as full_model_dir's weights


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(DATA_TEXT)
    return path


def run(capsys, *args) -> tuple[dict, str]:
    assert main(["eval", *map(str, args)]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def ids_of(model_dir):
    return ventoux.load(str(model_dir), dtype="float32").tokenizer.encode(DATA_TEXT, bos=True)


def test_perplexity_by_default_reads_the_models_whole_context(full_model_dir, hf, text_file, capsys):  # noqa: F811
    result, err = run(capsys, "perplexity", "--model", full_model_dir, "--data", text_file, "--dtype", "float32",
                      "--batch-size", "2", "--quiet")
    nll, count = hf_guide_nll(hf, ids_of(full_model_dir), 97, 96)  # its context: 96 tokens, consecutive windows
    assert (result["context"], result["stride"], result["tokens"]) == (96, 96, count)
    assert result["nll"] == pytest.approx(nll, rel=1e-5) and result["windows"] == math.ceil(count / 96)
    assert {k: result[k] for k in ("model", "dtype", "quantize", "lora")} == {
        "model": str(full_model_dir), "dtype": "float32", "quantize": None, "lora": None}
    line = (f"{full_model_dir}: perplexity {result['perplexity']:.4f}, {result['bits_per_byte']:.4f} bits per byte, "
            f"{result['nats_per_character']:.4f} nats per character over {count:,} tokens (context 96, stride 96, ")
    assert err.startswith(line) and re.fullmatch(r"\d+\.\d s\)\n", err[len(line):]), err


def test_perplexity_with_context_and_stride_and_out(full_model_dir, hf, text_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ppl.json"
    result, _ = run(capsys, "perplexity", "--model", full_model_dir, "--data", text_file, "--dtype", "float32",
                    "--context", "32", "--stride", "16", "--out", out, "--quiet")
    nll, count = hf_guide_nll(hf, ids_of(full_model_dir), 33, 16)
    assert (result["context"], result["stride"], result["tokens"]) == (32, 16, count)
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert json.loads(out.read_text()) == result  # perplexity has no samples: the file is what was printed


@pytest.fixture
def calls(monkeypatch):
    """run_task replaced by a recorder whose results hold per-item samples."""
    seen = []

    def run_task(llm, task, batch_size, chat, max_tokens, stop, progress):
        seen.append({"task": task.name, "batch_size": batch_size, "chat": chat, "max_tokens": max_tokens,
                     "stop": stop, "progress": progress, "model": llm.source})
        if task.kind == "multiple_choice":
            return {"kind": task.kind, "n": 4, "acc": 0.5, "acc_norm": 0.25, "samples": [{"pred": 1}]}
        return {"kind": task.kind, "n": 3, "exact_match": 1 / 3, "samples": [{"output": "x"}]}

    monkeypatch.setattr(eval_tasks, "run_task", run_task)
    return seen


def test_tasks_get_the_flags_and_print_without_samples(full_model_dir, calls, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "tasks.json"
    result, err = run(capsys, "tasks", "--model", full_model_dir, "--tasks", DATA / "mc.jsonl", DATA / "gen.jsonl",
                      "--out", out)
    common = {"batch_size": 8, "chat": False, "max_tokens": 64, "stop": ["\n"], "progress": True,
              "model": str(full_model_dir)}
    assert calls == [{"task": "mc", **common}, {"task": "gen", **common}]
    assert err == "mc: acc 0.5000, acc_norm 0.2500 (4 items)\ngen: exact_match 0.3333 (3 items)\n"
    assert result["tasks"] == {"mc": {"kind": "multiple_choice", "n": 4, "acc": 0.5, "acc_norm": 0.25},
                               "gen": {"kind": "generation", "n": 3, "exact_match": 1 / 3}}
    written = json.loads(out.read_text())
    assert written["tasks"]["gen"]["samples"] == [{"output": "x"}] and written["tasks"]["mc"]["samples"] == [
        {"pred": 1}]
    assert {k: written[k] for k in ("model", "quantize", "lora")} == {"model": str(full_model_dir), "quantize": None,
                                                                       "lora": None}
    calls.clear()
    run(capsys, "tasks", "--model", full_model_dir, "--tasks", DATA / "gen.jsonl", "--chat", "--quiet",
        "--batch-size", "3", "--max-tokens", "5")
    assert calls == [{**common, "task": "gen", "chat": True, "stop": [], "progress": False, "batch_size": 3,
                      "max_tokens": 5}]
    calls.clear()
    run(capsys, "tasks", "--model", full_model_dir, "--tasks", DATA / "gen.jsonl", "--stop", "a", "--stop", "b")
    assert calls[0]["stop"] == ["a", "b"]


def test_a_batch_size_below_one_is_refused_before_loading(tmp_path, text_file, capsys):
    assert main(["eval", "perplexity", "--model", str(tmp_path / "nowhere"), "--data", str(text_file),
                 "--batch-size", "0"]) == 1
    assert capsys.readouterr().err == "ventoux: error: --batch-size 0 must be at least 1\n"


def test_load_gets_the_model_flags_and_lora_and_mmap_only_when_given(monkeypatch, text_file, capsys):
    asked = []

    def load(model, **kw):
        asked.append((model, kw))
        raise VentouxError("stop here")

    monkeypatch.setattr(ventoux, "load", load)
    for extra in (["--batch-size", "1"], ["--lora", "adapter-dir"], ["--no-mmap"]):  # a batch of one is fine
        assert main(["eval", "perplexity", "--model", "m", "--data", str(text_file), "--dtype", "bfloat16",
                     "--device", "cpu", "--quantize", "int8", *extra]) == 1
    assert capsys.readouterr().err == "ventoux: error: stop here\n" * 3
    flags = {"dtype": "bfloat16", "device": "cpu", "quantize": "int8"}
    assert asked == [("m", flags), ("m", {**flags, "lora": "adapter-dir"}), ("m", {**flags, "mmap": False})]


@pytest.mark.parametrize("kind, flag", [("perplexity", "--data"), ("tasks", "--tasks")])
def test_the_inputs_are_required(kind, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", kind, "--model", "m"])
    assert e.value.code == 2 and f"the following arguments are required: {flag}" in capsys.readouterr().err


def test_the_kind_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval"])
    assert e.value.code == 2 and "the following arguments are required: KIND" in capsys.readouterr().err
