"""The live test server (ventoux/server/background.py) on its own: its address, a start that fails, waiting for a
model that loads, fails or hangs, a quiet log, and an exit that ends the thread and frees the port even with a
response still streaming."""

from __future__ import annotations

import asyncio
import socket
import threading

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route
from test_server import bigram_llm

import ventoux
from ventoux.server import Settings, create_app
from ventoux.server.background import BackgroundServer


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def _loading_app():
    """An app whose model loads until `release` is set, then fails quietly."""
    release = threading.Event()

    def load():
        release.wait(30)
        raise ventoux.VentouxError("released")

    return create_app(Settings(served_name="m"), load=load, on_load_error=lambda e: None), release


def test_two_servers_listen_on_ports_of_their_own_and_give_them_back(capfd):
    app, release = _loading_app()
    with BackgroundServer(app) as one, BackgroundServer(app, host="127.0.0.1") as two:
        ports = [s.sock.getsockname()[1] for s in (one, two)]
        assert [one.url, two.url] == [f"http://127.0.0.1:{p}" for p in ports] and ports[0] != ports[1]
        assert httpx.get(one.url + "/health").status_code == httpx.get(two.url + "/health").status_code == 503
        assert one.thread.daemon  # a thread that fails to stop never holds the test process open
        release.set()
    assert one.sock.fileno() == -1 and not one.thread.is_alive() and _refused(one.url)
    out, err = capfd.readouterr()
    assert "GET /health" not in out + err and "Uvicorn running" not in out + err  # warnings and errors only


def test_a_server_that_cannot_start_says_so_on_enter(capfd):
    with pytest.raises(RuntimeError, match="^the server thread ended before it started listening$"):
        with BackgroundServer("no_such_module_here:app"):
            pass
    assert "no_such_module_here" in capfd.readouterr().err  # uvicorn's own reason


def test_wait_ready_returns_once_the_model_is_served(tmp_path):
    llm, release = bigram_llm(tmp_path), threading.Event()

    def load():
        release.wait(30)
        return llm, llm.engine(max_batch=1)

    with BackgroundServer(create_app(Settings(served_name="m"), load=load)) as s:
        threading.Timer(0.3, release.set).start()  # still loading when wait_ready starts
        s.wait_ready(timeout=30)
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}


def test_wait_ready_raises_the_load_error_or_times_out():
    def bad_load():
        raise ventoux.VentouxError("no checkpoint in /nowhere")

    with BackgroundServer(create_app(Settings(served_name="m"), load=bad_load, on_load_error=lambda e: None)) as s:
        with pytest.raises(RuntimeError, match=r"^the model failed to load: no checkpoint in /nowhere$"):
            s.wait_ready(timeout=30)

    app, release = _loading_app()
    with BackgroundServer(app) as s:
        with pytest.raises(TimeoutError) as e:
            s.wait_ready(timeout=0.2)
        assert str(e.value) == f"{s.url}/health not 200 after 0.2 s"
        release.set()


def test_exit_stops_a_response_that_never_ends():
    async def endless(request):
        async def chunks():
            while True:
                yield b"data: x\n\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(chunks(), media_type="text/event-stream")

    server = BackgroundServer(Starlette(routes=[Route("/endless", endless)]))
    with server:
        client = socket.create_connection(server.sock.getsockname())
        client.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(1024).startswith(b"HTTP/1.1 200")
    # left with the client still reading: the graceful shutdown's time limit ended the response
    assert not server.thread.is_alive() and server.sock.fileno() == -1
    client.close()
