#!/usr/bin/env bash
# One prepared GPU check (about 3-6 minutes on one GPU; no trained project needed):
#   1. the `gpu`-marked tests (decode and readout on CUDA equal the CPU's; the loop at paper-scale sizes),
#   2. the search loop's parts per query on CPU and CUDA at paper-scale sizes (bench_device.py), with
#      the CUDA speed-up over the CPU,
#   3. the optimizers' overhead at d = 512 and 4,096 on this machine's CPU (bench_optimizers --scale).
# Everything lands in $OUT (default results/gpu_check/); gpu_check.json sums it up.
#   bash benchmarks/gpu_check.sh                 # from the repository root
#   PYTHON=/path/to/python OUT=/tmp/x bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/gpu_check}"
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import spikemax, torch, cma" 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import spikemax, torch and cma: install the project (pip install -e .) or set PYTHON" >&2
  exit 2
fi
(command -v nvidia-smi >/dev/null && nvidia-smi) > "$OUT/nvidia-smi.txt" 2>&1
"$PYTHON" -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/torch.txt"

start=$(date +%s)
"$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests > "$OUT/gpu-tests.log" 2>&1
tests_rc=$?
tail -n 3 "$OUT/gpu-tests.log"

"$PYTHON" benchmarks/bench_device.py --steps 10 --batch 64 --threads "${THREADS:-4}" --out "$OUT/device.json" \
  > "$OUT/device.log" 2>&1
device_rc=$?
cat "$OUT/device.log"

"$PYTHON" benchmarks/bench_optimizers.py --scale --dims 512,4096 --sizes 16,64 --methods random,cma,tt \
  --steps 3 --out "$OUT/scale.json" > "$OUT/scale.log" 2>&1
scale_rc=$?
tail -n 8 "$OUT/scale.log"

"$PYTHON" - "$OUT" "$tests_rc" "$device_rc" "$scale_rc" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
from pathlib import Path
out, tests_rc, device_rc, scale_rc, seconds = Path(sys.argv[1]), *map(int, sys.argv[2:])
device = json.loads((out / "device.json").read_text()) if (out / "device.json").is_file() else {}
counts = {}
if (out / "gpu-tests.xml").is_file():  # all skipped = no CUDA visible to torch: nothing was checked
    import xml.etree.ElementTree as ET
    suite = ET.parse(out / "gpu-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "skipped", "failures", "errors")}
summary = {
    "gpu_tests_passed": tests_rc == 0 and counts.get("tests", 0) > counts.get("skipped", 0),
    "gpu_tests": counts,
    "gpu_tests_rc": tests_rc,
    "bench_device_rc": device_rc,
    "bench_scale_rc": scale_rc,
    "seconds": seconds,
    "cuda": device.get("meta", {}).get("cuda"),
    "speedup_over_cpu": device.get("speedup", {}),
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
exit $(( tests_rc || device_rc || scale_rc ))
