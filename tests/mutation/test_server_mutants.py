"""The server's small parts (server/app.py, state.py, routes.py, middleware.py, errors.py, metrics.py) where
mutation testing (mutation/README.md) found them unpinned: the loading thread and what a failed load says and hands
on, the 503 while loading whole with its Retry-After, the model cards, closing the engine with the server, the
CORS preflight, no OpenAPI pages, ..."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from test_server import bigram_llm, live, wait_until

import ventoux
from ventoux.server import Settings, create_app
from ventoux.server.background import BackgroundServer
from ventoux.server.errors import APIError, error_body
from ventoux.server.state import ServerState


def test_loading_runs_in_a_named_daemon_thread_and_answers_503_with_retry_after_until_ready(tmp_path):
    release = threading.Event()
    llm = bigram_llm(tmp_path)
    loading = []

    def slow_load():
        loading.append(threading.current_thread())
        release.wait(30)
        return llm, llm.engine(max_batch=2)

    before = int(time.time())
    with BackgroundServer(create_app(Settings(served_name="m"), load=slow_load)) as server:
        wait_until(lambda: loading)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert r.json()["error"] == {"message": "the model is still loading: retry when GET /health is 200",
                                     "type": "service_unavailable", "param": None, "code": "model_loading"}
        health = httpx.get(server.url + "/health")
        assert health.json()["error"]["message"] == "loading the model"
        created = server.app.state.ventoux.created
        assert httpx.get(server.url + "/v1/models").json() == {"object": "list", "data": [  # no context known yet
            {"id": "m", "object": "model", "created": created, "owned_by": "ventoux"}]}
        release.set()
        server.wait_ready(timeout=30)
        card = httpx.get(server.url + "/v1/models").json()["data"][0]
        assert before <= card["created"] <= int(time.time())
        engine = server.app.state.ventoux.engine
    assert engine._closed  # the server's shutdown closed its engine


def test_the_load_runs_in_a_named_daemon_thread_whoever_starts_it():
    """From the main thread too (`ventoux serve`'s lifespan runs there): a hung load never blocks the exit."""
    loading, release = [], threading.Event()

    def load():
        loading.append(threading.current_thread())
        release.wait(30)
        raise ventoux.VentouxError("stopped")

    assert not threading.current_thread().daemon
    ServerState(Settings(served_name="m")).start_loading(load, on_error=lambda e: None)
    wait_until(lambda: loading)
    release.set()
    loading[0].join(10)  # its error line printed while this test captures it
    assert (loading[0].name, loading[0].daemon) == ("ventoux-load", True)


def test_a_failed_load_is_printed_handed_on_and_answered_without_retry_after(capsys):
    failures = []
    error = ventoux.VentouxError("no checkpoint in /nowhere")

    def bad_load():
        raise error

    with BackgroundServer(create_app(Settings(served_name="m"), load=bad_load, on_load_error=failures.append)) as s:
        wait_until(lambda: failures)
        assert failures == [error]
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and "retry-after" not in r.headers
        assert r.json()["error"]["message"] == "the model failed to load: no checkpoint in /nowhere"
    assert "ventoux: error: no checkpoint in /nowhere\n" in capsys.readouterr().err


def test_model_chooses_the_adapter_and_an_unknown_one_names_every_served_name():
    state = ServerState(Settings(served_name="m", adapters={"a": "runs/a", "b": "runs/b"}))
    assert [state.check_model(name) for name in (None, "m", "a", "b")] == [None, None, "a", "b"]
    with pytest.raises(APIError) as e:
        state.check_model("x")
    assert (e.value.status, e.value.param, e.value.code) == (404, "model", "model_not_found")
    assert e.value.message == "model 'x' is not served here: use 'm' or 'a' or 'b' (GET /v1/models)"


def test_the_model_cards_whole(tmp_path):
    llm = bigram_llm(tmp_path)
    with live(llm, adapters={"a": "runs/a/adapter"}) as server:
        created = server.app.state.ventoux.created
        base = {"id": "test-model", "object": "model", "created": created, "owned_by": "ventoux", "max_model_len": 96}
        adapter = {**base, "id": "a", "root": "runs/a/adapter", "parent": "test-model"}
        assert httpx.get(server.url + "/v1/models").json() == {"object": "list", "data": [base, adapter]}
        assert httpx.get(server.url + "/v1/models/test-model").json() == base
        assert httpx.get(server.url + "/v1/models/a").json() == adapter


def test_the_key_and_body_limit_refusals_whole(tmp_path):
    llm = bigram_llm(tmp_path)
    with live(llm, api_key="sk-k", max_body_bytes=100) as server:
        url = server.url + "/v1/models"
        r = httpx.get(url, headers={"Authorization": "Basic sk-k"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"] == {"message": "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                     "type": "authentication_error", "param": None, "code": "invalid_api_key"}
        assert httpx.get(url, headers={"Authorization": "Bearer  sk-k"}).status_code == 200  # two spaces
        r = httpx.post(server.url + "/v1/completions", headers={"Authorization": "Bearer sk-k"},
                       json={"prompt": "a" * 200})
        assert r.status_code == 413 and r.headers["connection"] == "close"
        assert r.json()["error"] == {
            "message": "the request body is over this server's limit of 100 bytes (--max-body-bytes)",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}


def test_a_declared_length_over_the_limit_is_refused_before_any_body_is_sent(tmp_path):
    """Content-Length alone decides: the 413 comes while the client has sent headers only (a body that never
    comes is never waited for)."""
    import socket
    from urllib.parse import urlsplit

    llm = bigram_llm(tmp_path)
    with live(llm, max_body_bytes=100) as server:
        address = urlsplit(server.url)
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000000000\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):  # until the server closes (Connection: close)
                reply += chunk
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413 ") and '"code":"request_too_large"' in reply


def test_an_api_error_reads_as_its_message_and_an_unlisted_status_is_an_invalid_request():
    error = APIError(409, "a conflict", param="x")
    assert str(error) == "a conflict"
    assert error_body(409, "a conflict", "x") == {"error": {"message": "a conflict", "type": "invalid_request_error",
                                                            "param": "x", "code": None}}


def test_a_streamed_body_is_counted_across_its_chunks_to_the_byte(tmp_path):
    """Without Content-Length (chunked), the bytes are counted as they come: a body of exactly the limit is
    served, one byte more is a 413, and so are chunks each under the limit that pass it together."""
    llm = bigram_llm(tmp_path)
    body = b'{"prompt": "a", "max_tokens": 1, "temperature": 0}'

    def padded(total, sizes):
        data = body + b" " * (total - len(body))
        return (data[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes)))

    with live(llm, max_body_bytes=100) as server:
        url = server.url + "/v1/completions"
        for sizes in ([60, 40], [100]):  # chunked, then one piece: Content-Length 100
            content = padded(100, sizes) if len(sizes) > 1 else b"".join(padded(100, sizes))
            ok = httpx.post(url, content=content, headers={"Content-Type": "application/json"})
            assert ok.status_code == 200, ok.text
        for total, sizes in ((101, [60, 41]), (120, [60, 60])):
            r = httpx.post(url, content=padded(total, sizes), headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["message"] == (
                "the request body is over this server's limit of 100 bytes (--max-body-bytes)")


def _samples(metrics):
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics.render(None).decode()) for s in f.samples}


def test_a_timer_observes_the_first_gap_as_ttft_and_each_later_one_as_inter_token_latency(monkeypatch):
    from ventoux.server import metrics as metrics_module

    clock = iter([10.0, 10.5, 10.75, 11.0, 20.0, 20.25])  # two sequences: starts at 10.0 and 20.0
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))
    m = metrics_module.Metrics()
    first = m.timer()
    first.token(), first.token(), first.token()   # 0.5 to the first token, then gaps of 0.25
    second = m.timer()
    second.token()                                 # 0.25 to its first token
    s = _samples(m)
    assert s[("ventoux_time_to_first_token_seconds_count", ())] == 2
    assert s[("ventoux_time_to_first_token_seconds_sum", ())] == 0.75
    assert s[("ventoux_inter_token_latency_seconds_count", ())] == 2
    assert s[("ventoux_inter_token_latency_seconds_sum", ())] == 0.5
    assert s[("ventoux_generation_tokens_total", ())] == 4
    assert s[("ventoux_time_to_first_token_seconds_bucket", (("le", "0.3"),))] == 1
    assert s[("ventoux_time_to_first_token_seconds_bucket", (("le", "0.5"),))] == 2
    buckets = sorted(float(dict(k[1])["le"]) for k in s if k[0] == "ventoux_inter_token_latency_seconds_bucket")
    assert buckets == [*metrics_module.LATENCY_BUCKETS, float("inf")]


def test_render_reads_the_engine_gauges_and_keeps_them_while_loading():
    from types import SimpleNamespace

    from ventoux.server.metrics import Metrics

    m = Metrics()
    m.render(SimpleNamespace(running=3, waiting=5, usage_ratio=0.25))
    m.requests.labels("chat", "stop").inc()
    m.prompt_tokens.inc(7)
    s = _samples(m)
    assert s[("ventoux_requests_running", ())] == 3 and s[("ventoux_requests_waiting", ())] == 5
    assert s[("ventoux_kv_cache_usage_ratio", ())] == 0.25 and s[("ventoux_prompt_tokens_total", ())] == 7
    assert s[("ventoux_requests_total", (("endpoint", "chat"), ("finish_reason", "stop")))] == 1
    assert Metrics().registry is not m.registry   # two apps in one process keep their own counts


def test_a_preflight_allows_the_apis_methods_and_headers_and_nothing_else(tmp_path):
    """app.py's CORS settings, through the preflight a browser sends before a cross-origin POST."""
    llm = bigram_llm(tmp_path)
    with live(llm, cors_origins=("http://good.example",)) as server:
        def preflight(method, headers="authorization, content-type"):
            return httpx.options(server.url + "/v1/chat/completions", headers={
                "Origin": "http://good.example", "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": headers})

        for method in ("POST", "GET"):
            r = preflight(method)
            assert r.status_code == 200, r.text
            assert r.headers["access-control-allow-methods"] == "GET, POST"
            allowed = set(r.headers["access-control-allow-headers"].lower().split(", "))  # names: any case
            assert allowed == {"authorization", "content-type", "accept", "accept-language", "content-language"}
            assert "access-control-allow-credentials" not in r.headers
        assert preflight("DELETE").status_code == 400
        assert preflight("POST", "x-api-key").status_code == 400


def test_no_openapi_schema_or_docs_pages_are_served(tmp_path):
    llm = bigram_llm(tmp_path)
    with live(llm) as server:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert httpx.get(server.url + path).status_code == 404, path
