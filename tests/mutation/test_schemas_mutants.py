"""Request bodies (server/schemas.py) behaviours that mutation testing (mutation/README.md) found unpinned: each
400's message and the field it names, whole (the HTTP tests check the status and the field), a union's error from
the branch that got furthest, how JSON names a value's type, and the cap and the names sampling errors take."""

from __future__ import annotations

import json

import pytest

from ventoux.server.errors import APIError
from ventoux.server.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Message,
    _json_type,
    _param_name,
    chat_ids,
    parse,
    sampling_params,
)

MSG = [{"role": "user", "content": "hi"}]
LOGIT_BIAS = "(it maps token ids to biases in [-100, 100])"


def _error(call) -> tuple:
    with pytest.raises(APIError) as e:
        call()
    return e.value.status, e.value.message, e.value.param, e.value.code


def _chat(**fields) -> bytes:
    return json.dumps({"messages": MSG, **fields}).encode()


@pytest.mark.parametrize("model, body, message, param", [
    (ChatRequest, b"", "missing required parameter 'messages'", "messages"),
    (ChatRequest, b"[1, 2]", "the request body must be a JSON object, not an array", None),
    (ChatRequest, b'"x"', "the request body must be a JSON object, not a string", None),
    (ChatRequest, b'{"messages": 5}', "invalid messages: Input should be a valid array", "messages"),
    (ChatRequest, b'{"messages": [5]}', "messages[0] must be a JSON object, not a number", "messages[0]"),
    (ChatRequest, b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "messages[0].content[0]: content parts of type 'image_url' are not supported; only text parts "
     '({"type": "text", "text": "..."}) are', "messages[0].content[0]"),
    (ChatRequest, b'{"messages": [{"role": "user", "content": 5}]}',
     "invalid messages[0].content: Input should be a valid string", "messages[0].content"),
    (ChatRequest, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
     "invalid messages[0].content[0].text: Input should be a valid string", "messages[0].content[0].text"),
    (ChatRequest, b'{"messages": [{"role": "user"}]}', "missing required parameter 'messages[0].content'",
     "messages[0].content"),
    (ChatRequest, _chat(temperature="hot"), "invalid temperature: Input should be a valid number", "temperature"),
    (ChatRequest, _chat(foo=1), "unknown parameter 'foo'", "foo"),
    (ChatRequest, _chat(logit_bias={"five": -100}),
     f"invalid logit_bias entry 'five': Input should be a valid integer, unable to parse string as an integer "
     f"{LOGIT_BIAS}", "logit_bias"),
    (ChatRequest, _chat(logit_bias={"5": "ban"}), f"invalid logit_bias entry '5': Input should be a valid number "
                                                  f"{LOGIT_BIAS}", "logit_bias"),
    (ChatRequest, _chat(logit_bias=[5]), "invalid logit_bias: Input should be an object", "logit_bias"),
    (ChatRequest, _chat(stop=5), "invalid stop: Input should be a valid string", "stop"),
    (ChatRequest, _chat(stream_options=5), "stream_options must be a JSON object, not a number", "stream_options"),
    (CompletionRequest, b'{"prompt": 5}', "invalid prompt: Input should be a valid string", "prompt"),
    (CompletionRequest, b'{"prompt": ["a"]}', "invalid prompt[0]: Input should be a valid integer", "prompt[0]"),
    (DetokenizeRequest, b'{"tokens": ["a"]}', "invalid tokens[0]: Input should be a valid integer", "tokens[0]"),
])
def test_each_bad_body_is_a_400_naming_its_field_whole(model, body, message, param):
    assert _error(lambda: parse(model, body)) == (400, message, param, None)


def test_a_body_that_is_no_json_has_its_own_code():
    assert _error(lambda: parse(ChatRequest, b'{"messages": [')) == (
        400, "the request body is not valid JSON (Invalid JSON: EOF while parsing a list at line 1 column 14)", None,
        "invalid_json")


def test_field_names_and_json_types_as_clients_know_them():
    assert _param_name(("messages", 0, "content", "list[TextPart]", 1, "text")) == "messages[0].content[1].text"
    assert _param_name(("prompt", "str")) == "prompt" and _param_name(()) == ""
    assert [_json_type(v) for v in (None, True, "s", 1, 1.5, [], {}, b"")] == [
        "null", "a boolean", "a string", "a number", "a number", "an array", "an object", "bytes"]


@pytest.mark.parametrize("model, body, logprobs, message, param", [
    (ChatRequest, {"max_tokens": 101}, None, "max_tokens=101 is over this server's cap of 100 (--max-tokens-cap)",
     "max_tokens"),
    (ChatRequest, {"max_completion_tokens": 101}, None,
     "max_completion_tokens=101 is over this server's cap of 100 (--max-tokens-cap)", "max_completion_tokens"),
    (ChatRequest, {"max_completion_tokens": 0}, None,
     "invalid sampling parameter max_completion_tokens=0: it must be an integer >= 1", "max_completion_tokens"),
    (ChatRequest, {"temperature": -1}, None,
     "invalid sampling parameter temperature=-1.0: it must be 0 (greedy) or a number in [0.0001, 100]", "temperature"),
    (ChatRequest, {"top_logprobs": 50}, 50,
     "invalid sampling parameter top_logprobs=50: it must be None or an integer in [0, 20]", "top_logprobs"),
    (CompletionRequest, {"logprobs": 50}, 50,
     "invalid sampling parameter logprobs=50: it must be None or an integer in [0, 20]", "logprobs"),
    (CompletionRequest, {"stop": [""]}, None,
     "invalid sampling parameter stop=['']: it must be a non-empty string or a list of them", "stop"),
])
def test_each_bad_sampling_request_names_the_field_the_client_sent(model, body, logprobs, message, param):
    body = {**({"messages": MSG} if model is ChatRequest else {"prompt": "x"}), **body}
    req = parse(model, json.dumps(body).encode())
    assert _error(lambda: sampling_params(req, 100, logprobs)) == (400, message, param, None)


def test_nulls_and_absent_fields_take_the_http_defaults_and_the_cap():
    for body in ({"prompt": "x"}, {"prompt": "x", "max_tokens": None, "temperature": None}):
        params = sampling_params(parse(CompletionRequest, json.dumps(body).encode()), 100)
        assert (params.max_tokens, params.temperature, params.top_p) == (100, 1.0, 1.0)
    chat = parse(ChatRequest, _chat(max_tokens=7, max_completion_tokens=100))
    assert sampling_params(chat, 100).max_tokens == 100  # the newer name wins, at the cap exactly


def test_a_conversation_the_chat_format_refuses_is_a_400_on_messages(v1_tokenizer):
    messages = [Message(role="user", content="hi"), Message(role="wizard", content="hi")]
    assert _error(lambda: chat_ids(v1_tokenizer, messages)) == (
        400, "messages[1].role='wizard' is invalid: use one of system, user, assistant", "messages", None)


def test_a_union_error_is_told_from_its_own_field_not_a_later_one():
    body = {"messages": [{"role": "user", "content": 5},
                         {"role": "user", "content": [{"type": "text", "text": 5}]}]}  # deeper, but later
    assert _error(lambda: parse(ChatRequest, json.dumps(body).encode())) == (
        400, "invalid messages[0].content: Input should be a valid string", "messages[0].content", None)
