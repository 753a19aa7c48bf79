#!/usr/bin/env bash
# Fill .whl/ with the Python packages petlbench needs that the GPU machines' image lacks (pydantic and its
# compiled core), for Python 3.12 on x86-64, at the versions constraints.txt pins. Run here (where pip reaches
# PyPI); scripts/gpu-validate.sh installs .whl/*.whl into a temporary site dir on the GPU machine.
#   scripts/gpu-wheels.sh [DIR]     (default .whl; add it to .git/info/exclude, and `carry` it to the device)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
pin() { grep -i "^$1==" constraints.txt | head -1; }
mkdir -p "$dir"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" "$(pin pydantic)" "$(pin pydantic_core)" annotated-types typing-inspection typing-extensions
ls -l "$dir"
