"""The GPU kit's probe (under 3 minutes on an H100): cuBLAS workspaces, the attention kernel SDPA runs, and two runs'
allocator histories replayed through the allocator model. See petlbench/measure/gpu_probe.py.

    PYTHONPATH=. python scripts/gpu_probe.py [--device cuda|cpu] [--out DIR]
"""

from __future__ import annotations

import sys

from petlbench.measure.gpu_probe import main

if __name__ == "__main__":
    sys.exit(main())
