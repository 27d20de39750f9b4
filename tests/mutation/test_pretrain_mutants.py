"""Pretraining's set-up (train/pretrain.py) behaviours that mutation testing (mutation/README.md) found unpinned:
each way of naming the architecture (a preset, a config.json, a checkpoint folder), every refusal's message whole
(the CLI prints them as they are), and dropout that is off outside training."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import error_message

from ventoux.api import DEMO_MODEL
from ventoux.config import PRESETS, ModelConfig, read_config
from ventoux.errors import VentouxError
from ventoux.model import Transformer
from ventoux.train import TrainArgs, pretrain
from ventoux.train.pretrain import add_dropout, resolve_config

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=320, sliding_window=8,
                  max_seq_len=32)


_message = functools.partial(error_message, VentouxError)


def test_each_way_of_naming_the_architecture(tmp_path):
    preset = resolve_config(TrainArgs(config="mistral-7b-v0.3", context=64), 32768)
    assert preset == PRESETS["mistral-7b-v0.3"].config.replace(max_seq_len=64)
    assert resolve_config(TrainArgs(config=str(DEMO_MODEL), context=48), 10) == \
        read_config(DEMO_MODEL).replace(max_seq_len=48)
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf()))
    assert resolve_config(TrainArgs(config=str(tmp_path / "config.json"), context=16), 320) == \
        CFG.replace(max_seq_len=16)  # a vocabulary exactly the tokenizer's size fits


def test_every_refusal_of_the_architecture_whole(tmp_path):
    missing = tmp_path / "missing"
    assert _message(lambda: resolve_config(TrainArgs(init=str(missing)), 320)) == (
        f"--init {missing} is not a folder; point at a checkpoint folder (config.json + model.safetensors)")
    assert _message(lambda: resolve_config(TrainArgs(), 320)) == (
        "pass --config (a preset name or config.json) or --init (a checkpoint folder)")
    broken = tmp_path / "broken.json"
    broken.write_text('{"dim": ')
    assert _message(lambda: resolve_config(TrainArgs(config=str(broken)), 320)) == (
        f"{broken} is not valid JSON (Expecting value); give an HF config.json")
    binary = tmp_path / "garbage.bin"
    binary.write_bytes(bytes(range(256)))
    assert _message(lambda: resolve_config(TrainArgs(config=str(binary)), 320)) == (
        f"--config {binary} is not a JSON config (not text); give an HF config.json, a preset name or a checkpoint "
        "folder")
    assert _message(lambda: resolve_config(TrainArgs(config="mistral-8b"), 320)) == (
        f"--config mistral-8b is neither a preset ({', '.join(PRESETS)}) nor a file or folder")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf()))
    assert _message(lambda: resolve_config(TrainArgs(config=str(tmp_path / "config.json")), 321)) == (
        "the config's vocab_size 320 is smaller than the tokenizer's 321 pieces; set vocab_size to at least that in "
        "the config")


def test_a_run_without_a_tokenizer_is_refused_whole(tmp_path):
    args = TrainArgs(config=str(DEMO_MODEL), data=[str(tmp_path / "t.txt")], out=str(tmp_path / "run"))
    assert _message(lambda: pretrain(args, progress=False)) == (
        "pass --tokenizer DIR (a folder with tokenizer.model; see `ventoux train-tokenizer`)")
    assert not (tmp_path / "run").exists()


def test_dropout_is_off_outside_training():
    torch.manual_seed(0)
    model = Transformer(CFG)
    tokens = torch.randint(0, CFG.vocab_size, (2, 12))
    model.eval()
    with torch.no_grad():
        plain = model(tokens)
        add_dropout(model, 0.5)
        assert torch.equal(model(tokens), plain)
        model.train()
        assert not torch.allclose(model(tokens), plain)


def test_nats_per_char_takes_a_folder_a_file_or_a_processor():
    import sentencepiece as spm
    import torch.nn.functional as F

    from ventoux.train.evaluate import nats_per_char
    from ventoux.weights import load_model

    model = load_model(DEMO_MODEL, read_config(DEMO_MODEL), torch.float32, torch.device("cpu")).eval()
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_MODEL / "tokenizer.model"))
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings. " * 2
    ids = torch.tensor([sp.bos_id(), *sp.encode(text)])
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 24):  # consecutive segments of the context
            target = ids[start + 1: start + 25]
            total += F.cross_entropy(model(ids[start: start + len(target)][None])[0], target, reduction="sum").item()
        assert len(ids) > 2 * 24 + 1
        for tokenizer in (DEMO_MODEL, DEMO_MODEL / "tokenizer.model", sp):
            assert nats_per_char(model, tokenizer, text, context=24) == pytest.approx(total / len(text), rel=1e-5)


# ---- runs on the demo model's tokenizer: a 2-step run of a tiny model ------------------------------------------
VOCAB = read_config(DEMO_MODEL).vocab_size


def _text(path, lines=300):
    path.write_text("".join(f"Line {i}: the king, my lord, and the fair night {i % 7}.\n" for i in range(lines)))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "config.json").write_text(json.dumps(CFG.replace(vocab_size=VOCAB).to_hf()))
    return root, _text(root / "text.txt")


def _run(inputs, out, **kw) -> TrainArgs:
    root, text = inputs
    base = dict(config=str(root / "config.json"), tokenizer=str(DEMO_MODEL), data=[str(text)], out=str(out), steps=2,
                batch_size=4, context=16, lr=1e-3, warmup=0, eval_every=2, save_every=2, log_every=1, device="cpu")
    return TrainArgs(**{**base, **kw})


def _rows(out):
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]


def _heldout_loss(out, n_tokens=None):
    """The summed loss of the held-out tokens (the first n_tokens + 1 of them) under the run's final model, in
    consecutive segments of the context, computed here from the token cache the run wrote."""
    import numpy as np
    import torch.nn.functional as F

    from ventoux.weights import load_model

    meta = json.loads((out / "data" / "meta.json").read_text())
    val = torch.from_numpy(np.fromfile(out / "data" / "val.bin", dtype=meta["dtype"]).astype(np.int64))
    val = val[: n_tokens + 1] if n_tokens else val
    model = load_model(out / "model", read_config(out / "model"), torch.float32, torch.device("cpu")).eval()
    total, context = 0.0, 16
    with torch.no_grad():
        for start in range(0, len(val) - 1, context):
            target = val[start + 1: start + context + 1]
            logits = model(val[start: start + len(target)][None])[0]
            total += F.cross_entropy(logits, target, reduction="sum").item()
    return total, len(val) - 1, meta["val_chars"]


def test_validation_scores_the_heldout_tokens_of_the_final_model(inputs, tmp_path):
    whole = tmp_path / "whole"
    pretrain(_run(inputs, whole), progress=False)
    last = [r for r in _rows(whole) if "val_loss" in r][-1]
    total, n, chars = _heldout_loss(whole)
    assert last["step"] == 2 and n > 16  # more than one segment
    assert last["val_loss"] == pytest.approx(total / n, rel=1e-4)
    assert last["val_nats_per_char"] == pytest.approx(total / chars, rel=1e-4)

    capped = tmp_path / "capped"  # --eval-tokens below the split: a per-token figure only
    pretrain(_run(inputs, capped, eval_tokens=20), progress=False)
    last = [r for r in _rows(capped) if "val_loss" in r][-1]
    total, n, _ = _heldout_loss(capped, 20)
    assert n == 20 and last["val_loss"] == pytest.approx(total / n, rel=1e-4) and "val_nats_per_char" not in last


def test_the_readmes_flow_a_tokenizer_in_the_run_folder_and_one_given_as_a_file(inputs, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"  # `ventoux train-tokenizer --out run` then `ventoux pretrain --tokenizer run --out run`
    run.mkdir()
    shutil.copyfile(DEMO_MODEL / "tokenizer.model", run / "tokenizer.model")
    pretrain(_run(inputs, run, tokenizer=str(run)))
    assert "2/2" in capsys.readouterr().err  # the progress bar, shown unless asked not to
    assert (run / "model" / "tokenizer.model").read_bytes() == (DEMO_MODEL / "tokenizer.model").read_bytes()
    pretrain(_run(inputs, tmp_path / "file", tokenizer=str(DEMO_MODEL / "tokenizer.model")), progress=False)
    assert (tmp_path / "file" / "model" / "model.safetensors").is_file()
    assert capsys.readouterr().err == ""


def test_tokenizer_refusals_whole(inputs, tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "nothing"
    assert _message(lambda: pretrain(_run(inputs, out, tokenizer=str(missing)), progress=False)) == (
        f"{missing} does not exist; train one with `ventoux train-tokenizer` or fix --tokenizer")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    assert _message(lambda: pretrain(_run(inputs, out, tokenizer=str(garbage)), progress=False)) == (
        f"{garbage} is not a SentencePiece model; train one with `ventoux train-tokenizer`")
    assert not out.exists()


def test_refusals_come_before_anything_is_written(inputs, tmp_path):
    out = tmp_path / "run"
    bare = tmp_path / "bare"  # a config and no weights
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(CFG.replace(vocab_size=VOCAB).to_hf()))
    with pytest.raises(VentouxError, match=f"^{bare} has no weights: expected model.safetensors"):
        pretrain(_run(inputs, out, config=None, init=str(bare)), progress=False)
    if not torch.backends.mps.is_available():
        assert _message(lambda: pretrain(_run(inputs, out, device="mps"), progress=False)) == (
            "device 'mps' asked for but MPS is not available here: use --device cpu")
    assert not out.exists()


def test_init_trains_in_float32_whatever_the_checkpoints_dtype(inputs, tmp_path):
    from ventoux.weights import save_hf

    torch.manual_seed(0)
    model = Transformer(CFG.replace(vocab_size=VOCAB)).to(torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float32):  # the same values, stored two ways
        save_hf(model, tmp_path / str(dtype), dtype=dtype)
        pretrain(_run(inputs, tmp_path / f"run-{dtype}", config=None, init=str(tmp_path / str(dtype))), progress=False)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / f"run-{d}" / "model" / "model.safetensors") for d in (torch.bfloat16, torch.float32))
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)


def test_a_resumed_run_needs_only_its_folder_and_honours_explicit_flags(inputs, tmp_path):
    root, text = inputs
    config = tmp_path / "config.json"
    config.write_text((root / "config.json").read_text())
    run = tmp_path / "run"
    pretrain(_run(inputs, run, config=str(config), lr=3e-3), progress=False)
    config.unlink()  # the architecture comes from the checkpoint
    (run / "checkpoints" / ".tmp-step-0000003").mkdir()  # what a process killed mid-save leaves
    (run / "checkpoints" / ".state").write_text("")
    # --lr 1e-3 given on the command line is a conflict, though it equals the default
    assert "--lr 0.001 (the run has 0.003)" in _message(lambda: pretrain(
        TrainArgs(out=str(run), resume=True, steps=4, lr=1e-3), progress=False,
        given={"out", "resume", "steps", "lr"}))
    pretrain(TrainArgs(out=str(run), resume=True, steps=4), progress=False)
    assert [r["step"] for r in _rows(run) if "loss" in r] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


class _Payload:
    """Unpickling this touches a file: what a hostile trainer.pt could do instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_hostile_or_damaged_trainer_state_is_refused(inputs, tmp_path):
    from ventoux.train.checkpoint import checkpoints

    run = tmp_path / "run"
    pretrain(_run(inputs, run), progress=False)
    state = run / "checkpoints" / "step-0000002" / "trainer.pt"
    marker = tmp_path / "ran"
    torch.save({"args": _Payload(marker)}, state)
    expected = (f"{state} is not a trainer state ventoux wrote (damaged, or holding more than tensors); delete "
                f"{state.parent} to resume from the checkpoint before it")
    assert _message(lambda: pretrain(TrainArgs(out=str(run), resume=True, steps=4), progress=False)) == expected
    assert not marker.exists()
    state.write_bytes(b"PK\x03\x04 cut short")
    assert _message(lambda: pretrain(TrainArgs(out=str(run), resume=True, steps=4), progress=False)) == expected

    (run / "checkpoints" / "step-0000009").mkdir()  # no trainer.pt: not a checkpoint
    (run / "checkpoints" / "backup").mkdir()
    (run / "checkpoints" / "backup" / "trainer.pt").write_bytes(b"")
    assert checkpoints(run) == [state.parent]
