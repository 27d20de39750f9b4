"""Fine-tuning data (train/sft_data.py) behaviours that mutation testing (mutation/README.md) found unpinned:
every bad line's reason whole (the CLI prints them as they are), the file errors, the summary --validate-only
prints, the padding share, which samples a step's micro-batch takes, and what the fingerprint sees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from test_finetune import DATA, mistral, reference

from ventoux.errors import VentouxError
from ventoux.train.sft_data import BadLine, Sample, SFTData, collate, encode_line

U, A = {"role": "user", "content": "u"}, {"role": "assistant", "content": "x"}
CALL = {"id": "abcDEF123", "type": "function", "function": {"name": "add", "arguments": "{}"}}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add",
                                           "parameters": {"type": "object", "properties": {}}}}]
CALLS_MESSAGE = 'messages[1].tool_calls must be a list of {"id": str, "function": {"name": str, "arguments": str}}'


@pytest.fixture(scope="module")
def v3():
    return mistral("v3")


@pytest.fixture(scope="module")
def v1():
    return mistral("v1")


def chat(*messages, **extra) -> str:
    return json.dumps({"messages": list(messages), **extra})


def with_call(**change):
    return {"role": "assistant", "tool_calls": [{**CALL, **change}]}


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes)"),
    ("[1]", 'each line must be an object with either "text" (a string) or "messages" (a list)'),
    (json.dumps({"text": "a", "messages": [U, A]}),
     'each line must be an object with either "text" (a string) or "messages" (a list)'),
    (json.dumps({"prompt": "a"}), 'each line must be an object with either "text" (a string) or "messages" (a list)'),
    (json.dumps({"text": ""}), '"text" must be a non-empty string'),
    (json.dumps({"text": 5}), '"text" must be a non-empty string'),
    (json.dumps({"messages": []}), '"messages" must be a non-empty list of {"role": ..., "content": ...}'),
    (json.dumps({"messages": "hi"}), '"messages" must be a non-empty list of {"role": ..., "content": ...}'),
    (chat(U, A, tools={}), '"tools" must be a list of {"type": "function", "function": {...}}'),
    (chat(U, 5), "messages[1] is not an object"),
    (chat({"role": "bot", "content": "u"}, A),
     "messages[0] has the unknown role 'bot'; use one of system, user, assistant, tool"),
    (chat({"content": "u"}, A), "messages[0] has the unknown role None; use one of system, user, assistant, tool"),
    (chat({"role": "user", "content": 5}, A), 'messages[0] (user) needs a "content" string'),
    (chat({"role": "system"}, U, A), 'messages[0] (system) needs a "content" string'),
    (chat(U, {"role": "tool", "content": "5"}, A),
     'messages[1] (tool) needs a "tool_call_id" string naming the call it answers'),
    (chat(U, {"role": "assistant"}), 'messages[1] (assistant) needs a "content" string or "tool_calls"'),
    (chat(U, {"role": "assistant", "content": 5, "tool_calls": []}),
     'messages[1] (assistant) needs a "content" string or "tool_calls"'),
    (chat(U, {"role": "assistant", "tool_calls": CALL}), CALLS_MESSAGE),
    (chat(U, {"role": "assistant", "tool_calls": [5]}), CALLS_MESSAGE),
    (chat(U, with_call(id=9)), CALLS_MESSAGE),
    (chat(U, with_call(function="add")), CALLS_MESSAGE),
    (chat(U, with_call(function={"name": 1, "arguments": "{}"})), CALLS_MESSAGE),
    (chat(U, with_call(function={"name": "add", "arguments": 1})), CALLS_MESSAGE),
    (chat(U, {**A, "weight": 0.5}), "messages[1].weight must be 0 or 1, not 0.5"),
    (chat(U, {**A, "weight": True}), "messages[1].weight must be 0 or 1, not True"),
    (chat(U, {**A, "weight": 2}), "messages[1].weight must be 0 or 1, not 2"),
    (chat({"role": "system", "content": "a"}, {"role": "system", "content": "b"}, U, A),
     "2 system messages; at most one is allowed"),
    (chat(U, A, U), "the conversation ends with a user turn; it must end with the assistant's"),
    (chat(U, with_call(id="abc"), tools=TOOLS), "Tool call id was abc but must be a-z, A-Z, 0-9, with a length of 9."),
    (chat(U, A, tools=[{"type": "function"}]), "tools.0.function: Field required"),
    (chat(U, A, tools=[{"type": "function", "function": {"name": "add", "parameters": 5}}]),
     "tools.0.function.parameters: Input should be a valid dictionary"),
    (chat(U, {**A, "tool_calls": [CALL]}, tools=TOOLS),
     "Assistant message must have either content or tool_calls, but not both."),
    (chat(U, {"role": "tool", "tool_call_id": "abcDEF123", "content": "5"}, A, tools=TOOLS),
     "Unexpected role 'tool' after role 'user'"),
    # lone surrogates (JSON's "\ud800" escapes), named by their place: no tokenizer encodes them
    (json.dumps({"text": "a\ud800b"}), "text holds a lone surrogate (\\ud800 at character 1), not text; fix that line"),
    (json.dumps({"text": "a\udfffb", "meta": ["x"]}),
     "text holds a lone surrogate (\\udfff at character 1), not text; fix that line"),
    (json.dumps({"text": "ok", "\udfff": 1}),
     "a key of the line holds a lone surrogate (\\udfff at character 0), not text; fix that line"),
    (chat({"role": "user", "content": "\udfff"}, A),
     "messages[0].content holds a lone surrogate (\\udfff at character 0), not text; fix that line"),
    (chat({"role": "user", "content": "u", "\ud800": 1}, A),
     "a key of messages[0] holds a lone surrogate (\\ud800 at character 0), not text; fix that line"),
])
def test_each_bad_line_has_its_reason_whole(v3, line, reason):
    with pytest.raises(BadLine) as e:
        encode_line(line, v3)
    assert str(e.value) == reason


def test_tool_calls_on_a_tokenizer_without_tool_tokens_say_which_it_is(v1):
    with pytest.raises(BadLine) as e:
        encode_line(chat(U, with_call(), tools=TOOLS), v1)
    assert str(e.value) == ("Tools not implemented for tokenizer V1 (the model's tokenizer is v1; tool calls need v3 "
                            "or tekken)")


def test_what_a_conversation_may_be(v3):
    """Weights 0 and 1 (1.0 too), arguments as an object, tools under mistral-finetune's "available_tools", a
    system prompt: each encodes, and a weight-0 turn trains nothing."""
    plain, trained = encode_line(chat(U, A), v3)
    assert sum(trained) == 2  # "x" and </s>
    assert sum(encode_line(chat(U, {**A, "weight": 0}, U, {**A, "weight": 1.0}), v3)[1]) == 2
    assert not any(encode_line(chat(U, {**A, "weight": 0}), v3)[1])
    as_object = encode_line(chat(U, with_call(function={"name": "add", "arguments": {"a": 1}}), tools=TOOLS), v3)
    assert len(as_object[0]) > len(plain)
    assert encode_line(chat(U, with_call(), available_tools=TOOLS), v3) == encode_line(chat(U, with_call(),
                                                                                           tools=TOOLS), v3)
    assert encode_line(chat({"role": "system", "content": "s"}, U, A), v3)[0] != plain


def _file(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_file_errors_and_where_each_bad_line_is(tmp_path, v3):
    with pytest.raises(VentouxError) as e:
        SFTData.load([tmp_path / "missing.jsonl"], v3, 64)
    assert str(e.value) == f"the data file {tmp_path / 'missing.jsonl'} does not exist; check the path"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(VentouxError) as e:
        SFTData.load([latin], v3, 64)
    assert str(e.value) == f"{latin} is not UTF-8 text (invalid continuation byte at byte 13); convert it"
    long = json.dumps({"text": "word " * 40})
    n = len(encode_line(long, v3)[0])
    path = _file(tmp_path, [chat(U, A), "", "   ", "{bad", long, chat(U, A)])
    data = SFTData.load([path], v3, 16)
    assert [s.where for s in data.samples] == [f"{path}:1", f"{path}:6"]
    assert data.problems == [f"{path}:4: not valid JSON (Expecting property name enclosed in double quotes)",
                             f"{path}:5: the sample is {n} tokens, longer than --seq-len 16"]
    assert len(SFTData.load([path], v3, n).samples) == 3  # exactly seq_len tokens fit


def _samples(lengths):
    return [Sample(f"f:{i}", list(range(1, n + 1)), [i % 2 == 0] * n) for i, n in enumerate(lengths)]


def test_the_summary_validate_only_prints(tmp_path, v3):
    data = SFTData(_samples([5, 3, 9]), ["f:9: why"])
    order = [*np.random.default_rng([0, 0]).permutation(3), np.random.default_rng([0, 1]).permutation(3)[0]]
    lengths = [[5, 3, 9][i] - 1 for i in order]
    share = 1 - sum(lengths) / (max(lengths[:2]) * 2 + max(lengths[2:]) * 2)
    assert data.report(batch_size=2, accumulate=1) == (
        f"f:9: why\n1 bad lines; valid: 3 samples, 17 tokens (14 in the loss), 2 steps per epoch at --batch-size 2 "
        f"x --accumulate 1, padding {100 * share:.0f}% of the batch tokens")
    assert data.pad_share(0, 2) == pytest.approx(share, abs=1e-12)
    in_order = 1 - (4 + 2 + 8) / (4 * 2 + 8)  # evaluation's batches: [5, 3] then [9] alone
    assert data.pad_share(None, 2) == pytest.approx(in_order, abs=1e-12)
    assert SFTData([]).report(4, 2) == ("0 samples, 0 tokens (0 in the loss), 0 steps per epoch at --batch-size 4 "
                                        "x --accumulate 2")
    assert SFTData(_samples([4] * 9)).steps_per_epoch(2, 2) == 3  # 9 samples, 4 a step: the last step short


def test_a_steps_micro_batch_takes_its_rows_of_the_permuted_stream():
    samples = _samples([3, 4, 5, 6, 7])
    data = SFTData(samples)
    stream = [int(i) for epoch in range(3) for i in np.random.default_rng([7, epoch]).permutation(5)]
    for step, micro in ((0, 0), (0, 1), (1, 0), (2, 1)):
        first = (step * 2 + micro) * 2  # accumulate 2, batch 2
        x, y, n = data.batch(seed=7, step=step, micro=micro, batch_size=2, accumulate=2, pad_id=9)
        want = collate([samples[i] for i in stream[first:first + 2]], pad_id=9)
        assert torch.equal(x, want[0]) and torch.equal(y, want[1]) and n == want[2]


def test_collate_pads_with_the_pad_id_and_no_loss():
    x, y, n = collate([Sample("a", [1, 2, 3], [True, False, True]), Sample("b", [4, 5], [True, True])], pad_id=7)
    assert x.tolist() == [[1, 2], [4, 7]] and y.tolist() == [[-100, 3], [5, -100]] and n == 3


def test_the_fingerprint_sees_tokens_and_loss_masks_only():
    base = SFTData(_samples([3, 4]))
    moved = SFTData([Sample("elsewhere:1", s.tokens, s.trained) for s in base.samples])
    assert base.fingerprint() == moved.fingerprint()
    other_mask = SFTData([base.samples[0], Sample("f:1", base.samples[1].tokens, [True] * 4)])
    other_tokens = SFTData([base.samples[0], Sample("f:1", [1, 2, 3, 5], base.samples[1].trained)])
    assert len({base.fingerprint(), other_mask.fingerprint(), other_tokens.fingerprint()}) == 3


V2 = "mistral_instruct_tokenizer_240216.model.v2"  # drops tool calls and results before the last user turn
V7 = "mistral_instruct_tokenizer_241114.model.v7"  # system prompts as their own [SYSTEM_PROMPT] message


@pytest.mark.parametrize("tokenizer", [V2, "mistral_instruct_tokenizer_240323.model.v3", V7, "tekken_240911.json"])
@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "Be brief."}, {**U, "content": "a"}, A, {**U, "content": "b"}, A],
    [{**U, "content": "a"}, with_call(), {"role": "tool", "tool_call_id": "abcDEF123", "content": "5"}, A,
     {**U, "content": "b"}, A],  # a tool call and result before the last user turn (v2 drops them)
    [{**U, "content": "a"}, with_call(), {"role": "tool", "tool_call_id": "abcDEF123", "content": "5", "name": "add"},
     A],
    [A, U, A],  # the first turn the assistant's
])
def test_more_conversations_equal_mistral_commons_encoding(tokenizer, messages):
    tok = MistralTokenizer.from_file(str(DATA / tokenizer))
    sample = {"messages": messages, "tools": TOOLS}
    tokens, trained = encode_line(json.dumps(sample), tok)
    assert tokens == reference(tok, sample)
    assert sum(trained) == _assistant_tokens(tok, sample)


def _assistant_tokens(tok, sample) -> int:
    """What mistral-common makes of the assistant turns (v2: nothing of a tool call before the last user turn)."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    messages = ChatCompletionRequest.model_validate(sample).messages
    last_user = max(i for i, m in enumerate(messages) if m.role == "user")
    return sum(len(tok.instruct_tokenizer.encode_assistant_message(m, i < last_user))
               for i, m in enumerate(messages) if m.role == "assistant")


def test_assistant_turns_of_different_weights_stay_apart_and_text_trains_whole(v3):
    tokens, trained = encode_line(chat(U, {**A, "weight": 0}, A), v3)  # one learned "x</s>", one not
    merged, _ = encode_line(chat(U, A, A), v3)  # equal weights: mistral-common makes one turn of them
    assert sum(trained) == 2 and trained[-2:] == [True, True] and len(tokens) == len(merged) - 1
    text, mask = encode_line(json.dumps({"text": "Hello there."}), v3)
    assert text[0] == v3.instruct_tokenizer.tokenizer.bos_id and all(mask)
