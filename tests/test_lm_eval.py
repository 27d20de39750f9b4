"""ventoux as an lm-evaluation-harness model, against lm-eval's own `hf` model on the same tiny checkpoint.

Both run the local tasks of tests/data/lm_eval (multiple choice, generate_until, loglikelihood_rolling)
through lm_eval.simple_evaluate: the per-sample log-likelihoods agree to 1e-4 and the generations are equal.
The checkpoint is a random float32 MistralForCausalLM saved in HF format with mistral-common's tekken
tokenizer, which both sides read (transformers through mistral-common's own backend).
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import mistral_common
import pytest
import torch
from conftest import hf_model

from ventoux.config import ModelConfig

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

import ventoux.eval.lm_eval_backend as backend  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval"
TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=131072, head_dim=16,
                  norm_eps=1e-5, rope_theta=1e6, sliding_window=None, max_seq_len=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-hf")
    model = hf_model(CFG, seed=3)
    with torch.no_grad():  # a sharper random model: greedy choices far from ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    shutil.copy(TEKKEN, folder / "tekken.json")
    return folder


def evaluate(model: str, model_args: dict, tasks: list[str]) -> dict:
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)  # only ours: indexing all takes 20 s
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=3, device="cpu",
                                   task_manager=manager, log_samples=True, num_fewshot=0)


def responses(result: dict, task: str) -> list:
    """Per sample (in document order), the list of the model's answers to its requests."""
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] if isinstance(r, list) else r for r in s["resps"]] for s in samples]


@pytest.fixture(scope="module")
def results(checkpoint):
    args = {"pretrained": str(checkpoint), "dtype": "float32"}
    return {"ventoux": evaluate("ventoux", args, ["ventoux_mc", "ventoux_gen", "ventoux_rolling"]),
            "hf": evaluate("hf", args, ["ventoux_mc", "ventoux_gen"])}


def test_multiple_choice_loglikelihoods_match_hf(results):
    ours, theirs = responses(results["ventoux"], "ventoux_mc"), responses(results["hf"], "ventoux_mc")
    assert len(ours) == 5 and [len(r) for r in ours] == [3, 3, 3, 2, 2]
    for mine, ref in zip(ours, theirs):
        for (lp, greedy), (lp_ref, greedy_ref) in zip(mine, ref):
            assert lp == pytest.approx(lp_ref, rel=1e-4, abs=1e-4)
            assert greedy == greedy_ref
    for metric in ("acc,none", "acc_norm,none"):
        assert results["ventoux"]["results"]["ventoux_mc"][metric] == results["hf"]["results"]["ventoux_mc"][metric]


def test_generations_match_hf(results):
    ours, theirs = responses(results["ventoux"], "ventoux_gen"), responses(results["hf"], "ventoux_gen")
    assert ours == theirs
    assert any(r[0] for r in ours)  # something was generated, not only stops


def rolling_reference(checkpoint, text: str, window: int) -> float:
    """log p(text | BOS) by transformers, in consecutive windows of `window` tokens, one window at a time.
    (lm-eval's hf model cannot be the reference here: it scores BOS itself as the first token of the text.)"""
    from transformers import MistralForCausalLM

    from ventoux.tokenizer import load_tokenizer

    ids = load_tokenizer(checkpoint).encode(text, bos=True)
    model = MistralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            inp, tgt = ids[start: start + window], ids[start + 1: start + window + 1]
            logprobs = model(torch.tensor([inp])).logits[0, : len(tgt)].log_softmax(-1)
            total += logprobs.gather(-1, torch.tensor(tgt)[:, None]).sum().item()
    return total


def test_rolling_loglikelihood_matches_transformers(results, checkpoint):
    samples = sorted(results["ventoux"]["samples"]["ventoux_rolling"], key=lambda s: s["doc_id"])
    assert len(samples) == 2
    for sample in samples:
        text = sample["doc"]["text"]
        assert sample["resps"][0][0] == pytest.approx(rolling_reference(checkpoint, text, CFG.max_seq_len), rel=1e-5)


def test_entry_point_names_the_backend():
    """The `lm_eval.models` entry point an lm-eval with plugin discovery reads resolves to the registered class."""
    points = {ep.name: ep for ep in metadata.entry_points(group="lm_eval.models")}
    assert points["ventoux"].load() is backend.VentouxLM
    from lm_eval.api.registry import get_model

    assert get_model("ventoux") is backend.VentouxLM


# ---- --apply_chat_template: mistral-common's ids, not the rendered text re-tokenized ----------------------
def chat_reference_ids(checkpoint, messages: list[dict], continue_final: bool = False) -> list[int]:
    """transformers' mistral-common tokenizer, tokenizing the conversation itself (tokenize=True)."""
    from transformers import MistralCommonBackend

    tok = MistralCommonBackend.from_pretrained(checkpoint)
    out = tok.apply_chat_template(messages, tokenize=True, continue_final_message=continue_final)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def test_apply_chat_template_keeps_mistral_common_ids(checkpoint):
    lm = backend.VentouxLM(pretrained=str(checkpoint), dtype="float32")
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    text = lm.apply_chat_template(chat)
    assert "[INST]" in text  # lm-eval logs the prompt as text
    expected = chat_reference_ids(checkpoint, chat)
    assert lm.tok_encode(text) == expected
    assert lm.tok_encode(text + " 6") == expected + lm.vtok.encode(" 6", bos=False)  # a continuation after it
    assert lm.tok_encode("[INST] plain text") == lm.vtok.encode("[INST] plain text", bos=True)  # not rendered
    prefixed = chat + [{"role": "assistant", "content": "The answer is"}]  # lm-eval's gen_prefix
    assert lm.tok_encode(lm.apply_chat_template(prefixed, add_generation_prompt=False)) == \
        chat_reference_ids(checkpoint, prefixed, continue_final=True)


def test_chat_template_scores_match_transformers(checkpoint):
    """simple_evaluate(apply_chat_template=True): each choice's log-likelihood and each greedy answer equal
    transformers' on mistral-common's chat ids."""
    from transformers import MistralForCausalLM

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    result = lm_eval.simple_evaluate(model="ventoux", model_args={"pretrained": str(checkpoint), "dtype": "float32"},
                                     tasks=["ventoux_mc", "ventoux_gen"], batch_size=3, device="cpu",
                                     task_manager=manager, log_samples=True, num_fewshot=0,
                                     apply_chat_template=True)
    model = MistralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    from transformers import MistralCommonBackend

    tok = MistralCommonBackend.from_pretrained(checkpoint)
    for sample in result["samples"]["ventoux_mc"]:
        prompt = chat_reference_ids(checkpoint, [{"role": "user", "content": sample["doc"]["question"]}])
        for (_, continuation), (lp, _) in zip(sample["arguments"], [r[0] for r in sample["resps"]]):
            cont = tok.encode(continuation, add_special_tokens=False)  # with a chat template: no delimiter
            with torch.no_grad():
                logprobs = model(torch.tensor([prompt + cont])).logits[0].log_softmax(-1)
            ref = sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont))
            assert lp == pytest.approx(ref, rel=1e-4, abs=1e-4)
    for sample in result["samples"]["ventoux_gen"]:
        prompt = chat_reference_ids(checkpoint, [{"role": "user", "content": sample["doc"]["prompt"]}])
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)
        for stop in ("\n", "."):
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text
