"""The command line's shell (cli.py) in process, where mutation testing (mutation/README.md) sees it: every shared
flag's name, default and type, what reaches SamplingParams and load, the checks made before a model loads, and
how main() ends on each kind of failure (exit status, one line, no traceback)."""

from __future__ import annotations

import argparse
import sys

import pytest

from ventoux import cli
from ventoux.errors import VentouxError
from ventoux.params import SamplingParams


def _parser(*adders) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    for add in adders:
        add(parser)
    return parser


def test_the_sampling_flags_defaults_are_the_clis():
    args = _parser(cli.add_sampling_args).parse_args([])
    assert cli.sampling_kwargs(args) == dict(
        max_tokens=256, temperature=0.7, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
        frequency_penalty=0.0, seed=None, stop=None, ignore_eos=False, logit_bias=None, prefill_chunk=None)
    assert cli.sampling_params(args) == SamplingParams(temperature=0.7)


def test_every_sampling_flag_reaches_sampling_params():
    args = _parser(cli.add_sampling_args).parse_args([
        "--max-tokens", "9", "-t", "0.5", "--top-p", "0.9", "--top-k", "40", "--min-p", "0.05",
        "--repetition-penalty", "1.1", "--presence-penalty", "0.2", "--frequency-penalty", "0.3", "--seed", "7",
        "--stop", "\n\n", "--stop", "END", "--logit-bias", "13=1.5", "--logit-bias", "7=-100", "--prefill-chunk", "64",
        "--ignore-eos"])
    assert cli.sampling_params(args) == SamplingParams(
        max_tokens=9, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.2,
        frequency_penalty=0.3, seed=7, stop=["\n\n", "END"], logit_bias={13: 1.5, 7: -100.0}, prefill_chunk=64,
        ignore_eos=True)
    assert _parser(cli.add_sampling_args).parse_args(["--temperature", "0"]).temperature == 0.0


@pytest.mark.parametrize("text", ["13", "x=1", "13=many", "=2"])
def test_a_logit_bias_that_is_not_id_equals_bias_is_refused_whole(text):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        cli._pair(text)
    assert str(e.value) == f"{text!r} is not ID=BIAS (a token id, =, a number), e.g. 1234=-100"


def test_the_model_flags_names_and_defaults():
    plain = _parser(cli.add_model_args).parse_args([])
    assert vars(plain) == dict(model=None, dtype=None, device="auto", quantize=None, compile=False, mmap=True)
    with_lora = _parser(lambda p: cli.add_model_args(p, lora=True))
    assert vars(with_lora.parse_args([])) == dict(vars(plain), lora=None)
    given = with_lora.parse_args(["-m", "repo/x", "--dtype", "bfloat16", "--device", "cpu", "--quantize", "int8",
                                  "--compile", "--lora", "adapter", "--no-mmap"])
    assert vars(given) == dict(model="repo/x", dtype="bfloat16", device="cpu", quantize="int8", compile=True,
                               mmap=False, lora="adapter")
    assert _parser(cli.add_model_args).parse_args(["--model", "m"]).model == "m"


def test_load_from_args_checks_every_flag_first_then_passes_them_all(monkeypatch):
    import ventoux

    calls = []
    monkeypatch.setattr(ventoux, "load", lambda source, **kw: calls.append((source, kw)) or "the model")
    parser = _parser(lambda p: cli.add_model_args(p, lora=True))
    with pytest.raises(VentouxError, match="^unknown dtype 'f12'"):
        cli.load_from_args(parser.parse_args(["--dtype", "f12"]))
    with pytest.raises(VentouxError, match="^unknown quantization scheme 'int3'"):
        cli.load_from_args(parser.parse_args(["--quantize", "int3"]))
    with pytest.raises(VentouxError, match="^device 'mps' asked for"):
        cli.load_from_args(parser.parse_args(["--device", "mps"]))
    assert calls == []  # nothing loaded for a bad flag
    args = parser.parse_args(["-m", "x", "--dtype", "float32", "--device", "cpu", "--quantize", "int4", "--compile",
                              "--lora", "a", "--no-mmap"])
    assert cli.load_from_args(args) == "the model"
    assert cli.load_from_args(args, lora={"b": "path"}) == "the model"  # adapters by name win over --lora
    bare = _parser(cli.add_model_args).parse_args([])  # a command without --lora
    cli.load_from_args(bare)
    assert calls == [("x", dict(dtype="float32", device="cpu", quantize="int4", compile=True, lora="a", mmap=False)),
                     ("x", dict(dtype="float32", device="cpu", quantize="int4", compile=True, lora={"b": "path"},
                                mmap=False)),
                     (None, dict(dtype=None, device="auto", quantize=None, compile=False, lora=None, mmap=True))]


@pytest.fixture
def command(monkeypatch):
    """Registers `ventoux probe`, whose run does what the test puts in the list."""
    action = []

    def run(args):
        return action[0](args)

    def add_arguments(p):
        p.add_argument("--n", type=int, help="what run returns")

    monkeypatch.setitem(cli.COMMANDS, "probe", ("a test command", add_arguments, run))
    return action


def test_main_ends_each_way_with_the_right_status(command, capsys, monkeypatch):
    command.append(lambda args: None)
    assert cli.main(["probe"]) == 0
    command[0] = lambda args: args.n
    assert cli.main(["probe", "--n", "3"]) == 3

    def fail(error):
        def run(args):
            raise error
        return run

    command[0] = fail(VentouxError("the file x\n  is   bad;\tfix it"))
    assert cli.main(["probe"]) == 1
    assert capsys.readouterr().err == "ventoux: error: the file x is bad; fix it\n"  # one line, whatever the error
    command[0] = fail(PermissionError(13, "Permission denied", "/root/x"))
    assert cli.main(["probe"]) == 1
    assert capsys.readouterr().err == "ventoux: error: [Errno 13] Permission denied: '/root/x'\n"
    command[0] = fail(KeyboardInterrupt())
    assert cli.main(["probe"]) == 130
    assert capsys.readouterr().err == "\n"  # the prompt starts on a fresh line
    closed = []
    monkeypatch.setattr(sys.stderr, "close", lambda: closed.append(True))
    command[0] = fail(BrokenPipeError())
    assert cli.main(["probe"]) == 0 and closed == [True]  # `ventoux info x | head`: the reader left
    command[0] = fail(ValueError("a bug"))
    with pytest.raises(ValueError):  # a bug is not a user's mistake: its traceback stays
        cli.main(["probe"])


def test_every_command_registers_with_its_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name, (help_text, _, _) in cli.COMMANDS.items():
        assert name in out and help_text.split(":")[0][:40] in " ".join(out.split())
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2 and "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_help_names_the_program_every_flag_and_its_syntax(command, capsys):
    from ventoux import commands  # noqa: F401  (registers the subcommands)

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: ventoux ") and "\nRun, chat with, convert and train Mistral models.\n" in out
    with pytest.raises(SystemExit):
        cli.main(["probe", "--help"])
    assert "usage: ventoux probe" in (out := capsys.readouterr().out) and "a test command" in out.split("options:")[0]
    def actions(parser):  # a command's flags, and those of its subcommands (eval perplexity, eval tasks)
        for action in parser._actions:
            yield action
            if isinstance(action, argparse._SubParsersAction):
                assert len(action._choices_actions) == len(action.choices)  # each subcommand has its help line
                yield from action._choices_actions
                for sub in action.choices.values():
                    yield from actions(sub)

    for name, (_, add_arguments, _) in cli.COMMANDS.items():
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        for action in actions(parser):
            assert isinstance(action.help, str) and action.help.strip(), (name, action.dest)
    assert any(a.dest == "stride" for a in actions(_parser(cli.COMMANDS["eval"][1])))  # subcommands are read
    usage = _parser(lambda p: cli.add_model_args(p, lora=True), cli.add_sampling_args).format_help()
    assert "--lora PATH" in usage and "--logit-bias ID=BIAS" in usage and "(default: 0.7)" in usage
