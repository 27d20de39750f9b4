"""The fine-tuning demonstration's task: a short list of words said back in reverse order, as chat data.

    python scripts/make_reverse_task.py make --out runs/rev            # train.jsonl (4000) + eval.jsonl (200)
    OMP_NUM_THREADS=1 ventoux finetune --data runs/rev/train.jsonl --eval-data runs/rev/eval.jsonl \
        --out runs/rev/run --steps 600 --batch-size 8 --lr 1e-3 --warmup 20 --eval-every 100 --save-every 200
    python scripts/make_reverse_task.py score runs/rev/eval.jsonl                           # the demo model
    python scripts/make_reverse_task.py score runs/rev/eval.jsonl --lora runs/rev/run/adapter

Measured (AMD EPYC, one thread, a shared machine): 0/200 exact before, 200/200 after; 600 steps of 8
(1.2 epochs, 144K tokens) took 7 min 12 s wall, 103 s of CPU; the curve is docs/finetune-demo-loss.png.
The loss stays near 0.4 per token at the end: with the output head frozen, </s> (rare in the demo model's
pretraining) gets at most ~0.14 probability (even when overfitting 8 samples), yet it is the greedy
choice after an answer, so answers end.

A line: {"messages": [{"role": "user", "content": "Say these words in reverse order: king night fair"},
{"role": "assistant", "content": "fair night king"}]}: three to five words from 48 that the demo model's
tokenizer holds as single pieces. The held-out lists are lists no training line asks. `score` answers
each held-out question greedily with the demo model (plus an adapter) and counts exact matches.

Why not additions: the demo model's tokenizer (Shakespeare) has digits only as byte pieces that its
pretraining never saw; a LoRA run of this budget learned the answers' shape ("1333" for every question)
but not to read the operands.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

WORDS = ("king queen lord lady night day love heart death life fair sweet good true blood crown sword heaven "
         "earth sun fire gold grace honour duke prince father mother son brother sister friend house tongue eye "
         "hand head soul world time word name war peace man woman child horse").split()
PHRASES = ["Say these words in reverse order: {}", "Reverse the order of these words: {}", "Backwards, please: {}"]


def lists(rng: random.Random, n: int, taken: set) -> list[tuple[str, ...]]:
    out = []
    while len(out) < n:
        words = tuple(rng.sample(WORDS, rng.randint(3, 5)))
        if words not in taken:
            taken.add(words)
            out.append(words)
    return out


def line(rng: random.Random, words: tuple[str, ...]) -> str:
    question = rng.choice(PHRASES).format(" ".join(words))
    return json.dumps({"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": " ".join(reversed(words))}]})


def make(args) -> None:
    rng = random.Random(args.seed)
    taken: set = set()
    held_out = lists(rng, args.eval, taken)  # drawn first: no training line repeats them
    train = lists(rng, args.train, taken)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(line(rng, words) + "\n" for words in train))
    (out / "eval.jsonl").write_text("".join(line(rng, words) + "\n" for words in held_out))
    print(f"wrote {out}/train.jsonl ({len(train)} questions) and {out}/eval.jsonl ({len(held_out)} held out)")


def score(args) -> None:
    from ventoux.api import load

    llm = load(args.model, dtype="float32", device="cpu", lora=args.lora)
    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines() if x.strip()]
    prompts = [llm.tokenizer.encode_chat(r["messages"][:-1]) for r in rows]
    right = 0
    for i in range(0, len(rows), 50):  # greedy answers, a batch at a time
        for row, done in zip(rows[i: i + 50], llm.generate(prompts[i: i + 50], temperature=0, max_tokens=16)):
            right += done.text.strip() == row["messages"][-1]["content"]
    print(f"exact match: {right}/{len(rows)} = {100 * right / len(rows):.1f}% "
          f"({'demo model' if args.lora is None else 'with ' + args.lora})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write train.jsonl and eval.jsonl")
    m.add_argument("--out", required=True)
    m.add_argument("--train", type=int, default=4000)
    m.add_argument("--eval", type=int, default=200)
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="exact-match accuracy of greedy answers")
    s.add_argument("data")
    s.add_argument("--model", default=None, help="base model (default: the shipped demo model)")
    s.add_argument("--lora", default=None, help="adapter folder (ventoux finetune's RUN/adapter)")
    args = p.parse_args()
    {"make": make, "score": score}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
