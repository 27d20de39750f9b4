"""Datasets of the local test tasks: the JSONL files of tests/data/eval, found from this file, not the cwd."""

import json
from pathlib import Path

import datasets

EVAL = Path(__file__).resolve().parent.parent / "eval"


def _rows(name):
    return [json.loads(line) for line in (EVAL / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def multiple_choice(**_):
    rows = _rows("mc.jsonl")
    for row in rows:  # an answer may be the choice's text (ventoux eval tasks accepts both)
        row["answer"] = row["choices"].index(row["answer"]) if isinstance(row["answer"], str) else row["answer"]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def generation(**_):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows("gen.jsonl"))})


def documents(**_):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows("docs.jsonl"))})
