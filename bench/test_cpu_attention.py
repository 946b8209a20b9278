"""The CPU attention benchmark: B=1, Hq=8, D=64, window (256, 256), 16 landmarks, fp32 and bf16,
N in {4096, 16384, 65536} (HK_CPU_REPORT_SIZES overrides): hk cpu, the blocked reference, SDPA with
an explicit mask (where it fits), FlexAttention compiled in its best arrangement; hk int8 and
backward; the torch.mm 4096^2 anchor; peak memory at the largest N. The ratios the
targets are stated in are printed at the end of the session.

    pytest bench/test_cpu_attention.py --benchmark-autosave
Same table without pytest: python bench/cpu_attention_report.py
"""
import pytest
import torch

from conftest import env_list
from hybrid_kernels.bench.cpu_report import COMPETITORS, report_case
from hybrid_kernels.bench.memory import peak_memory_subprocess

SIZES = [int(n) for n in env_list("HK_CPU_REPORT_SIZES", "4096,16384,65536")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mm_anchor(benchmark, request, dtype):
    """torch.mm of 4096 x 4096 (the anchor); GF/s in extra_info."""
    a, b = (torch.randn(4096, 4096).to(DTYPES[dtype]) for _ in range(2))
    benchmark.group = "anchor torch.mm 4096^2"
    benchmark.pedantic(torch.mm, args=(a, b), rounds=5, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:
        gflops = 2 * 4096 ** 3 / (benchmark.stats.stats.median * 1e9)
        benchmark.extra_info["gflops"] = gflops
        request.config._hk_extra[f"mm_{dtype}"] = gflops


@pytest.mark.parametrize("provider", COMPETITORS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
def test_forward(bench_provider, n, dtype, provider):
    bench_provider(provider, report_case(n, DTYPES[dtype]),
                   group=f"cpu window+landmarks {dtype} fwd N={n}")


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
def test_int8_forward(bench_provider, n):
    bench_provider("hk-cpu", report_case(n, quant=True), group=f"cpu window+landmarks fp32 fwd N={n}")


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
def test_backward(bench_provider, n):
    bench_provider("hk-cpu", report_case(n, mode="bwd"),
                   group=f"cpu window+landmarks fp32 bwd N={n}")


def test_peak_memory(request):
    """hk fp32 forward at the largest N, in a fresh process: peak vs the size of q, k, v, out."""
    n = max(SIZES)
    mem = peak_memory_subprocess(report_case(n), "hk-cpu")
    if "error" in mem:
        pytest.skip(f"hk-cpu: {mem['error']}")
    request.config._hk_extra.setdefault("memory", {})[n] = mem
    assert mem["peak_bytes"] is not None and mem["peak_bytes"] > 0
