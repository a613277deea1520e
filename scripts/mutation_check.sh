#!/usr/bin/env bash
# Mutation check (on demand, not in CI): break each named place of the code in a throw-away copy of
# the working tree, run the tests that cover it, and report whether they caught it. Every mutation
# must make a test fail; one that survives means the suite would let that regression through.
#
#   bash scripts/mutation_check.sh            # every mutation
#   bash scripts/mutation_check.sh top-k      # only those whose name contains "top-k"
#
# The copy holds the working tree as it is (committed or not; what git ignores is left out), so the
# check runs against your current tests. Exit status: 0 when every mutation was caught, 1 when one
# survived, 2 when a mutation no longer applies (the code it names moved: update the list below).
# Needs the project's .venv (bash scripts/install.sh --test) and redis-server for the Redis mutation.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || { echo "mutation_check: $PY missing: run bash scripts/install.sh --test" >&2; exit 2; }
FILTER="${1:-}"

# name | file | exact text (must occur once) | replacement | pytest arguments (run in the copy)
MUTATIONS=(
  "sampler top-k|mesh/engine/sampler.py|sorted_x = sorted_x.masked_fill(ranks >= top_k[:, None], float(\"-inf\"))|sorted_x = sorted_x|tests/engine/test_sampling.py -k draws_follow"
  "sampler top-p|mesh/engine/sampler.py|probs = probs.masked_fill(before >= top_p[:, None], 0.0)|probs = probs|tests/engine/test_sampling.py -k top_p"
  "sampler temperature|mesh/engine/sampler.py|x = x / temp[:, None]|x = x|tests/engine/test_sampling.py -k temperature"
  "redis corrupt-entry delete|router_service/redis_tier.py|self.client.delete(f\"{KEY_PREFIX}{key:016x}\")|pass|tests/cache/test_prefix_cache_redis.py -k corrupt"
  "all-to-all cost term|mesh/plan/perfmodel.py|t_a2a = sh.moe_layers * 2 * (lat + send / bw)|t_a2a = 0.0|tests/plan/test_plan.py"
  "router renormalisation|mesh/model/moe.py|weights = weights / weights.sum(dim=-1, keepdim=True)|weights = weights|tests/model/test_model_parity.py -k torch"
  "block manager free|mesh/engine/block_manager.py|                self.free[block] = None|                pass|tests/engine/test_engine.py"
)

WORK=$(mktemp -d /tmp/mesh-mutation-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
echo "mutation_check: copying the working tree to $WORK"
mkdir -p "$WORK/tree"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -xf - -C "$WORK/tree"
[ -d router_service/gen ] && cp -r router_service/gen "$WORK/tree/router_service/gen"
export PYTHONPATH="$WORK/tree"
where=$(cd "$WORK/tree" && "$PY" -c 'import mesh, os; print(os.path.dirname(os.path.dirname(mesh.__file__)))')
[ "$where" = "$WORK/tree" ] || { echo "mutation_check: mesh imports from $where, not the copy" >&2; exit 2; }

caught=0; survived=0; broken=0
report=()
for m in "${MUTATIONS[@]}"; do
  IFS='|' read -r name file old new tests <<<"$m"
  [[ -z "$FILTER" || "$name" == *"$FILTER"* ]] || continue
  rel="$WORK/tree/$file"
  cp "$rel" "$WORK/original"
  if ! "$PY" - "$rel" "$old" "$new" <<'EOF'
import sys
path, old, new = sys.argv[1:]
src = open(path).read()
n = src.count(old)
if n != 1:
    sys.exit(f"{path}: expected the text once, found it {n} times: {old!r}")
open(path, "w").write(src.replace(old, new))
EOF
  then
    report+=("NOT APPLIED  $name ($file): the code moved; update scripts/mutation_check.sh")
    broken=$((broken + 1))
    continue
  fi
  echo "mutation_check: [$name] $file: '$old' -> '$new'; running pytest $tests"
  log="$WORK/$(echo "$name" | tr ' /' '__').log"
  set +e
  # shellcheck disable=SC2086  # $tests is a list of pytest arguments
  (cd "$WORK/tree" && nice -n 10 "$PY" -m pytest -q -x -p no:cacheprovider -p no:randomly -rfE $tests) >"$log" 2>&1
  rc=$?
  set -e
  cp "$WORK/original" "$rel"
  summary=$(grep -E '^(FAILED|ERROR) ' "$log" | head -1 || true)
  last=$(tail -1 "$log")
  if [ $rc -eq 1 ]; then
    report+=("CAUGHT       $name: ${summary:-$last}")
    caught=$((caught + 1))
  elif [ $rc -eq 0 ]; then
    report+=("SURVIVED     $name: every test passed ($last)")
    survived=$((survived + 1))
  else
    report+=("NOT RUN      $name: pytest exit $rc ($last); see the log below")
    tail -20 "$log"
    broken=$((broken + 1))
  fi
done

echo
echo "mutation_check: results"
for line in "${report[@]}"; do echo "  $line"; done
echo "mutation_check: $caught caught, $survived survived, $broken not applied or not run"
[ $broken -eq 0 ] || exit 2
[ $survived -eq 0 ] || exit 1
