#!/usr/bin/env bash
# GPU validation kit: is `petlbench estimate` right? One command on a GPU machine (H100/H200, its own torch/timm):
#   0. the probe (under 3 minutes; scripts/gpu_probe.py → OUT/probe/): the cuBLAS workspaces, the attention kernel
#      SDPA runs for ViT-B/16 shapes in bf16 and fp32, and a LoRA and an SQT run's allocator history replayed
#      through the allocator model, which must reproduce max_memory_allocated and max_memory_reserved,
#   1. the GPU-only tests (`pytest -m gpu`),
#   2. the reduced memory suite, measured (suites/memory-reduced.yaml: ViT-B/16, every tuner, fp32 + bf16-mixed,
#      batch 32/64/128),
#   3. `petlbench estimate` of the same runs,
#   4. ONE table of estimated vs measured max_memory_allocated per run (plus the device's tensor-tracker peak,
#      max_memory_reserved, NVML and the context outside the allocator, each with absolute and relative error;
#      the estimate judges this card's preset): OUT/estimate-vs-measured.{csv,md},
#   5. one configuration's step time in a bare timm-benchmark-style loop beside petlbench's own row
#      (OUT/train-step-reference.md): the harness must add nothing,
#   6. how long each step took (OUT/timings.txt), to keep the kit inside one 15-minute lease.
#
#   scripts/gpu-validate.sh [--device cuda|cpu] [--tiny] [--out DIR] [--wheels DIR] [--suite FILE] [--skip-tests]
#
#   --device cpu   runs end to end without a GPU (no GPU tests); the estimate must equal the CPU measurement to
#                  the byte, else exit 1. With --tiny (suites/memory-reduced-tiny.yaml, test_vit) it takes a minute.
#   --wheels DIR   Python packages the machine lacks (pydantic there), as wheels: installed into a temporary
#                  site dir put on PYTHONPATH. Default: the repo's .whl/ folder when it holds wheels
#                  (scripts/gpu-wheels.sh fills it).
#   --out DIR      outputs: results/, logs, nvidia-smi.csv, probe/, estimate-vs-measured.*. Default: with $OUT set
#                  (the device tool), a temporary folder packed into $OUT/gpu-validate.tar.gz plus its summaries
#                  copied to $OUT; else results/reference/<gpu>/ (never the repository's root).
#   PYTHON=...     the interpreter (default python3).
# Exit code: 0 all steps passed; 1 a step failed (the table is still written when both halves ran); 2 bad usage.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
device=cuda
tiny=0
out=""
wheels=""
suite=""
skip_tests=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
    --tiny) tiny=1; shift ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
    --suite) suite=${2:?--suite needs a file}; shift 2 ;;
    --skip-tests) skip_tests=1; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "error: --device: expected cuda or cpu, got $device" >&2; exit 2 ;; esac
if [ -z "$suite" ]; then
  if [ "$tiny" -eq 1 ]; then suite=suites/memory-reduced-tiny.yaml; else suite=suites/memory-reduced.yaml; fi
fi
[ -f "$suite" ] || { echo "error: --suite: $suite: no such file" >&2; exit 2; }
py=${PYTHON:-python3}
package=""
if [ -z "$out" ] && [ -n "${OUT:-}" ]; then
  package=$OUT
  out=$(mktemp -d "${TMPDIR:-/tmp}/gpu-validate.XXXXXX")/gpu-validate
elif [ -z "$out" ]; then
  gpu_slug=cpu
  if [ "$device" = cuda ] && command -v nvidia-smi > /dev/null; then
    gpu_slug=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' \
      | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
  fi
  out=results/reference/${gpu_slug:-gpu}
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
SECONDS=0
timings=()
step() { timings+=("$SECONDS s: $1"); printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

# Missing packages as wheels, into a throwaway site dir (never into the machine's environment).
if [ -z "$wheels" ] && compgen -G ".whl/*.whl" > /dev/null; then wheels=.whl; fi
site=""
if [ -n "$wheels" ]; then
  step "wheels from $wheels"
  site=$(mktemp -d "${TMPDIR:-/tmp}/petlbench-site.XXXXXX")
  trap 'rm -rf "$site"' EXIT
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
    || { echo "error: installing the wheels in $wheels failed" >&2; exit 2; }
fi
export PYTHONPATH="${site:+$site:}$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

step "environment"
"$py" - "$device" <<'PY' 2>&1 | tee "$out/environment.txt"
import sys
import petlbench, pydantic, timm, torch
print(f"petlbench {petlbench.__file__} | torch {torch.__version__} | timm {timm.__version__} | pydantic {pydantic.__version__}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False; use --device cpu")
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, CUDA {torch.version.cuda}")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
if [ "$device" = cuda ] && command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" 2>&1
fi
# the card as the estimator names it: a preset, else its memory
card=()
if [ "$device" = cuda ]; then
  preset=$("$py" -c "import torch; from petlbench.estimate.gpus import match_preset as m; \
p = torch.cuda.get_device_properties(0); f = m(p.name, p.total_memory); \
print(f'--gpu {f.key}' if f else f'--device-memory {p.total_memory}B')")
  read -r -a card <<< "$preset"
  card+=(--headroom 0)
fi

step "probe (scripts/gpu_probe.py)"
probe_args=()
[ "$tiny" -eq 1 ] && probe_args=(--tuners lora)
"$py" scripts/gpu_probe.py --device "$device" --out "$out/probe" "${probe_args[@]}" 2>&1 | tee "$out/probe.log"
probe_rc=${PIPESTATUS[0]}

tests_rc=0
if [ "$device" = cuda ] && [ "$skip_tests" -eq 0 ]; then
  step "GPU tests (pytest -m gpu)"
  "$py" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest-gpu.log"
  tests_rc=${PIPESTATUS[0]}
elif [ "$device" = cuda ]; then
  echo "GPU tests not run (--skip-tests)"
else
  echo "GPU tests not run (device cpu: they need CUDA)"
fi

name=$("$py" -c "import sys; from petlbench.spec.loading import load_suite; print(load_suite(sys.argv[1]).name)" "$suite") \
  || { echo "error: $suite is not a valid suite" >&2; exit 2; }

step "measure: petlbench run $suite --device $device"
COLUMNS=200 "$py" -m petlbench run "$suite" --device "$device" --results-dir "$out/results" 2>&1 | tee "$out/run.log"
run_rc=${PIPESTATUS[0]}

step "estimate: petlbench estimate $suite --device $device"
COLUMNS=240 "$py" -m petlbench estimate "$suite" --device "$device" "${card[@]}" --results-dir "$out/results" \
  --jobs "$(( $(nproc) > 8 ? 8 : $(nproc) ))" 2>&1 \
  | tee "$out/estimate.log"
estimate_rc=${PIPESTATUS[0]}

step "estimated vs measured"
exact=()
[ "$device" = cpu ] && exact=(--exact)
"$py" scripts/calibration.py "$out/results" "$name" "$out" "${exact[@]}" 2>&1 | tee "$out/compare.log"
compare_rc=${PIPESTATUS[0]}

step "bare training loop vs petlbench (one configuration)"
"$py" scripts/reference_loop.py "$out/results" "$name" "$out" 2>&1 | tee "$out/reference.log"
reference_rc=${PIPESTATUS[0]}

step "done"
printf '%s\n' "${timings[@]}" "total ${SECONDS}s" | tee "$out/timings.txt"
echo "probe rc=$probe_rc tests rc=$tests_rc run rc=$run_rc estimate rc=$estimate_rc compare rc=$compare_rc" \
  "reference rc=$reference_rc; outputs in $out/"
if [ -n "$package" ]; then  # the device tool brings back a few files from $OUT: one archive and the summaries
  tar -czf "$package/gpu-validate.tar.gz" -C "$(dirname "$out")" gpu-validate
  for f in probe/probe.md estimate-vs-measured.md timings.txt; do
    [ -f "$out/$f" ] && cp "$out/$f" "$package/"
  done
  echo "packed into $package/gpu-validate.tar.gz"
fi
[ "$probe_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$run_rc" -eq 0 ] && [ "$estimate_rc" -eq 0 ] \
  && [ "$compare_rc" -eq 0 ] && [ "$reference_rc" -eq 0 ]
