"""Training: tokenizer settings against Mistral's own, data handling, a tiny run that learns,
resume after a real kill -9 equals an uninterrupted run, checkpoints that transformers loads, and
every bad input as one clear error with nothing written."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ventoux.cli import main
from ventoux.config import ModelConfig, read_config
from ventoux.errors import VentouxError
from ventoux.train import TrainArgs, pretrain, train_tokenizer
from ventoux.train.data import load_corpus, split_heldout
from ventoux.weights import load_model

VOCAB = 320  # 3 specials + 256 bytes + the corpus' characters + a few merges
CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=VOCAB,
                  sliding_window=8, max_seq_len=32)


def _text(n_lines: int, seed: int = 0) -> str:
    """Learnable pseudo-verse: a few speakers, a small word list, regular punctuation."""
    rng = random.Random(seed)
    words = "the king my lord good sweet love night day fair heart death life thou art not so".split()
    out = []
    for _ in range(n_lines):
        if rng.random() < 0.15:
            out.append(f"\n{rng.choice(['ROMEO', 'JULIET', 'KING'])}, act {rng.choice(['2024', '1599', '42'])}:")
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 8))).capitalize() + rng.choice(",.;!?"))
    return "\n".join(out) + "\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A ~12 KB text corpus with its trained tokenizer and a tiny config.json."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "text.txt").write_text(_text(400))
    train_tokenizer([root / "text.txt"], VOCAB, root / "tok")
    (root / "config.json").write_text(json.dumps(CFG.to_hf()))
    return root


def _args(corpus: Path, out: Path, **kw) -> TrainArgs:
    base = dict(config=str(corpus / "config.json"), tokenizer=str(corpus / "tok"), data=[str(corpus / "text.txt")],
                out=str(out), steps=40, batch_size=8, context=32, lr=3e-3, min_lr=3e-4, warmup=5,
                eval_every=10, save_every=20, log_every=5, device="cpu")
    return TrainArgs(**{**base, **kw})


# ---- tokenizer -------------------------------------------------------------------------------
def test_tokenizer_behaves_like_mistral_v1(corpus):
    """Special ids, digit splitting, byte fallback and the leading-space piece agree with Mistral's
    v1 tokenizer.model (shipped in mistral-common)."""
    from importlib.resources import files

    import sentencepiece as spm

    ours = spm.SentencePieceProcessor(model_file=str(corpus / "tok" / "tokenizer.model"))
    theirs = spm.SentencePieceProcessor(model_file=str(files("mistral_common") / "data" / "tokenizer.model.v1"))
    assert ours.get_piece_size() == VOCAB
    for name in ("unk_id", "bos_id", "eos_id", "pad_id"):
        assert getattr(ours, name)() == getattr(theirs, name)(), name
    for text in ["2024", "龘", "𝔉"]:  # digits one by one; unseen characters as UTF-8 byte pieces
        assert ours.encode(text, out_type=str) == theirs.encode(text, out_type=str), text
    text = "Thou art 2024 times fairer — été 🙂\n"
    assert ours.decode(ours.encode(text)) == text  # nothing is <unk>
    assert ours.encode("king", out_type=str)[0].startswith("▁")  # the dummy prefix, as Mistral's


def test_tokenizer_never_sees_the_heldout_text(tmp_path):
    import sentencepiece as spm

    text = _text(300)
    (tmp_path / "text.txt").write_text(text + "Zanzibarquux. " * 40 + "\n")  # a word only the held-out part has
    pieces = {}
    for fraction in (0.0, 0.1):
        train_tokenizer([tmp_path / "text.txt"], 400, tmp_path / str(fraction), val_fraction=fraction)
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / str(fraction) / "tokenizer.model"))
        pieces[fraction] = len(sp.encode("Zanzibarquux"))
    assert pieces[0.0] <= 3 and pieces[0.1] >= 10  # merged into pieces only when the held-out text trains
    with pytest.raises(VentouxError, match="--val-fraction 1.0"):
        train_tokenizer([tmp_path / "text.txt"], VOCAB, tmp_path / "bad", val_fraction=1.0)


def test_heldout_split_follows_corpus_convention():
    text = _text(100)
    i = text.index("\n", int(0.9 * len(text)))
    assert split_heldout([text], 0.1) == ([text[: i + 1]], [text[i + 1:]])


def test_documents_are_framed_by_bos_eos(corpus, tmp_path):
    import sentencepiece as spm

    docs = ["Good night, sweet prince.", "My lord?"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 20))
    data = load_corpus([tmp_path / "d.jsonl"], corpus / "tok" / "tokenizer.model", 0.1, tmp_path / "cache", 4)
    sp = spm.SentencePieceProcessor(model_file=str(corpus / "tok" / "tokenizer.model"))
    one = [1, *sp.encode(docs[0]), 2, 1, *sp.encode(docs[1]), 2]
    assert data.train[: len(one)].tolist() == one
    assert (tmp_path / "cache" / "train.bin").exists()
    again = load_corpus([tmp_path / "d.jsonl"], corpus / "tok" / "tokenizer.model", 0.1, tmp_path / "cache", 4)
    assert isinstance(again.train, __import__("numpy").memmap)  # second time: the cached memmap


# ---- training --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    """40 steps with dropout, checkpoints at steps 20 and 40: (run folder, final model folder)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    return out, pretrain(_args(corpus, out, dropout=0.1), progress=False)


def test_tiny_run_lowers_validation_loss_and_writes_its_outputs(tiny_run):
    out, model = tiny_run
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0] - 0.5, val
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert model == out / "model" and (model / "tokenizer.model").exists()
    assert read_config(model).max_seq_len == 32  # the config records the trained context
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000020", "step-0000040"]


def test_resume_after_kill_9_equals_uninterrupted_run(corpus, tmp_path):
    """A real process is killed (SIGKILL) mid-run; resuming it ends with the uninterrupted run's weights."""
    kw = dict(steps=80, batch_size=16, save_every=10, eval_every=30, dropout=0.2, seed=3)
    whole = pretrain(_args(corpus, tmp_path / "whole", **kw), progress=False)

    same = dataclasses.asdict(_args(corpus, tmp_path / "cut", **kw))  # the same settings, as CLI flags
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in same.items()
             if v is not None and k != "data" and not isinstance(v, bool)]
    script = "import sys; from ventoux.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", script, "pretrain", *flags, "--data", str(corpus / "text.txt"),
                             "--quiet"], stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoints" / "step-0000020").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
    assert not (tmp_path / "cut" / "model").exists()

    cut = pretrain(TrainArgs(out=str(tmp_path / "cut"), resume=True), progress=False)
    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_run_with_nothing_held_out_resumes(corpus, tmp_path):
    """--val-fraction 0 leaves an empty held-out cache file, which once failed to map on resume (a traceback)."""
    out = tmp_path / "run"
    pretrain(_args(corpus, out, steps=4, save_every=2, eval_every=2, val_fraction=0.0), progress=False)
    pretrain(TrainArgs(out=str(out), resume=True, steps=6), progress=False)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 6 and not any("val_loss" in r for r in rows)


def test_activation_checkpointing_and_accumulation_options(corpus, tmp_path):
    """Recomputing blocks in backward (dropout RNG replayed) gives the weights of a plain run."""
    kw = dict(steps=6, eval_every=6, save_every=6, dropout=0.1)
    plain = pretrain(_args(corpus, tmp_path / "plain", **kw), progress=False)
    ckpt = pretrain(_args(corpus, tmp_path / "ckpt", checkpointing=True, **kw), progress=False)
    a, b = load_file(plain / "model.safetensors"), load_file(ckpt / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    pretrain(_args(corpus, tmp_path / "accum", grad_accum=2, bf16=True, **kw), progress=False)
    rows = [json.loads(r) for r in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["val_loss"] < 6.0


def test_init_continues_from_existing_weights(corpus, tiny_run, tmp_path):
    start = tiny_run[1]
    kw = dict(init=str(start), config=None, steps=2, lr=1e-9, min_lr=1e-9, weight_decay=0.0, eval_every=2)
    end = pretrain(_args(corpus, tmp_path / "more", **kw), progress=False)
    a, b = load_file(start / "model.safetensors"), load_file(end / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_mid_training_checkpoint_loads_in_transformers_and_ventoux(tiny_run):
    from transformers import MistralForCausalLM

    ckpt = tiny_run[0] / "checkpoints" / "step-0000020"
    tokens = torch.randint(0, VOCAB, (2, 24))  # longer than the window of 8
    ours = load_model(ckpt, read_config(ckpt), torch.float32).eval()
    hf = MistralForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(ours(tokens), expected, atol=1e-4, rtol=1e-4)
        try:
            import ventoux.api  # noqa: F401
        except ImportError:
            return
        import ventoux

        llm = ventoux.load(str(ckpt), dtype="float32", device="cpu")
        torch.testing.assert_close(llm.model(tokens), expected, atol=1e-4, rtol=1e-4)
        assert llm.tokenizer.decode(llm.tokenizer.encode("Good night", bos=False)) == "Good night"


# ---- bad input: one line naming the culprit, nothing written ----------------------------------
def _fails(capsys, out: Path, *argv: str) -> str:
    assert main(list(argv)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ventoux: error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists(), f"{out} was created"
    return err


def _pretrain(corpus: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(corpus / "config.json"), "--tokenizer", str(corpus / "tok"),
            "--data", str(data), "--out", str(out), "--context", "32", "--steps", "2", "--quiet", *extra]


def test_bad_inputs(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert f"{empty}: the file is empty" in _fails(capsys, out, *_pretrain(corpus, out, empty))
    assert f"{empty}: the file is empty" in _fails(capsys, out, "train-tokenizer", "--input", str(empty),
                                                   "--vocab-size", "320", "--out", str(out))

    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.\n" * 3)
    assert "fewer than one sequence" in _fails(capsys, out, *_pretrain(corpus, out, short, "--val-fraction", "0.5",
                                                                      "--context", "64"))
    assert "held-out split" in _fails(capsys, out, *_pretrain(corpus, out, short, "--context", "4"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{not json}\n')
    assert f"{bad}:3: not valid JSON" in _fails(capsys, out, *_pretrain(corpus, out, bad))
    bad.write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n")  # json.loads recurses: RecursionError
    assert f"{bad}:2: its JSON nests arrays or objects too deeply" in _fails(capsys, out, *_pretrain(corpus, out, bad))
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"text": "fine"}\n\n{"content": "no text field"}\n')
    assert f'{notext}:3: no "text" field' in _fails(capsys, out, *_pretrain(corpus, out, notext))

    small = tmp_path / "small.json"
    small.write_text(json.dumps(CFG.replace(vocab_size=100).to_hf()))
    err = _fails(capsys, out, *_pretrain(corpus, out, corpus / "text.txt", "--config", str(small)))
    assert "vocab_size 100" in err and str(VOCAB) in err

    assert "--init" in _fails(capsys, out, *_pretrain(corpus, out, corpus / "text.txt", "--init",
                                                       str(tmp_path / "missing")))
    assert "--vocab-size 100000" in _fails(capsys, out, "train-tokenizer", "--input", str(corpus / "text.txt"),
                                           "--vocab-size", "100000", "--out", str(out))


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"), (["--grad-accum", "0"], "--grad-accum must be"),
    (["--eval-tokens", "0"], "--eval-tokens must be at least 1"), (["--steps", "0"], "--steps must be at least 1"),
    (["--context", "0"], "--context must be"), (["--dropout", "2"], "--dropout must be in [0, 1)"),
    (["--lr", "inf"], "--lr must be a positive number"), (["--lr", "-1"], "--lr must be"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"), (["--warmup", "-1"], "--warmup"),
    (["--val-fraction", "nan"], "--val-fraction must be in [0, 1)"), (["--clip", "inf"], "--clip must be"),
])
def test_bad_flags(corpus, tmp_path, capsys, flags, message):
    """Each once a traceback, or a model trained to NaN (or not trained at all) written with exit status 0."""
    out = tmp_path / "out"
    assert message in _fails(capsys, out, *_pretrain(corpus, out, corpus / "text.txt", *flags))


def test_binary_config_and_out_that_is_a_file(corpus, tmp_path, capsys):
    binary = tmp_path / "garbage.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "out"
    err = _fails(capsys, out, *_pretrain(corpus, out, corpus / "text.txt", "--config", str(binary)))
    assert f"--config {binary} is not a JSON config" in err
    assert main(_pretrain(corpus, binary, corpus / "text.txt")) == 1  # checked before the token cache is written
    err = capsys.readouterr().err.strip()
    assert f"--out {binary} is a file" in err and "must be a folder" in err and "\n" not in err, err


def test_a_diverging_run_stops_without_writing_a_model(corpus, tmp_path):
    """A learning rate that overflows the weights: the loss becomes NaN or inf and the run stops, naming the step."""
    with pytest.raises(VentouxError, match=r"loss became (nan|inf) at step \d.*lower --lr"):
        pretrain(_args(corpus, tmp_path / "run", steps=4, lr=1e30, warmup=0), progress=False)
    assert not (tmp_path / "run" / "model").exists()


def test_existing_run_is_not_overwritten_without_resume(corpus, tmp_path):
    pretrain(_args(corpus, tmp_path / "run", steps=4, save_every=4, eval_every=4), progress=False)
    with pytest.raises(VentouxError, match="--resume"):
        pretrain(_args(corpus, tmp_path / "run", steps=4), progress=False)


# ---- --resume through the CLI: flags are honoured or refused, never ignored -----------------------
def _cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    script = "import sys; from ventoux.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_resume_flags_through_the_cli(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(_args(corpus, run, steps=4, save_every=2, eval_every=2, log_every=1), progress=False)
    capsys.readouterr()
    assert "holds no checkpoint to resume" in _fails(capsys, tmp_path / "typo", "pretrain", "--out",
                                                     str(tmp_path / "typo"), "--resume")
    assert main(["pretrain", "--out", str(run), "--resume"]) == 1  # a finished run: say how to extend it
    err = capsys.readouterr().err
    assert "is at step 4" in err and "pass --steps N (more than 4)" in err and len(err.splitlines()) == 1

    conflict = _cli("pretrain", "--out", str(run), "--resume", "--lr", "0.5", "--context", "16",
                    "--data", str(corpus / "text.txt"), "--steps", "6")  # the same --data is no conflict
    assert conflict.returncode == 1 and len(conflict.stderr.strip().splitlines()) == 1, conflict.stderr
    assert "--context 16 (the run has 32)" in conflict.stderr and "--lr 0.5 (the run has 0.003)" in conflict.stderr
    assert "--data" not in conflict.stderr and "Traceback" not in conflict.stderr

    # a longer --steps extends the run; without matplotlib no picture is drawn, and none is announced
    fake = tmp_path / "no-matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is hidden by the test')\n")
    longer = _cli("pretrain", "--out", str(run), "--resume", "--steps", "6", "--quiet",
                  env={"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert longer.returncode == 0, longer.stderr
    assert "no loss.png" in longer.stderr and "loss.png" not in longer.stdout, longer.stdout
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs[6] == pytest.approx(3e-4) and lrs[5] > lrs[6]  # the cosine of a 6-step run ends at min_lr


def test_chunked_loss_equals_transformers_loss_and_gradients(monkeypatch):
    """The head and loss in chunks of rows, recomputed in backward, give transformers' summed loss and the
    same gradients (targets with ignored positions, rows not a multiple of the chunk)."""
    import torch.nn.functional as F
    from conftest import TINY, hf_model, ventoux_from_hf

    from ventoux.train import loop

    hf = hf_model(TINY, seed=5)
    ours = ventoux_from_hf(hf)
    x = torch.randint(0, TINY.vocab_size, (3, 27))  # 81 rows: more than the model's width (64)
    y = torch.randint(0, TINY.vocab_size, (81,))
    y[[0, 4, 80]] = -100
    monkeypatch.setattr(loop, "LOGIT_CHUNK", 5 * TINY.vocab_size)  # 5 rows a chunk: 17 chunks, the last of 1 row
    calls = []
    monkeypatch.setattr(ours, "logits", lambda h, f=ours.logits: calls.append(h.shape[0]) or f(h))
    loss = loop.summed_loss(ours, x, y)
    loss.backward()
    assert calls[:17] == [5] * 16 + [1]  # forward in chunks (backward recomputes each)
    ref = F.cross_entropy(hf(x).logits.flatten(0, 1), y, ignore_index=-100, reduction="sum")
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in [(ours.output.weight, hf.lm_head.weight), (ours.layers[0].attention.wq.weight,
                                                             hf.model.layers[0].self_attn.q_proj.weight)]:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_chunked_loss_of_a_frozen_head_takes_its_gradient_in_the_forward(monkeypatch):
    """With the final norm and the head frozen (LoRA), each chunk runs once (its gradient to the hidden states
    is taken in the forward, no recompute in backward), and the loss and the gradients of the trained weights
    are transformers' (the loss scaled, as the training loop divides it by the tokens)."""
    import torch.nn.functional as F
    from conftest import TINY, hf_model, ventoux_from_hf

    from ventoux.train import loop

    hf = hf_model(TINY, seed=6)
    ours = ventoux_from_hf(hf)
    for frozen in (ours.norm.weight, ours.output.weight, hf.model.norm.weight, hf.lm_head.weight):
        frozen.requires_grad_(False)
    x = torch.randint(0, TINY.vocab_size, (3, 7))
    y = torch.randint(0, TINY.vocab_size, (21,))
    y[[0, 4, 20]] = -100
    monkeypatch.setattr(loop, "LOGIT_CHUNK", 5 * TINY.vocab_size)
    calls = []
    monkeypatch.setattr(ours, "logits", lambda h, f=ours.logits: calls.append(h.shape[0]) or f(h))
    loss = loop.summed_loss(ours, x, y) / 18
    assert calls == [5, 5, 5, 5, 1]
    loss.backward()
    assert calls == [5, 5, 5, 5, 1]  # nothing recomputed
    ref = F.cross_entropy(hf(x).logits.flatten(0, 1), y, ignore_index=-100, reduction="sum") / 18
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in [(ours.layers[1].feed_forward.w2.weight, hf.model.layers[1].mlp.down_proj.weight),
                 (ours.layers[0].attention.wq.weight, hf.model.layers[0].self_attn.q_proj.weight)]:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # evaluation: the same sum, no gradient taken
        assert loop.summed_loss(ours, x, y).item() == pytest.approx(ref.item() * 18, rel=1e-5)


_HEAP_PROBE = """
import sys, torch
from ventoux.train import memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
mapped = memory.map_large_tensors() if sys.argv[1] == "mapped" else False
for _ in range(2):  # the first free raises glibc's own threshold to this size: the second one is served by the heap
    t = torch.ones(4 << 20)  # 16 MB
    before = rss()
    del t
print(mapped, before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/statm"), reason="glibc")
def test_large_tensors_are_returned_to_the_system_when_freed():
    """memory.map_large_tensors: a freed 16 MB tensor leaves the resident memory, where glibc's heap keeps it."""
    def freed(mode):
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True)
        mapped, released = out.stdout.split()
        return mapped == "True", int(released)

    mapped, released = freed("mapped")
    if not mapped:
        pytest.skip("not glibc: nothing to tune")
    assert released >= 15 << 20
    assert freed("heap")[1] < 1 << 20  # glibc's default keeps it (what the tuning is for)
