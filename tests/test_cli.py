"""The CLI as a user meets it: real subprocesses, real files, one-line errors and no tracebacks."""

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY, V1

import ventoux
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
])
def test_generate_bad_input_is_one_line(model_dir, args, words):
    base = ["--model", str(model_dir)] if "--model" not in args else []
    r = cli("generate", *base, *args, "Hello")
    assert_one_line_error(r, *words)
    assert not r.stdout  # the prompt is echoed only for a request that runs


def test_empty_prompt_is_refused(model_dir):
    assert_one_line_error(cli("generate", "--model", str(model_dir), ""), "empty")
