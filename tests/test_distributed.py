"""Sequence-parallel attention (hybrid_kernels.distributed) on 2 and 3 processes (gloo, loopback):
outputs, lse and gradients of every rank's shard against the float64 oracle with the derived
tolerance, for uneven shards, GQA, causal, padding, windows wider than a shard (multi-hop halos),
int / shared / per-batch landmarks, rows that see nothing, and int8; ranks that disagree or
fail raise the same error everywhere; a rank that dies is reported, not waited for."""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hybrid_kernels as hk
import hybrid_kernels.distributed as hkd
from hybrid_kernels.service.process import free_port
from oracle import assert_matches_oracle, reference_grads, reference_pair

CASES = [
    dict(window=(3, 2)),
    dict(window=(5, 5), landmarks=7),
    dict(window=(4, 0), causal=True, landmarks=5),
    dict(window=(20, 20), landmarks=[0, 9, 30], pad=True),   # wider than a shard: multi-hop
    dict(window=None, pad=True),
    dict(window=(2, 30), landmarks=11, pad=True),             # right halo over several ranks
    dict(window=(6, 1), causal=True, pad="empty_row"),         # a batch row sees nothing
    dict(window=(4, 4), landmarks="per_batch"),
]


def _init(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    torch.set_num_threads(1)


def _inputs(case: dict, N: int, seed: int = 0):
    """The full problem, identical on every rank: q, k, v, dout and hk.attention keywords."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hk, D = 2, 4, 2, 16
    q, k, v, dout = (torch.randn(B, h, N, D, generator=g) for h in (Hq, Hk, Hk, Hq))
    kw = {key: val for key, val in case.items() if key != "pad"}
    if isinstance(kw.get("landmarks"), list):
        kw["landmarks"] = torch.tensor(kw["landmarks"])
    elif kw.get("landmarks") == "per_batch":
        kw["landmarks"] = torch.stack([torch.tensor([1, 12, 20]), torch.tensor([5, 6, 33])])
    if case.get("pad"):
        kpm = torch.rand(B, N, generator=g) > 0.25
        if case["pad"] == "empty_row":
            kpm[1] = False
        kw["key_padding_mask"] = kpm
    return q, k, v, dout, kw


def _ref_kwargs(kw: dict, q, k, v) -> dict:
    from hybrid_kernels.api import plan
    return plan(q, k, v, **kw)[0].reference_kwargs()


def _check_cases(rank: int, world: int, port: int, lengths) -> None:
    _init(rank, world, port)
    N = sum(lengths)
    s = sum(lengths[:rank])
    e = s + lengths[rank]
    for i, case in enumerate(CASES):
        q, k, v, dout, kw = _inputs(case, N, seed=i)
        shard = [t[:, :, s:e].clone().requires_grad_() for t in (q, k, v)]
        out, lse = hkd.attention(*shard, return_lse=True, **kw)
        out.backward(dout[:, :, s:e])
        ref = _ref_kwargs(kw, q, k, v)
        (o64, l64), (o32, l32) = reference_pair(q, k, v, **ref)
        name = f"rank {rank}/{world} {case}"
        assert_matches_oracle(f"{name} out", out.detach(), o64[:, :, s:e], o32[:, :, s:e], depth=N)
        assert torch.equal(torch.isinf(lse), torch.isinf(l64[:, :, s:e])), f"{name}: -inf rows"
        assert_matches_oracle(f"{name} lse", lse.detach(), l64[:, :, s:e], l32[:, :, s:e], depth=N)
        g64 = reference_grads(q, k, v, dout, torch.float64, **ref)
        g32 = reference_grads(q, k, v, dout, torch.float32, **ref)
        for which, t, a, b in zip("qkv", shard, g64, g32):
            assert_matches_oracle(f"{name} d{which}", t.grad, a[:, :, s:e], b[:, :, s:e], depth=N)
    # int8 forward: as close to the exact result as the single-process int8 call is.
    q, k, v, _, kw = _inputs(dict(window=(8, 8), landmarks=9, pad=True), N, seed=99)
    with torch.no_grad():
        out = hkd.attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], quant="int8", **kw)
        single = hk.attention(q, k, v, quant="int8", **kw)[:, :, s:e]
        exact = hk.attention(q, k, v, backend="reference", **kw)[:, :, s:e]
    err, err_single = (out - exact).abs().max(), (single - exact).abs().max()
    assert err <= 2 * err_single + 1e-3, (float(err), float(err_single))
    hkd.shutdown()


@pytest.mark.parametrize("lengths", [[20, 17], [9, 15, 13]], ids=["2 ranks", "3 ranks uneven"])
def test_sequence_parallel_matches_the_oracle(lengths):
    mp.spawn(_check_cases, args=(len(lengths), free_port(), lengths), nprocs=len(lengths))


def _check_errors(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(hkd.RankDisagreement, match="disagree on window") as info:
        hkd.attention(q, k, v, window=(2, 2) if rank == 0 else (3, 3))
    assert "rank 0=(2, 2)" in str(info.value) and "rank 1=(3, 3)" in str(info.value)
    bad_q = q[0] if rank == 1 else q  # only rank 1 passes a 3-D q
    with pytest.raises(hkd.RankDisagreement, match="failed on rank.*1: ValueError: q must be a 4-D"):
        hkd.attention(bad_q, k, v, window=2)
    with pytest.raises(hkd.RankDisagreement, match="key_padding_mask"):
        kpm = torch.ones(1, 16, dtype=torch.bool)
        kpm[0, rank] = False  # masks that differ between ranks
        hkd.attention(q, k, v, window=2, key_padding_mask=kpm)
    # Still usable after the errors: the ranks stayed in step.
    out = hkd.attention(q, k, v, window=2)
    assert out.shape == q.shape
    hkd.shutdown()
    assert not dist.is_initialized()
    hkd.shutdown()  # once the group is gone: nothing to do


def test_ranks_that_disagree_all_raise_the_same_error():
    mp.spawn(_check_errors, args=(2, free_port()), nprocs=2)


def _die_or_wait(rank: int, world: int, port: int, result) -> None:
    _init(rank, world, port, timeout_s=20.0)
    if rank == 1:
        os._exit(0)  # dies before the call
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    try:
        hkd.attention(q, k, v, window=2)
    except RuntimeError as exc:
        result.put(str(exc))
    else:
        result.put("no error")


def test_a_dead_rank_is_reported_not_waited_for():
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_die_or_wait, args=(r, 2, port, result)) for r in range(2)]
    for p in procs:
        p.start()
    message = result.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    assert "did not answer" in message, message
