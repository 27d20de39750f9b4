#!/bin/bash
# Mutation-test one module without `mutmut run`'s test phase: every mutant through check_fresh.py (a fresh import per
# mutant), two at a time. For a module mutmut cannot run: config.py (conftest builds a ModelConfig at import, so
# mutmut's forced-fail check fails), or one whose tests run the CLI in a child process (the child inherits
# check_fresh's PYTHONPATH and MUTANT_UNDER_TEST, so it runs the mutant; under mutmut it runs the original).
#
#   bash mutation/fresh_module.sh src/ventoux/config.py tests/test_config.py tests/mutation/test_config_mutants.py
#   ONLY=generate_until bash mutation/fresh_module.sh ...   # only the mutants whose name holds that text
#
# The mutants are generated in a copy of HEAD plus the working tree's changes (/tmp/fresh_<module>), so mutants/ here
# is left alone. Prints "killed" or "SURVIVED" per mutant into /tmp/fresh_<module>.txt, then the survivors.
set -e
module=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
name=$(basename "$module" .py)
copy=/tmp/fresh_$name
rm -rf "$copy" && mkdir -p "$copy"
(cd "$here" && git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$copy")
python3 - "$copy/setup.cfg" "$module" <<'EOF'
import re, sys
path, module = sys.argv[1:]
text = open(path).read()
open(path, "w").write(re.sub(r"only_mutate =\n(    .*\n)+", f"only_mutate =\n    {module}\n", text))
EOF
# mutmut writes the mutants, then fails in its test phase (no test is selected): only the mutants are wanted
(cd "$copy" && PYTEST_ADDOPTS="-k nothing_at_all" "$here/.venv/bin/mutmut" run "ventoux.*" > /dev/null 2>&1 || true)
python3 - "$copy/mutants/$module.meta" "$copy" <<'EOF'
import json, os, sys
names = sorted(n for n in json.load(open(sys.argv[1]))["exit_code_by_key"] if os.environ.get("ONLY", "") in n)
for half in (0, 1):
    open(f"{sys.argv[2]}/names_{half}.txt", "w").write(" ".join(names[half::2]))
print(len(names), "mutants")
EOF
for half in 0 1; do
  (cd "$copy" && MUTDIR="$copy" OMP_NUM_THREADS=1 "$here/.venv/bin/python" "$here/mutation/check_fresh.py" "$@" \
     -p no:warnings $(cat "$copy/names_$half.txt") > "$copy/out_$half.txt" 2>&1) &
done
wait
cat "$copy"/out_*.txt | sort -k2 > "/tmp/fresh_$name.txt"
echo "$(grep -c '^killed' "/tmp/fresh_$name.txt") killed, $(grep -c '^SURVIVED' "/tmp/fresh_$name.txt") survived"
grep '^SURVIVED' "/tmp/fresh_$name.txt" || true
