"""The public Python API (api.py) where mutation testing (mutation/README.md) found it unpinned: what LLM.engine hands
the engine, chat_stream and chat's safe_prompt, the decode step and adapter that generate and stream pass on, the
compiled step's settings, pick_device's choices and refusals, and load's source, preset, quantize, compile and
LoRA forms."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import adapter_model, random_ids, randomize_adapters

import ventoux
from ventoux import api, hub, lora
from ventoux import engine as engine_module
from ventoux.api import LLM, compile_decode, pick_device
from ventoux.errors import VentouxError
from ventoux.lora_files import save_adapter
from ventoux.qlinear import Int8Linear

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def demo():
    return ventoux.load(dtype="float32")


def test_engine_hands_on_every_setting_and_its_defaults(monkeypatch, demo):
    calls = []
    monkeypatch.setattr(engine_module, "Engine", lambda *a, **k: calls.append((a, k)))
    llm = LLM(demo.model, demo.tokenizer, "demo")
    llm.decode = "compiled step"  # as compile=True sets it (None would match the engine's default)
    llm.engine(max_batch=3, kv_cache_bytes=1000, max_queue=5, prefill_budget=64, prefix_cache=False)
    llm.engine()
    step = "compiled step"
    assert calls == [((demo.model, demo.tokenizer), dict(max_batch=3, kv_cache_bytes=1000, max_queue=5,
                                                          prefill_budget=64, decode=step, prefix_cache=False)),
                     ((demo.model, demo.tokenizer), dict(max_batch=8, kv_cache_bytes=None, max_queue=None,
                                                          prefill_budget=None, decode=step, prefix_cache=True))]


def test_chat_stream_streams_chats_reply_and_both_take_safe_prompt(demo, monkeypatch):
    for safe in (False, True):
        whole = demo.chat(HI, safe_prompt=safe, max_tokens=6)
        assert "".join(ev.text for ev in demo.chat_stream(HI, safe_prompt=safe, max_tokens=6)) == whole.text
        assert whole.prompt_tokens == len(demo.tokenizer.encode_chat(HI, safe_prompt=safe))
    assert demo.chat(HI, safe_prompt=True, max_tokens=1).prompt_tokens > demo.chat(HI, max_tokens=1).prompt_tokens
    asked = []
    encode_chat = demo.tokenizer.encode_chat
    monkeypatch.setattr(demo.tokenizer, "encode_chat", lambda m, safe_prompt: asked.append(safe_prompt) or
                        encode_chat(m, safe_prompt=safe_prompt))
    list(demo.chat_stream(HI, max_tokens=1)), demo.chat(HI, max_tokens=1)
    assert asked == [False, False]  # the guardrail prompt only when asked for


def test_a_text_prompt_starts_with_bos_and_bad_prompts_are_named_whole(demo):
    assert demo.generate("Hello", max_tokens=1).prompt_tokens == len(demo.tokenizer.encode("Hello", bos=True))
    for prompt, message in (("", "the prompt is empty: give some text to continue"),
                            ([[1, 2], "x", 3.5], "prompt must be a string or a list of token ids"),
                            (3.5, "prompt must be a string, a list of token ids, or a list of those; not float")):
        with pytest.raises(VentouxError) as e:
            demo.generate(prompt)
        assert str(e.value) == message


def test_generate_and_stream_use_the_compiled_step_and_the_adapter_asked_for(v1_tokenizer):
    model = adapter_model()
    llm = LLM(model, v1_tokenizer, "tiny")
    calls = []
    llm.decode = lambda *a, **k: calls.append(1) or model(*a, **k)
    prompt = random_ids(1, 9)
    base = llm.generate(prompt, max_tokens=6).tokens
    assert calls, "generate did not decode with llm.decode"
    with_a = llm.generate(prompt, adapter="a", max_tokens=6).tokens
    assert with_a != base
    calls.clear()
    assert [ev.token for ev in llm.stream(prompt, adapter="a", max_tokens=6) if ev.token is not None] == with_a
    assert calls, "stream did not decode with llm.decode"
    for call in (llm.generate, llm.stream):
        with pytest.raises(VentouxError, match="'zz'"):
            call(prompt, adapter="zz")


def test_compile_true_compiles_the_decode_step(monkeypatch, demo):
    compiled = []
    monkeypatch.setattr(api, "compile_decode", lambda model: compiled.append(model) or "step")
    llm = LLM(demo.model, demo.tokenizer, "demo", compile=True)
    assert (llm.decode, compiled, llm.config) == ("step", [demo.model], demo.model.config)
    assert LLM(demo.model, demo.tokenizer, "demo").decode is None


def test_compile_decode_settings(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **k: calls.append((model, k)) or "compiled")
    cpu, cuda = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("cuda"))
    assert compile_decode(cpu) == "compiled" and compile_decode(cuda) == "compiled"
    assert calls == [(cpu, {"dynamic": False, "mode": None}), (cuda, {"dynamic": False, "mode": "reduce-overhead"})]


def test_pick_device_auto_and_its_refusals_whole(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device(None) == pick_device("auto") == torch.device("cpu")
    for name, flag in (("cuda:1", "CUDA"), ("mps", "MPS")):
        with pytest.raises(VentouxError) as e:
            pick_device(name)
        assert str(e.value) == f"device {name!r} asked for but {flag} is not available here: use --device cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == pick_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(None) == torch.device("cuda") and pick_device("cuda:1") == torch.device("cuda:1")


def test_load_names_its_source_and_a_preset_resolves_to_its_repo(monkeypatch):
    assert ventoux.load().source == str(api.DEMO_MODEL)
    assert api.load().decode is None  # compiled only when asked for (ventoux.load passes its own default)
    asked = []
    monkeypatch.setattr(hub, "resolve", lambda source: asked.append(source) or api.DEMO_MODEL)
    assert ventoux.load("mistral-7b-v0.1").source == "mistral-7b-v0.1"
    assert ventoux.load("someone/model").source == "someone/model"
    assert asked == ["mistralai/Mistral-7B-v0.1", "someone/model"]


def test_load_without_the_demo_model_says_what_to_pass(monkeypatch, tmp_path):
    monkeypatch.setattr(api, "DEMO_MODEL", tmp_path)
    with pytest.raises(VentouxError) as e:
        ventoux.load()
    assert str(e.value) == ("the demonstration model is not shipped in this build yet: pass --model with a checkpoint "
                            "folder or a Hugging Face repo id")


def test_load_quantizes_and_compiles_when_asked():
    llm = ventoux.load(quantize="int8", compile=True)
    assert isinstance(llm.model.layers[0].attention.wq, Int8Linear) and llm.decode is not None


def test_one_adapter_is_always_on_and_several_are_chosen_per_request(tmp_path):
    source = ventoux.load(dtype="float32")
    lora.add_adapter(source.model, lora.LoraConfig(rank=4, alpha=8), name="mine")
    save_adapter(randomize_adapters(source.model, scale=0.3, name="mine"), tmp_path / "adapter", name="mine")
    base = ventoux.load(dtype="float32")
    always = ventoux.load(dtype="float32", lora=tmp_path / "adapter")
    chosen = ventoux.load(dtype="float32", lora={"x": tmp_path / "adapter"})
    assert lora.adapter_names(always.model) == ["default"] and lora.adapter_names(chosen.model) == ["x"]
    want = base.generate("Romeo", max_tokens=8).text
    assert chosen.generate("Romeo", max_tokens=8).text == want  # no adapter unless a request names one
    assert always.generate("Romeo", max_tokens=8).text == chosen.generate("Romeo", adapter="x", max_tokens=8).text
    assert always.generate("Romeo", max_tokens=8).text != want
