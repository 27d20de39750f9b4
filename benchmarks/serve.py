"""Serving under load: `ventoux serve` and llama.cpp's server on the same weights, in the same run.

    python benchmarks/serve.py                                   # demo + 7B-shaped int8/int4, 1/4/8/16 clients
    python benchmarks/serve.py --models demo --clients 1,4 --requests 2 --max-tokens 16 --peer none  # quick
    python benchmarks/serve.py --soak 1000 --clients 8           # 1,000 requests, random disconnects, RSS growth
    python benchmarks/serve.py --llama-server build        # llama.cpp's C++ server (--parallel N), built once
    python benchmarks/serve.py --llama-server /path/to/llama-server   # or one of yours

Each concurrency level runs C streaming clients, each sending --requests completions one after another
(random prompts of 20-200 words, temperature 0, max_tokens fixed), and reports aggregate generated
tokens/s, p50/p99 time to first token and p50/p99 inter-token latency, measured by the client from the
SSE chunks (one chunk = one token on both servers; ventoux merges the pieces of a split character).
The servers run as subprocesses with --threads threads each, one at a time. The peer is llama-cpp-python's
`llama_cpp.server` (built from source by ventoux.bench.llamacpp, on a GGUF converted from the same
checkpoint: BF16 / Q8_0 / Q4_0) -- it serves one request at a time, having no parallel slots, so the
client queues its requests (the wait counts in time to first token) -- or, with --llama-server,
llama.cpp's own server with --parallel set to the largest client count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, log, random_checkpoint  # noqa: E402

WORDS = ("thou art the sun and the moon of my days when the night is long and cold we shall go forth to the "
         "river where kings and fools alike drink of sweet water speak now or be silent my lord for time is "
         "short and the hour grows late").split()
SERVER_DEPS = ["sse-starlette", "starlette-context", "pydantic-settings", "python-dotenv"]


# ---- servers ----------------------------------------------------------------------------------------
class Server:
    """A server subprocess; `url` once it answers."""

    def __init__(self, name: str, cmd: list[str], env: dict, ready_path: str, port: int | None = None,
                 one_at_a_time: bool = False):
        self.name, self.ready_path, self.one_at_a_time = name, ready_path, one_at_a_time
        # Logs go to a file: a pipe nobody reads fills up and blocks the server. ventoux prints its URL on
        # stdout (--port 0 picks a free port); the peers are given a port.
        CACHE.mkdir(parents=True, exist_ok=True)
        self.log = open(CACHE / f"serve-{name.split()[0]}.log", "w")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self.log if port else subprocess.PIPE,
                                     stderr=self.log, text=True, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}" if port else self.proc.stdout.readline().split()[2]

    def wait_ready(self, timeout: float = 1800) -> Server:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {self.log.name}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout} s")
            time.sleep(0.5)

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ventoux_server(model: dict, args) -> Server:
    cmd = [sys.executable, "-m", "ventoux", "serve", "--port", "0", "--max-batch", str(max(args.clients)),
           "--max-queue", "100000", "--dtype", args.dtype]
    cmd += ["--model", str(model["folder"])] if model["folder"] else []
    cmd += ["--quantize", model["quantize"]] if model["quantize"] else []
    return Server("ventoux", cmd, {"OMP_NUM_THREADS": str(args.threads)}, "/health").wait_ready()


def llamacpp_server(model: dict, args) -> Server:
    from ventoux.api import DEMO_MODEL
    from ventoux.bench import llamacpp

    folder = model["folder"] or DEMO_MODEL
    gguf_type = llamacpp.gguf_types(args.dtype, model["quantize"])[0]
    gguf = llamacpp.gguf_file(folder, gguf_type, CACHE, log)  # shared with the other benchmarks
    port = free_port()
    if args.llama_server:
        slots = max(args.clients)
        binary = llama_server_binary() if args.llama_server == "build" else args.llama_server
        cmd = [str(binary), "-m", str(gguf), "-t", str(args.threads), "--parallel", str(slots),
               "-c", str(slots * args.context), "--host", "127.0.0.1", "--port", str(port)]
        return Server(f"llama-server {gguf_type}", cmd, {}, "/health", port).wait_ready()
    lib = llamacpp.ensure_installed("native", log)
    deps = CACHE / "llama-cpp-server-deps"
    if not deps.is_dir():  # the [server] extra of llama-cpp-python, beside this environment's fastapi/uvicorn
        log(f"installing {', '.join(SERVER_DEPS)} for llama_cpp.server into {deps} ...")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(deps),
                        *SERVER_DEPS], check=True)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(args.threads),
           "--n_threads_batch", str(args.threads), "--n_ctx", str(args.context), "--host", "127.0.0.1",
           "--port", str(port), "--interrupt_requests", "False"]  # else a new request kills the running stream
    env = {"PYTHONPATH": os.pathsep.join([str(lib), str(deps)])}
    # It runs one request at a time (no parallel slots): the client queues them, the wait counted in TTFT.
    return Server(f"llama_cpp.server {gguf_type}", cmd, env, "/v1/models", port, one_at_a_time=True).wait_ready()


def llama_server_binary() -> Path:
    """llama.cpp's llama-server, built from the llama.cpp that the installed llama-cpp-python vendors (its sdist,
    fetched with pip) for this CPU, as ventoux.bench.llamacpp builds the library; cached in benchmarks/.cache.
    Only the llama-server target, without network features (no curl, no OpenSSL, no prebuilt web UI)."""
    import hashlib
    import shutil
    import tarfile
    import tempfile

    from ventoux.bench import llamacpp

    llamacpp.ensure_installed("native", log)
    import llama_cpp

    version = llama_cpp.__version__
    key = hashlib.sha1(f"{llamacpp.cpu_model()}|{llamacpp.install_dir('native').name}".encode()).hexdigest()[:10]
    binary = CACHE / f"llama-server-{version}-{key}" / "llama-server"
    if binary.exists():
        return binary
    source = CACHE / f"llama.cpp-{version}"
    if not (source / "CMakeLists.txt").exists():
        log(f"fetching the llama-cpp-python {version} source (it vendors llama.cpp) ...")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps",
                            "-q", f"llama-cpp-python=={version}", "-d", tmp], check=True)
            with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
                prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
                for m in members:
                    m.name = m.name[len(prefix):] or "."
                tar.extractall(source, members=members, filter="data")
    build = binary.parent.with_name(binary.parent.name + ".build")
    log(f"building llama-server from {source} into {binary.parent} (several minutes) ...")
    options = ["-DCMAKE_BUILD_TYPE=Release", *llamacpp.cmake_args("native").split(), "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *options], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
                   check=True, stdout=subprocess.DEVNULL)
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(build / "bin" / "llama-server", binary)
    return binary


# ---- load ---------------------------------------------------------------------------------------------
def prompts(n: int, seed: int, lo: int = 20, hi: int = 200) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


async def one_request(client, url: str, prompt: str, max_tokens: int, leave_after: int | None = None,
                      gate=None) -> dict:
    """A streaming completion; the times of its non-empty chunks. leave_after: disconnect after that many.
    gate: a semaphore that queues requests at the client, for a server that takes one at a time (the wait
    counts in the time to first token, as it would in the server's queue)."""
    start, times = time.perf_counter(), []
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with gate or contextlib.nullcontext(), client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "times": [], "start": start}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
                if leave_after is not None and len(times) >= leave_after:
                    break  # leaving the block closes the connection mid-stream
    return {"ok": True, "times": times, "start": start}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def level(server: Server, clients: int, args, seed: int) -> dict:
    """`clients` closed-loop clients, each sending args.requests requests in turn."""
    todo, url = prompts(clients * args.requests, seed), server.url
    gate = asyncio.Semaphore(1) if server.one_at_a_time else None

    async def worker(i: int) -> list[dict]:
        return [await one_request(http, url, todo[i * args.requests + j], args.max_tokens, gate=gate)
                for j in range(args.requests)]

    # A fresh connection per request: a kept-alive one that the server times out (llama-server's after 5 s
    # idle) just as the client reuses it fails with "Server disconnected without sending a response".
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        await one_request(http, url, prompts(1, seed + 1)[0], 4)  # warm-up
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r["times"]) for r in results)
    return {"clients": clients, "tokens": tokens, "tokens_per_s": tokens / wall,
            "failures": sum(not r["ok"] for r in results),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


async def soak(server: Server, n: int, concurrency: int, max_tokens: int, seed: int) -> dict:
    """n requests of random lengths (prompts of 1-300 words, 1-max_tokens tokens), about a third left
    mid-stream; the server's resident memory at request 100 and at the end."""
    rng = random.Random(seed)
    jobs = [(p, rng.randint(1, max_tokens), rng.randint(1, max_tokens) if rng.random() < 0.35 else None)
            for p in prompts(n, seed, 1, 300)]
    failures, done, rss = [], 0, {}

    async def worker(http):
        nonlocal done
        while jobs:
            prompt, max_tokens, leave = jobs.pop()
            try:
                r = await one_request(http, server.url, prompt, max_tokens, leave)
                if not r["ok"]:
                    failures.append(r["status"])
            except httpx.HTTPError as e:
                failures.append(repr(e))
            done += 1
            if done in (100, n):
                rss[done] = server.rss()

    async with httpx.AsyncClient(timeout=None) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    await asyncio.sleep(1)
    metrics = httpx.get(server.url + "/metrics").text
    running = next(float(line.split()[1]) for line in metrics.splitlines()
                   if line.startswith("ventoux_requests_running "))
    return {"requests": n, "failures": len(failures), "failure_examples": failures[:5], "rss_100": rss.get(100),
            "rss_end": rss.get(n), "rss_growth": rss[n] / rss[100] - 1 if 100 in rss and n in rss else None,
            "running_after": running}


# ---- report -------------------------------------------------------------------------------------------
def show(model: str, server: str, rows: list[dict]) -> None:
    base = rows[0]["tokens_per_s"] if rows and rows[0]["clients"] == 1 else None
    print(f"\n{model} on {server}")
    print(f"{'clients':>7} {'tok/s':>8} {'x 1 client':>10} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} fail")
    for r in rows:
        speedup = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{r['clients']:>7} {r['tokens_per_s']:8.1f} {speedup:>10} {r['ttft_p50'] * 1e3:7.0f}ms "
              f"{r['ttft_p99'] * 1e3:5.0f}ms {r['itl_p50'] * 1e3:6.1f}ms {r['itl_p99'] * 1e3:5.0f}ms "
              f"{r['failures']:>4}")


MODELS = {"demo": dict(folder=None, quantize=None), "7b-int8": dict(folder="7b", quantize="int8"),
          "7b-int4": dict(folder="7b", quantize="int4")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,7b-int8,7b-int4", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--clients", default="1,4,8,16", help="concurrency levels (comma-separated)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="threads of each server")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--context", type=int, default=2048, help="llama.cpp context per slot")
    p.add_argument("--peer", choices=["llama.cpp", "none"], default="llama.cpp")
    p.add_argument("--llama-server", default=None,
                   help="llama.cpp's llama-server binary, or 'build' to build it here once (else llama_cpp.server)")
    p.add_argument("--soak", type=int, default=0, help="run the soak test with this many requests instead")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    result = {"command": " ".join(sys.argv), "machine": _machine(args.threads)}
    print(f"# {result['command']}\n# {result['machine']}")

    if args.soak:
        server = ventoux_server(MODELS["demo"], args)
        try:
            result["soak"] = asyncio.run(soak(server, args.soak, max(args.clients), args.max_tokens, seed=0))
        finally:
            server.stop()
        print(json.dumps(result["soak"], indent=1))
    for name in [m for m in args.models.split(",") if m and not args.soak]:
        model = dict(MODELS[name])
        if model["folder"] == "7b":
            model["folder"] = random_checkpoint(n_layers=4)
        rows = {}
        for make in [ventoux_server] + ([llamacpp_server] if args.peer != "none" else []):
            server = make(model, args)
            try:
                rows[server.name] = [asyncio.run(level(server, c, args, seed=c)) for c in args.clients]
            finally:
                server.stop()
            show(name, server.name, rows[server.name])
        if len(rows) == 2:
            ours, peer = rows.values()
            print("ventoux / " + list(rows)[1] + ": " + ", ".join(
                f"{a['clients']} clients {a['tokens_per_s'] / b['tokens_per_s']:.2f}x" for a, b in zip(ours, peer)))
        result[name] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def _machine(threads: int) -> str:
    from ventoux.cpu_kernels import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, {threads} threads per server, load {os.getloadavg()[0]:.1f}"


if __name__ == "__main__":
    main()
