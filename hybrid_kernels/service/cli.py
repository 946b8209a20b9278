"""``hybrid-kernels serve``: options and entry point (argparse only at import)."""
from __future__ import annotations

import argparse
import os
import secrets
import sys

from .config import API_KEY_ENV


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default=None, help="FiD reader checkpoint (with its tokenizer); "
                   "default: a small reader built offline")
    p.add_argument("--default-model", choices=("trained", "random"), default="trained",
                   help="without --model: train the small default reader once (2-3 min, cached in "
                   "$HYBRID_KERNELS_CACHE or ~/.cache/hybrid_kernels) or use random weights")
    p.add_argument("--db", required=True, help="SQLite file for documents and the retention log")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"key for mutating endpoints (default ${API_KEY_ENV}, "
                   "else a random key printed at start)")
    p.add_argument("--student", default=None, help="cascade student checkpoint")
    p.add_argument("--diffusion", default=None, help="saved masked diffusion LM directory")
    p.add_argument("--embedder", choices=("hashing", "minilm"), default="hashing")
    p.add_argument("--workers", type=int, default=0, help="worker threads (default: CPU cores)")
    p.add_argument("--queue-limit", type=int, default=32, help="waiting requests before 503")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request seconds before 504")
    p.add_argument("--threshold", type=float, default=None, help="cascade confidence threshold "
                   "(default: the student's cascade_calibration.json, else 0.5)")
    return p


def run(args: argparse.Namespace) -> int:
    from . import ServiceConfig, serve
    key = args.api_key or os.environ.get(API_KEY_ENV)
    if not key:
        key = secrets.token_urlsafe(24)
        print(f"API key for mutating endpoints (X-API-Key): {key}", file=sys.stderr, flush=True)
    config = ServiceConfig(db_path=args.db, api_key=key, model_dir=args.model,
                           default_reader=args.default_model, student_dir=args.student,
                           diffusion_dir=args.diffusion, embedder=args.embedder, workers=args.workers,
                           queue_limit=args.queue_limit, timeout_s=args.timeout,
                           threshold=0.5 if args.threshold is None else args.threshold,
                           threshold_from_calibration=args.threshold is None)
    print(f"serving on http://{args.host}:{args.port} (docs at /docs)", file=sys.stderr, flush=True)
    serve(config, host=args.host, port=args.port)
    return 0
