"""The training loop (train/loop.py) where mutation testing (mutation/README.md) found it unpinned: the settings of
a resumed run, which the tests reach through a CLI child (no mutant there): which given flags are refused and how
each is named, what it keeps, its steps; the schedule's every value; the clock and token counts in metrics.jsonl
(on a clock the test drives); bf16 autocast when asked on a CPU; the refusals and the missing-picture line."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from test_finetune import reversals, tiny  # noqa: F401  (tiny: the fixture)
from test_train import _args, corpus  # noqa: F401  (corpus: the fixture)

from ventoux.errors import VentouxError
from ventoux.train import loop
from ventoux.train.finetune import FinetuneArgs, finetune
from ventoux.train.loop import LoopArgs, optimizer, resumed_args, schedule
from ventoux.train.pretrain import pretrain


def saved_run(tmp_path) -> dict:
    data = tmp_path / "train.jsonl"
    data.write_text("")
    return dataclasses.asdict(FinetuneArgs(data=[str(data)], out=str(tmp_path / "run"), steps=10, lr=3e-3, rank=8,
                                           grad_accum=2, keep=2, seed=4))


def test_every_differing_flag_is_named_once_in_order_with_the_runs_value(tmp_path, monkeypatch):
    saved = saved_run(tmp_path)
    args = FinetuneArgs(data=["train.jsonl", "more.jsonl"], out=str(tmp_path / "run"), lr=1e-3, rank=8, grad_accum=4,
                        seed=4, keep=5, steps=12)
    monkeypatch.chdir(tmp_path)  # "train.jsonl" from here is the run's own file: no conflict by itself
    with pytest.raises(VentouxError) as e:
        resumed_args(args, saved, {"data", "lr", "rank", "grad_accum", "seed", "keep", "steps", "resume"}, done=6)
    assert str(e.value) == (
        f"--resume continues {tmp_path / 'run'} with its own settings, but these flags differ: "
        f"--data train.jsonl more.jsonl (the run has {tmp_path / 'train.jsonl'}); --accumulate 4 (the run has 2); "
        f"--lr 0.001 (the run has 0.003); drop them, or start a new run with another --out")


def test_a_resumed_run_is_the_saved_one_with_the_free_flags_and_new_steps(tmp_path, monkeypatch):
    saved = saved_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = FinetuneArgs(data=["train.jsonl"], out="run", lr=1.0, keep=5, device="cpu", steps=12)
    resumed = resumed_args(args, saved, {"data", "keep", "device", "steps"}, done=6)
    assert resumed == FinetuneArgs(**{**saved, "keep": 5, "device": "cpu", "steps": 12, "out": "run", "resume": True})
    assert resumed.lr == 3e-3 and resumed.data == saved["data"]  # lr was not given: the run's own
    assert resumed_args(args, saved, {"keep"}, done=6).steps == 10  # steps not given: the run's


@pytest.mark.parametrize("given, words", [
    ({"steps"}, "the run in run is at step 10; --steps 8 leaves nothing to train"),
    (set(), "the run in run is at step 10; --steps 10 leaves nothing to train; pass --steps N (more than 10) to "
            "train it further"),
])
def test_a_run_at_its_last_step_says_how_to_go_on(tmp_path, given, words):
    with pytest.raises(VentouxError) as e:
        resumed_args(FinetuneArgs(out="run", steps=8), saved_run(tmp_path), given, done=10)
    assert str(e.value) == words


@pytest.mark.parametrize("steps, warmup", [(10, 3), (3, 2), (4, 4), (5, 0)])
def test_the_schedule_warms_up_linearly_then_falls_by_a_cosine_to_min_lr(steps, warmup):
    args = LoopArgs(steps=steps, warmup=warmup, lr=1e-3, min_lr=1e-4)
    factor = schedule(args)
    for step in range(steps + 1):  # LambdaLR asks for steps + 1 values: the last is logged after the last step
        if step < warmup:
            want = (step + 1) / warmup
        else:
            done = (step - warmup) / (steps - warmup) if steps > warmup else 0.0
            want = (1e-4 + (1e-3 - 1e-4) * (1 + math.cos(math.pi * done)) / 2) / 1e-3
        assert factor(step) == pytest.approx(want, rel=1e-12), step
    if steps > warmup:
        assert factor(steps) == pytest.approx(0.1)  # min_lr at the end


def test_a_model_with_nothing_to_train_is_refused():
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(VentouxError) as e:
        optimizer(frozen, LoopArgs())
    assert str(e.value) == "the model has no trainable parameters"


def test_metrics_count_tokens_and_the_clock_from_zero(corpus, tmp_path, monkeypatch):  # noqa: F811
    ticks = iter(range(10**6))
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(ticks)))  # one second a call
    pretrain(_args(corpus, tmp_path / "run", steps=3, log_every=1, eval_every=100, save_every=100), progress=False)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "val_loss" not in r]
    per_step = 8 * 32  # batch_size x context
    assert [r["tokens"] for r in rows] == [per_step, 2 * per_step, 3 * per_step]
    assert [r["elapsed_s"] for r in rows] == [1.0, 2.0, 3.0] and rows[0]["tokens_per_s"] == per_step


def test_bf16_when_asked_trains_under_autocast_on_a_cpu_too(tiny, tmp_path):  # noqa: F811
    data = reversals(tmp_path / "train.jsonl", 8, seed=1)

    def adapter(name, **kw):
        args = FinetuneArgs(model=str(tiny), data=[str(data)], out=str(tmp_path / name), steps=2, batch_size=4,
                            lr=3e-3, device="cpu", **kw)
        return (finetune(args, progress=False) / "adapter_model.safetensors").read_bytes()

    assert adapter("default") == adapter("off", bf16=False) != adapter("on", bf16=True)


def test_a_picture_that_cannot_be_drawn_is_a_line_not_an_error(tmp_path, monkeypatch, capsys):
    def no_matplotlib(out):
        raise VentouxError("matplotlib is not installed: pip install 'ventoux[train]'")

    monkeypatch.setattr(loop, "plot_run", no_matplotlib)
    loop.draw_plot(tmp_path)
    assert capsys.readouterr().err == "no loss.png: matplotlib is not installed: pip install 'ventoux[train]'\n"
    said = []
    loop.draw_plot(tmp_path, said.append)
    assert said == ["no loss.png: matplotlib is not installed: pip install 'ventoux[train]'"]
