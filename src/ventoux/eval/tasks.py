"""Local JSONL tasks: multiple choice by log-likelihood, and generation by greedy exact match.

    tasks = read_tasks(["mc.jsonl", "qa.jsonl"])   # named "mc" and "qa" (by path if two stems are alike)
    results = {t.name: run_task(llm, t, batch_size=8, chat=False) for t in tasks}

Multiple choice, a line {"question": ..., "choices": [...], "answer": index or choice text}: each
choice is scored as the continuation of the question (joined by a space, as lm-eval's target
delimiter), acc takes the most likely choice and acc_norm the most likely per character (lm-eval's
acc_norm). Generation, a line {"prompt": ..., "answer": ...}: the greedy continuation up to a stop
string, exact match after stripping whitespace. With chat=True the question or prompt is one user turn
of the model's chat format and the choices or the answer follow the assistant marker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import VentouxError
from . import data
from .scoring import score


@dataclass
class Task:
    name: str
    path: str
    kind: str  # "multiple_choice" or "generation"
    items: list[dict] = field(default_factory=list)  # {"line", "question"/"prompt", "choices", "answer"}


def read_task(path: str | Path) -> Task:
    """Reads and checks a task file; its kind is the first line's: "choices" makes it multiple choice."""
    rows = data.read_jsonl(path)  # at least one: read_file refuses a blank file
    kind = "multiple_choice" if "choices" in rows[0][1] else "generation"
    task = Task(Path(path).stem, str(path), kind)
    for n, obj in rows:
        if kind == "generation":
            hint = ': a generation line is {"prompt": "...", "answer": "..."}'
            task.items.append({"line": n, "prompt": data.field(path, n, obj, "prompt", hint=hint),
                               "answer": data.field(path, n, obj, "answer", hint=hint)})
            continue
        hint = ': a multiple-choice line is {"question": "...", "choices": ["...", ...], "answer": 0}'
        question = data.field(path, n, obj, "question", hint=hint)
        choices = data.field(path, n, obj, "choices", list, hint=hint)
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise VentouxError(f'{path}:{n}: field "choices" must list at least two non-empty strings')
        answer = data.field(path, n, obj, "answer", (int, str), hint=hint)
        if isinstance(answer, str):
            if answer not in choices:
                raise VentouxError(f'{path}:{n}: field "answer" {answer!r} is not one of the choices')
            answer = choices.index(answer)
        elif not 0 <= answer < len(choices):
            raise VentouxError(f'{path}:{n}: field "answer" {answer} is not a choice index (0 to {len(choices) - 1})')
        task.items.append({"line": n, "question": question, "choices": choices, "answer": answer})
    return task


def read_tasks(paths: list[str | Path]) -> list[Task]:
    """read_task of each file. A task is named by its file's stem, unless two files share a stem: those are
    named by their paths as given (as perplexity names its files), so no result overwrites another."""
    resolved = [Path(p).resolve() for p in paths]
    for i, path in enumerate(paths):
        if resolved.index(resolved[i]) != i:
            raise VentouxError(f"--tasks names the file {path} twice: give each file once")
    tasks = [read_task(path) for path in paths]
    stems = [t.name for t in tasks]
    for task in tasks:
        if stems.count(task.name) > 1:
            task.name = task.path
    return tasks


def encode_pair(tokenizer, context: str, continuation: str, chat: bool) -> tuple[list[int], list[int]]:
    """Context and continuation ids, split as lm-eval does: encode the whole text and the context, the
    continuation is what the whole adds (a trailing space of the context moves to the continuation)."""
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": context}]), tokenizer.encode(continuation, bos=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tokenizer.encode(context, bos=True)
    whole = tokenizer.encode(context + continuation, bos=True)
    return ctx, whole[len(ctx):]


def check_fits(config, task: Task, item: dict, n_tokens: int) -> None:
    if config.sliding_window is None and n_tokens > config.max_seq_len:
        raise VentouxError(f"{task.path}:{item['line']}: {n_tokens} tokens, longer than the model's context of "
                           f"{config.max_seq_len} tokens (full attention): shorten that line")


def multiple_choice(llm, task: Task, batch_size: int, chat: bool, progress: bool) -> dict:
    requests, owners = [], []
    for i, item in enumerate(task.items):
        for choice in item["choices"]:  # after a chat prompt the answer starts the assistant turn: no space
            ctx, cont = encode_pair(llm.tokenizer, item["question"], choice if chat else " " + choice, chat)
            check_fits(llm.config, task, item, len(ctx) + len(cont) - 1)
            requests.append((ctx + cont, len(cont)))
            owners.append(i)
    scores = score(llm.model, requests, batch_size, progress=progress, desc=task.name)
    samples = [{"line": item["line"], "answer": item["answer"], "logprobs": []} for item in task.items]
    for i, (logprob, _) in zip(owners, scores):
        samples[i]["logprobs"].append(logprob)
    for sample, item in zip(samples, task.items):
        lp = sample["logprobs"]
        per_char = [x / len(c) for x, c in zip(lp, item["choices"])]
        sample["pred"] = max(range(len(lp)), key=lp.__getitem__)
        sample["pred_norm"] = max(range(len(lp)), key=per_char.__getitem__)
    n = len(samples)
    return {"kind": task.kind, "n": n, "acc": sum(s["pred"] == s["answer"] for s in samples) / n,
            "acc_norm": sum(s["pred_norm"] == s["answer"] for s in samples) / n, "samples": samples}


def generation(llm, task: Task, batch_size: int, chat: bool, max_tokens: int, stop: list[str] | None,
               progress: bool) -> dict:
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": item["prompt"]}]) if chat
               else llm.tokenizer.encode(item["prompt"], bos=True) for item in task.items]
    for item, ids in zip(task.items, prompts):
        check_fits(llm.config, task, item, len(ids) + 1)
    texts = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=task.name, disable=not progress, unit="batch"):
        done = llm.generate(prompts[start: start + batch_size], max_tokens=max_tokens, temperature=0.0,
                            stop=stop or None)
        texts += [c.text for c in done]
    samples = [{"line": item["line"], "answer": item["answer"], "output": text,
                "exact_match": text.strip() == item["answer"].strip()} for item, text in zip(task.items, texts)]
    return {"kind": task.kind, "n": len(samples), "exact_match": sum(s["exact_match"] for s in samples) / len(samples),
            "samples": samples}


def run_task(llm, task: Task, batch_size: int = 8, chat: bool = False, max_tokens: int = 64,
             stop: list[str] | None = None, progress: bool = False) -> dict:
    if task.kind == "multiple_choice":
        return multiple_choice(llm, task, batch_size, chat, progress)
    return generation(llm, task, batch_size, chat, max_tokens, stop, progress)
