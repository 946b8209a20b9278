"""Print the CPU attention benchmark table in one run (see hybrid_kernels/bench/cpu_report.py).

    python bench/cpu_attention_report.py [--sizes 4096,16384,65536] [--threads N]
"""
import os
import sys

try:  # the installed package, else this checkout
    import hybrid_kernels  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hybrid_kernels.bench.cpu_report import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
