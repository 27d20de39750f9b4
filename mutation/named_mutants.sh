#!/bin/bash
# The three mutants issue 14 names, each applied to a copy of src/ (the working tree is never touched); each
# must make tests/test_sampling.py fail. Run from the repository root: bash mutation/named_mutants.sh
set -u
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
check() {  # name, file under src/ventoux, text to replace, replacement
  d="$work/$1"
  cp -r src "$d"
  python3 -c "import sys; p=sys.argv[1]; s=open(p).read(); assert s.count(sys.argv[2]) == 1, sys.argv[2]; \
open(p, 'w').write(s.replace(sys.argv[2], sys.argv[3]))" "$d/ventoux/$2" "$3" "$4" || { status=1; return; }
  if PYTHONPATH="$d" OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_sampling.py -q -x -p no:cacheprovider \
      > "$work/$1.log" 2>&1; then
    echo "SURVIVED $1"; status=1
  else
    echo "killed   $1: $(grep -m1 '^FAILED' "$work/$1.log")"
  fi
}
check min_p_never_applied sampling.py 'logits = apply_min_p(logits, col["min_p"])' 'pass'
check counts_never_updated sampling.py 'self.counts[idx, tokens] += 1' 'pass'
check top_logprobs_off_by_0.01 batch.py 'dict(zip(top.indices.tolist(), top.values.tolist()))' \
  'dict(zip(top.indices.tolist(), (top.values + 0.01).tolist()))'
exit $status
