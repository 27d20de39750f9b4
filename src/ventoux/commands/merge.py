"""`ventoux merge BASE ADAPTER OUT [--dtype]`: fold a LoRA adapter into its base, write an HF checkpoint.

    ventoux merge ./Mistral-7B-v0.3 ./run/adapter ./merged --dtype bfloat16

The adapter is a PEFT folder or mistral-finetune's lora.safetensors (lora_files.py). Each merged weight is
W + scaling * B @ A summed in float32 and rounded once to the output dtype (default: the base's stored one).
"""

from __future__ import annotations

from ..cli import command


def _merge_args(p):
    p.add_argument("base", help="base checkpoint folder or Hugging Face repo id (unquantized)")
    p.add_argument("adapter", help="a PEFT adapter folder or mistral-finetune's lora.safetensors")
    p.add_argument("out", help="output folder for the merged Hugging Face checkpoint")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the base's stored dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


@command("merge", "Merge a LoRA adapter into its base model and write a Hugging Face checkpoint.", _merge_args)
def run_merge(args):
    from ..api import load_model
    from ..config import read_config
    from ..hub import resolve
    from ..lora import merge
    from ..weights import check_output_folder, parse_dtype, save_hf, tokenizer_files

    dtype = parse_dtype(args.dtype) if args.dtype else None  # None keeps the stored dtype
    check_output_folder(args.out, args.overwrite)  # before the (long) load and merge, not only when writing
    folder = resolve(args.base)
    model = load_model(folder, read_config(folder), dtype, "cpu", lora=args.adapter)
    out = save_hf(merge(model), args.out, dtype=dtype, extra_files=tokenizer_files(folder), overwrite=args.overwrite)
    print(f"merged {args.adapter} into {args.base}: {out}")
