"""The training loop (train/loop.py) where mutation testing (mutation/README.md) found it unpinned: the settings of
a resumed run, which the tests reach through a CLI child (no mutant there): which given flags are refused and how
each is named, what it keeps, its steps; the schedule's every value; the clock and token counts in metrics.jsonl
(on a clock the test drives); bf16 autocast when asked on a CPU; the refusals and the missing-picture line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch
from test_finetune import reversals, tiny, tuning_args  # noqa: F401  (tiny: the fixture)
from test_train import _args, corpus  # noqa: F401  (corpus: the fixture)

from ventoux.errors import VentouxError
from ventoux.train import loop
from ventoux.train.finetune import FinetuneArgs, finetune
from ventoux.train.loop import LoopArgs, optimizer, resumed_args, schedule
from ventoux.train.pretrain import pretrain


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


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


def test_metrics_count_tokens_and_the_clock_from_zero(corpus, tmp_path, monkeypatch, capsys):  # noqa: F811
    def clock(call: int) -> float:  # steps of 2.34, 6.34 and 10.34 s, from 10 s
        return 10 + 2 * call**2 + 0.34 * call

    calls = iter(range(10**6))
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock(next(calls)))
    args = _args(corpus, tmp_path / "run", steps=3, log_every=1, eval_every=100, save_every=100)
    pretrain(args, progress=False)
    rows = metrics(tmp_path / "run")
    said = capsys.readouterr().out  # the evaluation at the last step, said as it is logged
    assert re.search(r"^step 3: val_loss \d+\.\d{4}, val_nats_per_char \d+\.\d{4}$", said, re.M), said
    evaluation = rows.pop()
    assert set(evaluation) == {"step", "val_loss", "val_nats_per_char"} and evaluation["step"] == 3
    per_step = 8 * 32  # batch_size x context
    assert [r["tokens"] for r in rows] == [per_step, 2 * per_step, 3 * per_step]
    elapsed = [clock(k) - clock(0) for k in (1, 2, 3)]
    assert [r["elapsed_s"] for r in rows] == [round(e, 1) for e in elapsed] == [2.3, 8.7, 19.0]
    rate = [per_step / elapsed[0]]
    for k in (2, 3):  # the tokens/s shown: a moving average, 0.1 of each new step's
        rate.append(0.9 * rate[-1] + 0.1 * per_step / (clock(k) - clock(k - 1)))
    assert [r["tokens_per_s"] for r in rows] == [round(r) for r in rate]
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * schedule(args)(k) for k in (1, 2, 3)], rel=1e-12)


def test_a_logged_loss_is_the_mean_of_the_steps_since_the_last_row(corpus, tmp_path):  # noqa: F811
    def rows(name, log_every):
        pretrain(_args(corpus, tmp_path / name, steps=3, log_every=log_every, eval_every=100, save_every=100),
                 progress=False)
        return [r for r in metrics(tmp_path / name) if "lr" in r]

    each, every_2 = rows("each", 1), rows("every_2", 2)
    assert [r["step"] for r in every_2] == [2, 3]  # and the last step, always
    assert every_2[0]["loss"] == pytest.approx((each[0]["loss"] + each[1]["loss"]) / 2, rel=1e-9)
    assert every_2[1]["loss"] == pytest.approx(each[2]["loss"], rel=1e-9)


def test_accumulated_micro_batches_train_as_their_whole_batch(tiny, tmp_path):  # noqa: F811
    """Fine-tuning rows (step*A + micro)*B...: 2 micro-batches of 4 are one batch of 8, whose samples have
    different lengths: the step's loss is the mean over all its targets, not the mean of the micro-batches'."""
    data = reversals(tmp_path / "train.jsonl", 16, seed=1)

    def first_row(name, **kw):
        finetune(tuning_args(tiny, data, tmp_path / name, steps=1, log_every=1, **kw), progress=False)
        return metrics(tmp_path / name)[0]

    whole, accumulated = first_row("whole", batch_size=8), first_row("acc", batch_size=4, grad_accum=2)
    assert accumulated["tokens"] == whole["tokens"]
    assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_the_first_logged_loss_is_the_untrained_models_on_its_batch(tiny, tmp_path):  # noqa: F811
    from ventoux.api import load_model
    from ventoux.config import read_config
    from ventoux.lora import LoraConfig, add_adapter
    from ventoux.tokenizer import load_tokenizer
    from ventoux.train.finetune import eval_loss
    from ventoux.train.sft_data import SFTData

    path = reversals(tmp_path / "train.jsonl", 3, seed=1)
    tok = load_tokenizer(tiny)
    finetune(tuning_args(tiny, path, tmp_path / "run", steps=1, batch_size=3, log_every=1), progress=False)
    logged = metrics(tmp_path / "run")[0]["loss"]
    model = add_adapter(load_model(tiny, read_config(tiny), torch.float32, "cpu"), LoraConfig())  # B = 0: the base
    data = SFTData.load([str(path)], tok.mistral, 2048)
    assert logged == pytest.approx(eval_loss(model, data, 3, tok.eos_id), rel=1e-6)  # the batch: all 3 samples


def test_clip_0_means_no_clipping(corpus, tmp_path):  # noqa: F811
    def model_bytes(name, clip):
        return (pretrain(_args(corpus, tmp_path / name, steps=2, clip=clip), progress=False) /
                "model.safetensors").read_bytes()

    off = model_bytes("off", 0.0)
    assert off == model_bytes("huge", 1e9)  # a norm never reached scales by 1: the same bytes
    assert off != model_bytes("tight", 1e-3)


def test_keep_is_how_many_checkpoints_stay(tiny, tmp_path):  # noqa: F811
    data = reversals(tmp_path / "train.jsonl", 8, seed=1)
    finetune(tuning_args(tiny, data, tmp_path / "run", steps=5, batch_size=4, save_every=1, keep=3), progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-0000003", "step-0000004", "step-0000005"]


def test_the_progress_bar_counts_steps_from_where_a_run_resumes(tiny, tmp_path, capsys):  # noqa: F811
    data = reversals(tmp_path / "train.jsonl", 8, seed=1)
    args = tuning_args(tiny, data, tmp_path / "run", steps=6, batch_size=4, save_every=3)
    finetune(args, progress=False)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000006")
    capsys.readouterr()
    finetune(FinetuneArgs(out=str(tmp_path / "run"), resume=True))
    bar = capsys.readouterr().err
    assert " 3/6 " in bar and " 6/6 " in bar and " 1/6 " not in bar, bar
    assert "step/s" in bar or "s/step" in bar
    assert re.search(r"loss=\d+\.\d{3}, tok_s=\d+", bar), bar


def test_bf16_when_asked_trains_under_autocast_on_a_cpu_too(tiny, tmp_path):  # noqa: F811
    data = reversals(tmp_path / "train.jsonl", 8, seed=1)

    def adapter(name, **kw):
        args = tuning_args(tiny, data, tmp_path / name, steps=2, batch_size=4, lr=3e-3, **kw)
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


@pytest.mark.parametrize("setting, value, words", [
    ("seed", -1, "--seed must be at least 0, not -1"),
    ("lr", 0.0, "--lr must be a positive number, e.g. 1e-4, not 0.0"),
    ("dropout", 1.0, "--dropout must be in [0, 1), not 1.0"),
    ("dropout", 1.5, "--dropout must be in [0, 1), not 1.5"),
])
def test_a_setting_out_of_range_is_named_with_its_range(tmp_path, setting, value, words):
    with pytest.raises(VentouxError) as e:
        finetune(FinetuneArgs(data=["unread.jsonl"], out=str(tmp_path / "run"), **{setting: value}), progress=False)
    assert str(e.value) == words


def test_a_finished_run_with_more_checkpoints_kept_is_resumed_from_its_newest(tiny, tmp_path):  # noqa: F811
    data = reversals(tmp_path / "train.jsonl", 8, seed=1)
    args = tuning_args(tiny, data, tmp_path / "run", steps=4, batch_size=4, save_every=1, keep=4, log_every=1)
    finetune(args, progress=False)
    with pytest.raises(VentouxError, match="is at step 4; --steps 4 leaves nothing to train"):
        finetune(FinetuneArgs(out=str(tmp_path / "run"), resume=True), progress=False)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    finetune(FinetuneArgs(out=str(tmp_path / "run"), resume=True), progress=False)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3's row kept, step 4's written once more


def test_sigusr1_asks_for_a_new_picture_in_the_main_thread_only(monkeypatch):
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # never the default (it ends the process)
    try:
        event = loop._on_sigusr1()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert event.is_set()
        elsewhere = []
        thread = threading.Thread(target=lambda: elsewhere.append(loop._on_sigusr1()))
        thread.start()
        thread.join()
        assert not elsewhere[0].is_set()  # signals can only be handled in the main thread: no handler, no error
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_run_asked_for_a_picture_draws_it_once_through_the_bar(tiny, tmp_path, monkeypatch):  # noqa: F811
    asked = threading.Event()
    asked.set()
    monkeypatch.setattr(loop, "_on_sigusr1", lambda: asked)
    drawn = []
    monkeypatch.setattr(loop, "draw_plot", lambda out, say=None: drawn.append((out, say)))
    data = reversals(tmp_path / "train.jsonl", 8, seed=1)
    finetune(tuning_args(tiny, data, tmp_path / "run", steps=3, batch_size=4), progress=False)
    assert len(drawn) == 1 and drawn[0][0] == tmp_path / "run" and drawn[0][1] is not None  # through the bar
    assert not asked.is_set()


def test_a_list_setting_differs_by_its_items(tmp_path, monkeypatch):
    saved = saved_run(tmp_path)
    (tmp_path / "other.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VentouxError, match=r"--data other.jsonl \(the run has "):
        resumed_args(FinetuneArgs(data=["other.jsonl"], out="run"), saved, {"data"}, done=1)


def test_resume_without_a_run_says_both_ways_out(tmp_path):
    with pytest.raises(VentouxError) as e:
        finetune(FinetuneArgs(out=str(tmp_path / "typo"), resume=True), progress=False)
    assert str(e.value) == (f"--resume: {tmp_path / 'typo'} holds no checkpoint to resume; check --out, or drop "
                            "--resume to start a new run")
