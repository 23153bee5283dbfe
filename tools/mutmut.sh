#!/usr/bin/env bash
# `make mutmut`: mutmut (2.5) mutates ds2net/losses.py, ds2net/blocks.py and ds2net/callbacks.py one small change at a
# time (an operator, a number, a string, a keyword) and runs the tests that exercise each module against every mutant.
# A mutant the tests let through "survives". Score = killed / all mutants, per module.
#
# It works in a scratch copy (.mutmut/<module>/, gitignored), never on ds2net/ itself: nbdev_export could otherwise
# overwrite a mutated file, or mutmut restore an old one over a fresh export. mutmut's cache lives there too, so a run
# that is stopped goes on where it stopped; `rm -rf .mutmut` starts afresh.
#
#   tools/mutmut.sh                 # all three modules
#   tools/mutmut.sh losses blocks   # some of them
#   tools/mutmut.sh --show losses   # the surviving mutants of a module, as diffs
#   SAMPLE=100 tools/mutmut.sh callbacks   # 100 random mutants only (after a run has listed them)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
mutmut=${MUTMUT:-$root/.venv/bin/mutmut}

# The tests that exercise each module (fast ones; -x stops at the first failure, so a killed mutant costs little)
tests_for() {
  case $1 in
    losses)    echo "tests/test_losses.py" ;;
    blocks)    echo "tests/test_blocks.py tests/test_model.py -k 'blocks or dem or sem or gradients or side_outputs_are'" ;;
    callbacks) echo "tests/test_callbacks.py tests/test_pinned_behaviour.py -k 'callbacks or resume or interrupted or runs_ahead or nonfinite or clipping or multiscale or autocast or weights_and or side_outputs_and or plain or deep_supervision or resize or scaled'" ;;
    *) echo "unknown module $1 (losses, blocks, callbacks)" >&2; exit 2 ;;
  esac
}

show=0
if [ "${1:-}" = "--show" ]; then show=1; shift; fi
modules=${*:-losses blocks callbacks}

for m in $modules; do
  work=$root/.mutmut/$m
  if [ $show = 1 ]; then
    (cd "$work" && "$mutmut" results | sed -n '/Survived/,$p' | grep -oE '[0-9]+' | while read -r id; do "$mutmut" show "$id"; done)
    continue
  fi
  mkdir -p "$work"
  # the current package and tests; mutmut keeps its cache in $work: killed mutants stay killed, survivors are tested
  # again against changed tests, and a changed module starts afresh
  rm -rf "$work/ds2net" "$work/tests"
  cp -r "$root/ds2net" "$root/tests" "$work/"
  find "$work" -name __pycache__ -prune -exec rm -rf {} +
  runner="env PYTHONPATH=$work PYTHONHASHSEED=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} $py -m pytest -x -q -p no:cacheprovider -p no:randomly $(tests_for "$m")"
  echo "== mutmut on ds2net/$m.py with: $(tests_for "$m")"
  # mutmut re-tests survivors when the tests change, not when the test selection does: do it by hand then
  if [ -f "$work/.mutmut-cache" ] && [ "$(cat "$work/runner.txt" 2>/dev/null)" != "$runner" ]; then
    "$py" -c "import sqlite3; c = sqlite3.connect('$work/.mutmut-cache'); c.execute(\"update Mutant set status = 'untested' where status != 'ok_killed'\"); c.commit()"
  fi
  echo "$runner" > "$work/runner.txt"
  (cd "$work" && "$py" -c "import ds2net, sys; sys.exit(0 if ds2net.__file__.startswith('$work') else 'the tests would not import the scratch copy')")
  if [ -n "${SAMPLE:-}" ] && [ -f "$work/.mutmut-cache" ]; then
    # SAMPLE=N: N of the mutants drawn at random (seed 0) and tested one by one: an estimate of the score when a full
    # run takes too long (callbacks). It needs the cache of a run that was started (mutmut lists every mutant first).
    ids=$("$py" -c "import random, sqlite3; c = sqlite3.connect('$work/.mutmut-cache'); ids = [r[0] for r in c.execute('select id from Mutant order by id')]; random.Random(0).shuffle(ids); print(' '.join(map(str, sorted(ids[:$SAMPLE]))))")
    "$py" -c "import sqlite3; c = sqlite3.connect('$work/.mutmut-cache'); c.execute(\"update Mutant set status = 'untested' where id not in ($(echo $ids | tr ' ' ','))\"); c.commit()"
    for id in $ids; do
      (cd "$work" && "$mutmut" run "$id" --paths-to-mutate "ds2net/$m.py" --tests-dir tests --runner "$runner" --no-progress > /dev/null 2>&1) || true
    done
  else
    (cd "$work" && "$mutmut" run --paths-to-mutate "ds2net/$m.py" --tests-dir tests --runner "$runner" --no-progress) || true
  fi
  (cd "$work" && "$mutmut" results) | tee "$work/results.txt"
  # the score from mutmut's cache: killed (or timed out) / all
  (cd "$work" && "$py" - "$m" <<'EOF'
import sqlite3, sys
con = sqlite3.connect('.mutmut-cache')
rows = dict(con.execute('select status, count(*) from Mutant group by status').fetchall())
total = sum(rows.values())
tested = total - rows.get('untested', 0) - rows.get('skipped', 0)
killed = rows.get('ok_killed', 0) + rows.get('ok_suspicious', 0) + rows.get('bad_timeout', 0)  # suspicious: killed, slowly
part = '' if tested == total else f' (a sample: {tested} of the {total} mutants tested)'
print(f"score ds2net/{sys.argv[1]}.py: {killed}/{tested} killed = {100 * killed / max(tested, 1):.1f}%{part}  ({rows})")
EOF
  ) | tee -a "$root/.mutmut/scores.txt"
done
