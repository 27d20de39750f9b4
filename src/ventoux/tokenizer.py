"""Tokenizers and the instruct chat format, through Mistral's own mistral-common.

    tok = load_tokenizer(Path("Mistral-7B-Instruct-v0.3"))       # tekken.json, tokenizer.model.v3, ...
    ids = tok.encode("Hello", bos=True)
    prompt = tok.encode_chat([{"role": "user", "content": "Hi"}])  # == mistral-common, token for token
    dec = tok.stream_decoder()
    text = "".join(dec.push(i) for i in generated) + dec.flush()  # == tok.decode(generated)

A plain sentencepiece `tokenizer.model` (HF folders, the demo model) gets the v1 `[INST] ... [/INST]`
format: mistral-common itself reads an unversioned `.model` file as v1.
"""

from __future__ import annotations

import json
import operator
import re
from pathlib import Path

from .errors import VentouxError

# The paper's guardrail; Mistral's API `safe_prompt` prepends it to the messages as a system prompt.
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid "
    "harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)
_VERSIONED = re.compile(r"\.model\.v(\d+)(m\d+)?$")  # tokenizer.model.v3, *_240323.model.v3, *.model.v7m1


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files of a checkpoint folder, preferred first: tekken json, then versioned sentencepiece
    models (newest version first), then a plain sentencepiece tokenizer.model."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    tekken = [p for p in reversed(files) if "tekken" in p.name and p.suffix == ".json"]  # newest date first
    tekken.sort(key=lambda p: p.name != "tekken.json")  # stable: tekken.json itself, then the others
    # HF repos of v0.3 ship both tokenizer.model and tokenizer.model.v3: the version wins
    versioned = sorted((p for p in files if _VERSIONED.search(p.name)),
                       key=lambda p: -int(_VERSIONED.search(p.name).group(1)))
    plain = [folder / "tokenizer.model"] if (folder / "tokenizer.model").is_file() else []
    return tekken + versioned + plain


def find_tokenizer_file(folder: Path) -> Path:
    """The preferred tokenizer file of a checkpoint folder (see tokenizer_files)."""
    files = tokenizer_files(folder)
    if not files:
        raise VentouxError(
            f"no tokenizer in {folder}: expected tekken.json, tokenizer.model.v1/v2/v3 or tokenizer.model; "
            "copy the tokenizer file of the checkpoint into that folder"
        )
    return files[0]


def load_tokenizer(folder: Path, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint folder that fits its model: when the folder holds several (tekken.json with
    131K pieces beside a 32K tokenizer.model), the one whose size is the model's vocab_size (read from the
    folder's config unless given); else the preferred one, if no larger than the model's vocabulary (a model
    may pad its embeddings). A tokenizer larger than the model is refused, naming both sizes."""
    candidates = [find_tokenizer_file(folder)] + tokenizer_files(folder)[1:]
    vocab = vocab_size if vocab_size is not None else _model_vocab(Path(folder))
    loaded = []
    for path in candidates:
        tokenizer = _load(path)
        if vocab is None or tokenizer.vocab_size == vocab:
            return tokenizer
        loaded.append((path, tokenizer))
    fitting = [t for _, t in loaded if t.vocab_size < vocab]
    if fitting:
        return fitting[0]
    sizes = ", ".join(f"{p.name} has {t.vocab_size}" for p, t in loaded)
    raise VentouxError(f"the tokenizer does not fit the model in {folder}: {sizes} pieces but the model's "
                       f"vocabulary (vocab_size in its config) is {vocab}; put the model's own tokenizer there")


def _model_vocab(folder: Path) -> int | None:
    """vocab_size from the folder's config.json or params.json; None without one (the config reader reports
    a broken config)."""
    for name in ("config.json", "params.json"):
        try:
            vocab = json.loads((folder / name).read_text()).get("vocab_size")
        except (OSError, ValueError, AttributeError):
            continue
        return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None
    return None


def _load(path: Path) -> Tokenizer:
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    try:
        return Tokenizer(MistralTokenizer.from_file(str(path)))
    except (MistralCommonException, OSError, RuntimeError, ValueError, KeyError, AssertionError) as e:
        raise VentouxError(
            f"tokenizer file {path} cannot be read ({_one_line(e)}); replace it with the checkpoint's own"
        ) from None


class Tokenizer:
    """Text <-> token ids and the chat format of one Mistral tokenizer (v1, v2, v3, tekken)."""

    def __init__(self, mistral_tokenizer):
        self.mistral = mistral_tokenizer  # mistral_common MistralTokenizer: the chat-format reference
        self._raw = mistral_tokenizer.instruct_tokenizer.tokenizer
        self.version = str(self._raw.version.value)
        self.bos_id = self._raw.bos_id
        self.eos_id = self._raw.eos_id
        self.vocab_size = self._raw.n_words
        self.special_ids = frozenset(self._raw.special_ids)

    def __repr__(self):
        return f"Tokenizer({self.version}, vocab_size={self.vocab_size})"

    def is_control(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Plain text to ids; text that looks like a control token ("</s>", "[INST]") stays text."""
        if not isinstance(text, str):
            raise VentouxError(f"text to encode must be a string, not {type(text).__name__}")
        _check_unicode(text, "text to encode")
        return self._raw.encode(text, bos=bos, eos=eos)

    def decode(self, ids) -> str:
        """Ids to text, control tokens dropped."""
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise VentouxError("token ids to decode must be a list of integers") from None
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise VentouxError(f"token id {bad!r} is not in this tokenizer's vocabulary [0, {self.vocab_size})")
        return self._raw.decode(ids)

    def encode_chat(self, messages: list[dict], safe_prompt: bool = False) -> list[int]:
        """A conversation to prompt ids, exactly as mistral-common's encode_chat_completion.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], ending with a user
        message (the prompt to generate from). safe_prompt prepends the guardrail system prompt.
        """
        return self._encode_chat(messages, safe_prompt, continue_final=False)

    def render_chat(self, messages: list[dict], continue_final: bool = False) -> tuple[list[int], str]:
        """(ids, text) of a conversation: encode_chat's ids, and their text with control tokens shown as
        "[INST]" etc. continue_final: the conversation ends with an assistant message that the model
        continues (no end of sequence after it)."""
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        ids = self._encode_chat(messages, False, continue_final)
        text = self.mistral.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)
        return ids, text.replace("\u2581", " ")  # sentencepiece keeps its word marks with KEEP

    def _encode_chat(self, messages: list[dict], safe_prompt: bool, continue_final: bool) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        if not isinstance(messages, (list, tuple)) or not messages:
            raise VentouxError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        objs = [SystemMessage(content=SAFE_PROMPT)] if safe_prompt else []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if not isinstance(role, str) or role not in kinds:
                raise VentouxError(f"messages[{i}].role={role!r} is invalid: use one of {', '.join(kinds)}")
            if not isinstance(m.get("content"), str):
                kind = type(m.get("content")).__name__
                raise VentouxError(f"messages[{i}].content must be a string, not {kind}")
            _check_unicode(m["content"], f"messages[{i}].content")
            objs.append(kinds[role](content=m["content"]))
        if continue_final:
            if not isinstance(objs[-1], AssistantMessage):
                raise VentouxError("to continue the final message, the last message must be the assistant's")
            objs[-1] = AssistantMessage(content=objs[-1].content, prefix=True)
        try:
            return self.mistral.encode_chat_completion(ChatCompletionRequest(messages=objs)).tokens
        except (MistralCommonException, ValueError) as e:  # e.g. a conversation that ends with the wrong turn
            reason = _one_line(e)
            raise VentouxError(f"messages are not a valid conversation ({reason}); reorder them") from None

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.decode, self.is_control)


def _check_unicode(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8, decoded leniently
        raise VentouxError(f"{what} is not valid Unicode (a lone surrogate at character {e.start}, from bytes "
                           "that were not UTF-8); decode the input as UTF-8 first") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


class StreamDecoder:
    """Incremental detokenisation: the pushed deltas concatenated equal decode(all pushed ids).

    Each push decodes a short window: the last real (non-control) token already emitted, as context,
    plus the tokens not yet emitted. The context matters for sentencepiece, which drops the leading
    space of the first real piece it decodes. A delta is held back while the text ends with U+FFFD:
    a UTF-8 character split across byte-fallback tokens is still incomplete.
    """

    def __init__(self, decode, is_control):
        self._decode = decode
        self._is_control = is_control
        self._window: list[int] = []  # context token (if any), then the pending tokens
        self._read = 0  # window[:_read] is already emitted

    def push(self, token_id: int) -> str:
        self._window.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """The held-back text (an incomplete character decodes as U+FFFD, as decode would)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        if not final and text.endswith("\ufffd"):
            return ""
        real = [i for i, t in enumerate(self._window) if not self._is_control(t)]
        # control tokens stay after the context: sentencepiece does not join byte runs across them
        self._window = self._window[real[-1] :] if real else []
        self._read = len(self._window)
        return text[len(done) :]
