"""SamplingParams behaviours that mutation testing (mutation/README.md) found unpinned: each invalid value's whole
message (the range it must be in), and the surfaces table: which fields the CLI and HTTP requests show, with
which defaults (the module docstring's table: OpenAI's temperature 1 and no max_tokens for HTTP, 0.7 for the
CLI), each with its help text. The `_field` mutants act at import: mutation/check_fresh.py checks them."""

from __future__ import annotations

import functools

import pytest
from conftest import error_message

from ventoux.errors import VentouxError
from ventoux.params import SamplingParams

ALL = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
       "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "logit_bias", "logprobs", "prefill_chunk"]


@pytest.mark.parametrize("name, value, want", [
    ("max_tokens", 0, "an integer >= 1"),
    ("temperature", 200, "0 (greedy) or a number in [0.0001, 100]"),
    ("top_p", 0, "in (0, 1]"),
    ("top_k", -1, "an integer >= 0 (0 turns it off)"),
    ("min_p", 1.0, "in [0, 1)"),
    ("repetition_penalty", 0.0, "a number in [0.01, 100] (1 turns it off)"),
    ("presence_penalty", 3, "in [-2, 2]"),
    ("frequency_penalty", -3, "in [-2, 2]"),
    ("seed", 2**64, "None or an integer that fits in 64 bits"),
    ("stop", [""], "a non-empty string or a list of them"),
    ("stop_token_ids", [-1], "a list of token ids (integers >= 0)"),
    ("ignore_eos", 1, "True or False"),
    ("logprobs", 21, "None or an integer in [0, 20]"),
    ("prefill_chunk", 0, "an integer >= 1"),
])
def test_each_invalid_value_names_the_range_it_must_be_in(name, value, want):
    with pytest.raises(VentouxError) as e:
        SamplingParams(**{name: value})
    assert str(e.value) == f"invalid sampling parameter {name}={value!r}: it must be {want}"


def test_python_defaults_and_the_surfaces_table():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.presence_penalty,
            p.frequency_penalty, p.seed, p.stop, p.stop_token_ids, p.ignore_eos, p.logit_bias, p.logprobs,
            p.prefill_chunk) == (256, 0.0, 1.0, 0, 0.0, 1.0, 0.0, 0.0, None, None, None, False, None, None, None)
    assert sorted(SamplingParams.names()) == sorted(ALL)
    python = {name: getattr(p, name) for name in ALL}
    cli = {f.name: default for f, default in SamplingParams.surface_fields("cli")}
    http = {f.name: default for f, default in SamplingParams.surface_fields("http")}
    # the CLI: every field but stop_token_ids and logprobs (request-only), temperature 0.7
    assert cli == {**{n: python[n] for n in ALL if n not in ("stop_token_ids", "logprobs")}, "temperature": 0.7}
    # HTTP (OpenAI's names and defaults): every field but logprobs (own request shape) and prefill_chunk
    assert http == {**{n: python[n] for n in ALL if n not in ("logprobs", "prefill_chunk")},
                    "temperature": 1.0, "max_tokens": None}
    for f, _ in SamplingParams.surface_fields("cli") + SamplingParams.surface_fields("http"):
        assert isinstance(f.metadata["help"], str) and len(f.metadata["help"]) > 8, f.name
    assert SamplingParams.surface_fields("grpc") == []


_message = functools.partial(error_message, VentouxError, SamplingParams)


def test_a_value_is_printed_whole_up_to_80_characters_then_cut():
    def stop_of(length):  # an invalid stop list (its "" entry) whose repr is `length` characters
        value = ["a" * (length - 8), ""]
        assert len(repr(value)) == length
        return value

    whole = stop_of(80)
    assert _message(stop=whole) == f"invalid sampling parameter stop={whole!r}: it must be a non-empty string or a " \
                                   "list of them"
    cut = stop_of(81)
    assert _message(stop=cut).startswith(f"invalid sampling parameter stop={repr(cut)[:77]}...: it must be")
    assert _message(logit_bias={-1: 1}) == ("invalid sampling parameter logit_bias={-1: 1}: it must be a map of "
                                            "token ids (integers >= 0) to biases in [-100, 100]")
