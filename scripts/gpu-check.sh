#!/usr/bin/env bash
# One call on a CUDA machine: the GPU-only tests (`pytest -m gpu`) and a small GPU suite, outputs in one folder.
#   scripts/gpu-check.sh [OUT_DIR]        (default: gpu-check-out/)
# Needs petlbench importable (pip install -e . or PYTHONPATH=.) and a visible NVIDIA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check-out}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name(0))" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" 2>&1
python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest-gpu.log"
tests_rc=${PIPESTATUS[0]}
python -m petlbench run suites/gpu-small.yaml --device cuda --results-dir "$out/results" 2>&1 | tee "$out/sweep.log"
sweep_rc=${PIPESTATUS[0]}
python - "$out" <<'PY'
import sys
from pathlib import Path
from petlbench.results import load_results
out = Path(sys.argv[1])
frame = load_results([out / "results"])
cols = ["tuner", "knob", "batch_size", "precision", "status", "peak_allocated_bytes", "peak_reserved_bytes",
        "peak_driver_bytes", "driver_memory_scope", "mem_tracked_peak_bytes", "train_images_per_s", "attn_kernel"]
frame = frame[[c for c in cols if c in frame.columns]].sort_values(["tuner", "knob", "batch_size"])
frame.to_csv(out / "gpu-small.csv", index=False)
print(frame.to_string(index=False))
PY
echo "pytest rc=$tests_rc sweep rc=$sweep_rc; outputs in $out/"
[ "$tests_rc" -eq 0 ] && [ "$sweep_rc" -eq 0 ]
