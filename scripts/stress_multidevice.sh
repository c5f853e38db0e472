#!/usr/bin/env bash
# Stress check for multi-device collectives (issue: "Multi-device runs can deadlock in an all-reduce").
# Runs the 4-device Learner path (tests/learner_multidevice.py: jit and pmap; fit, stop + resume, validate,
# predict, lr_find) and a validate-heavy loop (tests/reliability/validate_multidevice.py) N times in a row while
# two busy-loop processes load the CPU at low priority. Exits non-zero on the first failure.
#
#   bash scripts/stress_multidevice.sh [N=10] [VALIDATE_ROUNDS=40]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10}
ROUNDS=${2:-40}
export XLA_FLAGS="--xla_force_host_platform_device_count=4" JAX_PLATFORMS=cpu
hogs=()
for _ in 1 2; do
  nice -n 19 bash -c 'while :; do :; done' &
  hogs+=($!)
done
trap 'kill "${hogs[@]}" 2>/dev/null || true' EXIT
start=$(date +%s)
pass=0
for i in $(seq 1 "$N"); do
  t0=$(date +%s)
  log=$(mktemp)
  if python tests/learner_multidevice.py >"$log" 2>&1 && grep -q '^RESULT ' "$log" \
     && python tests/reliability/validate_multidevice.py "$ROUNDS" >>"$log" 2>&1 && grep -q '^OK ' "$log"; then
    pass=$((pass + 1))
    echo "run $i/$N: ok ($(( $(date +%s) - t0 )) s)"
  else
    echo "run $i/$N: FAILED ($(( $(date +%s) - t0 )) s); last lines:"
    grep -v '^    @' "$log" | tail -20
    rm -f "$log"
    echo "stress: $pass/$N passed in $(( $(date +%s) - start )) s"
    exit 1
  fi
  rm -f "$log"
done
echo "stress: $pass/$N passed in $(( $(date +%s) - start )) s"
