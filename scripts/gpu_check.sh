#!/usr/bin/env bash
# The accelerator check, as one prepared script for a cold machine without network or TensorFlow (issue:
# accelerators). It writes JSON under $OUT (default runs/gpu_check) and prints each part's summary:
#
#   devices.json      jax.devices(), backend, versions
#   tests.log/.xml    the TF-free test subset (tests/conftest.py skips the tf.data modules when TF is absent)
#   bench_train.json  scripts/bench_train.py: ResNet-50 / 224 px / batch 256, bfloat16 and float32 -- img/s and MFU
#   step_probe.json   scripts/step_probe.py: forward-mode AD through ResNet-50 and the number of `conditional`
#                     ops in the compiled train step (expect 0 off the CPU)
#   gpu_check.json    all of the above + each part's exit status and wall time
#
#   OUT=/tmp/gc bash scripts/gpu_check.sh               # on the GPU (budget: <= 4 minutes on a cold H200)
#   OUT=/tmp/gc bash scripts/gpu_check.sh --cpu-dry-run # the same parts at small shapes on the CPU (in the tests)
#
# jaxtl is used from this checkout (PYTHONPATH), not installed; ml_collections and tensorboardX, which the GPU
# image lacks, are installed from wheels in scripts/wheels/ when present (`pip download ml_collections tensorboardX
# --no-deps -d scripts/wheels`).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes (pytest workers) share the GPU
if [ "$DRY" = 1 ]; then export JAX_PLATFORMS=cpu; fi

for mod in ml_collections tensorboardX; do
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    if ls scripts/wheels/*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --find-links scripts/wheels "$mod" || echo "could not install $mod"
    else
      echo "$mod is missing and scripts/wheels/ holds no wheels" >&2
    fi
  fi
done

if [ "$DRY" = 1 ]; then
  TESTS=(tests/test_tf_free.py tests/test_schedules.py); WORKERS=1
  BENCH=(--arch resnet18 --size 32 --batch 8 --steps 2 --warmup 1 --rounds 1)
  PROBE=(--arch resnet18 --size 32 --batch 2 --kernels auto,plain)
else
  TESTS=(tests/models tests/optim tests/convert tests/test_train.py tests/test_tf_free.py tests/test_parallel.py
         tests/test_groups.py tests/test_schedules.py tests/test_loop.py); WORKERS=4
  BENCH=(--arch resnet50 --size 224 --batch 256)
  PROBE=(--arch resnet50 --size 224 --batch 8 --kernels auto)
fi

: > "$OUT/parts.tsv"
part() {  # part NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record exit status and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/parts.tsv"
  tail -n 15 "$OUT/$name.log"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
}

part devices 60 "$PY" -c "
import json, platform, sys
import jax, jaxlib, flax, optax
d = jax.devices()
info = {'backend': jax.default_backend(), 'devices': [str(x) for x in d], 'device_kind': d[0].device_kind,
        'process_count': jax.process_count(), 'python': sys.version.split()[0], 'platform': platform.platform(),
        'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__, 'optax': optax.__version__}
open('$OUT/devices.json', 'w').write(json.dumps(info, indent=1)); print(json.dumps(info))"
part tests 150 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -n "$WORKERS" --junitxml="$OUT/tests.xml" "${TESTS[@]}"
part bench_train 150 "$PY" scripts/bench_train.py "${BENCH[@]}" --phases unfrozen --precisions bfloat16,float32 \
  --no-torch --json "$OUT/bench_train.json"
part step_probe 90 "$PY" scripts/step_probe.py "${PROBE[@]}" --json "$OUT/step_probe.json"

"$PY" - "$OUT" "$DRY" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
rows = [line.split("\t") for line in (out / "parts.tsv").read_text().splitlines()]
summary = {"cpu_dry_run": dry, "parts": {n: {"exit": int(r), "wall_s": int(w)} for n, r, w in rows}}
if (out / "tests.xml").exists():
    s = ET.parse(out / "tests.xml").getroot()
    s = s if s.tag == "testsuite" else s[0]
    summary["tests"] = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
summary["devices"], summary["bench_train"], summary["step_probe"] = (load("devices.json"), load("bench_train.json"),
                                                                     load("step_probe.json"))
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({"parts": summary["parts"], "tests": summary.get("tests")}))
PYEOF
