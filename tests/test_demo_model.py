"""The shipped demonstration model: its shape promises, a golden greedy output (as llama2.c does),
parity with transformers, and its validation loss against the figure the README publishes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import ventoux
from ventoux.api import DEMO_MODEL
from ventoux.config import read_config

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("VENTOUX_CORPUS", ROOT.parent / "shared" / "corpus" / "tinyshakespeare.txt"))

PROMPT = "ROMEO:\nBut soft, what light"
# fp32 CPU greedy continuation, recorded by running the shipped model (tokens after the prompt).
GOLDEN = ("ners, I have done,\nThat I may live, and I'll not be a word.\n\n"
          "PARIS:\nO, I will not, sir, and I'll tell you well.\n"
          "I'll be a bawd, and a little while:\nI'll be a bawd,")


@pytest.fixture(scope="module")
def llm():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # on the shared 2-core machine one thread is faster than two fighting
    yield ventoux.load(None, dtype="float32", device="cpu")
    torch.set_num_threads(old)


def test_demo_model_keeps_its_promises():
    cfg = read_config(DEMO_MODEL)
    files = {p.name: p.stat().st_size for p in DEMO_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= files.keys()
    assert sum(files.values()) <= 25 * 2**20
    assert cfg.n_kv_heads < cfg.n_heads  # grouped-query attention
    assert cfg.sliding_window < cfg.max_seq_len  # the rolling buffer is live in generation
    assert json.loads((DEMO_MODEL / "config.json").read_text())["max_position_embeddings"] == cfg.max_seq_len


def test_golden_greedy_output(llm):
    out = llm.generate(PROMPT, max_tokens=64, temperature=0)
    assert out.text == GOLDEN


def test_same_logits_as_transformers(llm):
    from transformers import MistralForCausalLM

    hf = MistralForCausalLM.from_pretrained(DEMO_MODEL, torch_dtype=torch.float32, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, llm.config.vocab_size, (1, llm.config.max_seq_len), generator=gen)  # > the window
    with torch.no_grad():
        torch.testing.assert_close(llm.model(tokens), hf(tokens).logits, atol=2e-4, rtol=1e-4)


def _readme_figure() -> float:
    m = re.search(r"validation loss of \*\*([0-9.]+) nats per character\*\*", (ROOT / "README.md").read_text())
    assert m, "README.md states no 'validation loss of **X nats per character**' for the demo model"
    return float(m.group(1))


@pytest.mark.skipif(not CORPUS.exists(), reason=f"corpus not found at {CORPUS}: set VENTOUX_CORPUS to "
                    "tinyshakespeare.txt (sha256 86c4e6aa...565ed) to check the demo model's validation loss")
def test_validation_loss_matches_readme(llm):
    from ventoux.train.data import split_heldout
    from ventoux.train.evaluate import nats_per_char

    text = split_heldout([CORPUS.read_text(encoding="utf-8")], 0.1)[1][0]
    with torch.inference_mode():
        nats = nats_per_char(llm.model, DEMO_MODEL, text, llm.config.max_seq_len, batch_size=32)
    assert nats == pytest.approx(_readme_figure(), rel=0.01)
