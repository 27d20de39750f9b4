"""A live server on a thread of this process, for tests and benchmarks: real sockets, real HTTP.

    with BackgroundServer(create_app(settings, load)) as server:
        server.wait_ready()                     # GET /health is 200
        httpx.get(server.url + "/v1/models")
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind((host, port))
        self.url = "http://{}:{}".format(*self.sock.getsockname()[:2])
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended before it started listening")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/health").status_code != 200:
            if self.app.state.ventoux.load_error:
                raise RuntimeError(self.app.state.ventoux.load_error)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url}/health not 200 after {timeout} s")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
