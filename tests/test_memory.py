"""No N x N buffers: the windowed + landmark paths' peak memory stays near the size of their
inputs and output (measured in a fresh process, on process RSS, so C++ allocations count)."""
import pytest

from hybrid_kernels.bench.cases import Case, parse_pattern
from hybrid_kernels.bench.memory import peak_memory_subprocess


@pytest.mark.parametrize("provider,mode", [("hk-cpu", "fwd"), ("reference", "fwd")])
def test_windowed_landmark_peak_memory_is_linear(provider, mode):
    # N = 32768: one fp32 N x N score matrix would be 4 GiB; q, k, v and out are 16 MiB.
    case = Case(parse_pattern("window+landmarks"), n=32768, heads_q=1, heads_kv=1, head_dim=32)
    result = peak_memory_subprocess(case, provider)
    assert "error" not in result, result
    budget = 2 * result["io_bytes"] + (64 << 20)  # plus a fixed allowance for workspaces
    assert result["peak_bytes"] <= budget, result
