"""`ventoux serve`'s flags (commands/serve.py) where mutation testing (mutation/README.md, through
mutation/fresh_module.sh: its tests run the CLI, some in a child process) found them unpinned: the defaults the help
promises, the flags' types, the repeatable ones, vLLM's --lora-modules forms, IPv6 hosts, and the refusals' whole
messages."""

from __future__ import annotations

import argparse
import socket

import pytest

from ventoux.commands.serve import _api_key, _listen, _lora_module, _serve_args
from ventoux.errors import VentouxError


def parse(*argv):
    parser = argparse.ArgumentParser()
    _serve_args(parser)
    return parser.parse_args(argv)


def test_the_defaults_the_help_promises():
    args = parse()
    assert (args.host, args.port, args.served_model_name, args.api_key, args.api_key_file) == \
        ("127.0.0.1", 8000, None, None, None)
    assert (args.max_batch, args.max_queue, args.kv_cache_bytes, args.max_tokens_cap, args.max_body_bytes) == \
        (8, 64, None, 4096, "1MiB")  # sizes are read by run_serve (cli.parse_size), before it listens
    assert (args.cors_origin, args.lora_modules) == ([], [])


def test_counts_are_integers_and_the_lists_gather_every_flag():
    args = parse("--port", "0", "--max-batch", "2", "--max-queue", "3", "--kv-cache-bytes", "1000",
                 "--max-tokens-cap", "5", "--max-body-bytes", "600", "--cors-origin", "http://a",
                 "--cors-origin", "http://b", "--lora-modules", "a=x", "b=y", "--lora-modules", "c=z")
    assert (args.port, args.max_batch, args.max_queue, args.kv_cache_bytes, args.max_tokens_cap,
            args.max_body_bytes) == (0, 2, 3, "1000", 5, "600")
    assert args.cors_origin == ["http://a", "http://b"]
    assert args.lora_modules == ["a=x", "b=y", "c=z"]
    assert parse("--api-key-file", "k.txt").api_key_file == "k.txt"


@pytest.mark.parametrize("text, pair", [
    ("sql=runs/a=b", ("sql", "runs/a=b")),              # the first = splits: a path may hold one
    (" sql = runs/sql ", ("sql", "runs/sql")),
    ('  {"name": "sql", "path": "runs/sql"}', ("sql", "runs/sql")),
    ('{"name": "sql", "path": "runs/sql", "base_model_name": "m"}', ("sql", "runs/sql")),
])
def test_lora_module_forms(text, pair):
    assert _lora_module(text) == pair


def test_an_ipv6_host_listens_on_ipv6():
    sock = _listen("::1", 0)
    try:
        assert sock.family == socket.AF_INET6
    finally:
        sock.close()


def test_the_printed_port_takes_connections_before_the_server_accepts_them():
    """The URL is printed before uvicorn starts: a client connecting then must wait, not be refused."""
    sock = _listen("127.0.0.1", 0)
    try:
        socket.create_connection(sock.getsockname()[:2], timeout=5).close()
    finally:
        sock.close()


def test_a_taken_port_is_refused_whole():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(VentouxError) as e:
            _listen("127.0.0.1", port)
        assert str(e.value) == (f"cannot listen on 127.0.0.1:{port} (Address already in use): choose another --port "
                                "or --host")
    finally:
        taken.close()


def test_the_key_from_each_source_and_an_empty_file_refused_whole(tmp_path, monkeypatch):
    monkeypatch.delenv("VENTOUX_API_KEY", raising=False)
    assert _api_key(parse()) is None
    assert _api_key(parse("--api-key", "k1")) == "k1"
    monkeypatch.setenv("VENTOUX_API_KEY", "k2")
    assert _api_key(parse()) == "k2" and _api_key(parse("--api-key", "k1")) == "k1"
    (tmp_path / "key").write_text(" k3\n")
    assert _api_key(parse("--api-key-file", str(tmp_path / "key"))) == "k3"
    (tmp_path / "key").write_text("\n")
    with pytest.raises(VentouxError) as e:
        _api_key(parse("--api-key-file", str(tmp_path / "key")))
    assert str(e.value) == f"--api-key-file {tmp_path / 'key'} is empty: write the key in it"
