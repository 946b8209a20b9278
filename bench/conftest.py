"""pytest-benchmark suites. Timing is pytest-benchmark's; providers, inputs and the correctness
gate are the harness's (hybrid_kernels.bench), so a wrong kernel fails its test and is never
timed.

    pytest bench/ --benchmark-autosave            # then, later:
    pytest bench/ --benchmark-compare             # compare with the last saved run
Environment: HYBRID_KERNELS_NUM_THREADS (CPU threads), HK_BENCH_SIZES, HK_BENCH_DTYPES,
HK_BENCH_MODES, HK_BENCH_PROVIDERS (comma lists) for bench/test_attention.py;
HK_CPU_REPORT_SIZES for bench/test_cpu_attention.py.
"""
import os

import pytest

from hybrid_kernels.bench import get_providers, make_inputs, prepare, set_threads
from hybrid_kernels.bench.check import expected_result
from hybrid_kernels.bench.timing import TimingConfig, rounds_for, synchronized

BENCH_TIMING = TimingConfig(min_repeats=3, max_repeats=50, target_seconds=1.0)


def env_list(name, default):
    return [x for x in os.environ.get(name, default).replace(",", " ").split() if x]


def pytest_configure(config):
    config._hk_threads = set_threads(None)
    config._hk_results = []   # Result per benchmarked provider run
    config._hk_extra = {}     # anchors and memory measurements, by name


def pytest_report_header(config):
    return f"hybrid-kernels benchmarks: CPU threads fixed at {config._hk_threads}"


@pytest.fixture
def bench_provider(benchmark, request):
    """bench_provider(provider_name, case) -> median ms: check against the reference, then time
    with pytest-benchmark; group = the case's pattern (with dtype, mode and N)."""
    def run(provider_name, case, group=None):
        (provider,) = get_providers([provider_name])
        inputs = make_inputs(case, requires_grad=case.mode == "bwd")
        timed, result = prepare(provider, case, inputs, expected_result(case, *inputs))
        if result.status == "SKIP":
            pytest.skip(f"{provider_name}: {result.reason}")
        if result.status != "ok":
            pytest.fail(f"{provider_name} is {result.status} (not timed): {result.reason}")
        fn = synchronized(timed, case.device)
        benchmark.group = group or (f"{case.pattern.name} {case.dtype_name} {case.mode} "
                                    f"N={case.n}")
        benchmark.extra_info.update(provider=provider_name, pattern=case.pattern.name,
                                    dtype=case.dtype_name, mode=case.mode, n=case.n,
                                    max_abs_err=result.max_abs_err, gflop=case.flops() / 1e9)
        benchmark.pedantic(fn, rounds=rounds_for(fn, case.device, BENCH_TIMING),
                           warmup_rounds=1, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable
            return None
        stats = benchmark.stats.stats
        result.ms_median, result.repeats = stats.median * 1e3, stats.rounds
        benchmark.extra_info["gflops"] = result.gflops
        request.config._hk_results.append(result)
        return result.ms_median
    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = getattr(config, "_hk_results", [])
    report_rows = [r for r in results if r.case.pattern.num_landmarks == 16
              and r.case.window_lr == (256, 256) and r.case.head_dim == 64]
    if not report_rows or "mm_fp32" not in config._hk_extra:
        return
    from hybrid_kernels.bench.cpu_report import CpuReport, format_report
    from hybrid_kernels.bench.env import environment
    env = environment("cpu", config._hk_threads)
    env_line = (f"{env['device_name']}, torch {env['versions']['torch']}, hybrid_kernels "
                f"{env['versions']['hybrid_kernels']} ({env['git_revision']})"
                + (f", kernel ISA {env['cpu_isa']}" if env.get("cpu_isa") else ""))
    rep = CpuReport(mm_fp32=config._hk_extra.get("mm_fp32"), mm_bf16=config._hk_extra.get("mm_bf16"),
                 results=report_rows, memory=config._hk_extra.get("memory", {}))
    sizes = sorted({r.case.n for r in report_rows})
    terminalreporter.write_sep("=", "CPU attention benchmark")
    terminalreporter.write_line(format_report(rep, sizes, config._hk_threads, env_line))
