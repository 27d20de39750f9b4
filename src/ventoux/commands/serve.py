"""`ventoux serve`: the OpenAI-compatible HTTP server and chat page (ventoux/server), on FastAPI + uvicorn.

    ventoux serve                                   # the demo model on http://127.0.0.1:8000 (open / to chat)
    ventoux serve --model ./Mistral-7B-Instruct-v0.3 --quantize int4 --api-key-file key.txt --max-batch 8
    ventoux serve --model ./base --lora-modules sql=runs/sql/adapter chat=./chat-lora   # `model`: sql, chat or base

The URL is printed at once; the model loads in the background (GET /health: 503, then 200).

Defaults of the three surfaces (one table, ventoux/params.py): the Python API samples greedily
(temperature 0), the CLI's generate/chat at temperature 0.7, HTTP requests at OpenAI's 1.0; a request
without max_tokens may generate up to --max-tokens-cap tokens, the CLI and Python API 256. Every
other sampling field has the same default everywhere. n is at most --max-batch; choice i of a seeded
request samples with seed + i.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from ..cli import add_model_args, command, load_from_args, parse_size
from ..errors import VentouxError


def _serve_args(p):
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients pass as `model` (default: ventoux-demo, or the --model name)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every route but /health and the page "
                          "(default: $VENTOUX_API_KEY; --api-key-file keeps it out of the process list)")
    key.add_argument("--api-key-file", default=None, help="file holding the API key")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row; more get 429 with Retry-After (default 64)")
    p.add_argument("--kv-cache-bytes", default=None,
                   help="KV cache budget, e.g. 2GiB or 512MiB (default: the engine's)")
    p.add_argument("--max-tokens-cap", type=int, default=4096,
                   help="most tokens one request may ask for, and the default max_tokens (default 4096)")
    p.add_argument("--max-body-bytes", default="1MiB",
                   help="larger request bodies get 413, e.g. 64KiB or 2MiB (default 1 MiB)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="allow browser pages of this origin (repeatable; default: no cross-origin access)")
    p.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                   help="LoRA adapters (PEFT folders or mistral-finetune's lora.safetensors) served beside the model, "
                        "each chosen by a request's `model`: NAME (vLLM's flag, which also takes "
                        "'{\"name\": NAME, \"path\": PATH}'); rows of one batch may differ")


def _lora_module(text: str) -> tuple[str, str]:
    """NAME=PATH, or vLLM's JSON form {"name": NAME, "path": PATH} -> (name, path); ("", "") for neither."""
    if not text.lstrip().startswith("{"):
        name, _, path = text.partition("=")
        return name.strip(), path.strip()
    try:
        entry = json.loads(text)
    except json.JSONDecodeError:
        return "", ""
    fields = [entry.get(key) if isinstance(entry, dict) else None for key in ("name", "path")]
    return tuple(fields) if all(isinstance(f, str) for f in fields) else ("", "")


def _lora_modules(pairs: list[str], served: str) -> dict[str, str]:
    """--lora-modules NAME=PATH ... -> {name: path}, checked before the model loads."""
    modules: dict[str, str] = {}
    for pair in pairs:
        name, path = _lora_module(pair)
        if not (name and path):
            raise VentouxError(f"--lora-modules {pair!r} is not NAME=PATH, e.g. sql=runs/sql/adapter, or "
                               '{"name": "sql", "path": "runs/sql/adapter"}')
        if name == served or name in modules:
            raise VentouxError(f"--lora-modules {pair!r}: the name {name!r} is already served; give each adapter "
                               "its own name, other than the model's (--served-model-name)")
        if not Path(path).exists():
            raise VentouxError(f"--lora-modules {pair!r}: {path} does not exist; give an adapter folder "
                               "(adapter_config.json) or a lora.safetensors file")
        modules[name] = path
    return modules


def _api_key(args) -> str | None:
    if args.api_key_file is None:
        key, source, instead = args.api_key, "--api-key", "leave the flag out"
        if key is None:
            key, source, instead = os.environ.get("VENTOUX_API_KEY"), "$VENTOUX_API_KEY", "unset it"
        if key is not None and not key.strip():  # an empty key would serve with no authentication at all
            raise VentouxError(f"{source} is empty: give the key, or {instead} to serve without one")
        return key
    try:
        key = Path(args.api_key_file).read_text().strip()
    except OSError as e:
        raise VentouxError(f"--api-key-file {args.api_key_file} cannot be read ({e.strerror})") from None
    if not key:
        raise VentouxError(f"--api-key-file {args.api_key_file} is empty: write the key in it")
    return key


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading, so a taken port fails at once and --port 0 can print the port it got; listen at once
    too, so a client that reads the printed URL and connects waits in the backlog until uvicorn accepts, rather
    than being refused."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError as e:
        sock.close()
        raise VentouxError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None
    return sock


@command("serve", "Serve a model over an OpenAI-compatible HTTP API, with a chat page.", _serve_args)
def run_serve(args):
    import uvicorn

    from ..server import Settings, create_app

    if args.kv_cache_bytes is not None:
        args.kv_cache_bytes = parse_size(args.kv_cache_bytes, "--kv-cache-bytes")
    args.max_body_bytes = parse_size(args.max_body_bytes, "--max-body-bytes")
    for name in ("max_batch", "max_queue", "max_tokens_cap", "max_body_bytes", "kv_cache_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # kv_cache_bytes: None, the engine's
            raise VentouxError(f"--{name.replace('_', '-')}={getattr(args, name)}: it must be >= 1")
    if not 0 <= args.port <= 65535:
        raise VentouxError(f"--port {args.port} is not a port: give 1 to 65535, or 0 for any free one")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise VentouxError("--served-model-name is empty: give the name clients pass as `model`, or leave it out")
    served = args.served_model_name or ("ventoux-demo" if args.model is None else Path(args.model).name)
    adapters = _lora_modules(args.lora_modules, served)
    settings = Settings(served_name=served, api_key=_api_key(args), cors_origins=tuple(args.cors_origin),
                        max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap, max_n=args.max_batch,
                        adapters=adapters)
    sock = _listen(args.host, args.port)
    failed = []

    def load():
        start = time.perf_counter()
        llm = load_from_args(args, lora=adapters or None)
        engine = llm.engine(max_batch=args.max_batch, kv_cache_bytes=args.kv_cache_bytes, max_queue=args.max_queue)
        print(f"ventoux serve: {served} ready ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
        return llm, engine

    def on_load_error(e):
        failed.append(e)
        server.should_exit = True

    app = create_app(settings, load, on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    print(f"ventoux serve: {url} (chat page at /, OpenAI API at /v1; loading {served} ...)", flush=True)
    server.run(sockets=[sock])
    return 1 if failed else 0
