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
# phase 1: 1,250 steps of 16 sequences of 256 tokens
ventoux pretrain --config scripts/demo-config.json --tokenizer "$RUN" --data "$CORPUS" --out "$RUN" \
  --steps 1250 --batch-size 16 --context 256 --lr 2e-3 --min-lr 1e-4 --warmup 100 \
  --weight-decay 0.1 --dropout 0.3 --clip 1.0 --seed 0 --val-fraction 0.1 \
  --eval-every 100 --save-every 100 --keep 3 --resume
# phase 2: 100 steps on 2 sequences of 2048 tokens (the same tokens per step), the learning rate decaying
# from phase 1's last value: the model learns to use a longer context (the window stays 128)
ventoux pretrain --init "$RUN/model" --tokenizer "$RUN" --data "$CORPUS" --out "$RUN/long" \
  --steps 100 --batch-size 2 --context 2048 --lr 1e-4 --min-lr 1e-5 --warmup 10 \
  --weight-decay 0.1 --dropout 0.3 --clip 1.0 --seed 0 --val-fraction 0.1 \
  --eval-every 25 --save-every 50 --keep 3 --resume
[ -d "$RUN/bf16" ] || ventoux convert "$RUN/long/model" "$RUN/bf16" --format hf --dtype bfloat16   # what src/ventoux/assets/demo holds
ventoux plot "$RUN" "$RUN/long" --out "$RUN/loss.png"
python benchmarks/eval_demo.py --model "$RUN/bf16" --corpus "$CORPUS"
