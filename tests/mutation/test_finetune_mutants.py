"""finetune() (train/finetune.py) behaviours that mutation testing (mutation/README.md) found unpinned: an exact
resume in this process (test_finetune.py's kill -9 checkpoint comes from a child, which no mutant reaches), the
settings that reach the model (dtype, quantized base, device), the steps an epoch makes, the flags a resumed run
was given, the progress bar, and every refusal's message whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_finetune import CHAT, reversals, tiny, tiny_checkpoint, tuning_args  # noqa: F401  (tiny: the fixture)

from ventoux.errors import VentouxError
from ventoux.train.finetune import FinetuneArgs, check_data, finetune, model_folder


def adapter_bytes(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()


def args_for(model, data, out, **kw) -> FinetuneArgs:
    return tuning_args(model, data, out, **{"steps": 4, "batch_size": 4, "lr": 3e-3, "warmup": 1, **kw})


def test_a_resume_in_this_process_ends_with_the_uninterrupted_adapter(tiny, tmp_path):  # noqa: F811
    data = reversals(tmp_path / "train.jsonl", 40, seed=1)
    held = reversals(tmp_path / "eval.jsonl", 8, seed=2)
    kw = dict(steps=6, save_every=3, eval_every=3, dropout=0.1, eval_data=[str(held)])
    whole = finetune(args_for(tiny, data, tmp_path / "whole", **kw), progress=False)
    cut = tmp_path / "deep" / "er" / "cut"  # the run folder's parents are made too
    finetune(args_for(tiny, data, cut, **kw), progress=False)
    shutil.rmtree(cut / "checkpoints" / "step-0000006")  # as if killed after step 3's checkpoint
    shutil.rmtree(cut / "adapter")
    resumed = finetune(FinetuneArgs(out=str(cut), resume=True), progress=False)
    assert adapter_bytes(resumed) == adapter_bytes(whole)

    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    held.write_text(held.read_text() * 2)  # the evaluation data changed: refused too
    with pytest.raises(VentouxError) as e:
        finetune(FinetuneArgs(out=str(cut), resume=True), progress=False)
    assert str(e.value) == (f"the data of the run in {cut} changed since it started ({data} {held}); resuming would "
                            "not give the run's adapter: restore the files, or start a new run with another --out")


def test_a_flag_given_on_resume_is_checked_even_at_its_default(tiny, tmp_path):  # noqa: F811
    data = reversals(tmp_path / "train.jsonl", 8, seed=1)
    finetune(args_for(tiny, data, tmp_path / "run", steps=2, save_every=1), progress=False)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000002")
    with pytest.raises(VentouxError, match=r"--lr 0.0001 \(the run has 0.003\)"):  # 1e-4: FinetuneArgs' default
        finetune(FinetuneArgs(out=str(tmp_path / "run"), resume=True), progress=False, given={"resume", "lr"})


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> Path:
    """The tiny model stored in bfloat16: a float32 base (the CPU's default) is not what the file holds."""
    return tiny_checkpoint(tmp_path_factory.mktemp("bf16") / "model", torch.bfloat16)


def test_the_base_is_float32_on_a_cpu_unless_told_and_quantized_when_asked(bf16_model, tmp_path):
    data = reversals(tmp_path / "train.jsonl", 8, seed=1)
    runs = {name: adapter_bytes(finetune(args_for(bf16_model, data, tmp_path / name, steps=2, **kw), progress=False))
            for name, kw in [("default", {}), ("float32", {"dtype": "float32"}), ("bfloat16", {"dtype": "bfloat16"}),
                             ("int8", {"quantize": "int8"})]}
    assert runs["default"] == runs["float32"]
    assert len({runs["float32"], runs["bfloat16"], runs["int8"]}) == 3


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_a_device_this_machine_lacks_is_refused(tiny, tmp_path):  # noqa: F811
    data = reversals(tmp_path / "train.jsonl", 4, seed=1)
    with pytest.raises(VentouxError, match="device 'mps' asked for but MPS is not available here: use --device cpu"):
        finetune(args_for(tiny, data, tmp_path / "run", device="mps"), progress=False)


@pytest.mark.parametrize("epochs, steps", [(None, 3), (1.5, 5), (2, 6)])
def test_without_steps_a_run_is_its_epochs_of_batches(tiny, tmp_path, epochs, steps):  # noqa: F811
    data = reversals(tmp_path / "train.jsonl", 10, seed=1)  # 10 samples, 4 a batch: 3 steps an epoch
    finetune(args_for(tiny, data, tmp_path / "run", steps=None, epochs=epochs), progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[-1] == f"step-{steps:07d}"


def test_the_progress_bar_is_on_by_default(tiny, tmp_path, capsys):  # noqa: F811
    data = reversals(tmp_path / "train.jsonl", 4, seed=1)
    finetune(args_for(tiny, data, tmp_path / "quiet", steps=1), progress=False)
    assert capsys.readouterr().err == ""
    finetune(args_for(tiny, data, tmp_path / "shown", steps=1))
    assert "1/1" in capsys.readouterr().err


def test_refusals_are_whole_sentences(tiny, tmp_path):  # noqa: F811
    def refused(args) -> str:
        with pytest.raises(VentouxError) as e:
            finetune(args, progress=False)
        return str(e.value)

    assert refused(FinetuneArgs(out=str(tmp_path / "a"))) == (
        'no training data: pass --data FILE.jsonl ({"messages": [...]} or {"text": ...})')
    empty = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for path in empty:
        path.write_text("")
    assert refused(FinetuneArgs(model=str(tiny), data=[str(p) for p in empty], out=str(tmp_path / "b"))) == (
        f"{empty[0]}, {empty[1]} holds no samples; give at least one JSON line")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\n" + json.dumps(CHAT) + "\n[]\n")
    bad_eval = tmp_path / "bad_eval.jsonl"
    bad_eval.write_text("nope\n")
    assert refused(FinetuneArgs(model=str(tiny), data=[str(bad)], eval_data=[str(bad_eval)],
                                out=str(tmp_path / "c"))) == (
        "3 bad data lines (listed above with file and line); fix them, then check with --validate-only")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_the_data_report_has_a_line_for_the_evaluation_data_in_its_order(tiny, tmp_path):  # noqa: F811
    from ventoux.tokenizer import load_tokenizer

    mistral = load_tokenizer(tiny).mistral
    data = reversals(tmp_path / "train.jsonl", 12, seed=1)
    held = tmp_path / "eval.jsonl"  # four short samples, then four long: batches of 4 in order need no padding
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a"] * 4 + ["a long sample of text"] * 4))
    reports = [check_data(args_for(tiny, data, tmp_path / "run", eval_data=[str(held)], grad_accum=2, seed=s),
                          mistral)[2] for s in (0, 1, 2)]
    lines = reports[0].split("\n")
    assert len(lines) == 2 and lines[0].startswith("12 samples, ") and "2 steps per epoch" in lines[0]
    assert lines[1].startswith("evaluation data: 8 samples, ")
    assert lines[1].endswith("2 steps per epoch at --batch-size 4 x --accumulate 1, padding 0% of the batch tokens")
    firsts, seconds = zip(*(r.split("\n") for r in reports))
    assert len(set(firsts)) > 1 and len(set(seconds)) == 1  # training's padding is its seed's batches'


def test_a_preset_name_is_its_hub_repository(monkeypatch, tmp_path):
    import ventoux.hub

    asked = []
    monkeypatch.setattr(ventoux.hub, "resolve", lambda source: asked.append(source) or tmp_path)
    assert model_folder("mistral-7b-instruct-v0.2") == tmp_path and model_folder("org/name") == tmp_path
    assert asked == ["mistralai/Mistral-7B-Instruct-v0.2", "org/name"]


@pytest.mark.parametrize("settings, words", [
    ({"steps": 5, "epochs": 2.0}, "give --steps or --epochs, not both"),
    ({"steps": None, "epochs": 0.0}, "--epochs must be a positive number, not 0.0"),
    ({"alpha": 0.0}, "--alpha must be a positive number (the scaling is alpha/rank), not 0.0"),
])
def test_settings_out_of_range_are_named(tmp_path, settings, words):
    with pytest.raises(VentouxError) as e:
        finetune(FinetuneArgs(data=["unread.jsonl"], out=str(tmp_path / "run"), **settings), progress=False)
    assert str(e.value) == words


def test_fractions_of_an_epoch_and_of_alpha_are_fine_and_the_adapter_names_its_base(tmp_path):
    from ventoux.api import DEMO_MODEL

    data = reversals(tmp_path / "train.jsonl", 8, seed=1)  # 8 samples, 4 a batch: half an epoch is one step
    adapter = finetune(FinetuneArgs(data=[str(data)], out=str(tmp_path / "run"), batch_size=4, epochs=0.5, alpha=0.5,
                                    device="cpu"), progress=False)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(DEMO_MODEL) and config["lora_alpha"] == 0.5
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000001"]
