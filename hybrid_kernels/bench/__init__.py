"""Benchmark harness: cases, providers, correctness gate, timing and reports.

``hybrid-kernels bench`` (hybrid_kernels.cli) and the pytest-benchmark suites in bench/ use it.
"""
from .cases import DEFAULT_PATTERNS, Case, PatternSpec, make_inputs, parse_pattern, visible_pairs
from .check import compare, expected_result
from .harness import BenchOptions, BenchOutput, build_cases, run_benchmark
from .providers import (HkProvider, Provider, ReferenceProvider, SdpaProvider, get_providers,
                        register_provider, unregister_provider)
from .runner import Result, prepare, run_case, run_sweep
from .timing import Stats, TimingConfig, measure, set_threads

__all__ = ["Case", "PatternSpec", "parse_pattern", "make_inputs", "visible_pairs",
           "DEFAULT_PATTERNS", "compare", "expected_result", "BenchOptions", "BenchOutput",
           "build_cases", "run_benchmark", "Provider", "HkProvider", "SdpaProvider",
           "ReferenceProvider", "get_providers", "register_provider", "unregister_provider",
           "Result", "prepare", "run_case", "run_sweep", "Stats", "TimingConfig", "measure",
           "set_threads"]
