"""`ventoux eval perplexity` and `ventoux eval tasks`: scores on local text and JSONL tasks, as JSON.

    ventoux eval perplexity --model ./Mistral-7B-v0.1 --data wiki.test.txt --context 4096 --stride 2048
    ventoux eval tasks --model ./Mistral-7B-Instruct-v0.3 --tasks mc.jsonl qa.jsonl --chat --out result.json

Inputs are read and checked before the model loads; --out is written whole or not at all. For the
standard benchmarks (MMLU, HellaSwag, ...) use lm-evaluation-harness with the `ventoux` model
(ventoux.eval.lm_eval_backend).
"""

from __future__ import annotations

import json
import sys
import time

from ..cli import add_model_args, command


def _common(p):
    add_model_args(p)
    p.add_argument("--lora", default=None, help="a LoRA adapter folder to apply (PEFT's or mistral-finetune's)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--out", default=None, help="also write the result to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _perplexity_args(p):
    _common(p)
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help='text files (one document each) or .jsonl files (one {"text": ...} document a line)')
    p.add_argument("--context", type=int, default=None,
                   help="tokens the model sees per window (default: the model's context, at most 4096)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: the context, i.e. consecutive windows)")


def _tasks_args(p):
    _common(p)
    p.add_argument("--tasks", nargs="+", required=True, metavar="FILE.jsonl",
                   help='{"question", "choices", "answer"} lines (multiple choice) or {"prompt", "answer"} '
                        "lines (generation)")
    p.add_argument("--chat", action="store_true", help="wrap each question or prompt in the model's chat format")
    p.add_argument("--max-tokens", type=int, default=64, help="generation tasks: most tokens to generate")
    p.add_argument("--stop", action="append", default=None,
                   help="generation tasks: stop string (repeatable; default a newline, none with --chat)")


def _eval_args(p):
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="KIND", help="what to measure")
    _perplexity_args(sub.add_parser("perplexity", help="perplexity and bits per byte of text files"))
    _tasks_args(sub.add_parser("tasks", help="accuracy on local multiple-choice and generation tasks"))


def _load(args):
    from .. import load
    from ..errors import VentouxError

    if args.batch_size < 1:
        raise VentouxError(f"--batch-size {args.batch_size} must be at least 1")
    extra = {"lora": args.lora} if args.lora else {}  # lora= and mmap= are only passed when asked for
    if not args.mmap:
        extra["mmap"] = False
    return load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, **extra)


def _without_samples(result: dict) -> dict:
    """The result as printed: the per-item samples only go to --out."""
    tasks = {name: {k: v for k, v in r.items() if k != "samples"} for name, r in result.get("tasks", {}).items()}
    return {**result, "tasks": tasks} if tasks else result


@command("eval", "Perplexity of text files, or accuracy on local JSONL tasks.", _eval_args)
def run_eval(args):
    from ..errors import VentouxError
    from ..eval.data import check_out, read_documents, write_json_atomic
    from ..eval.perplexity import check_context, perplexity
    from ..eval.tasks import read_tasks, run_task

    progress = not args.quiet
    if args.out:
        check_out(args.out)
    if args.eval_command == "perplexity":
        if args.context is not None:  # before the load; 0 is an error, not "the default"
            check_context(None, args.context)
        if args.stride is not None and args.stride < 1:
            raise VentouxError(f"--stride {args.stride} must be at least 1")
        docs = read_documents(args.data)
        llm = _load(args)
        context = args.context if args.context is not None else min(llm.config.max_seq_len, 4096)
        check_context(llm.config, context)
        t0 = time.perf_counter()
        result = perplexity(llm.model, llm.tokenizer, docs, context, args.stride, args.batch_size, progress)
        print(f"{llm.source}: perplexity {result['perplexity']:.4f}, {result['bits_per_byte']:.4f} bits per byte, "
              f"{result['nats_per_character']:.4f} nats per character over {result['tokens']:,} tokens "
              f"(context {context}, stride {result['stride']}, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    else:
        tasks = read_tasks(args.tasks)
        llm = _load(args)
        stop = args.stop if args.stop is not None else ([] if args.chat else ["\n"])
        result = {"tasks": {}}
        for task in tasks:
            r = run_task(llm, task, args.batch_size, args.chat, args.max_tokens, stop, progress)
            result["tasks"][task.name] = r
            metric = "acc" if task.kind == "multiple_choice" else "exact_match"
            extra = f", acc_norm {r['acc_norm']:.4f}" if metric == "acc" else ""
            print(f"{task.name}: {metric} {r[metric]:.4f}{extra} ({r['n']} items)", file=sys.stderr)
    result = {"model": llm.source, "dtype": str(llm.model.dtype).removeprefix("torch."),
              "quantize": args.quantize, "lora": args.lora, **result}
    if args.out:
        write_json_atomic(result, args.out)
    json.dump(_without_samples(result), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")
