"""`ventoux serve` against the official openai client and raw HTTP: live uvicorn servers on free local ports.

Two models: the shipped demo model (real text), and a tiny random model with the real v1 Mistral tokenizer
whose weights are set so its greedy output is known in advance: "😀 ok" again and again, the emoji as four
byte-fallback tokens (a multi-byte character split across tokens) -- so texts, token counts and stream
deltas are checked against values that do not come from the server.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import TINY_FULL, V1
from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import ventoux
from ventoux.api import DEMO_MODEL, LLM
from ventoux.model import Transformer
from ventoux.server import Settings, create_app, generation
from ventoux.server import routes as small_routes
from ventoux.server.background import BackgroundServer
from ventoux.tokenizer import SAFE_PROMPT, load_tokenizer

CHAIN = [243, 162, 155, 131, 3614]  # v1 ids of <0xF0> <0x9F> <0x98> <0x80> "▁ok": "😀 ok"
KEY = "sk-test-key"
HI = [{"role": "user", "content": "Hi"}]
ROMEO = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


def bigram_llm(folder: Path) -> LLM:
    """Full attention, context 96. Layers add nothing (wo = w2 = 0), so the logits depend on the last token
    only: each chain token points to the next, and every other token to the first (through dimension 0)."""
    cfg = TINY_FULL.replace(vocab_size=32000)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        emb = torch.randn(cfg.vocab_size, cfg.dim)
        emb[:, 0] = 3.0
        out = torch.zeros(cfg.vocab_size, cfg.dim)
        out[CHAIN[0], 0] = 3.0
        for a, b in zip(CHAIN, CHAIN[1:] + CHAIN[:1]):
            out[b, 1:] += 3.0 * emb[a, 1:] / emb[a, 1:].norm()
        model.tok_embeddings.weight.copy_(emb)
        model.output.weight.copy_(out)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(V1, folder / "tokenizer.model")
    return LLM(model, load_tokenizer(folder), "bigram")


def expected_bigram_text(n_tokens: int) -> str:
    assert n_tokens % 5 == 0
    return "😀 ok" * (n_tokens // 5)


@contextmanager
def live(llm: LLM, max_batch: int = 8, max_queue: int | None = None, **settings):
    settings.setdefault("served_name", "test-model")
    app = create_app(Settings(**settings), load=lambda: (llm, llm.engine(max_batch=max_batch, max_queue=max_queue)))
    with BackgroundServer(app) as server:
        server.wait_ready()
        yield server


def engine(server):
    return server.app.state.ventoux.engine


def client(server, key="none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def sse(response: httpx.Response) -> list[dict]:
    """The JSON chunks of a server-sent event stream, checking the framing and the closing [DONE]."""
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


@pytest.fixture(scope="module")
def demo():
    llm = ventoux.load(dtype="float32")
    with live(llm, max_batch=8, max_tokens_cap=4096) as server:
        yield server


@pytest.fixture(scope="module")
def bigram(tmp_path_factory):
    llm = bigram_llm(tmp_path_factory.mktemp("bigram"))
    with live(llm, api_key=KEY, cors_origins=("http://good.example",), max_body_bytes=4096,
              max_tokens_cap=200) as server:
        yield server


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---- the openai client: chat, completions, streaming, usage, logprobs, stop, seeds ------------------
def test_chat_and_completions_stream_equals_whole_and_usage_is_the_tokenizers(demo):
    c = client(demo)
    messages = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Speak of love."}]
    whole = c.chat.completions.create(model="test-model", messages=messages, max_tokens=24, temperature=0)
    parts = [ch.choices[0].delta.content or "" for ch in
             c.chat.completions.create(model="test-model", messages=messages, max_tokens=24, temperature=0,
                                       stream=True) if ch.choices]
    assert "".join(parts) == whole.choices[0].message.content and len(parts) > 3
    assert whole.choices[0].finish_reason == "length"
    reference = MistralTokenizer.from_file(str(DEMO_MODEL / "tokenizer.model"))
    prompt = reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    assert whole.usage.prompt_tokens == len(prompt)
    assert whole.usage.completion_tokens == 24 and whole.usage.total_tokens == len(prompt) + 24

    text = c.completions.create(model="test-model", prompt=ROMEO, max_tokens=20, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="test-model", prompt=ROMEO, max_tokens=20, temperature=0, stream=True) if ch.choices)
    assert streamed == text.choices[0].text
    assert text.usage.prompt_tokens == len(reference.instruct_tokenizer.tokenizer.encode(ROMEO, bos=True, eos=False))
    by_ids = c.completions.create(model="test-model", prompt=reference.instruct_tokenizer.tokenizer.encode(
        ROMEO, bos=True, eos=False), max_tokens=20, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text


def test_include_usage_adds_exactly_one_final_usage_chunk(demo):
    body = {"messages": HI, "max_tokens": 6, "temperature": 0, "stream": True}
    with_usage = sse(httpx.post(demo.url + "/v1/chat/completions",
                                json={**body, "stream_options": {"include_usage": True}}))
    assert [ch["usage"] is not None for ch in with_usage] == [False] * (len(with_usage) - 1) + [True]
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 6
    without = sse(httpx.post(demo.url + "/v1/chat/completions", json=body))
    assert all("usage" not in ch for ch in without) and all(ch["choices"] for ch in without)
    assert without[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert without[-1]["choices"][0]["finish_reason"] == "length"


def reference_greedy(llm: LLM, ids: list[int], n: int, top: int):
    """Greedy decoding by whole-sequence forwards (no cache, no engine): tokens, their logprobs, top-n."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            lp = llm.model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
            values, indices = lp.topk(top)
            out.append((int(indices[0]), float(values[0]), values.tolist(), indices.tolist()))
            ids.append(int(indices[0]))
    return out


def test_logprobs_chat_and_completions_match_a_reference_forward(demo):
    llm = demo.app.state.ventoux.llm
    ids = llm.tokenizer.encode(ROMEO, bos=True)
    ref = reference_greedy(llm, ids, 8, 3)
    r = client(demo).completions.create(model="test-model", prompt=ids, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x[1] for x in ref], abs=2e-3)
    for top, (_, _, values, _) in zip(lp.top_logprobs, ref):
        assert sorted(top.values(), reverse=True) == pytest.approx(values, abs=2e-3)
    assert "".join(lp.tokens).strip() == llm.tokenizer.decode([x[0] for x in ref]).strip()

    chat_ids = llm.tokenizer.encode_chat(HI)
    ref = reference_greedy(llm, chat_ids, 6, 2)
    r = client(demo).chat.completions.create(model="test-model", messages=HI, max_tokens=6, temperature=0,
                                             logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx([x[1] for x in ref], abs=2e-3)
    assert [[t.logprob for t in e.top_logprobs] for e in content] == [pytest.approx(x[2], abs=2e-3) for x in ref]
    assert bytes(b for e in content for b in e.bytes).decode() == r.choices[0].message.content


def test_logit_bias_bans_and_pushes_tokens_as_a_reference_forward_does(demo):
    """OpenAI's logit_bias (string keys, as JSON has them): greedy tokens equal whole-sequence forwards with
    the bias added to the logits; chat streamed equals chat whole; logprobs stay the model's own."""
    llm = demo.app.state.ventoux.llm
    ids = llm.tokenizer.encode(ROMEO, bos=True)
    plain = [x[0] for x in reference_greedy(llm, ids, 10, 1)]
    bias = {plain[0]: -100.0, plain[1]: -100.0, 300: 3.0}
    ref, out = list(ids), []
    with torch.no_grad():
        for _ in range(10):
            logits = llm.model(torch.tensor([ref]))[0, -1].float()
            for t, b in bias.items():
                logits[t] += b
            out.append(int(logits.argmax()))
            ref.append(out[-1])
    assert out != plain and not {plain[0], plain[1]} & set(out)
    c = client(demo)
    r = c.completions.create(model="test-model", prompt=ids, max_tokens=10, temperature=0, logprobs=0,
                             logit_bias={str(t): b for t, b in bias.items()})
    assert r.choices[0].text == llm.tokenizer.decode(out) and r.usage.completion_tokens == 10
    with torch.no_grad():
        first = llm.model(torch.tensor([ids]))[0, -1].float()
    biased = first.clone()
    biased[list(bias)] += torch.tensor(list(bias.values()))
    unbiased_lp, biased_lp = first.log_softmax(-1)[out[0]].item(), biased.log_softmax(-1)[out[0]].item()
    assert r.choices[0].logprobs.token_logprobs[0] == pytest.approx(unbiased_lp, abs=2e-3)
    assert abs(unbiased_lp - biased_lp) > 0.1
    kw = dict(model="test-model", messages=HI, max_tokens=8, temperature=0, logit_bias={"300": 100})
    whole = c.chat.completions.create(**kw).choices[0].message.content
    assert whole == llm.tokenizer.decode([300] * 8)
    assert "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)) == whole


def test_ignore_eos_decodes_max_tokens_through_the_end_of_sequence(demo):
    """vLLM's extra field, as its benchmark clients send it (extra_body): an EOS pushed to the top by logit_bias
    ends the completion at once without it, and is decoded max_tokens times with it (adding no text; "</s>" in
    logprobs)."""
    eos = demo.app.state.ventoux.llm.tokenizer.eos_id
    c = client(demo)
    kw = dict(model="test-model", prompt=ROMEO, max_tokens=6, temperature=0, logit_bias={str(eos): 100})
    stopped = c.completions.create(**kw)
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", 0)
    through = c.completions.create(**kw, logprobs=0, extra_body={"ignore_eos": True})
    assert (through.choices[0].finish_reason, through.usage.completion_tokens) == ("length", 6)
    assert through.choices[0].text == "" and through.choices[0].logprobs.tokens == ["</s>"] * 6
    chunks = list(c.chat.completions.create(model="test-model", messages=HI, max_tokens=5, temperature=0,
                                            logit_bias={str(eos): 100}, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-2].choices[0].finish_reason == "length"


def test_stop_sequences_cut_the_text_whole_and_streamed(demo):
    c = client(demo)
    full = c.completions.create(model="test-model", prompt=ROMEO, max_tokens=30, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    r = c.completions.create(model="test-model", prompt=ROMEO, max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = [ch for ch in c.completions.create(model="test-model", prompt=ROMEO, max_tokens=30, temperature=0,
                                                  stop=stop, stream=True)]
    assert "".join(ch.choices[0].text for ch in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_n_choices_differ(demo):
    c = client(demo)
    kw = dict(model="test-model", messages=HI, max_tokens=16, temperature=1.0, top_p=0.95)
    a = c.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert c.chat.completions.create(seed=7, **kw).choices[0].message.content == a
    assert c.chat.completions.create(seed=8, **kw).choices[0].message.content != a
    two = c.chat.completions.create(seed=7, n=2, **kw)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].message.content == a  # choice i samples with seed + i
    assert two.choices[1].message.content == c.chat.completions.create(seed=8, **kw).choices[0].message.content
    streamed = ["", ""]
    for chunk in c.chat.completions.create(seed=7, n=2, stream=True, **kw):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [ch.message.content for ch in two.choices]


def test_seeds_wrap_at_64_bits_and_a_top_k_past_the_vocabulary_keeps_every_token(demo):
    # Choice i samples with seed + i modulo 2^64 (torch's own reading of a negative seed): seed 2^64 - 1 with n = 2
    # was a 400 naming a seed the client never sent. top_k = 2^63 - 1 keeps every token, as top_k off does (it
    # failed every request in the batch with an index error).
    c = client(demo)
    kw = dict(model="test-model", prompt=ROMEO, max_tokens=12, temperature=1.0)
    two = c.completions.create(seed=2**64 - 1, n=2, **kw)
    assert two.choices[1].text == c.completions.create(seed=0, **kw).choices[0].text
    assert two.choices[0].text == c.completions.create(seed=-1, **kw).choices[0].text
    huge = c.completions.create(seed=5, extra_body={"top_k": 2**63 - 1}, **kw).choices[0].text
    assert huge == c.completions.create(seed=5, **kw).choices[0].text


# ---- continuous batching through HTTP --------------------------------------------------------------
def test_16_concurrent_streams_each_equal_the_request_alone(demo):
    words = ROMEO.split()
    requests = [dict(prompt=" ".join(words[: 3 + i]), max_tokens=4 + i, temperature=0) for i in range(16)]
    c = client(demo)
    alone = [c.completions.create(model="test-model", **r).choices[0].text for r in requests]

    def streamed(r):
        return "".join(ch.choices[0].text for ch in client(demo).completions.create(
            model="test-model", stream=True, **r) if ch.choices)

    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            for line in httpx.get(demo.url + "/metrics").text.splitlines():
                if line.startswith("ventoux_requests_running "):
                    peak[0] = max(peak[0], float(line.split()[1]))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(streamed, requests))
    finally:
        done.set()
        watcher.join()
    assert together == alone
    assert peak[0] > 1


def test_client_disconnect_mid_stream_frees_the_row(demo):
    body = {"prompt": ROMEO, "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", demo.url + "/v1/completions", json=body) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 3:
                break
        assert engine(demo).stats().running == 1
    wait_until(lambda: engine(demo).stats().running == 0, timeout=5)
    assert 'finish_reason="cancelled"' in httpx.get(demo.url + "/metrics").text


def test_a_client_gone_mid_body_leaves_no_traceback_and_serving_goes_on(demo, caplog):
    # The body's read raised starlette's ClientDisconnect out of the app: uvicorn logged "Exception in ASGI
    # application" with its traceback. Now it is a 400 that no one reads
    host, port = demo.url.removeprefix("http://").split(":")
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            wait_until(lambda: demo.server.server_state.tasks, timeout=5)  # the request is in the app
        wait_until(lambda: not demo.server.server_state.tasks, timeout=5)  # and done with
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    ok = client(demo).completions.create(model="test-model", prompt="Hi", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def test_metrics_are_prometheus_text_with_the_documented_names(demo):
    client(demo).chat.completions.create(model="test-model", messages=HI, max_tokens=4, temperature=0)
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(demo.url + "/metrics").text)}
    for name in ("ventoux_requests_running", "ventoux_requests_waiting", "ventoux_kv_cache_usage_ratio"):
        assert families[name].type == "gauge"
    for name in ("ventoux_prompt_tokens", "ventoux_generation_tokens"):
        assert families[name].type == "counter" and families[name].samples[0].value > 0
    for name in ("ventoux_time_to_first_token_seconds", "ventoux_inter_token_latency_seconds"):
        assert families[name].type == "histogram"
        assert next(s.value for s in families[name].samples if s.name.endswith("_count")) > 0


def test_models_tokenize_detokenize(demo):
    assert [m.id for m in client(demo).models.list()] == ["test-model"]
    reference = MistralTokenizer.from_file(str(DEMO_MODEL / "tokenizer.model"))
    r = httpx.post(demo.url + "/tokenize", json={"prompt": ROMEO}).json()
    assert r["tokens"] == reference.instruct_tokenizer.tokenizer.encode(ROMEO, bos=True, eos=False)
    chat = httpx.post(demo.url + "/tokenize", json={"messages": HI}).json()
    assert chat["tokens"] == reference.encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content="Hi")])).tokens
    assert httpx.post(demo.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == ROMEO


MSG = [{"role": "user", "content": "hello"}]
BAD = [
    ("/v1/chat/completions", b'{"messages": [', 400, None),
    ("/v1/chat/completions", b'[1, 2]', 400, None),
    ("/v1/chat/completions", {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": MSG, "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "n": 99}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 10**30}, 400, "n"),  # refused before anything n long is made
    ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSG, "model_path": "/etc/passwd"}, 400, "model_path"),
    ("/v1/chat/completions", {"messages": MSG, "model": "/etc/passwd"}, 404, "model"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"2048": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSG, "logit_bias": {"five": -100}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSG, "logit_bias": {"5": "ban"}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSG, "logit_bias": [5]}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/detokenize", {"tokens": [-5]}, 400, "tokens"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_every_bad_request_gets_its_status_and_the_server_keeps_serving(demo, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(demo.url + path, headers={"Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    ok = client(demo).chat.completions.create(model="test-model", messages=HI, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


# ---- the tiny model with the real tokenizer: multi-byte text, exact counts, security -----------------
def test_multibyte_characters_are_never_split_across_deltas(bigram):
    c = client(bigram, KEY)
    chunks = [ch.choices[0].delta.content for ch in c.chat.completions.create(
        model="test-model", messages=HI, max_tokens=20, temperature=0, stream=True) if ch.choices]
    deltas = [d for d in chunks if d]
    assert "".join(deltas) == expected_bigram_text(20)
    assert all("\ufffd" not in d for d in deltas) and "😀" in deltas
    whole = c.chat.completions.create(model="test-model", messages=HI, max_tokens=20, temperature=0, logprobs=True)
    assert whole.choices[0].message.content == expected_bigram_text(20)
    reference = MistralTokenizer.from_file(str(V1))
    assert whole.usage.prompt_tokens == len(reference.encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content="Hi")])).tokens)
    assert whole.usage.completion_tokens == 20
    content = whole.choices[0].logprobs.content
    safe = c.chat.completions.create(model="test-model", messages=HI, max_tokens=5, extra_body={"safe_prompt": True})
    assert safe.usage.prompt_tokens == len(reference.encode_chat_completion(ChatCompletionRequest(
        messages=[SystemMessage(content=SAFE_PROMPT), UserMessage(content="Hi")])).tokens)
    assert [e.bytes for e in content[:5]] == [[0xF0], [0x9F], [0x98], [0x80], list(b" ok")]
    assert content[0].token == "bytes:\\xf0" and content[4].token == " ok"


def test_prompt_longer_than_a_full_attention_context_is_a_400(bigram):
    r = httpx.post(bigram.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": list(range(10, 200)), "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "context" in r.json()["error"]["message"]
    ok = client(bigram, KEY).completions.create(model="test-model", prompt="Hello", max_tokens=5, temperature=0)
    assert ok.choices[0].text == expected_bigram_text(5)


def test_the_key_guards_every_route_but_health_and_the_page(bigram):
    every = [r for router in (generation.router, small_routes.router) for r in router.routes]  # all app.py mounts
    routes = {(m, r.path.replace("{name:path}", "test-model")) for r in every for m in r.methods
              if m in ("GET", "POST")}
    assert ("GET", "/metrics") in routes and ("POST", "/tokenize") in routes
    routes |= {("GET", "/no/such/route"), ("POST", "/v1/embeddings")}
    bodies = {"/v1/chat/completions": {"messages": HI, "max_tokens": 2},
              "/v1/completions": {"prompt": "a", "max_tokens": 2},
              "/tokenize": {"prompt": "a"}, "/detokenize": {"tokens": [1]}}
    http = httpx.Client(base_url=bigram.url)
    for method, path in sorted(routes):
        body = bodies.get(path, {})
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = http.request(method, path, json=body, headers=headers)
            expected = 200 if path in ("/health", "/") else 401
            assert r.status_code == expected, (method, path, headers, r.status_code)
            if expected == 401:
                assert r.json()["error"]["type"] == "authentication_error"
        r = http.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == (404 if path in ("/no/such/route", "/v1/embeddings") else 200), (path, r.text)


def test_bodies_over_the_limit_get_413_without_being_read_whole(bigram):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps({"prompt": "x" * 10_000}).encode()
    r = httpx.post(bigram.url + "/v1/completions", content=big, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    sent = []

    def chunked():  # no Content-Length: the server counts and stops early
        for i in range(20_000):
            sent.append(i)
            yield b" " * 1024

    try:
        r = httpx.post(bigram.url + "/v1/completions", content=chunked(), headers=auth)
        assert r.status_code == 413
    except httpx.HTTPError:  # the server answered and closed while we were still sending: also not read whole
        pass
    assert len(sent) < 20_000
    ok = client(bigram, KEY).completions.create(model="test-model", prompt="Hello", max_tokens=5, temperature=0)
    assert ok.choices[0].text == expected_bigram_text(5)


def test_cors_is_closed_except_for_the_listed_origin(bigram, demo):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    good = httpx.options(bigram.url + "/v1/chat/completions", headers={"Origin": "http://good.example", **preflight})
    assert good.headers.get("access-control-allow-origin") == "http://good.example"
    assert "access-control-allow-credentials" not in good.headers
    evil = httpx.options(bigram.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in evil.headers
    r = httpx.get(bigram.url + "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    for url in (demo.url + "/v1/models", demo.url + "/health"):  # no --cors-origin: no CORS header at all
        assert "access-control-allow-origin" not in httpx.get(url, headers={"Origin": "http://good.example"}).headers


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    llm = bigram_llm(tmp_path)
    with live(llm, max_batch=1, max_queue=1) as server, httpx.Client(timeout=30) as http:
        body = {"prompt": "Hello", "max_tokens": 90, "stream": True}
        with http.stream("POST", server.url + "/v1/completions", json=body) as first:
            wait_until(lambda: engine(server).stats().running == 1)
            with http.stream("POST", server.url + "/v1/completions", json=body) as second:
                wait_until(lambda: engine(server).stats().waiting == 1)
                r = http.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 5})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
                assert second.status_code == first.status_code == 200
        wait_until(lambda: engine(server).stats().running + engine(server).stats().waiting == 0)
        r = http.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_bigram_text(5)


class WrappedEngine:
    """The real engine (two rows) behind a test's own submit."""

    def __init__(self, llm):
        self.engine = llm.engine(max_batch=2)

    def stats(self):
        return self.engine.stats()

    def close(self):
        self.engine.close()


@contextmanager
def serving(llm: LLM, engine):
    """A live server of `llm` whose requests go to `engine` (a WrappedEngine, or a real one)."""
    with BackgroundServer(create_app(Settings(served_name="m"), load=lambda: (llm, engine))) as server:
        server.wait_ready()
        yield server


class FailingEngine(WrappedEngine):
    """The real engine, except that a request whose prompt is "fail" breaks after five events ("😀 ok")."""

    def __init__(self, llm):
        super().__init__(llm)
        self.fail_ids = llm.tokenizer.encode("fail", bos=True)

    def submit(self, ids, params, adapter=None):
        handle = self.engine.submit(ids, params)
        return FailAfterFive(handle) if ids == self.fail_ids else handle


class FailAfterFive:
    def __init__(self, handle):
        self.handle = handle

    async def __aiter__(self):
        from ventoux.engine import EngineError

        n = 0
        async for ev in self.handle:
            if n == 5:
                self.handle.cancel()
                raise EngineError("generation failed: injected")
            n += 1
            yield ev

    def cancel(self):
        self.handle.cancel()


def test_an_engine_failure_ends_that_request_with_an_error_and_serving_goes_on(tmp_path):
    llm = bigram_llm(tmp_path)
    with serving(llm, FailingEngine(llm)) as server:
        body = {"prompt": "fail", "max_tokens": 50, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        stream = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}).text
        lines = [x for x in stream.split("\n\n") if x]
        error = json.loads(lines[-1][len("data: "):])["error"]
        assert "[DONE]" not in stream and error["message"] == "generation failed: injected"
        assert [json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]] == ["😀", " ok"]
        ok = httpx.post(server.url + "/v1/completions", json={**body, "prompt": "Hello", "max_tokens": 5})
        assert ok.json()["choices"][0]["text"] == expected_bigram_text(5)


def test_health_is_503_while_loading_then_200_and_says_why_a_load_failed(tmp_path):
    release = threading.Event()
    llm = bigram_llm(tmp_path)

    def slow_load():
        release.wait(30)
        return llm, llm.engine(max_batch=2)

    with BackgroundServer(create_app(Settings(served_name="m"), load=slow_load)) as server:
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "a"}).status_code == 503
        release.set()
        server.wait_ready(timeout=30)
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
        assert httpx.head(server.url + "/health").status_code == 200  # load balancers' probes send HEAD

    failures = []

    def bad_load():
        raise ventoux.VentouxError("no checkpoint in /nowhere")

    with BackgroundServer(create_app(Settings(served_name="m"), load=bad_load, on_load_error=failures.append)) as s:
        wait_until(lambda: failures)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "no checkpoint in /nowhere" in r.json()["error"]["message"]


def test_cli_serve_binds_localhost_prints_the_url_and_stops_on_sigterm(tmp_path, capsys):
    from ventoux.cli import main

    assert main(["serve", "--max-batch", "0"]) == 1
    assert capsys.readouterr().err == "ventoux: error: --max-batch=0: it must be >= 1\n"
    assert main(["serve", "--api-key-file", str(tmp_path / "missing")]) == 1
    assert "--api-key-file" in capsys.readouterr().err
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "ventoux", "serve", "--port", "0", "--api-key-file",
                             str(key_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the first line names the URL
        url = next((w for w in line.split() if w.startswith("http://")), line)
        assert url.startswith("http://127.0.0.1:"), line
        wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout=120)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert r.json()["data"][0]["id"] == "ventoux-demo"
    finally:
        proc.terminate()  # uvicorn shuts down gracefully, then exits by the signal it caught
        assert proc.wait(timeout=30) == -signal.SIGTERM


def test_cli_serve_refuses_an_empty_key_or_name_and_a_port_out_of_range(monkeypatch, capsys, tmp_path):
    from ventoux.cli import main

    not_pair = ("is not NAME=PATH, e.g. sql=runs/sql/adapter, or "
                '{"name": "sql", "path": "runs/sql/adapter"}')
    taken = "is already served; give each adapter its own name, other than the model's (--served-model-name)"
    as_json = json.dumps({"name": "x", "path": str(tmp_path)})
    cases = {("--api-key", ""): "--api-key is empty: give the key, or leave the flag out to serve without one",
             ("--api-key", "  "): "--api-key is empty: give the key, or leave the flag out to serve without one",
             ("--port", "99999"): "--port 99999 is not a port: give 1 to 65535, or 0 for any free one",
             ("--port", "-1"): "--port -1 is not a port: give 1 to 65535, or 0 for any free one",
             ("--lora-modules", "sql"): f"--lora-modules 'sql' {not_pair}",
             ("--lora-modules", "=x"): f"--lora-modules '=x' {not_pair}",
             ("--lora-modules", '{"name": "x"}'): f"""--lora-modules '{{"name": "x"}}' {not_pair}""",
             ("--lora-modules", '{"name": "x", "path": 3}'):
                 f"""--lora-modules '{{"name": "x", "path": 3}}' {not_pair}""",
             ("--lora-modules", '["x", "y"]'): f"""--lora-modules '["x", "y"]' {not_pair}""",
             ("--lora-modules", "{x"): f"--lora-modules '{{x' {not_pair}",
             ("--lora-modules", f"x={tmp_path}", as_json): f"--lora-modules '{as_json}': the name 'x' {taken}",
             ("--lora-modules", f"x={tmp_path}", f"x={tmp_path}"):
                 f"--lora-modules 'x={tmp_path}': the name 'x' {taken}",
             ("--lora-modules", f"ventoux-demo={tmp_path}"):
                 f"--lora-modules 'ventoux-demo={tmp_path}': the name 'ventoux-demo' {taken}",
             ("--lora-modules", "x=/nonexistent/adapter"):
                 "--lora-modules 'x=/nonexistent/adapter': /nonexistent/adapter does not exist; give an adapter folder "
                 "(adapter_config.json) or a lora.safetensors file",
             # a model that fails to load: were the name let through, serve would stop, not listen on
             ("--served-model-name", "", "--model", "/nonexistent/model", "--port", "0"):
                 "--served-model-name is empty: give the name clients pass as `model`, or leave it out"}
    for argv, message in cases.items():
        assert main(["serve", *argv]) == 1  # before anything loads or listens
        assert capsys.readouterr().err == f"ventoux: error: {message}\n"
    monkeypatch.setenv("VENTOUX_API_KEY", "")  # no authentication must be asked for, not fallen into
    assert main(["serve"]) == 1
    assert capsys.readouterr().err == ("ventoux: error: $VENTOUX_API_KEY is empty: give the key, or unset it to serve "
                                       "without one\n")


@pytest.mark.parametrize("message, param, words", [
    ("hi", "messages[0]", "must be a JSON object, not a string"),
    (None, "messages[0]", "must be a JSON object, not null"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
     "messages[0].content[0]", "only text parts"),
    ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content[0].text", "missing"),
])
def test_a_malformed_message_is_named(demo, message, param, words):
    r = httpx.post(demo.url + "/v1/chat/completions", json={"messages": [message]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and words in error["message"], error


@pytest.mark.parametrize("field, value", [("top_logprobs", 100), ("max_completion_tokens", 0)])
def test_sampling_errors_name_the_field_the_client_sent(demo, field, value):
    r = httpx.post(demo.url + "/v1/chat/completions", json={"messages": HI, "logprobs": True, field: value})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == field and f"{field}={value}" in error["message"], error


# ---- LoRA adapters served by name (vLLM's --lora-modules) ---------------------------------------------------
def test_adapters_are_served_by_name_beside_the_model_and_mix_in_one_batch(v1_tokenizer):
    """`model` chooses the adapter per request; requests for the model and for its adapter, sent together, decode
    side by side and each gives the tokens ventoux.generate gives with that adapter (or none)."""
    from conftest import adapter_model, random_ids

    llm = LLM(adapter_model(), v1_tokenizer, "tiny")
    prompts = [random_ids(seed, 9) for seed in (1, 2)]
    want = {name: [llm.generate(p, adapter=adapter, max_tokens=10).text for p in prompts]
            for name, adapter in (("test-model", None), ("a", "a"))}
    assert want["a"] != want["test-model"]  # the adapter changes the output
    with live(llm, adapters={"a": "runs/a/adapter"}) as server:
        c = client(server)
        assert [m.id for m in c.models.list().data] == ["test-model", "a"]
        card = httpx.get(server.url + "/v1/models/a").json()
        assert (card["id"], card["parent"], card["root"]) == ("a", "test-model", "runs/a/adapter")
        assert "parent" not in httpx.get(server.url + "/v1/models/test-model").json()
        jobs = [(name, p) for name in want for p in prompts]
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda job: c.completions.create(model=job[0], prompt=job[1], max_tokens=10,
                                                                 temperature=0).choices[0].text, jobs))
        assert got == want["test-model"] + want["a"]
        streamed = c.completions.create(model="a", prompt=prompts[1], max_tokens=10, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == want["a"][1]
        r = httpx.post(server.url + "/v1/completions", json={"model": "b", "prompt": prompts[0]})
        assert r.status_code == 404 and r.json()["error"] == {
            "message": "model 'b' is not served here: use 'test-model' or 'a' (GET /v1/models)",
            "type": "not_found_error", "param": "model", "code": "model_not_found"}
        assert httpx.get(server.url + "/v1/models/b").status_code == 404


def test_cli_serves_a_peft_adapter_folder_by_name(tmp_path):
    """`ventoux serve --lora-modules NAME=PATH` on the demo model and a PEFT folder saved from it: `model`: NAME
    gives ventoux.load(lora={NAME: PATH})'s tokens with the adapter, the served name the model's own."""
    from conftest import randomize_adapters

    from ventoux import lora
    from ventoux.lora_files import save_adapter

    llm = ventoux.load(dtype="float32")
    lora.add_adapter(llm.model, lora.LoraConfig(rank=4, alpha=8), name="mine")
    save_adapter(randomize_adapters(llm.model, scale=0.3, name="mine"), tmp_path / "adapter", name="mine")
    ref = ventoux.load(dtype="float32", lora={"mine": tmp_path / "adapter"})
    want = {name: ref.generate(ROMEO, adapter=adapter, max_tokens=12).text
            for name, adapter in (("ventoux-demo", None), ("mine", "mine"))}
    assert want["mine"] != want["ventoux-demo"]
    proc = subprocess.Popen([sys.executable, "-m", "ventoux", "serve", "--port", "0", "--dtype", "float32",
                             "--lora-modules", f"mine={tmp_path / 'adapter'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = next((w for w in line.split() if w.startswith("http://")), line)
        wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout=120)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["ventoux-demo", "mine"]
        for name, text in want.items():
            assert c.completions.create(model=name, prompt=ROMEO, max_tokens=12, temperature=0).choices[0].text == text
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == -signal.SIGTERM
