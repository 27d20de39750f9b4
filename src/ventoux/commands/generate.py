"""`ventoux generate` and `ventoux chat`: streaming text to the terminal."""

from __future__ import annotations

import sys

from ..cli import add_model_args, add_sampling_args, command, load_from_args, sampling_kwargs, sampling_params
from ..errors import VentouxError


def _generate_args(p):
    add_model_args(p, lora=True)
    add_sampling_args(p)
    p.add_argument("prompt", help="text to continue ('-' reads standard input)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap the prompt as one user turn of the model's chat format")


@command("generate", "Continue a prompt, streaming tokens to stdout.", _generate_args)
def run_generate(args):
    prompt = read_prompt(args.prompt)
    if not prompt:
        raise VentouxError("the prompt is empty: give some text to continue")
    sampling_params(args)  # every flag is checked before the model loads and the prompt is echoed
    llm = load_from_args(args)
    kwargs = sampling_kwargs(args)
    if args.chat_template:
        events = llm.chat_stream([{"role": "user", "content": prompt}], **kwargs)
    else:
        events = llm.stream(prompt, **kwargs)  # raises for a request that cannot run: nothing echoed then
        sys.stdout.write(prompt)
    for ev in events:
        sys.stdout.write(ev.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def read_prompt(arg: str) -> str:
    """The prompt argument, or standard input for '-'; text that is not UTF-8 is refused, not guessed at."""
    if arg == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise VentouxError(f"standard input is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                               "convert it first, e.g. iconv -f latin1 -t utf-8") from None
    _check_utf8(arg, "the prompt argument")
    return arg


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that were not UTF-8 reach argv (and our stdin) as lone surrogates
        raise VentouxError(f"{what} is not valid UTF-8 (at character {e.start}); type or pass UTF-8 text") from None


def _chat_args(p):
    add_model_args(p, lora=True)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--safe-prompt", action="store_true", help="prepend Mistral's guardrail system prompt")


HELP = "Commands: /reset clears the conversation, /system TEXT sets the system prompt, Ctrl-D quits."


@command("chat", "Talk with a model in the terminal (multi-turn, streaming).", _chat_args)
def run_chat(args):
    sampling_params(args)  # checked before the model loads
    if args.system is not None:
        _check_utf8(args.system, "--system")
    llm = load_from_args(args)
    kwargs = sampling_kwargs(args)
    system, history = args.system, []
    print(f"ventoux chat with {llm.source}. {HELP}", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused below, not fatal
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        try:
            _check_utf8(line, "that line")
        except VentouxError as e:
            print(f"({e})", file=sys.stderr)
            continue
        if line.strip() == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply = []
        try:
            for ev in llm.chat_stream(messages, safe_prompt=args.safe_prompt, **kwargs):
                reply.append(ev.text)
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            pass
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
