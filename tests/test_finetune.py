"""Fine-tuning: conversations encoded exactly as mistral-common encodes them, the loss on assistant turns
only, every bad data line reported, resume after a real kill -9 ending with the same adapter bytes, and
a short run on the demonstration task that lowers the held-out loss."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ventoux.api import DEMO_MODEL
from ventoux.cli import main
from ventoux.config import ModelConfig
from ventoux.errors import VentouxError
from ventoux.model import Transformer
from ventoux.train.finetune import FinetuneArgs, finetune
from ventoux.train.sft_data import Sample, collate, encode_line
from ventoux.weights import save_hf

DATA = files("mistral_common") / "data"
TOKENIZERS = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3",
              "tekken-v3": "tekken_240718.json", "tekken-240911": "tekken_240911.json"}
CLI = [sys.executable, "-c", "import sys; from ventoux.cli import main; sys.exit(main())"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

CHAT = {"messages": [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "How many legs has a cat?"},
    {"role": "assistant", "content": "Four, I think.", "weight": 0},
    {"role": "user", "content": "Just the number?"},
    {"role": "assistant", "content": "4"},
]}
TOOLS = {
    "tools": [{"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}],
    "messages": [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "tool_calls": [
            {"id": "abcDEF123", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "5"},
        {"role": "assistant", "content": "It is 5."},
    ],
}


def mistral(name: str):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(DATA / TOKENIZERS[name]))


def reference(tok, sample: dict) -> list[int]:
    """mistral-common's own encoding of the whole conversation (finetuning validation: it ends with the
    assistant). Weights are ours, not a field of its request."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator

    request = ChatCompletionRequest.model_validate(
        {**sample, "messages": [{k: v for k, v in m.items() if k != "weight"} for m in sample["messages"]]})
    version = tok.instruct_tokenizer.tokenizer.version
    tok._chat_completion_request_validator = get_validator(version, ValidationMode.finetuning)
    return tok.encode_chat_completion(request).tokens


def trained_text(tok, tokens, trained) -> str:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    text = tok.instruct_tokenizer.tokenizer.decode([t for t, m in zip(tokens, trained) if m],
                                                   special_token_policy=SpecialTokenPolicy.KEEP)
    return text.replace("\u2581", " ")  # sentencepiece keeps its word marker when special tokens are kept


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


# ---- encoding and loss masks -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_conversation_equals_mistral_common_and_trains_only_assistant_turns(name):
    tok = mistral(name)
    eos = tok.instruct_tokenizer.tokenizer.eos_id
    samples = [CHAT] if name == "v1" else [CHAT, TOOLS]  # v1 has no tool tokens
    for sample in samples:
        tokens, trained = encode_line(json.dumps(sample), tok)
        assert tokens == reference(tok, sample)
        text = trained_text(tok, tokens, trained)
        assert tokens[[i for i, m in enumerate(trained) if m][-1]] == eos  # </s> ends each trained turn
        if sample is CHAT:  # the weight-0 turn, the system prompt and the user turns are not trained
            assert text.replace("</s>", "").strip() == "4", text
        else:  # the tool call (as [TOOL_CALLS] + JSON) and the final answer
            assert "[TOOL_CALLS]" in text and '"name": "add"' in text and text.endswith("It is 5.</s>"), text
            assert "What is 2 plus 3" not in text and "[TOOL_RESULTS]" not in text


def test_labels_are_minus_100_off_the_assistant_turns():
    tok = mistral("v3")
    tokens, trained = encode_line(json.dumps(CHAT), tok)
    text_tokens, _ = encode_line(json.dumps({"text": "Hello there."}), tok)
    x, y, n = collate([Sample("a:1", tokens, trained), Sample("a:2", text_tokens, [True] * len(text_tokens))])
    assert x.shape == y.shape == (2, len(tokens) - 1) and n == len(tokens) + len(text_tokens) - 2
    labelled = [int(t) for t in y[0] if t != -100]
    assert labelled == [t for t, m in zip(tokens[1:], trained[1:]) if m]
    assert tok.instruct_tokenizer.tokenizer.decode(labelled) == "4"
    assert y[1, : len(text_tokens) - 1].tolist() == text_tokens[1:]  # text: every token is a target
    assert (y[1, len(text_tokens) - 1:] == -100).all()  # padding is not


BAD_LINES = [
    (2, "{not json", "not valid JSON"),
    (3, '{"prompt": "x"}', '"text"'),
    (4, '{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "'bot'"),
    (5, '{"messages": [{"role": "user", "content": "hi"}]}', "must end with the assistant"),
    (6, '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', '"content"'),
    (7, '{"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, '
        '{"role": "user", "content": "u"}, {"role": "assistant", "content": "x"}]}', "system messages"),
    (8, '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "tool_calls": [{"id": "abcDEF123", '
        '"function": {"arguments": "{}"}}]}]}', "tool_calls"),
    (9, '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "x", "weight": 0.5}]}',
     "weight"),
    (10, json.dumps({"text": "word " * 200}), "longer than --seq-len 64"),
    (12, '{"messages": [{"role": "user", "content": "u"}, {"role": "tool", "content": "5"}, '
         '{"role": "assistant", "content": "x"}]}', "tool_call_id"),
    (13, '{"text": "a\\ud800b"}', "text holds a lone surrogate (\\ud800 at character 1)"),  # valid JSON, not text
    (14, '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "\\udfff"}]}',
     "messages[1].content holds a lone surrogate"),
    (15, "[" * 100_000, "nests arrays or objects too deeply"),
]


def bad_file(tmp_path: Path) -> Path:
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    lines = {1: good, 11: good, **{n: text for n, text, _ in BAD_LINES}}
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines[i] for i in range(1, len(lines) + 1)) + "\n")
    return path


def test_every_bad_line_is_reported_and_nothing_trains(tmp_path, capsys):
    path = bad_file(tmp_path)
    run = subprocess.run([*CLI, "finetune", "--data", str(path), "--seq-len", "64", "--validate-only"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 1, run.stderr
    report = run.stdout.splitlines()
    assert len(report) == len(BAD_LINES) + 1 and "Traceback" not in run.stderr
    for (n, _, why), line in zip(BAD_LINES, report):
        assert line.startswith(f"{path}:{n}: ") and why in line, (n, line)
    assert report[-1].startswith(f"{len(BAD_LINES)} bad lines; valid: 2 samples")
    out = tmp_path / "run"  # training refuses with the same report and writes nothing
    assert main(["finetune", "--data", str(path), "--seq-len", "64", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:-1] == report and err[-1].startswith(f"ventoux: error: {len(BAD_LINES)} bad data lines")
    assert not out.exists()


def test_validate_only_summary(tmp_path, capsys):
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(json.dumps(CHAT) + "\n" for _ in range(10)) + json.dumps({"text": "Hello."}) + "\n")
    assert main(["finetune", "--data", str(path), "--batch-size", "4", "--validate-only"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("11 samples, ") and "3 steps per epoch" in out and "padding" in out


# ---- training ------------------------------------------------------------------------------------
def tiny_checkpoint(folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny random model with the demo model's tokenizer (2048 pieces, v1 chat format), stored in `dtype`."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=2048, max_seq_len=128)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.05) if p.dim() == 2 else None
    save_hf(model, folder, dtype=dtype, extra_files=[DEMO_MODEL / "tokenizer.model"])
    return folder


def tuning_args(model: Path, data: Path, out: Path, **settings) -> FinetuneArgs:
    """A fine-tuning run of `model` on one data file, on the CPU unless `settings` say otherwise."""
    return FinetuneArgs(model=str(model), data=[str(data)], out=str(out), **{"device": "cpu", **settings})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def reversals(path: Path, n: int, seed: int) -> Path:
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from make_reverse_task import line, lists

    rng = random.Random(seed)
    path.write_text("".join(line(rng, words) + "\n" for words in lists(rng, n, set())))
    return path


def test_weight_zero_trains_nothing(tiny, tmp_path):
    """The only assistant turn has weight 0: no token is a target, so the adapter stays the fresh one."""
    from ventoux.api import load_model
    from ventoux.config import read_config
    from ventoux.lora import LoraConfig, add_adapter, lora_state_dict

    sample = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no", "weight": 0}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(sample) + "\n")
    args = FinetuneArgs(model=str(tiny), data=[str(tmp_path / "d.jsonl")], out=str(tmp_path / "run"), steps=3,
                        lr=1e-2, warmup=1, seed=5, device="cpu")
    finetune(args, progress=False)
    trained = load_file(tmp_path / "run" / "checkpoints" / "step-0000003" / "adapter_state.safetensors")
    model = load_model(tiny, read_config(tiny), torch.float32, "cpu")
    torch.manual_seed(5)
    fresh = lora_state_dict(add_adapter(model, LoraConfig()))
    assert trained.keys() == fresh.keys() and len(fresh) == 2 * 7 * 2
    for key, value in fresh.items():
        assert torch.equal(trained[key], value), key


def test_resume_after_kill_9_gives_the_same_adapter_bytes(tiny, tmp_path):
    """A real process is killed (SIGKILL) after a checkpoint; resuming ends with the uninterrupted run's bytes."""
    data = reversals(tmp_path / "train.jsonl", 200, seed=1)
    kw = dict(model=str(tiny), data=[str(data)], steps=30, batch_size=4, lr=3e-3, dropout=0.1, save_every=3,
              eval_every=100, seed=2, device="cpu")
    whole = finetune(FinetuneArgs(out=str(tmp_path / "whole"), **kw), progress=False)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items() if k != "data"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*CLI, "finetune", *flags, "--data", str(data), "--out", str(cut), "--quiet"], env=ENV,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "step-0000006").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
    assert not (cut / "adapter").exists()

    conflict = subprocess.run([*CLI, "finetune", "--out", str(cut), "--resume", "--lr", "1e-3", "--rank", "8",
                               "--accumulate", "2"], env=ENV, capture_output=True, text=True, timeout=120)
    assert conflict.returncode == 1 and "--lr 0.001 (the run has 0.003)" in conflict.stderr
    assert "--accumulate 2 (the run has 1)" in conflict.stderr  # the flag finetune has, not --grad-accum
    assert "--rank 8 (the run has 16)" in conflict.stderr and len(conflict.stderr.strip().splitlines()) == 1
    lines = data.read_text()
    data.write_text(lines.replace("king", "queen"))  # the data changed under the run: refused
    with pytest.raises(VentouxError, match="changed since it started"):
        finetune(FinetuneArgs(out=str(cut), resume=True), progress=False)
    data.write_text(lines)
    resumed = finetune(FinetuneArgs(out=str(cut), resume=True), progress=False)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name


def test_resume_needs_a_run(tmp_path, capsys):
    assert main(["finetune", "--out", str(tmp_path / "typo"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "holds no checkpoint to resume" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "typo").exists()


def test_short_run_on_the_reversal_task_lowers_eval_loss(tmp_path):
    """The shipped demo model, 12 steps of LoRA on the demonstration task (scripts/make_reverse_task.py)."""
    train = reversals(tmp_path / "train.jsonl", 200, seed=1)
    held = reversals(tmp_path / "eval.jsonl", 24, seed=2)
    args = FinetuneArgs(data=[str(train)], eval_data=[str(held)], out=str(tmp_path / "run"), steps=12,
                        batch_size=8, lr=2e-3, warmup=2, eval_every=6, device="cpu")
    adapter = finetune(args, progress=False)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] - 0.5, val
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32 and len(config["target_modules"]) == 7

    # the adapter written is PEFT's: peft on transformers' model gives ventoux's logits with it
    from peft import PeftModel
    from transformers import MistralForCausalLM

    from ventoux.api import load

    tokens = torch.randint(3, 2048, (1, 40), generator=torch.Generator().manual_seed(0))
    hf = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(DEMO_MODEL, torch_dtype=torch.float32),
                                   str(adapter)).eval()
    ours = load(None, dtype="float32", device="cpu", lora=str(adapter))
    with torch.no_grad():
        expected = hf(tokens).logits
        with hf.disable_adapter():
            assert (expected - hf(tokens).logits).abs().max() > 1e-2  # the adapter changes the logits
        torch.testing.assert_close(ours.model(tokens), expected, atol=1e-4, rtol=1e-4)


def test_bad_settings_are_one_line_errors(tiny, tmp_path):
    data = reversals(tmp_path / "train.jsonl", 10, seed=1)
    base = dict(model=str(tiny), data=[str(data)], out=str(tmp_path / "run"), device="cpu")
    for kw, match in [(dict(steps=3, epochs=1), "not both"), (dict(rank=0), "--rank"),
                      (dict(targets=("wq", "embed")), "targets"), (dict(data=[str(tmp_path / "none.jsonl")]),
                                                                   "does not exist")]:
        with pytest.raises(VentouxError, match=match):
            finetune(FinetuneArgs(**{**base, **kw}), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "nan"], "--alpha must be a positive number"), (["--alpha", "inf"], "--alpha must be"),
    (["--alpha", "-1"], "--alpha must be"), (["--lr", "inf"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be"), (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be"), (["--min-lr", "inf"], "--min-lr must be"),
    (["--clip", "nan"], "--clip must be"), (["--warmup", "-1"], "--warmup must be at least 0"),
    (["--dropout", "nan"], "--dropout must be in [0, 1)"), (["--steps", "0"], "--steps must be at least 1"),
    (["--epochs", "inf"], "--epochs must be a positive number"),
    (["--accumulate", "0"], "--accumulate must be at least 1"),  # the flag finetune has, not --grad-accum
])
def test_bad_flags_are_one_line_errors_before_anything_is_written(tiny, tmp_path, capsys, flags, message):
    """NaN and inf pass no comparison: unchecked, they trained an adapter of NaN (and wrote invalid JSON)."""
    data = reversals(tmp_path / "train.jsonl", 4, seed=1)
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(tiny), "--data", str(data), "--out", str(out), "--device", "cpu", "--quiet"]
    steps = [] if {"--steps", "--epochs"} & set(flags) else ["--steps", "1"]
    assert main([*argv, *steps, *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ventoux: error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_out_that_is_a_file_is_refused_up_front(tiny, tmp_path, capsys):
    data = reversals(tmp_path / "train.jsonl", 4, seed=1)
    (tmp_path / "file").write_text("not a folder")
    assert main(["finetune", "--model", str(tiny), "--data", str(data), "--out", str(tmp_path / "file"),
                 "--steps", "1", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "is a file" in err and "must be a folder" in err and "\n" not in err, err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_an_evaluation_set_with_nothing_to_score_is_refused(tiny, tmp_path, capsys):
    """Empty, blank or with every assistant turn of weight 0, it reported val_loss 0.0 at every --eval-every."""
    data = reversals(tmp_path / "train.jsonl", 4, seed=1)
    unscored = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no", "weight": 0}]}
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("weight0.jsonl", json.dumps(unscored) + "\n")]:
        (tmp_path / name).write_text(text)
        out = tmp_path / f"run-{name}"
        assert main(["finetune", "--model", str(tiny), "--data", str(data), "--eval-data", str(tmp_path / name),
                     "--out", str(out), "--device", "cpu", "--steps", "1", "--eval-every", "1", "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err == (f"ventoux: error: the evaluation data {tmp_path / name} holds no samples to score (none with "
                       "an assistant turn of weight > 0); give at least one, or leave out --eval-data\n"), err
        assert not out.exists()


def test_a_diverging_run_stops_without_writing_an_adapter(tiny, tmp_path):
    """A learning rate that overflows the weights: the loss becomes NaN or inf and the run stops, naming the step."""
    data = reversals(tmp_path / "train.jsonl", 8, seed=1)
    args = FinetuneArgs(model=str(tiny), data=[str(data)], out=str(tmp_path / "run"), steps=4, batch_size=2,
                        lr=1e30, warmup=0, device="cpu")
    with pytest.raises(VentouxError, match=r"loss became (nan|inf) at step 2 .*lower --lr"):  # step 1's is finite
        finetune(args, progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_base_trains_every_adapter(tiny, tmp_path, quantize):
    """QLoRA: gradients reach the adapters of every layer through the frozen quantized linears."""
    data = reversals(tmp_path / "train.jsonl", 20, seed=1)
    args = FinetuneArgs(model=str(tiny), data=[str(data)], out=str(tmp_path / "run"), steps=2, batch_size=4,
                        quantize=quantize, checkpointing=True, device="cpu")
    tensors = load_file(finetune(args, progress=False) / "adapter_model.safetensors")
    b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert len(b) == 2 * 7 and all(v.abs().sum() > 0 for v in b.values()), [k for k, v in b.items() if not v.any()]


@pytest.mark.parametrize("quantize, lean_memory, mapped", [
    (None, None, False), ("int8", None, True), (None, True, True), ("int8", False, False)])
def test_lean_memory_maps_large_tensors_by_default_only_for_quantized_bases(tiny, tmp_path, monkeypatch,
                                                                            quantize, lean_memory, mapped):
    """--lean-memory (each large tensor its own mapping) trades speed for peak memory: on by default where the
    base is quantized (memory is why it is), off for a 16-bit base; either way when asked."""
    from ventoux.train import memory

    calls = []
    monkeypatch.setattr(memory, "map_large_tensors", lambda *a: calls.append(a) or True)
    data = reversals(tmp_path / "train.jsonl", 4, seed=1)
    finetune(FinetuneArgs(model=str(tiny), data=[str(data)], out=str(tmp_path / "run"), steps=1, batch_size=2,
                          quantize=quantize, lean_memory=lean_memory, device="cpu"), progress=False)
    assert bool(calls) == mapped
