"""Evaluation (ventoux.eval: data.py, perplexity.py, tasks.py) behaviours that mutation testing (mutation/README.md)
found unpinned: generation tasks against transformers' greedy tokens, chat-format tasks against mistral-common's
ids, the context checks at their boundaries, the result files' keys, and every refusal whole (the CLI prints them
as they are)."""

from __future__ import annotations

import errno
import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_FULL, V1, error_message
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from test_eval import TEXT, Uniform, pair

from ventoux.api import LLM
from ventoux.errors import VentouxError
from ventoux.eval import Document, perplexity, read_task, run_task
from ventoux.eval.data import check_out, read_documents, read_jsonl, write_json_atomic
from ventoux.eval.perplexity import check_context, strided_loss

_message = functools.partial(error_message, VentouxError)


def _jsonl(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(v1_tokenizer):
    hf, model = pair(TINY)
    return hf, LLM(model, v1_tokenizer, "tiny")


def _greedy(hf, ids: list[int], n: int) -> list[int]:
    """transformers' argmax, one token at a time, up to n tokens or the end of sequence."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(hf(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == 2:
                break
            out.append(token)
    return out


def _chat_ids(text: str) -> list[int]:
    request = ChatCompletionRequest(messages=[UserMessage(content=text)])
    return MistralTokenizer.from_file(str(V1)).encode_chat_completion(request).tokens


# ---- generation tasks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
def test_generation_is_greedy_and_exact_match_compares_stripped_text(tiny, tmp_path, chat):
    hf, llm = tiny
    prompts = ["Once upon a time", "Question: two plus two?", "Héllo wörld", "The end"]
    ids = [_chat_ids(p) if chat else llm.tokenizer.encode(p, bos=True) for p in prompts]
    texts = [llm.tokenizer.decode(_greedy(hf, i, 5)) for i in ids]
    answers = [f"  {texts[0]}\n", "no such output", texts[2], texts[3] + "!"]
    path = _jsonl(tmp_path / "gen.jsonl", *({"prompt": p, "answer": a} for p, a in zip(prompts, answers)))
    result = run_task(llm, read_task(path), batch_size=3, chat=chat, max_tokens=5)
    assert result == {"kind": "generation", "n": 4, "exact_match": 0.5, "samples": [
        {"line": n + 1, "answer": a, "output": t, "exact_match": n in (0, 2)}
        for n, (a, t) in enumerate(zip(answers, texts))]}


def test_generation_stops_at_a_stop_string(tiny, tmp_path):
    hf, llm = tiny
    text = llm.tokenizer.decode(_greedy(hf, llm.tokenizer.encode("Once upon a time", bos=True), 12))
    stop = text[len(text) // 2: len(text) // 2 + 2]
    path = _jsonl(tmp_path / "gen.jsonl", {"prompt": "Once upon a time", "answer": "x"})
    result = run_task(llm, read_task(path), max_tokens=12, stop=[stop])
    assert result["samples"][0]["output"] == text[: text.index(stop)]


def test_a_generation_prompt_must_leave_room_for_a_token_under_full_attention(v1_tokenizer, tmp_path):
    _, model = pair(TINY_FULL)  # max_seq_len 96
    llm = LLM(model, v1_tokenizer, "full")
    words = " ".join(["word"] * 200)
    fits = next(words[:i] for i in range(len(words), 0, -1) if len(v1_tokenizer.encode(words[:i])) == 95)
    too_long = next(words[:i] for i in range(len(words), 0, -1) if len(v1_tokenizer.encode(words[:i])) == 96)
    path = _jsonl(tmp_path / "gen.jsonl", {"prompt": fits, "answer": "a"})
    assert run_task(llm, read_task(path), max_tokens=1)["n"] == 1  # 95 prompt tokens and the one generated
    path = _jsonl(tmp_path / "long.jsonl", {"prompt": "short", "answer": "a"}, {"prompt": too_long, "answer": "a"})
    assert _message(lambda: run_task(llm, read_task(path), max_tokens=1)) == (
        f"{path}:2: 97 tokens, longer than the model's context of 96 tokens (full attention): shorten that line")
    _, windowed = pair(TINY.replace(max_seq_len=96))  # a sliding window has no such limit
    assert run_task(LLM(windowed, v1_tokenizer, "w"), read_task(path), max_tokens=1)["n"] == 2


def test_progress_bars_only_when_asked(tiny, tmp_path, capsys):
    _, llm = tiny
    gen = read_task(_jsonl(tmp_path / "qa.jsonl", {"prompt": "p", "answer": "a"}))
    mc = read_task(_jsonl(tmp_path / "quiz.jsonl", {"question": "q", "choices": ["a", "b"], "answer": 0}))
    doc = [Document("d", "d", TEXT)]
    for task in (gen, mc):
        run_task(llm, task, max_tokens=1)
    perplexity(llm.model, llm.tokenizer, doc, 24)
    assert capsys.readouterr().err == ""
    for task in (gen, mc):
        run_task(llm, task, max_tokens=1, progress=True)
    perplexity(llm.model, llm.tokenizer, doc, 24, progress=True)
    err = capsys.readouterr().err
    assert "quiz: 100%" in err and "perplexity: 100%" in err, err
    assert re.search(r"qa: 100%[^\r\n]*batch/s", err), err  # generation counts its batches
    strided_loss(llm.model, llm.tokenizer.encode(TEXT), 24, progress=True)
    assert "perplexity: 100%" in capsys.readouterr().err


def test_strided_loss_takes_the_context_as_its_default_stride(tiny):
    _, llm = tiny
    ids = llm.tokenizer.encode(TEXT)
    assert strided_loss(llm.model, ids, 16) == strided_loss(llm.model, ids, 16, 16)
    assert strided_loss(llm.model, ids, 16) != strided_loss(llm.model, ids, 16, 8)


def test_generation_writes_64_tokens_unless_told(tiny, tmp_path):
    hf, llm = tiny
    ids = llm.tokenizer.encode("Once upon a time", bos=True)
    reference = _greedy(hf, ids, 65)
    assert len(reference) == 65  # no end of sequence before the 65th token
    result = run_task(llm, read_task(_jsonl(tmp_path / "g.jsonl", {"prompt": "Once upon a time", "answer": "a"})))
    assert result["samples"][0]["output"] == llm.tokenizer.decode(reference[:64])


# ---- multiple choice ------------------------------------------------------------------------------------
def test_chat_multiple_choice_scores_the_choice_after_mistral_commons_prompt(tiny, tmp_path):
    hf, llm = tiny
    path = _jsonl(tmp_path / "mc.jsonl", {"question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": 0})
    result = run_task(llm, read_task(path), chat=True)
    prompt = _chat_ids("Capital of France?")
    for choice, logprob in zip(["Paris", "Rome"], result["samples"][0]["logprobs"]):
        cont = llm.tokenizer.encode(choice, bos=False)  # no space: the answer starts the assistant's turn
        ids = prompt + cont
        with torch.no_grad():
            lp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
        assert logprob == pytest.approx(sum(lp[i - 1, ids[i]].item() for i in range(len(prompt), len(ids))), rel=1e-5)


def test_acc_norm_counts_the_items_it_gets_right(v1_tokenizer, tmp_path):
    """Under a uniform model acc_norm picks the fewest tokens per character: right on one item of three."""
    items = [{"question": "Pick", "choices": ["the the the the", "the"], "answer": 0},
             {"question": "Pick", "choices": ["the the the the", "the"], "answer": 1},
             {"question": "Pick", "choices": ["a", "extraordinarily"], "answer": 0}]
    llm = LLM(Uniform(TINY.replace(vocab_size=32000)), v1_tokenizer, "uniform")
    result = run_task(llm, read_task(_jsonl(tmp_path / "mc.jsonl", *items)))
    assert [s["pred_norm"] for s in result["samples"]] == [0, 0, 1]
    assert set(result) == {"kind", "n", "acc", "acc_norm", "samples"} and result["kind"] == "multiple_choice"
    assert result["acc_norm"] == pytest.approx(1 / 3) and result["acc"] == pytest.approx(2 / 3)
    assert [(s["line"], s["answer"]) for s in result["samples"]] == [(1, 0), (2, 1), (3, 0)]


def test_a_choice_must_fit_the_context_under_full_attention(v1_tokenizer, tmp_path):
    llm = LLM(Uniform(TINY_FULL.replace(vocab_size=32000)), v1_tokenizer, "uniform")  # max_seq_len 96
    for n in (96, 97):  # question tokens (BOS included); the choice adds one token, the model reads all but the last
        words = " ".join(["word"] * 200)
        question = next(words[:i] for i in range(len(words), 0, -1) if len(v1_tokenizer.encode(words[:i])) == n)
        path = _jsonl(tmp_path / f"{n}.jsonl", {"question": question, "choices": ["the", "a"], "answer": 0})
        if n == 96:
            assert run_task(llm, read_task(path))["n"] == 1  # 96 tokens read
        else:
            assert _message(lambda: run_task(llm, read_task(path))) == (  # noqa: B023 (called at once)
                f"{path}:1: 97 tokens, longer than the model's context of 96 tokens (full attention): "
                "shorten that line")


# ---- reading tasks ----------------------------------------------------------------------------------------
GEN_HINT = ': a generation line is {"prompt": "...", "answer": "..."}'
MC_HINT = ': a multiple-choice line is {"question": "...", "choices": ["...", ...], "answer": 0}'
TWO_CHOICES = ':1: field "choices" must list at least two non-empty strings'


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "answer": "a"}, {"question": "q", "choices": ["a", "b"], "answer": 0}],
     ':2: no "prompt" field' + GEN_HINT),  # the first line decides the kind
    ([{"prompt": "p", "answer": "a"}, {"prompt": "p"}], ':2: no "answer" field' + GEN_HINT),
    ([{"choices": ["a", "b"], "answer": 0}], ':1: no "question" field' + MC_HINT),
    ([{"question": "q", "choices": "ab", "answer": 0}], ':1: field "choices" must be a list, not str'),
    ([{"question": "q", "choices": ["a", "b"], "answer": 0}, {"question": "q", "answer": 0}],
     ':2: no "choices" field' + MC_HINT),
    ([{"question": "q", "choices": ["a"], "answer": 0}], TWO_CHOICES),
    ([{"question": "q", "choices": ["a", 5], "answer": 0}], TWO_CHOICES),
    ([{"question": "q", "choices": ["a", "b"]}], ':1: no "answer" field' + MC_HINT),
    ([{"question": "q", "choices": ["a", "b"], "answer": True}], ':1: field "answer" must be a int or str, not bool'),
    ([{"question": "q", "choices": ["a", "b"], "answer": "c"}], ":1: field \"answer\" 'c' is not one of the choices"),
    ([{"question": "q", "choices": ["a", "b"], "answer": 2}], ':1: field "answer" 2 is not a choice index (0 to 1)'),
    ([{"question": "", "choices": ["a", "b"], "answer": 0}], ':1: field "question" is empty'),
    (["[1, 2]"], ":1: expected a JSON object, got list"),
    (['{"prompt": "bad \\ud800 here", "answer": "a"}'], ':1: field "prompt" holds a lone surrogate (\\ud800 at '
                                                          'character 4), not text; fix that line'),
    (["", "{oops"], ":2: not valid JSON (Expecting property name enclosed in double quotes, column 2)"),
])
def test_every_task_refusal_whole(tmp_path, rows, message):
    path = _jsonl(tmp_path / "t.jsonl", *rows)
    assert _message(lambda: read_task(path)) == f"{path}{message}"


def test_tasks_keep_every_line_after_a_blank_one(tmp_path):
    gen = read_task(_jsonl(tmp_path / "g.jsonl", {"prompt": "p", "answer": "a"}, "", {"prompt": "q", "answer": "b"}))
    assert gen.items == [{"line": 1, "prompt": "p", "answer": "a"}, {"line": 3, "prompt": "q", "answer": "b"}]
    mc = read_task(_jsonl(tmp_path / "m.jsonl", {"question": "q", "choices": ["a", "b"], "answer": "b"}))
    assert mc.items == [{"line": 1, "question": "q", "choices": ["a", "b"], "answer": 1}]


# ---- reading documents and writing results ------------------------------------------------------------------
def test_every_document_refusal_whole(tmp_path):
    assert _message(lambda: read_documents([])) == (
        'no data file given: pass --data FILE (text, or JSONL with a "text" field a line)')
    missing = tmp_path / "missing.txt"
    assert _message(lambda: read_documents([missing])) == f"{missing}: no such file"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    assert _message(lambda: read_documents([latin])) == f"{latin}: not UTF-8 text (byte 3); convert it to UTF-8"
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n")
    assert _message(lambda: read_documents([blank])) == f"{blank}: the file is empty"
    assert _message(lambda: read_documents([tmp_path])) == f"{tmp_path} is a folder, not a file: name a file in it"
    no_text = _jsonl(tmp_path / "d.jsonl", {"text": "fine"}, {"body": "x"})
    assert _message(lambda: read_documents([no_text])) == (
        f'{no_text}:2: no "text" field: each line must be {{"text": "..."}}')


def test_documents_name_their_file_and_line(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("whole file")
    lines = _jsonl(tmp_path / "b.json", {"text": "one"}, "", {"text": "two"})  # .json is read as JSON lines too
    assert read_documents([text, lines]) == [Document(str(text), str(text), "whole file"),
                                             Document(f"{lines}:1", str(lines), "one"),
                                             Document(f"{lines}:3", str(lines), "two")]
    assert read_jsonl(lines) == [(1, {"text": "one"}), (3, {"text": "two"})]


def test_result_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "result.json"
    check_out(out)
    assert list(tmp_path.iterdir()) == []  # the trial write leaves nothing
    write_json_atomic({"name": "café", "n": [1, 2]}, out)
    assert out.read_text(encoding="utf-8") == '{\n "name": "café",\n "n": [\n  1,\n  2\n ]\n}\n'
    assert _message(lambda: check_out(tmp_path)) == (
        f"--out {tmp_path} is a folder: give a file name, such as {tmp_path / 'result.json'}")
    nowhere = tmp_path / "no" / "r.json"
    assert _message(lambda: check_out(nowhere)) == f"--out {nowhere}: the folder {nowhere.parent} does not exist"

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    assert _message(lambda: write_json_atomic({"n": 3}, out)) == (
        f"--out {out} cannot be written (No space left on device); choose another path")
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"name": "café", "n": [1, 2]}  # the old result stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_an_unwritable_out_is_refused_before_any_work():
    out = Path("/proc/result.json")  # root may write almost anywhere; not here
    message = _message(lambda: check_out(out))
    assert message.startswith(f"--out {out} cannot be written (") and message.endswith("); choose another path")
    assert "[Errno" not in message  # the system's reason, not the exception's repr


# ---- perplexity -------------------------------------------------------------------------------------------
def test_context_checks_at_their_boundaries():
    check_context(None, 1)  # before the model loads: only positivity
    assert _message(lambda: check_context(None, 0)) == "--context 0 must be at least 1"
    check_context(TINY_FULL, 96)
    assert _message(lambda: check_context(TINY_FULL, 97)) == (
        "--context 97 is longer than the model's context of 96 tokens (full attention): use --context 96 or less")
    check_context(TINY.replace(max_seq_len=96), 500)  # a sliding window reads any context in bands


def test_perplexity_checks_the_models_context_and_each_documents_tokens(v1_tokenizer):
    _, full = pair(TINY_FULL)
    assert _message(lambda: perplexity(full, v1_tokenizer, [Document("d", "d", TEXT)], 97)).startswith(
        "--context 97 is longer than the model's context of 96 tokens")
    one = next(w for w in ("a", "I", "x") if len(v1_tokenizer.encode(w, bos=True)) == 2)
    assert perplexity(full, v1_tokenizer, [Document("d", "d", one)], 8)["tokens"] == 1  # one token is scored
    assert _message(lambda: perplexity(full, v1_tokenizer, [Document("f.jsonl:4", "f.jsonl", "")], 8)) == (
        "f.jsonl:4: the text has no tokens to score")


def test_perplexitys_result_keys_and_figures(tiny):
    _, llm = tiny
    docs = [Document("a.txt", "a.txt", TEXT[:120]), Document("b.jsonl:1", "b.jsonl", TEXT[120:])]
    result = perplexity(llm.model, llm.tokenizer, docs, 24, 12)
    figures = {"tokens", "characters", "bytes", "nll", "nats_per_token", "perplexity", "nats_per_character",
               "bits_per_byte"}
    assert set(result) == figures | {"documents", "windows", "context", "stride", "files"}
    assert (result["documents"], result["context"], result["stride"]) == (2, 24, 12)
    assert result["characters"] == len(TEXT) and result["bytes"] == len(TEXT.encode())
    assert result["nats_per_token"] == pytest.approx(result["nll"] / result["tokens"])
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"] / result["tokens"]))
    assert set(result["files"]) == {"a.txt", "b.jsonl"}
    assert all(set(f) == figures | {"documents"} for f in result["files"].values())
    assert result["windows"] > 2
