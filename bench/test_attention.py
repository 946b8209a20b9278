"""Every pattern x provider on the available device (sizes etc. from HK_BENCH_* variables)."""
import pytest
import torch

from conftest import env_list
from hybrid_kernels.bench import DEFAULT_PATTERNS, Case, get_providers, parse_pattern
from hybrid_kernels.bench.cases import DTYPES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [int(n) for n in env_list("HK_BENCH_SIZES", "1024,4096")]
DTYPE_NAMES = env_list("HK_BENCH_DTYPES", "bf16" if DEVICE == "cuda" else "fp32")
MODES = env_list("HK_BENCH_MODES", "fwd")
PROVIDERS = env_list("HK_BENCH_PROVIDERS", ",".join(p.name for p in get_providers()))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("pattern", DEFAULT_PATTERNS)
def test_attention(bench_provider, pattern, dtype, mode, n, provider):
    case = Case(parse_pattern(pattern), n, DTYPES[dtype], mode, device=DEVICE)
    bench_provider(provider, case)
