"""``python -m hybrid_kernels bench|info``."""
import sys

from .cli import main

sys.exit(main())
