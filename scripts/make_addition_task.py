"""The fine-tuning demonstration's task: additions of two- and three-digit numbers asked in words, as chat data.

    python scripts/make_addition_task.py make --out runs/add            # train.jsonl (4000) + eval.jsonl (200)
    ventoux finetune --data runs/add/train.jsonl --eval-data runs/add/eval.jsonl --out runs/add/run ...
    python scripts/make_addition_task.py score runs/add/eval.jsonl                           # the demo model
    python scripts/make_addition_task.py score runs/add/eval.jsonl --lora runs/add/run/adapter

A line: {"messages": [{"role": "user", "content": "What is 347 plus 58?"}, {"role": "assistant", "content": "405"}]}.
The held-out questions are pairs that no training line asks (in either order). `score` answers each
held-out question greedily with the demo model (plus an adapter) and counts exact matches.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

PHRASES = ["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} + {b}?", "Compute the sum of {a} and {b}."]


def pairs(rng: random.Random, n: int, taken: set) -> list[tuple[int, int]]:
    out = []
    while len(out) < n:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        if (a, b) not in taken and (b, a) not in taken:
            taken.add((a, b))
            out.append((a, b))
    return out


def line(rng: random.Random, a: int, b: int) -> str:
    question = rng.choice(PHRASES).format(a=a, b=b)
    return json.dumps({"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": str(a + b)}]})


def make(args) -> None:
    rng = random.Random(args.seed)
    taken: set = set()
    held_out = pairs(rng, args.eval, taken)  # drawn first: no training pair repeats them
    train = pairs(rng, args.train, taken)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(line(rng, a, b) + "\n" for a, b in train))
    (out / "eval.jsonl").write_text("".join(line(rng, a, b) + "\n" for a, b in held_out))
    print(f"wrote {out}/train.jsonl ({len(train)} questions) and {out}/eval.jsonl ({len(held_out)} held out)")


def score(args) -> None:
    import ventoux

    llm = ventoux.load(args.model, dtype="float32", device="cpu", lora=args.lora)
    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines() if x.strip()]
    prompts = [llm.tokenizer.encode_chat(r["messages"][:-1]) for r in rows]
    right = 0
    for i in range(0, len(rows), 50):  # greedy answers, a batch at a time
        for row, done in zip(rows[i: i + 50], llm.generate(prompts[i: i + 50], temperature=0, max_tokens=8)):
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
