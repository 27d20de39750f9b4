"""`ventoux finetune`, `pretrain`, `train-tokenizer` and `plot` (commands/finetune.py, commands/train.py) where
mutation testing (mutation/README.md, through mutation/fresh_module.sh) found them unpinned: every flag reaching
its setting with its type (the settings dataclass's every field has a flag), what a run is told was given (only
the flags typed: --resume compares those with the run's own), and the closing line. The training itself is
tested in tests/test_train.py and tests/test_finetune.py; here it is replaced by a recorder."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

from ventoux.cli import main
from ventoux.train import FinetuneArgs, TrainArgs

LOOP = {"steps": 7, "batch_size": 2, "grad_accum": 3, "lr": 0.002, "min_lr": 1e-05, "warmup": 4,
        "weight_decay": 0.01, "clip": 0.5, "eval_every": 5, "save_every": 6, "keep": 3, "log_every": 2, "seed": 9,
        "bf16": True, "checkpointing": True, "resume": True, "device": "cpu"}
FINETUNE = {**LOOP, "model": "base", "data": ["a.jsonl", "b.jsonl"], "eval_data": ["e.jsonl"], "rank": 4,
            "alpha": 8.5, "dropout": 0.125, "targets": ("wq", "wv"), "quantize": "int8", "lean_memory": True,
            "dtype": "bfloat16", "seq_len": 128, "epochs": 1.5}
PRETRAIN = {**LOOP, "config": "c.json", "init": "ckpt", "tokenizer": "tok", "data": ["x.txt", "y.jsonl"],
            "context": 64, "dropout": 0.125, "eval_tokens": 1000, "val_fraction": 0.25}


def argv(settings: dict, flags: dict[str, str]) -> list[str]:
    """The command line that asks for `settings` (out apart: each test passes its own)."""
    out = []
    for name, value in settings.items():
        flag = flags.get(name, "--" + name.replace("_", "-"))
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *value]
        else:
            out += [flag, ", ".join(value) + "," if isinstance(value, tuple) else str(value)]
    return out


@pytest.fixture
def runs(monkeypatch, tmp_path):
    """finetune and pretrain replaced by recorders that leave a run folder as the real ones do."""
    seen = []

    def recorder(result):
        def run(settings, progress, given):
            seen.append((settings, progress, given))
            folder = tmp_path / "run"
            (folder / result).mkdir(parents=True, exist_ok=True)
            (folder / "metrics.jsonl").write_text("{}\n")
            return folder / result
        return run

    monkeypatch.setattr(sys.modules["ventoux.train.finetune"], "finetune", recorder("adapter"))
    monkeypatch.setattr("ventoux.train.pretrain", recorder("model"))
    return seen


@pytest.mark.parametrize("command, cls, settings, result", [
    ("finetune", FinetuneArgs, FINETUNE, "adapter (the adapter, PEFT format)"),
    ("pretrain", TrainArgs, PRETRAIN, "model (the model)"),
])
def test_every_setting_has_its_flag_and_type(runs, tmp_path, capsys, command, cls, settings, result):
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields == {*settings, "out"}  # a new setting needs its flag, and a line here
    out = str(tmp_path / "run")
    assert main([command, *argv(settings, cls.FLAGS), "--out", out, "--quiet"]) == 0
    (got, progress, given), = runs
    assert got == cls(**settings, out=out) and progress is False and given == fields
    assert capsys.readouterr().out == (f"wrote {tmp_path / 'run' / result.split()[0]} {result.split(' ', 1)[1]}, "
                                       "with checkpoints/ and metrics.jsonl beside it\n")


@pytest.mark.parametrize("command, cls", [("finetune", FinetuneArgs), ("pretrain", TrainArgs)])
def test_flags_not_typed_are_not_given(runs, tmp_path, command, cls):
    assert main([command, "--out", str(tmp_path / "run"), "--no-bf16"]) == 0
    (got, progress, given), = runs
    assert got == cls(out=str(tmp_path / "run"), bf16=False) and progress is True and given == {"out", "bf16"}


def test_finetune_no_lean_memory_targets_without_blanks_and_m_for_model(runs, tmp_path):
    assert main(["finetune", "-m", "base", "--out", str(tmp_path / "run"), "--no-lean-memory",
                 "--targets", " w1 ,, w2,"]) == 0
    assert runs[0][0].lean_memory is False and runs[0][0].targets == ("w1", "w2") and runs[0][0].model == "base"


def test_finetune_needs_out_unless_it_only_validates(runs, capsys):
    assert main(["finetune", "--data", "a.jsonl"]) == 1
    assert capsys.readouterr().err == ("ventoux: error: pass --out DIR, the run folder (or --validate-only to check "
                                       "the data alone)\n")
    assert runs == []


def test_the_closing_line_names_the_plot_only_when_this_run_drew_it(runs, tmp_path, capsys):
    plot = tmp_path / "run" / "loss.png"
    plot.parent.mkdir()
    plot.write_bytes(b"png")
    os.utime(plot, ns=(1, 1))  # older than the metrics the recorder writes: left from an earlier run
    assert main(["pretrain", "--out", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.endswith(" with checkpoints/ and metrics.jsonl beside it\n")
    metrics = tmp_path / "run" / "metrics.jsonl"
    os.utime(plot, ns=(metrics.stat().st_mtime_ns, metrics.stat().st_mtime_ns))  # drawn as the run ended
    from ventoux.commands.train import beside

    assert beside(tmp_path / "run") == "checkpoints/, metrics.jsonl and loss.png"
    metrics.unlink()
    assert beside(tmp_path / "run") == "checkpoints/ and metrics.jsonl"


def test_train_tokenizer_and_plot_pass_their_arguments(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr("ventoux.train.train_tokenizer", lambda *a: seen.append(a) or tmp_path / "tokenizer.model")
    monkeypatch.setattr("ventoux.train.plot.plot_run", lambda *a: seen.append(a) or tmp_path / "loss.png")
    assert main(["train-tokenizer", "--input", "a.txt", "b.jsonl", "--vocab-size", "300", "--out", "tok"]) == 0
    assert main(["train-tokenizer", "--input", "a.txt", "--vocab-size", "300", "--out", "tok",
                 "--val-fraction", "0.25"]) == 0
    assert main(["plot", "runA"]) == 0
    assert main(["plot", "runA", "runB", "runC", "--out", "c.png"]) == 0
    assert seen == [(["a.txt", "b.jsonl"], 300, "tok", 0.0), (["a.txt"], 300, "tok", 0.25),
                    ("runA", None, []), ("runA", "c.png", ["runB", "runC"])]
    assert capsys.readouterr().out == (f"wrote {tmp_path / 'tokenizer.model'}\n" * 2
                                       + f"wrote {tmp_path / 'loss.png'}\n" * 2)


def test_validate_only_checks_both_files_and_the_settings_without_training(runs, tmp_path, capsys):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"text": "Hello there."}\n' * 4)
    bad.write_text('{"text": "Hello there."}\n{"txet": "a typo"}\n')
    check = ["finetune", "--data", str(good), "--batch-size", "2", "--validate-only"]
    assert main(check) == 0
    assert capsys.readouterr().out.startswith("4 samples, ")
    assert main([*check, "--eval-data", str(good)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("evaluation data: 4 samples, ")
    assert main([*check, "--eval-data", str(bad)]) == 1  # a bad evaluation line fails the check too
    assert f"{bad}:2: " in capsys.readouterr().out
    assert main(["finetune", "--data", str(bad), "--validate-only"]) == 1
    assert main([*check, "--batch-size", "0"]) == 1  # the settings first: the report divides by it
    assert capsys.readouterr().err == "ventoux: error: --batch-size must be at least 1, not 0\n"
    assert runs == []


@pytest.mark.parametrize("command, flag", [("train-tokenizer", "--input"), ("train-tokenizer", "--vocab-size"),
                                           ("train-tokenizer", "--out"), ("pretrain", "--out")])
def test_required_flags(runs, capsys, command, flag):
    given = {"train-tokenizer": {"--input": ["a.txt"], "--vocab-size": ["300"], "--out": ["tok"]},
             "pretrain": {"--out": ["run"], "--steps": ["5"]}}[command]
    argv = [part for name, values in given.items() if name != flag for part in (name, *values)]
    with pytest.raises(SystemExit) as e:
        main([command, *argv])
    assert e.value.code == 2 and f"the following arguments are required: {flag}" in capsys.readouterr().err
    assert runs == []
