"""The CUDA C++ backend against the oracle. Needs a CUDA device and the built _C_cuda module;
skips cleanly without them (CI compiles the module but cannot run it)."""
import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.dispatch import get_backend

from cases import Case, ref_kwargs
from oracle import assert_matches_oracle, reference_pair

pytestmark = pytest.mark.skipif(
    get_backend("cuda").unavailable_reason() is not None,
    reason=f"cuda backend unavailable: {get_backend('cuda').unavailable_reason()}")

GPU_CASES = [
    Case("gpu_window_lm_pad_gqa", B=2, Hq=4, Hk=2, Nq=1025, Nk=1025, D=64, window=(64, 64), landmarks="per_batch", G=16, padding=True),
    Case("gpu_causal_window", Hq=2, Hk=2, Nq=97, Nk=97, D=128, window=(16, 0), landmarks=10, causal=True),
    Case("gpu_nq_ne_nk", Nq=50, Nk=300, D=64, window=(32, -1), landmarks="shared", causal=True),
    Case("gpu_full", Nq=200, Nk=200, D=128),
    Case("gpu_empty_rows", B=2, D=64, window=(0, 0), empty_rows=True),
    # Many landmark query rows (landmark_rows_kernel), a window narrower than a key tile.
    Case("gpu_landmark_rows", B=2, Hq=4, Hk=1, Nq=300, Nk=300, D=128, window=(8, 8),
         landmarks="per_batch", G=40, causal=True, padding=True),
    Case("gpu_nq_gt_nk", Nq=150, Nk=70, D=64, window=(8, 8), landmarks="shared", causal=True),
]


def _to(pattern, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in pattern.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_cuda_forward(case, dtype):
    q, k, v, pattern = case.make(dtype)
    out, lse = hk.attention(q.cuda(), k.cuda(), v.cuda(), **_to(pattern, "cuda"), return_lse=True,
                            backend="cuda")
    (o64, l64), (o_half, l_half) = reference_pair(q, k, v, **ref_kwargs(pattern, q, k))
    assert_matches_oracle("out", out.cpu(), o64, o_half)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(l64))


@pytest.mark.parametrize("nq", [1, 16, 33])
def test_cuda_int8_decode(nq):
    q, k, v = (torch.randn(2, 8, n, 128, device="cuda", dtype=torch.float16) for n in (nq, 4096, 4096))
    for pattern in (dict(), dict(window=(512, 0), landmarks=64, causal=True)):
        out = hk.attention(q, k, v, **pattern, quant="int8", backend="cuda")
        ref = hk.attention(q.float(), k.float(), v.float(), **pattern, backend="reference")
        cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0)
        assert cos >= 0.999, float(cos)


def test_cuda_deterministic():
    q, k, v, pattern = GPU_CASES[0].make(torch.float16)
    q, k, v, pattern = q.cuda(), k.cuda(), v.cuda(), _to(pattern, "cuda")
    a = hk.attention(q, k, v, **pattern, backend="cuda")
    b = hk.attention(q, k, v, **pattern, backend="cuda")
    assert torch.equal(a, b)


def test_auto_routes_training_away_from_cuda():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    problem = hk.dispatch.Problem.from_inputs(q, q, hk.plan(q, q, q)[0], None, needs_grad=True)
    assert hk.select_backend(problem).name != "cuda"


# Nq = 1, 3, 5, 70 exercise the 1-, 4- and 16-row INT8 kernels; D = 60 the 4-byte K-load path.
@pytest.mark.parametrize("nq,d", [(1, 64), (3, 128), (5, 60), (70, 64)])
def test_cuda_int8_matches_int8_reference(nq, d):
    g = torch.Generator().manual_seed(nq * 1000 + d)
    B, Hq, Hk, Nk = 2, 4, 2, 1000
    q = torch.randn(B, Hq, nq, d, generator=g).half().cuda()
    k = torch.randn(B, Hk, Nk, d, generator=g).half().cuda()
    v = torch.randn(B, Hk, Nk, 64, generator=g).half().cuda()
    kpm = (torch.rand(B, Nk, generator=g) > 0.1).cuda()
    pattern = dict(window=(100, 0), landmarks=37, causal=True, key_padding_mask=kpm)
    out, lse = hk.attention(q, k, v, **pattern, quant="int8", backend="cuda", return_lse=True)
    ref = hk.attention(q, k, v, **pattern, quant="int8", backend="reference")
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    # The lse (smoothing undone) against the exact scores' lse: int8 rounding only.
    _, exact_lse = hk.attention(q.float(), k.float(), v.float(), **pattern, backend="reference",
                                return_lse=True)
    assert torch.equal(torch.isinf(lse), torch.isinf(exact_lse))
    fin = ~torch.isinf(lse)
    torch.testing.assert_close(lse[fin], exact_lse[fin], atol=0.1, rtol=0)


def test_cuda_int8_deterministic():
    q, k, v = (torch.randn(1, 4, n, 128, device="cuda", dtype=torch.float16) for n in (2, 5000, 5000))
    a = hk.attention(q, k, v, quant="int8", backend="cuda")
    b = hk.attention(q, k, v, quant="int8", backend="cuda")
    assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_runs_on_the_tensors_device():
    q, k, v = (torch.randn(1, 2, 100, 64, device="cuda:1", dtype=torch.float16) for _ in range(3))
    with torch.cuda.device(0):
        out = hk.attention(q, k, v, window=(16, 16), backend="cuda")
    ref = hk.attention(q.float(), k.float(), v.float(), window=(16, 16), backend="reference")
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
