#!/bin/bash
# Stops a mutant whose tests hang: a mutant that deadlocks the engine's threads (batch.admit's, for one) sleeps,
# and mutmut's CPU-time limit never fires. While `mutmut run` runs, any mutant child older than LIMIT seconds
# (default 90; a survivor running all its tests takes under 40 here) is killed; mutmut records it as
# suspicious (🤔) and goes on. `make mutants` starts it; by hand: bash mutation/watchdog.sh &
LIMIT=${1:-90}
sleep 5
while pgrep -f "mutmut run" > /dev/null; do
  for pid in $(pgrep -f "^mutmut: ventoux"); do
    age=$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ')
    if [ -n "$age" ] && [ "$age" -gt "$LIMIT" ]; then
      echo "watchdog: stopped $(ps -o args= -p "$pid") after ${age} s" >&2
      kill "$pid"
    fi
  done
  sleep 10
done
