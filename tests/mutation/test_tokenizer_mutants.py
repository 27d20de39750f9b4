"""Tokenizer behaviours that mutation testing (mutation/README.md) found unpinned: which file of a folder is
preferred, which one fits the model's vocabulary, the rendered chat text and a continued final message (against
mistral-common's own Tokenized text and ids), and the one-line errors of decode."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import mistral_common
import pytest
from conftest import error_message
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from ventoux.errors import VentouxError
from ventoux.tokenizer import find_tokenizer_file, load_tokenizer, tokenizer_files

DATA = Path(mistral_common.__file__).parent / "data"
V1, V3, TEKKEN = DATA / "tokenizer.model.v1", DATA / "mistral_instruct_tokenizer_240323.model.v3", \
    DATA / "tekken_240911.json"  # 32000, 32768 and 131072 pieces


def test_files_are_preferred_tekken_json_then_dated_tekken_then_newest_version_then_plain(tmp_path):
    names = ["config.json", "tokenizer.model", "tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3",
             "tokenizer.model.v7m1", "tekken_240718.json", "tekken.json", "tekken_240911.json",
             "tokenizer.model.v3.orig", "tekken.txt", "other.model.v2x"]
    for name in names:
        (tmp_path / name).write_text("")
    (tmp_path / "tekken_dir.json").mkdir()  # a folder is not a tokenizer file
    want = ["tekken.json", "tekken_240911.json", "tekken_240718.json", "tokenizer.model.v7m1",
            "mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v1", "tokenizer.model"]
    assert [p.name for p in tokenizer_files(tmp_path)] == want
    assert [p.name for p in tokenizer_files(str(tmp_path))] == want
    assert find_tokenizer_file(tmp_path) == tmp_path / "tekken.json"
    assert tokenizer_files(tmp_path / "absent") == [] and tokenizer_files(tmp_path / "config.json") == []


def _folder(tmp_path: Path, config: dict | str | None, name: str = "config.json") -> Path:
    shutil.copy(TEKKEN, tmp_path / "tekken.json")
    shutil.copy(V3, tmp_path / "tokenizer.model.v3")
    shutil.copy(V1, tmp_path / "tokenizer.model")
    if config is not None:
        (tmp_path / name).write_text(config if isinstance(config, str) else json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("config, name, size", [
    ({"vocab_size": 32768}, "config.json", 32768),  # the exact size wins over the preferred tekken.json
    ({"vocab_size": 32000}, "params.json", 32000),  # Mistral's own params.json
    ({"vocab_size": 32100}, "config.json", 32000),  # padded embeddings: the preferred one that fits
    ({"vocab_size": 200000}, "config.json", 131072),  # all fit: the preferred one
    ({"vocab_size": True}, "config.json", 131072),  # not a size: as without a config
    ({"vocab_size": -5}, "config.json", 131072),
    ({"vocab_size": 0}, "config.json", 131072),
    ("{broken", "config.json", 131072),
    (None, "config.json", 131072),
])
def test_the_tokenizer_that_fits_the_models_vocabulary(tmp_path, config, name, size):
    assert load_tokenizer(_folder(tmp_path, config, name)).vocab_size == size


def test_a_broken_config_json_falls_back_to_params_json_and_the_argument_wins(tmp_path):
    folder = _folder(tmp_path, "[1, 2]")  # a list: no .get
    (folder / "params.json").write_text(json.dumps({"vocab_size": 32768}))
    assert load_tokenizer(folder).vocab_size == 32768
    assert load_tokenizer(folder, vocab_size=32000).vocab_size == 32000


@pytest.mark.parametrize("vocab", [1000, 1])
def test_a_model_smaller_than_every_tokenizer_is_refused_naming_each_size(tmp_path, vocab):
    with pytest.raises(VentouxError) as err:
        load_tokenizer(_folder(tmp_path, {"vocab_size": vocab}))
    assert str(err.value) == (
        f"the tokenizer does not fit the model in {tmp_path}: tekken.json has 131072, tokenizer.model.v3 has "
        f"32768, tokenizer.model has 32000 pieces but the model's vocabulary (vocab_size in its config) is {vocab}; "
        "put the model's own tokenizer there")


@pytest.mark.parametrize("path", [V1, V3, TEKKEN])
def test_rendered_chat_is_mistral_commons_text_and_a_final_message_continues(tmp_path, path):
    shutil.copy(path, tmp_path / path.name)
    tok, ref = load_tokenizer(tmp_path), MistralTokenizer.from_file(str(path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again?"}]
    objs = [SystemMessage(content="Be brief."), UserMessage(content="Hi there"), AssistantMessage(content="Hello"),
            UserMessage(content="Again?")]
    want = ref.encode_chat_completion(ChatCompletionRequest(messages=objs))
    ids, text = tok.render_chat(messages)
    assert ids == want.tokens == tok.encode_chat(messages)
    assert text == want.text.replace("\u2581", " ") and "[INST]" in text
    # continue_final: the assistant's message is left open for the model to continue (mistral-common's prefix)
    partial = [*messages, {"role": "assistant", "content": "Yes, ag"}]
    want = ref.encode_chat_completion(ChatCompletionRequest(
        messages=[*objs, AssistantMessage(content="Yes, ag", prefix=True)]))
    ids, text = tok.render_chat(partial, continue_final=True)
    assert ids == want.tokens and ids[-1] != tok.eos_id and text.endswith("Yes, ag")
    with pytest.raises(VentouxError, match="last message must be the assistant's"):
        tok.render_chat(messages, continue_final=True)


def test_decode_errors_name_the_bad_id_and_the_range(tmp_path):
    shutil.copy(V1, tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(V1))
    for edge in ([], [0], [31999], [0, 5, 31999]):  # the first and last ids are in the vocabulary
        assert tok.decode(edge) == sp.decode(edge)
    for bad in (-1, 32000):
        with pytest.raises(VentouxError, match=rf"token id {bad} is not in this tokenizer's vocabulary \[0, 32000\)"):
            tok.decode([5, bad])
    assert _message(lambda: tok.decode([5, 2.0])) == "token ids to decode must be a list of integers"


def test_the_ids_and_defaults_are_mistral_commons(tmp_path):
    shutil.copy(V3, tmp_path / "tokenizer.model.v3")
    tok, raw = load_tokenizer(tmp_path), MistralTokenizer.from_file(str(V3)).instruct_tokenizer.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.version) == (raw.bos_id, raw.eos_id, "v3") == (1, 2, "v3")
    assert tok.special_ids == frozenset(raw.special_ids) and tok.is_control(3) and not tok.is_control(1000)
    assert tok.encode("Hi there") == raw.encode("Hi there", bos=True, eos=False)  # bos by default, no eos


_message = functools.partial(error_message, VentouxError)


def test_user_errors_are_these_exact_lines(tmp_path):
    shutil.copy(V1, tmp_path / "tokenizer.model")
    tok, ref = load_tokenizer(tmp_path), MistralTokenizer.from_file(str(V1))
    surrogate = "caf\udce9"
    lone = ("is not valid Unicode (a lone surrogate at character 3, from bytes that were not UTF-8); "
            "decode the input as UTF-8 first")
    assert _message(lambda: tok.encode(b"x")) == "text to encode must be a string, not bytes"
    assert _message(lambda: tok.encode(surrogate)) == "text to encode " + lone
    listing = "messages must be a non-empty list of {'role': ..., 'content': ...} dicts"
    assert _message(lambda: tok.encode_chat("hello")) == listing
    assert _message(lambda: tok.encode_chat([])) == listing
    assert _message(lambda: tok.encode_chat([["user", "hi"]])) == \
        "messages[0].role=None is invalid: use one of system, user, assistant"
    assert _message(lambda: tok.encode_chat([{"role": "user", "content": 5}])) == \
        "messages[0].content must be a string, not int"
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": surrogate}]
    assert _message(lambda: tok.encode_chat(bad)) == "messages[1].content " + lone
    ends_with_assistant = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    try:  # mistral-common's own reason, on one line
        ref.encode_chat_completion(ChatCompletionRequest(
            messages=[UserMessage(content="a"), AssistantMessage(content="b")]))
    except Exception as e:  # noqa: BLE001  (whatever mistral-common raises: its text is the reason shown)
        reason = " ".join(str(e).split())
    assert len(reason.split()) > 2
    assert _message(lambda: tok.encode_chat(ends_with_assistant)) == \
        f"messages are not a valid conversation ({reason}); reorder them"
    assert _message(lambda: tok.render_chat([{"role": "user", "content": "a"}], continue_final=True)) == \
        "to continue the final message, the last message must be the assistant's"


def test_missing_and_unreadable_tokenizer_files_are_these_exact_lines(tmp_path):
    assert _message(lambda: load_tokenizer(tmp_path)) == (
        f"no tokenizer in {tmp_path}: expected tekken.json, tokenizer.model.v1/v2/v3 or tokenizer.model; "
        "copy the tokenizer file of the checkpoint into that folder")
    broken = tmp_path / "tekken.json"
    broken.write_text('{"config": {}}')
    try:  # mistral-common's own reason, on one line
        MistralTokenizer.from_file(str(broken))
    except Exception as e:  # noqa: BLE001  (whatever it raises: its text is the reason shown)
        reason = " ".join(str(e).split())
    assert _message(lambda: load_tokenizer(tmp_path)) == \
        f"tokenizer file {broken} cannot be read ({reason}); replace it with the checkpoint's own"
