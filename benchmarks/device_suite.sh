#!/usr/bin/env bash
# The merge, serving and training-step benchmarks on whatever device JAX sees (meant for one GPU),
# in at most about 5 minutes; each table goes to OUT_DIR/<benchmark>.md, its log to
# OUT_DIR/<benchmark>.log, the device and timings to OUT_DIR/suite.md.
#
#   bash benchmarks/device_suite.sh OUT_DIR            # full shapes, bounded per benchmark
#   bash benchmarks/device_suite.sh --quick OUT_DIR    # every benchmark's --quick (CPU smoke test, ≤ 10 min each)
#
# Run from the repository root with the project's Python (PYTHON=..., default: python). A
# benchmark that runs past its time limit is stopped and marked in suite.md; the others still run.
set -euo pipefail

quick=0
if [[ "${1:-}" == "--quick" ]]; then
  quick=1
  shift
fi
if [[ $# -ne 1 ]]; then
  echo "usage: $0 [--quick] OUT_DIR" >&2
  exit 2
fi
out=$1
mkdir -p "$out"
py=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# name | time limit (s) | arguments
if [[ $quick == 1 ]]; then
  suite=(
    "merge|600|--quick"
    "serving|600|--quick"
    "train_step|600|--quick"
  )
else
  suite=(
    "merge|150|--T 10 100 1000 --shapes roberta,7b --reps 3 --run 12 --baseline-reps 1 --baseline-budget 4 --max-slot-s 4"
    "serving|60|--repeats 7"
    "train_step|90|--rounds 15"
  )
fi

{
  echo "# Device suite ($([[ $quick == 1 ]] && echo quick || echo full))"
  echo
  echo "$(date -u +%FT%TZ), $(uname -m), $(getconf _NPROCESSORS_ONLN) CPU cores; JAX devices:"
  "$py" -c "import jax; print(jax.__version__, [(d.platform, d.device_kind) for d in jax.devices()])"
  echo
  echo "| benchmark | arguments | exit | seconds |"
  echo "|---|---|---|---|"
} >"$out/suite.md"

failed=0
for entry in "${suite[@]}"; do
  IFS="|" read -r name limit args <<<"$entry"
  start=$(date +%s)
  # shellcheck disable=SC2086  # args is a word list
  if timeout "$limit" "$py" -m "benchmarks.$name" $args >"$out/$name.md" 2>"$out/$name.log"; then
    status=0
  else
    status=$?
    failed=1
  fi
  seconds=$(($(date +%s) - start))
  [[ $status == 124 ]] && status="124 (over ${limit} s)"
  echo "| $name | \`$args\` | $status | $seconds |" >>"$out/suite.md"
  echo "$name: exit $status, ${seconds} s -> $out/$name.md" >&2
done
cat "$out/suite.md"
exit $failed
