"""Mutation score per module from mutmut's last results, and the survivors not yet triaged.

    .venv/bin/python mutation/report.py            # after `make mutants` (or any `mutmut run`)

A surviving mutant is triaged either by a test that kills it, or by a line in mutation/equivalent.txt:
`<mutant name>  <one-line reason it is equivalent>`. The score counts triaged equivalents out of the
denominator; the exit status is 1 while an untriaged survivor remains, so the next run shows only new ones.
An import-time mutant, which mutmut cannot activate, is killed through mutation/check_fresh.py and listed in
mutation/fresh_killed.txt; it counts as killed.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).parent
MUTMUT = Path(sys.executable).parent / "mutmut"


def equivalents() -> dict[str, str]:
    out = {}
    for line in (HERE / "equivalent.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            out[name] = reason.strip()
    return out


def fresh_killed() -> set[str]:
    """Import-time mutants that mutation/check_fresh.py showed killed (mutmut cannot activate them)."""
    return {line.split()[0] for line in (HERE / "fresh_killed.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def results() -> dict[str, str]:
    """mutant name -> status (killed, survived, timeout, no tests, not checked, ...)."""
    text = subprocess.run([str(MUTMUT), "results", "--all", "true"], capture_output=True, text=True,
                          cwd=HERE.parent, check=True).stdout
    return {name.strip(): status.strip() for name, _, status in
            (line.rpartition(": ") for line in text.splitlines() if ": " in line)}


def main() -> int:
    equivalent, fresh, status = equivalents(), fresh_killed(), results()
    by_module: dict[str, Counter] = defaultdict(Counter)
    untriaged = []
    for name, state in sorted(status.items()):
        module = name.split(".x")[0]  # ventoux.sampling.x_apply_min_p__mutmut_3 -> ventoux.sampling
        if state in ("survived", "no tests") and name in equivalent:  # no test can tell it apart either way
            state = "equivalent"
        elif state in ("survived", "no tests") and name in fresh:
            state = "killed"
        by_module[module][state] += 1
        if state == "survived":
            untriaged.append(name)
    print(f"{'module':<20} {'mutants':>7} {'killed':>6} {'surv.':>5} {'equiv.':>6} {'no test':>7} {'score':>6}")
    for module, c in sorted(by_module.items()):
        if c["not checked"] == sum(c.values()):
            continue  # not run yet
        killed = c["killed"] + c["timeout"]
        tested = killed + c["survived"] + c["no tests"]
        score = f"{100 * killed / tested:.1f}%" if tested else "-"
        print(f"{module:<20} {sum(c.values()):>7} {killed:>6} {c['survived']:>5} {c['equivalent']:>6} "
              f"{c['no tests']:>7} {score:>6}")
    for name in untriaged:
        print("untriaged survivor:", name, f"(see: {MUTMUT.name} show {name})")
    return 1 if untriaged else 0


if __name__ == "__main__":
    sys.exit(main())
