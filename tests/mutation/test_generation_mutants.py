"""The completion routes (server/generation.py) to the field, where mutation testing (mutation/README.md) found
them unpinned: whole bodies and every streamed chunk against OpenAI's documented shapes, per choice with n > 1,
the headers of a stream, what the metrics count per request and per choice, and what is cancelled when a
request cannot be taken whole. The bigram model's greedy text is known in advance ("😀 ok" again and again,
the emoji as four byte tokens), so every expected value here comes from outside the server."""

from __future__ import annotations

import re
import time
from collections import defaultdict

import httpx
import pytest
from conftest import V1
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from prometheus_client.parser import text_string_to_metric_families
from test_server import (
    HI,
    FailingEngine,
    WrappedEngine,
    bigram_llm,
    expected_bigram_text,
    live,
    reference_greedy,
    serving,
    sse,
    wait_until,
)

from ventoux.engine import QueueFull

BYTES = ["bytes:\\xf0", "bytes:\\x9f", "bytes:\\x98", "bytes:\\x80", " ok"]  # the pieces of "😀 ok"
OFFSETS = [0, 0, 0, 0, 1]  # where each token starts in "😀 ok": the emoji's bytes all start it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live(bigram_llm(tmp_path_factory.mktemp("bigram")), max_batch=4, max_tokens_cap=60) as s:
        yield s


def chat_prompt_tokens() -> int:
    reference = MistralTokenizer.from_file(str(V1))
    return len(reference.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content="Hi")])).tokens)


def text_prompt_tokens(text: str) -> int:
    return len(MistralTokenizer.from_file(str(V1)).instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False))


def post(server, path, **body) -> tuple[httpx.Response, int, int]:
    before = int(time.time())
    r = httpx.post(server.url + path, json=body, timeout=60)
    return r, before, int(time.time())


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@pytest.mark.parametrize("logprobs", [{}, {"logprobs": False}])
def test_a_whole_chat_body_has_openais_fields_and_nothing_else(server, logprobs):
    r, before, after = post(server, "/v1/chat/completions", messages=HI, max_tokens=10, temperature=0, n=2,
                            **logprobs)
    body = r.json()
    assert r.status_code == 200 and re.fullmatch("chatcmpl-[0-9a-f]{32}", body.pop("id"))
    assert before <= body.pop("created") <= after
    message = {"role": "assistant", "content": expected_bigram_text(10)}
    assert body == {"object": "chat.completion", "model": "test-model",
                    "choices": [{"index": i, "message": message, "logprobs": None, "finish_reason": "length"}
                                for i in range(2)],
                    "usage": usage(chat_prompt_tokens(), 20)}


def test_a_whole_completion_body_has_openais_fields_and_its_logprobs(server):
    llm = server.app.state.ventoux.llm
    ids = llm.tokenizer.encode("Hello", bos=True)
    r, before, after = post(server, "/v1/completions", prompt="Hello", max_tokens=10, temperature=0, logprobs=1)
    body = r.json()
    assert re.fullmatch("cmpl-[0-9a-f]{32}", body.pop("id")) and before <= body.pop("created") <= after
    logprobs = body["choices"][0].pop("logprobs")
    assert body == {"object": "text_completion", "model": "test-model",
                    "choices": [{"index": 0, "text": expected_bigram_text(10), "finish_reason": "length"}],
                    "usage": usage(text_prompt_tokens("Hello"), 10)}
    ref = reference_greedy(llm, ids, 10, 1)
    assert logprobs["tokens"] == BYTES * 2
    assert logprobs["text_offset"] == OFFSETS + [4 + x for x in OFFSETS]  # into the text the body returns
    assert logprobs["token_logprobs"] == pytest.approx([x[1] for x in ref], abs=1e-4)
    assert logprobs["top_logprobs"] == [{t: pytest.approx(x[1], abs=1e-4)} for t, x in zip(BYTES * 2, ref)]


def test_a_chat_stream_is_a_role_chunk_text_deltas_the_finish_then_usage(server):
    r, before, after = post(server, "/v1/chat/completions", messages=HI, max_tokens=10, temperature=0, stream=True,
                            stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert '"content": "😀"' in r.text  # JSON as OpenAI sends it: UTF-8, not \u escapes
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    chunks = sse(r)
    ids, created = {ch.pop("id") for ch in chunks}, {ch.pop("created") for ch in chunks}
    assert len(ids) == 1 and re.fullmatch("chatcmpl-[0-9a-f]{32}", ids.pop())
    assert len(created) == 1 and before <= created.pop() <= after
    head = {"object": "chat.completion.chunk", "model": "test-model"}

    def choice(delta, finish=None):
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                "usage": None}

    assert chunks == [choice({"role": "assistant", "content": ""}), choice({"content": "😀"}),
                      choice({"content": " ok"}), choice({"content": "😀"}), choice({"content": " ok"}, "length"),
                      {**head, "choices": [], "usage": usage(chat_prompt_tokens(), 10)}]


def test_chat_stream_logprobs_come_per_token_even_before_a_character_is_whole(server):
    r, _, _ = post(server, "/v1/chat/completions", messages=HI, max_tokens=5, temperature=0, stream=True,
                   logprobs=True)
    chunks = sse(r)
    assert all("usage" not in ch for ch in chunks)
    choices = [ch["choices"][0] for ch in chunks]
    assert [c["delta"] for c in choices] == [{"role": "assistant", "content": ""}, {}, {}, {}, {"content": "😀"},
                                             {"content": " ok"}]
    assert choices[0]["logprobs"] is None
    assert [[e["token"] for e in c["logprobs"]["content"]] for c in choices[1:]] == [[t] for t in BYTES]
    assert [c["finish_reason"] for c in choices] == [None] * 5 + ["length"]


def test_a_completion_stream_with_n_choices_gives_each_its_chunks_and_offsets(server):
    llm = server.app.state.ventoux.llm
    ref = reference_greedy(llm, llm.tokenizer.encode("Hello", bos=True), 5, 1)
    r, _, _ = post(server, "/v1/completions", prompt="Hello", max_tokens=5, temperature=0, stream=True, n=2,
                   logprobs=0)
    chunks = sse(r)
    assert {ch["object"] for ch in chunks} == {"text_completion"}
    assert all(set(ch) == {"id", "object", "created", "model", "choices"} for ch in chunks)
    per_choice = defaultdict(list)
    for ch in chunks:
        (c,) = ch["choices"]
        per_choice[c.pop("index")].append(c)
    for i in (0, 1):
        assert [c["text"] for c in per_choice[i]] == ["", "", "", "😀", " ok"]
        assert [c["finish_reason"] for c in per_choice[i]] == [None] * 4 + ["length"]
        logprobs = [c["logprobs"] for c in per_choice[i]]
        assert logprobs == [{"tokens": [t], "token_logprobs": [pytest.approx(x[1], abs=1e-4)], "top_logprobs": [{}],
                             "text_offset": [o]} for t, x, o in zip(BYTES, ref, OFFSETS)]
    whole = post(server, "/v1/completions", prompt="Hello", max_tokens=5, temperature=0, logprobs=0)[0].json()
    assert whole["choices"][0]["logprobs"]["text_offset"] == OFFSETS  # streamed offsets are the whole body's


def test_a_completion_stream_without_logprobs_skips_held_back_tokens(server):
    r, _, _ = post(server, "/v1/completions", prompt="Hello", max_tokens=10, temperature=0, stream=True)
    chunks = sse(r)
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "text": t, "logprobs": None, "finish_reason": f}]
        for t, f in [("😀", None), (" ok", None), ("😀", None), (" ok", "length")]]


def metric_values(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_prompt_tokens_per_request_and_the_rest_per_choice(server):
    before = metric_values(server)
    post(server, "/v1/chat/completions", messages=HI, max_tokens=10, temperature=0, n=3)
    post(server, "/v1/completions", prompt="Hello", max_tokens=5, temperature=0, stop=["ok"])
    after = metric_values(server)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert grew("ventoux_prompt_tokens_total") == chat_prompt_tokens() + text_prompt_tokens("Hello")
    assert grew("ventoux_generation_tokens_total") == 30 + 5
    assert grew("ventoux_requests_total", endpoint="chat", finish_reason="length") == 3
    assert grew("ventoux_requests_total", endpoint="text", finish_reason="stop") == 1
    assert grew("ventoux_time_to_first_token_seconds_count") == 4
    assert grew("ventoux_inter_token_latency_seconds_count") == 3 * 9 + 4


def test_a_prompt_too_long_names_the_field_it_came_in(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a " * 200}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages" and "context" in error["message"], error
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "logit_bias": {"40000": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"  # the engine's own field


class QueueFullOnThird(WrappedEngine):
    """The real engine, except that the third submit of a request finds the queue full; records cancels."""

    def __init__(self, llm):
        super().__init__(llm)
        self.submits, self.cancelled = 0, []

    def submit(self, ids, params, adapter=None):
        self.submits += 1
        if self.submits == 3:
            raise QueueFull("3 requests are already waiting (max_queue=3): retry later")
        handle = self.engine.submit(ids, params)
        original = handle.cancel
        handle.cancel = lambda: (self.cancelled.append(self.submits), original())
        return handle


def test_a_full_queue_mid_request_cancels_the_choices_already_submitted(tmp_path):
    llm = bigram_llm(tmp_path)
    fake = QueueFullOnThird(llm)
    with serving(llm, fake) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 80, "n": 3})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == {
            "message": "the server is busy (3 requests are already waiting (max_queue=3): retry later); retry after "
                       "a second", "type": "rate_limit_error", "param": None, "code": "queue_full"}
        assert len(fake.cancelled) == 2
        wait_until(lambda: fake.engine.stats().running + fake.engine.stats().waiting == 0, timeout=5)


def test_n_choices_with_a_seed_sample_with_seed_plus_i_streamed_too(server):
    kw = {"prompt": "Hello", "max_tokens": 12, "temperature": 5.0}
    alone = [post(server, "/v1/completions", seed=s, **kw)[0].json()["choices"][0]["text"] for s in (3, 4, 5)]
    assert len(set(alone)) == 3
    texts = ["", "", ""]
    for ch in sse(post(server, "/v1/completions", seed=3, n=3, stream=True, **kw)[0]):
        texts[ch["choices"][0]["index"]] += ch["choices"][0]["text"]
    assert texts == alone


@pytest.mark.parametrize("body, message, param", [
    ({"n": 0}, "n=0 must be in [1, 8] on this server", "n"),
    ({"n": 9}, "n=9 must be in [1, 8] on this server", "n"),
    ({"stream_options": {"include_usage": False}}, "stream_options is only allowed with stream: true",
     "stream_options"),
    ({"top_logprobs": 2, "logprobs": False}, "top_logprobs needs logprobs: true", "top_logprobs"),
])
def test_a_refused_chat_request_says_why_whole(server, body, message, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": param, "code": None}


def test_n_at_the_servers_limit_is_served(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "n": 8,
                                                         "temperature": 0})
    assert [c["text"] for c in r.json()["choices"]] == [expected_bigram_text(5)] * 8


def test_an_engine_failure_with_n_choices_ends_the_response_whole_and_streamed(tmp_path):
    llm = bigram_llm(tmp_path)
    with serving(llm, FailingEngine(llm)) as server:
        body = {"prompt": "fail", "max_tokens": 50, "temperature": 0, "n": 2}
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 500 and r.json()["error"] == {
            "message": "generation failed: injected", "type": "server_error", "param": None, "code": "engine_error"}
        lines = [x for x in httpx.post(server.url + "/v1/completions", json={**body, "stream": True}).text.split(
            "\n\n") if x]
        assert lines[-1] == 'data: {"error": {"message": "generation failed: injected", "type": "server_error", ' \
                            '"param": null, "code": "engine_error"}}'
        ok = httpx.post(server.url + "/v1/completions", json={**body, "prompt": "Hello", "max_tokens": 5})
        assert [c["text"] for c in ok.json()["choices"]] == [expected_bigram_text(5)] * 2


class SlowEngine(WrappedEngine):
    """The real engine, its events handed on a tenth of a second apart; records when a handle is cancelled."""

    def __init__(self, llm):
        super().__init__(llm)
        self.cancelled_at = []

    def submit(self, ids, params, adapter=None):
        return SlowHandle(self.engine.submit(ids, params), self.cancelled_at)


class SlowHandle:
    def __init__(self, handle, cancelled_at):
        self.handle, self.cancelled_at = handle, cancelled_at

    async def __aiter__(self):
        import asyncio

        async for ev in self.handle:
            await asyncio.sleep(0.1)
            yield ev

    def cancel(self):
        self.cancelled_at.append(time.monotonic())
        self.handle.cancel()


def test_a_client_that_leaves_a_whole_response_cancels_it_at_once(tmp_path):
    llm = bigram_llm(tmp_path)
    slow = SlowEngine(llm)
    with serving(llm, slow) as server:
        with pytest.raises(httpx.ReadTimeout):  # 80 tokens take 8 s; the client leaves after half a second
            httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 80}, timeout=0.5)
        left = time.monotonic()
        wait_until(lambda: slow.cancelled_at, timeout=3)
        assert slow.cancelled_at[0] - left < 3


def test_a_request_to_a_closed_engine_is_refused_in_a_sentence(tmp_path):
    llm = bigram_llm(tmp_path)
    engine = llm.engine(max_batch=1)
    with serving(llm, engine) as server:
        engine.close()  # as while the server shuts down
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert r.json()["error"]["message"] == "the engine is closed: start a new one with llm.engine()"
