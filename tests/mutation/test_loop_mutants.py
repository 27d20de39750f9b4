"""The settings of a resumed run (train/loop.py's resumed_args), which the tests reach through a CLI child (no
mutant there): which given flags are refused and how each is named, what a resumed run keeps, and its steps."""

from __future__ import annotations

import dataclasses

import pytest

from ventoux.errors import VentouxError
from ventoux.train.finetune import FinetuneArgs
from ventoux.train.loop import resumed_args


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
