"""The CLI as a user meets it: real subprocesses, real files, one-line errors and no tracebacks."""

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY, V1

import ventoux
from ventoux.cli import main
from ventoux.errors import VentouxError
from ventoux.model import Transformer
from ventoux.weights import save_hf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "tiny"
    torch.manual_seed(0)
    save_hf(Transformer(TINY.replace(vocab_size=32000)), folder)
    shutil.copy(V1, folder / "tokenizer.model")
    return folder


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ventoux", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(r, *words):
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ventoux: error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_generate_streams_the_api_greedy_text(model_dir):
    r = cli("generate", "--model", str(model_dir), "--max-tokens", "12", "--temperature", "0", "Hello world")
    assert r.returncode == 0, r.stderr
    expected = ventoux.load(str(model_dir)).generate("Hello world", max_tokens=12).text
    assert r.stdout == "Hello world" + expected + "\n"


def test_chat_repl_multi_turn_reset_and_system(model_dir):
    script = "Hi there\n/system Be brief\nHello\n/reset\n/bogus\n"
    r = cli("chat", "--model", str(model_dir), "--max-tokens", "5", "--temperature", "0", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "conversation cleared" in r.stderr and "/reset" in r.stderr
    llm = ventoux.load(str(model_dir))
    first = llm.chat([{"role": "user", "content": "Hi there"}], max_tokens=5).text
    second = llm.chat([{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hello"}],
                      max_tokens=5).text
    replies = r.stdout.replace("> ", "").split("\n")  # "> " is the input prompt
    assert replies[:2] == [first, second]


def test_logit_bias_flags_give_the_apis_tokens(model_dir):
    llm = ventoux.load(str(model_dir))
    banned = llm.generate("Hello world", max_tokens=8).tokens[0]
    expected = llm.generate("Hello world", max_tokens=8, logit_bias={banned: -100, 13: 1.5})
    r = cli("generate", "--model", str(model_dir), "--max-tokens", "8", "--temperature", "0",
            "--logit-bias", f"{banned}=-100", "--logit-bias", "13=1.5", "Hello world")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello world" + expected.text + "\n" and banned not in expected.tokens
    bad = cli("generate", "--model", str(model_dir), "--logit-bias", "13", "Hello")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and not bad.stdout
    assert bad.stderr.strip().splitlines()[-1].endswith("argument --logit-bias: '13' is not ID=BIAS (a token id, =, "
                                                        "a number), e.g. 1234=-100")


@pytest.mark.parametrize("args, words", [
    (["--model", "/nonexistent/folder"], ["/nonexistent/folder"]),
    (["--logit-bias", "32000=1"], ["logit_bias names token id 32000, outside the vocabulary [0, 32000)"]),
    (["--logit-bias", "5=-100.5"], ["logit_bias={5: -100.5}", "[-100, 100]"]),
    (["--temperature", "-1"], ["temperature"]),
    (["--top-p", "1.5"], ["top_p"]),
    (["--dtype", "float7"], ["float7"]),
    (["--device", "tpu9"], ["tpu9"]),
    (["--device", "meta"], ["'meta'", "use auto, cpu, cuda, cuda:N or mps"]),  # a torch device ventoux cannot run on
    (["--device", "xla"], ["'xla'", "use auto, cpu, cuda, cuda:N or mps"]),
])
def test_generate_bad_input_is_one_line(model_dir, args, words):
    base = ["--model", str(model_dir)] if "--model" not in args else []
    r = cli("generate", *base, *args, "Hello")
    assert_one_line_error(r, *words)
    assert not r.stdout  # the prompt is echoed only for a request that runs


def test_empty_prompt_is_refused(model_dir):
    assert_one_line_error(cli("generate", "--model", str(model_dir), ""), "empty")


def test_serve_byte_flags_take_units(monkeypatch, capsys):
    """`--kv-cache-bytes 2GiB`, as the README writes it: the serve command's sizes, read before anything loads (the
    rest of the command stubbed out; the units are convert's --max-shard-size's, cli.parse_size)."""
    from ventoux.commands import serve

    seen = {}
    def stop_here(args):  # what serve reads after its flags, before it listens or loads
        seen.update(vars(args))
        raise VentouxError("stop here")

    monkeypatch.setattr(serve, "_api_key", stop_here)
    for text, size in [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000), ("1048576", 1 << 20)]:
        assert main(["serve", "--kv-cache-bytes", text, "--max-body-bytes", text]) == 1
        assert capsys.readouterr().err == "ventoux: error: stop here\n"
        assert (seen["kv_cache_bytes"], seen["max_body_bytes"]) == (size, size), text
    for flag, text in [("--kv-cache-bytes", "2 lots"), ("--kv-cache-bytes", "2TB-ish"), ("--max-body-bytes", "-1"),
                       ("--kv-cache-bytes", "0")]:
        assert main(["serve", flag, text]) == 1
        assert capsys.readouterr().err == (f"ventoux: error: {flag} {text!r} is not a size; write e.g. 5GB, 500MB or "
                                           "a number of bytes\n")
