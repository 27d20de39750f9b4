#!/bin/sh
# Reproduce the shipped demonstration model (src/ventoux/assets/demo/) from tinyshakespeare.
#   sh scripts/train_demo.sh [CORPUS] [RUN_DIR]
# CORPUS: tinyshakespeare.txt, sha256 86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed
# (the char-rnn data/tinyshakespeare/input.txt). Interrupted? Run it again: it resumes.
set -e
CORPUS=${1:-../shared/corpus/tinyshakespeare.txt}
RUN=${2:-runs/demo}
echo "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed  $CORPUS" | sha256sum -c -
[ -f "$RUN/tokenizer.model" ] || ventoux train-tokenizer --input "$CORPUS" --vocab-size 2048 --val-fraction 0.1 --out "$RUN"
ventoux pretrain --config scripts/demo-config.json --tokenizer "$RUN" --data "$CORPUS" --out "$RUN" \
  --steps 1250 --batch-size 16 --context 256 --lr 2e-3 --min-lr 1e-4 --warmup 100 \
  --weight-decay 0.1 --dropout 0.3 --clip 1.0 --seed 0 --val-fraction 0.1 \
  --eval-every 100 --save-every 100 --keep 3 --resume
[ -d "$RUN/bf16" ] || ventoux convert "$RUN/model" "$RUN/bf16" --format hf --dtype bfloat16   # what src/ventoux/assets/demo holds
python benchmarks/eval_demo.py --model "$RUN/bf16" --corpus "$CORPUS"
