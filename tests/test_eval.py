"""ventoux eval: perplexity and local tasks against transformers on the same weights, and the CLI's errors.

Tiny random float32 models with mistral-common's real v1 tokenizer; transformers' MistralForCausalLM is the
reference, fed the token ids ventoux's tokenizer gives.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_FULL, V1, hf_model, ventoux_from_hf

from ventoux.errors import VentouxError
from ventoux.eval import Document, perplexity, read_task, run_task
from ventoux.eval.perplexity import windows
from ventoux.weights import save_hf

DATA = Path(__file__).parent / "data" / "eval"
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness. Ça va? 日本語 😀\n\nSecond paragraph: x = f(a, b) ** 2.")


@pytest.fixture(scope="module")
def tokenizer(v1_tokenizer):
    return v1_tokenizer


def pair(cfg):
    hf = hf_model(cfg.replace(vocab_size=32000), seed=1)
    return hf, ventoux_from_hf(hf)


def hf_guide_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's perplexity guide (labels with -100 for context), summing, not averaging."""
    ids = torch.tensor([ids])
    seq_len, prev_end, total, count = ids.size(1), 0, 0.0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        scored = int((target[:, 1:] != -100).sum())  # the model shifts labels: position 0 predicts nothing
        total, count = total + loss.item() * scored, count + scored
        prev_end = end
        if end == seq_len:
            break
    return total, count


@pytest.mark.parametrize("cfg,context,stride", [(TINY, 24, 10), (TINY, 24, 24), (TINY_FULL, 24, 7)],
                         ids=["windowed-strided", "windowed-consecutive", "full-strided"])
def test_perplexity_matches_transformers(tokenizer, cfg, context, stride):
    hf, model = pair(cfg)
    ids = tokenizer.encode(TEXT, bos=True)
    assert len(ids) > 3 * context  # several windows
    result = perplexity(model, tokenizer, [Document("t", "t", TEXT)], context, stride, batch_size=3)
    nll, count = hf_guide_nll(hf, ids, context + 1, stride)  # the guide's max_length counts the unscored token
    assert result["tokens"] == count == len(ids) - 1  # every token after BOS scored once
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-5)
    assert result["nats_per_character"] == pytest.approx(nll / len(TEXT), rel=1e-5)


def test_windows_score_every_token_once():
    for n, context, stride in [(2, 5, 5), (50, 8, 3), (50, 8, 8), (9, 8, 1), (100, 16, 5)]:
        ids = list(range(n))
        seen = []
        for tokens, k in windows(ids, context, stride):
            assert len(tokens) - 1 <= context  # the model never reads more than the context
            seen += list(tokens[-k:])
        assert seen == ids[1:]
    with pytest.raises(VentouxError, match="--stride"):
        windows(list(range(10)), 4, 5)


def test_documents_are_scored_separately(tokenizer):
    """Two documents = the sum of each alone (each starts at BOS); batching does not change any number."""
    _, model = pair(TINY)
    docs = [Document("a", "f", TEXT[:150]), Document("b", "f", TEXT[150:])]
    both = perplexity(model, tokenizer, docs, 16, 8, batch_size=4)
    alone = [perplexity(model, tokenizer, [d], 16, 8, batch_size=1) for d in docs]
    assert both["tokens"] == sum(r["tokens"] for r in alone)
    assert both["nll"] == pytest.approx(sum(r["nll"] for r in alone), rel=1e-6)
    assert both["files"]["f"]["documents"] == 2


class LLM:
    """What run_task needs of ventoux.load's LLM."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.config = model, tokenizer, model.config


class Uniform(torch.nn.Module):
    """A model that gives every token the same probability: a choice's log-likelihood is -n log V for n tokens."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.device = torch.device("cpu")

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.config.vocab_size)


def test_multiple_choice_accuracy_on_a_known_task(tokenizer, tmp_path):
    """Under a uniform model a choice of n tokens has log-likelihood -n log V: acc picks the fewest tokens,
    acc_norm the fewest tokens per character. Item 1's answer is acc's pick, item 2's is acc_norm's."""
    items = [{"question": "Pick one:", "choices": ["the the the the", "the"], "answer": 1},
             {"question": "And now", "choices": ["a", "extraordinarily"], "answer": "extraordinarily"}]
    counts = [[len(tokenizer.encode(q["question"] + " " + c, bos=True)) - len(tokenizer.encode(q["question"]))
               for c in q["choices"]] for q in items]
    assert counts == [[4, 1], [1, 3]]  # per character: 4/15 < 1/3 and 3/15 < 1/1
    path = tmp_path / "known.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in items))
    llm = LLM(Uniform(TINY.replace(vocab_size=32000)), tokenizer)
    result = run_task(llm, read_task(path), batch_size=3)
    log_v = math.log(32000)
    assert [s["logprobs"] for s in result["samples"]] == [pytest.approx([-4 * log_v, -log_v]),
                                                          pytest.approx([-log_v, -3 * log_v])]
    assert [s["answer"] for s in result["samples"]] == [1, 1]  # the answer's text became its index
    assert [s["pred"] for s in result["samples"]] == [1, 0]
    assert [s["pred_norm"] for s in result["samples"]] == [0, 1]
    assert result["acc"] == 0.5 and result["acc_norm"] == 0.5


def test_task_loglikelihoods_match_transformers(tokenizer):
    hf, model = pair(TINY)
    task = read_task(DATA / "mc.jsonl")
    result = run_task(LLM(model, tokenizer), task, batch_size=4)
    for item, sample in zip(task.items, result["samples"]):
        for choice, logprob in zip(item["choices"], sample["logprobs"]):
            context, whole = item["question"].rstrip(), item["question"] + " " + choice
            ctx, ids = tokenizer.encode(context, bos=True), tokenizer.encode(whole, bos=True)
            with torch.no_grad():
                lp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
            ref = sum(lp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))
            assert logprob == pytest.approx(ref, rel=1e-5)
    assert result["n"] == 5 and [s["answer"] for s in result["samples"]] == [0, 0, 2, 0, 1]
    acc = sum(max(range(len(s["logprobs"])), key=s["logprobs"].__getitem__) == s["answer"]
              for s in result["samples"]) / 5
    assert result["acc"] == acc


# ---- the CLI: results and one-line errors -----------------------------------------------------------
@pytest.fixture(scope="module")
def full_model_dir(tmp_path_factory):
    """A full-attention checkpoint (its context is a hard limit)."""
    folder = tmp_path_factory.mktemp("m") / "tiny-full"
    save_hf(pair(TINY_FULL)[1], folder)
    shutil.copy(V1, folder / "tokenizer.model")
    return folder


def cli(*args):
    return subprocess.Popen([sys.executable, "-m", "ventoux", "eval", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_cli_writes_results(full_model_dir, tmp_path):
    out_ppl, out_tasks = tmp_path / "ppl.json", tmp_path / "tasks.json"
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    runs = [cli("perplexity", "--model", full_model_dir, "--data", text, DATA / "docs.jsonl", "--context", 32,
                "--stride", 16, "--out", out_ppl, "--quiet"),
            cli("tasks", "--model", full_model_dir, "--tasks", DATA / "mc.jsonl", DATA / "gen.jsonl",
                "--max-tokens", 4, "--out", out_tasks, "--quiet")]
    for run in runs:
        stdout, stderr = run.communicate(timeout=180)
        assert run.returncode == 0, stderr
        json.loads(stdout)
    ppl = json.loads(out_ppl.read_text())
    assert ppl["documents"] == 3 and set(ppl["files"]) == {str(text), str(DATA / "docs.jsonl")}
    assert ppl["tokens"] == sum(f["tokens"] for f in ppl["files"].values())
    tasks = json.loads(out_tasks.read_text())["tasks"]
    assert tasks["mc"]["n"] == 5 and 0 <= tasks["mc"]["acc"] <= 1
    assert len(tasks["gen"]["samples"]) == 4 and all("output" in s for s in tasks["gen"]["samples"])


def test_cli_errors_are_one_line(full_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    no_text = tmp_path / "docs.jsonl"
    no_text.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    bad_answer = tmp_path / "mc.jsonl"
    bad_answer.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n'
                          '{"question": "q", "choices": ["a", "b"], "answer": "c"}\n')
    no_prompt = tmp_path / "gen.jsonl"
    no_prompt.write_text('{"prompt": "p", "answer": "a"}\n{"answer": "a"}\n')
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "result.json"
    model = ["--model", full_model_dir, "--out", out]
    cases = {  # arguments -> words the one line must hold
        ("perplexity", "--data", tmp_path / "missing.txt", *model): ["missing.txt", "no such file"],
        ("perplexity", "--data", empty, *model): ["empty.txt", "empty"],
        ("perplexity", "--data", text, no_text, *model): [f"{no_text}:2", '"text"'],
        ("tasks", "--tasks", bad_answer, *model): [f"{bad_answer}:2", '"answer"', "not one of the choices"],
        ("tasks", "--tasks", no_prompt, *model): [f"{no_prompt}:2", '"prompt"'],
        ("perplexity", "--data", text, "--context", 97, *model): ["--context 97", "96", "full attention"],
    }
    runs = {args: cli(*args) for args in cases}
    for args, run in runs.items():
        _, stderr = run.communicate(timeout=180)
        assert run.returncode == 1, (args, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ventoux: error:"), (args, stderr)
        assert all(word in lines[0] for word in cases[args]), lines[0]
    assert not out.exists() and not list(tmp_path.glob(".result.json*"))  # nothing half-written


def test_out_and_data_folders_are_refused_before_the_model_loads(tmp_path, capsys):
    from ventoux.cli import main

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    nowhere = ["--model", tmp_path / "no-model"]  # never loaded: the inputs fail first
    cases = {("perplexity", "--data", text, "--out", tmp_path, *nowhere): [f"--out {tmp_path} is a folder"],
             ("perplexity", "--data", tmp_path, *nowhere): [f"{tmp_path} is a folder, not a file"],
             ("tasks", "--tasks", tmp_path, *nowhere): [f"{tmp_path} is a folder, not a file"],
             ("tasks", "--tasks", DATA / "mc.jsonl", DATA / ".." / "eval" / "mc.jsonl", *nowhere): ["twice"],
             ("perplexity", "--data", text, "--context", "0", *nowhere): ["--context 0 must be at least 1"],
             ("perplexity", "--data", text, "--stride", "0", *nowhere): ["--stride 0 must be at least 1"]}
    for args, words in cases.items():
        assert main(["eval", *map(str, args)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_tasks_of_files_with_the_same_name_are_all_kept(full_model_dir, tmp_path, capsys):
    from ventoux.cli import main
    from ventoux.eval import read_tasks

    for sub in ("da", "db"):
        (tmp_path / sub).mkdir()
        shutil.copy(DATA / "mc.jsonl", tmp_path / sub / "t.jsonl")
    paths = [tmp_path / "da" / "t.jsonl", tmp_path / "db" / "t.jsonl", DATA / "gen.jsonl"]
    assert [t.name for t in read_tasks(paths)] == [str(paths[0]), str(paths[1]), "gen"]  # unique stems stay
    assert main(["eval", "tasks", "--model", str(full_model_dir), "--tasks", *map(str, paths[:2]),
                 "--quiet"]) == 0
    tasks = json.loads(capsys.readouterr().out)["tasks"]
    assert set(tasks) == {str(paths[0]), str(paths[1])} and tasks[str(paths[0])] == tasks[str(paths[1])]
