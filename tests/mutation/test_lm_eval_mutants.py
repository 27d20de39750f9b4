"""The lm-evaluation-harness model (eval/lm_eval_backend.py) on what simple_evaluate's tasks in tests/test_lm_eval.py
never reach: contexts longer than max_length (scored as transformers scores the tokens kept), a continuation
longer than the window, the generation settings lm-eval passes (sampling, stop strings, max_gen_toks, batches
and groups), its model_args as given on the command line (strings, "auto", cuda:0 without CUDA), and the
cache hook that lets lm-eval's --use_cache skip what was scored."""

from __future__ import annotations

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from test_lm_eval import checkpoint  # noqa: E402,F401  (the fixture: a tiny HF checkpoint with tekken)

import ventoux  # noqa: E402
import ventoux.eval.lm_eval_backend as backend  # noqa: E402
from ventoux.errors import VentouxError  # noqa: E402


@pytest.fixture(scope="module")
def lm(checkpoint):  # noqa: F811
    return backend.VentouxLM(pretrained=checkpoint, dtype="float32", max_length="16", max_gen_toks="6",
                             batch_size="2")


@pytest.fixture(scope="module")
def hf(checkpoint):  # noqa: F811
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


class Hook:
    def __init__(self):
        self.calls = []

    def add_partial(self, kind, key, value):
        self.calls.append((kind, key, value))


def reference(hf, tokens: list[int], k: int) -> tuple[float, bool]:
    """transformers: the log-probability of the last k tokens given the ones before, and whether each is greedy."""
    with torch.no_grad():
        logprobs = hf(torch.tensor([tokens])).logits[0].log_softmax(-1)
    rows = logprobs[len(tokens) - 1 - k: len(tokens) - 1]
    target = torch.tensor(tokens[len(tokens) - k:])
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


@pytest.mark.parametrize("_batch_size", [8, "8", "auto", "auto:4", "16"])
def test_batch_size_as_lm_eval_passes_it(_batch_size):
    assert backend._batch_size(_batch_size) == {"16": 16}.get(_batch_size, 8)


def test_model_args_as_the_command_line_gives_them(monkeypatch, tmp_path):
    asked = []

    class Loaded:
        tokenizer = None
        config = type("Config", (), {"max_seq_len": 32})

    monkeypatch.setattr(ventoux, "load", lambda src, **kw: asked.append((src, kw)) or Loaded())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = backend.VentouxLM(pretrained=tmp_path, dtype="auto", device="cuda:0", quantize="int8", lora=tmp_path / "a")
    assert asked == [(str(tmp_path), {"dtype": None, "device": None, "quantize": "int8", "lora": str(tmp_path / "a")})]
    assert (lm.max_length, lm.max_gen_toks, lm._batch) == (32, 256, 8)  # the model's context; lm-eval's defaults
    backend.VentouxLM(dtype="bfloat16", device="cpu")
    assert asked[1] == (None, {"dtype": "bfloat16", "device": "cpu", "quantize": None})  # no lora: not passed


def test_what_templatelm_asks_for(lm):
    tok = lm.vtok
    assert (lm.eot_token_id, lm.prefix_token_id) == (tok.eos_id, tok.bos_id) == (2, 1)
    assert (lm.max_length, lm.max_gen_toks, lm._batch) == (16, 6, 2)
    assert lm.tokenizer_name == f"ventoux-{tok.version}"
    assert lm.chat_template() == f"mistral-common instruct {tok.version}"
    assert lm.tok_encode("Hello there") == tok.encode("Hello there", bos=True)
    assert lm.tok_encode("Hello there", add_special_tokens=False) == tok.encode("Hello there", bos=False)
    assert lm.tok_decode(tok.encode("Hello there", bos=False)) == "Hello there"


def test_a_context_longer_than_max_length_keeps_its_last_tokens(lm, hf):
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(1000, 131072, (30,), generator=g).tolist()
    short, long = torch.randint(1000, 131072, (3,), generator=g).tolist(), torch.randint(
        1000, 131072, (20,), generator=g).tolist()
    lm.cache_hook = Hook()
    requests = [(("c", "s"), ctx, short), (("c", "l"), ctx, long), (("c", "t"), ctx[:4], short)]
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    expected = [reference(hf, (ctx + short)[-17:], 3), reference(hf, (ctx + long)[-17:], 16),  # all but the first
                reference(hf, ctx[:4] + short, 3)]
    for (lp, greedy), (ref, ref_greedy) in zip(got, expected):
        assert lp == pytest.approx(ref, rel=1e-4, abs=1e-4) and greedy == ref_greedy
    assert lm.cache_hook.calls == [("loglikelihood", key, r) for (key, _, _), r in zip(requests, got)]


def test_rolling_loglikelihood_is_cached(lm):
    lm.cache_hook = Hook()
    (nll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Hello there.",), 0)], True)
    assert lm.cache_hook.calls == [("loglikelihood_rolling", ("Hello there.",), nll)] and nll < 0


def generate(lm, monkeypatch, requests):
    """lm.generate_until with the LLM's generate recorded: (prompts, settings) per call."""
    calls, real = [], lm.llm.generate

    def spy(prompts, **kw):
        calls.append(([len(p) for p in prompts], kw))
        return real(prompts, **kw)

    monkeypatch.setattr(lm.llm, "generate", spy)
    lm.cache_hook = Hook()
    return lm.generate_until([Instance("generate_until", {}, args, i) for i, args in enumerate(requests)], True), calls


def test_generation_settings_groups_and_batches(lm, monkeypatch):
    long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    greedy = {"until": ["\n\n", ""], "do_sample": False, "temperature": 0.7}
    sampled = {"until": "zzz", "do_sample": True, "temperature": 0.5, "max_gen_toks": 3}
    requests = [("Hi", greedy), (long, greedy), ("Hello there", greedy), ("Hi", sampled)]
    texts, calls = generate(lm, monkeypatch, requests)
    assert len(lm.tok_encode(long)) > 10  # cut to max_length - max_gen_toks = 10 tokens
    short = len(lm.tok_encode("Hello there"))
    assert calls == [([10, short], {"max_tokens": 6, "stop": ["\n\n"], "temperature": 0.0}),  # longest first
                     ([len(lm.tok_encode("Hi"))], {"max_tokens": 6, "stop": ["\n\n"], "temperature": 0.0}),
                     ([len(lm.tok_encode("Hi"))], {"max_tokens": 3, "stop": ["zzz"], "temperature": 0.5})]
    assert texts[0] == lm.llm.generate([lm.tok_encode("Hi")], max_tokens=6, stop=["\n\n"], temperature=0.0)[0].text
    assert lm.cache_hook.calls == [("generate_until", requests[i], texts[i]) for i in (1, 2, 0, 3)]  # as run
    texts, calls = generate(lm, monkeypatch, [("Hi", {"until": [], "do_sample": False})])
    assert calls[0][1]["stop"] is None
    texts, calls = generate(lm, monkeypatch, [("Hi", {"do_sample": True})])  # lm-eval warns: temperature 0.0
    assert calls[0][1] == {"max_tokens": 6, "stop": None, "temperature": 0.0}


def test_max_gen_toks_must_leave_room_for_a_prompt(lm, monkeypatch):
    with pytest.raises(VentouxError) as e:
        generate(lm, monkeypatch, [("Hi", {"until": [], "do_sample": False, "max_gen_toks": 16})])
    assert str(e.value) == ("max_gen_toks 16 leaves no room for a prompt in max_length 16: lower it, or raise "
                            "max_length in --model_args")
    generate(lm, monkeypatch, [("Hi", {"until": [], "do_sample": False, "max_gen_toks": 15})])


def test_progress_bars_by_default_and_the_batch_size_asked_for(lm, monkeypatch, capsys):
    """lm-eval calls generate_until(requests) and passes disable_tqdm through loglikelihood: a bar by default."""
    batches, real = [], backend.score
    monkeypatch.setattr(backend, "score", lambda model, scored, batch, **kw: batches.append(batch) or real(
        model, scored, batch, **kw))
    requests = [(("c", "s"), [1, 500, 600], [700])]
    lm._loglikelihood_tokens(requests)
    assert "loglikelihood: 100%" in capsys.readouterr().err and batches == [2]
    lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert capsys.readouterr().err == ""
    hi = [Instance("generate_until", {}, ("Hi", {"until": [], "do_sample": False}), 0)]
    lm.generate_until(hi)
    assert "generate_until: 100%" in capsys.readouterr().err
    lm.generate_until(hi, disable_tqdm=True)
    assert capsys.readouterr().err == ""
    windows, strided = [], backend.strided_loss
    monkeypatch.setattr(backend, "strided_loss", lambda model, ids, context, batch_size: windows.append(
        (context, batch_size)) or strided(model, ids, context, batch_size=batch_size))
    text = [Instance("loglikelihood_rolling", {}, ("Hello there.",), 0)]
    lm.loglikelihood_rolling(text)
    assert "loglikelihood_rolling: 100%" in capsys.readouterr().err and windows == [(16, 2)]
    lm.loglikelihood_rolling(text, disable_tqdm=True)
    assert capsys.readouterr().err == ""
