"""`ventoux generate` and `ventoux chat` (commands/generate.py) in process, where mutation testing
(mutation/README.md) sees them: the chat template, standard input, text that is not UTF-8, each REPL command, the
guardrail prompt, and an answer interrupted with Ctrl-C; outputs compared with the Python API's."""

from __future__ import annotations

import io
import sys

import pytest
from test_cli import model_dir  # noqa: F401  (the fixture: a tiny model with Mistral's v1 tokenizer)

import ventoux
from ventoux.cli import main
from ventoux.commands.generate import HELP

GREEDY = ["--max-tokens", "6", "--temperature", "0"]


@pytest.fixture(scope="module")
def llm(model_dir):  # noqa: F811
    return ventoux.load(str(model_dir))


def _stdin(monkeypatch, data: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_generate_with_the_chat_template_or_from_standard_input(model_dir, llm, capsys, monkeypatch):  # noqa: F811
    assert main(["generate", "--model", str(model_dir), *GREEDY, "--chat-template", "Hello world"]) == 0
    reply = llm.chat([{"role": "user", "content": "Hello world"}], max_tokens=6).text
    assert capsys.readouterr().out == reply + "\n"  # the prompt is not echoed: the reply is a new turn
    _stdin(monkeypatch, "Héllo wörld".encode())
    assert main(["generate", "--model", str(model_dir), *GREEDY, "-"]) == 0
    assert capsys.readouterr().out == "Héllo wörld" + llm.generate("Héllo wörld", max_tokens=6).text + "\n"


def test_generate_refuses_text_that_is_not_utf8_whole(model_dir, capsys, monkeypatch):  # noqa: F811
    _stdin(monkeypatch, b"caf\xe9 au lait")
    assert main(["generate", "--model", str(model_dir), "-"]) == 1
    assert capsys.readouterr().err == ("ventoux: error: standard input is not valid UTF-8 (byte 0xe9 at offset 3); "
                                       "convert it first, e.g. iconv -f latin1 -t utf-8\n")
    assert main(["generate", "--model", str(model_dir), "caf\udce9"]) == 1
    assert capsys.readouterr().err == ("ventoux: error: the prompt argument is not valid UTF-8 (at character 3); "
                                       "type or pass UTF-8 text\n")
    _stdin(monkeypatch, b"")
    assert main(["generate", "--model", str(model_dir), "-"]) == 1
    assert capsys.readouterr().err == "ventoux: error: the prompt is empty: give some text to continue\n"
    assert main(["chat", "--model", str(model_dir), "--system", "\udce9"]) == 1
    assert capsys.readouterr().err == ("ventoux: error: --system is not valid UTF-8 (at character 0); "
                                       "type or pass UTF-8 text\n")


def test_each_chat_command(model_dir, llm, capsys, monkeypatch):  # noqa: F811
    script = "\n   \nbad \udce9\n/system Be brief\nHello\n/system\nHi\n/bogus\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", "--model", str(model_dir), *GREEDY]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"ventoux chat with {model_dir}. {HELP}",
        "(that line is not valid UTF-8 (at character 4); type or pass UTF-8 text)",
        "(system prompt set; conversation cleared)",
        "(system prompt cleared; conversation cleared)",
        HELP,
        "",  # Ctrl-D: the shell's prompt starts on a new line
    ]
    first = llm.chat([{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hello"}], max_tokens=6)
    second = llm.chat([{"role": "user", "content": "Hi"}], max_tokens=6)
    assert out == "> " * 5 + first.text + "\n" + "> " * 2 + second.text + "\n" + "> " * 2


def test_chat_with_the_guardrail_prompt_and_an_interrupted_answer(model_dir, llm, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    assert main(["chat", "--model", str(model_dir), *GREEDY, "--safe-prompt"]) == 0
    safe = llm.chat([{"role": "user", "content": "Hello"}], max_tokens=6, safe_prompt=True).text
    assert capsys.readouterr().out == "> " + safe + "\n> "

    seen = []

    def interrupted(self, messages, **kwargs):
        seen.append([dict(m) for m in messages])
        yield type("Event", (), {"text": "Half"})()
        raise KeyboardInterrupt

    monkeypatch.setattr(ventoux.api.LLM, "chat_stream", interrupted)
    monkeypatch.setattr(sys, "stdin", io.StringIO("One\nTwo\n"))
    assert main(["chat", "--model", str(model_dir), *GREEDY]) == 0  # Ctrl-C stops the answer, not the chat
    assert capsys.readouterr().out == "> Half\n> Half\n> "
    assert seen[1] == [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Half"},
                       {"role": "user", "content": "Two"}]  # the interrupted answer stays in the conversation


def test_the_flags_of_generate_and_chat():
    import argparse

    from ventoux.commands.generate import _chat_args, _generate_args

    for add, flags, defaults, given in [
        (_generate_args, ["--lora", "a", "--chat-template", "p"], dict(lora=None, chat_template=False, prompt="p"),
         dict(lora="a", chat_template=True, prompt="p")),
        (_chat_args, ["--lora", "a", "--system", "s", "--safe-prompt"], dict(lora=None, system=None, safe_prompt=False),
         dict(lora="a", system="s", safe_prompt=True))]:
        parser = argparse.ArgumentParser()
        add(parser)
        bare = vars(parser.parse_args(["p"] if add is _generate_args else []))
        assert {k: bare[k] for k in defaults} == defaults
        args = vars(parser.parse_args(flags))
        assert {k: args[k] for k in given} == given
        assert all(isinstance(a.help, str) and a.help for a in parser._actions)
