"""StreamingEncoder and RetentionStore: chunk invariance, rejection, resume, bounded retention."""
import pytest
import torch

from hybrid_kernels.streaming import RetentionStore, StreamingEncoder, TorchCosineStore
from hybrid_kernels.streaming.retention import VectorStoreAdapter, default_store


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return StreamingEncoder(vocab_size=50, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            rope_theta=1000.0).eval()


def _ids(n, b=1, seed=0):
    return torch.randint(0, 50, (b, n), generator=torch.Generator().manual_seed(seed))


def _feed(encoder, session, ids, chunk):
    return torch.cat([encoder.feed(session, ids[:, i:i + chunk]) for i in range(0, ids.shape[1], chunk)], 1)


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_encoder_chunked_equals_whole(encoder, chunk):
    ids = _ids(40, b=2)
    whole = encoder(ids, num_sinks=4, window=12)
    out = _feed(encoder, encoder.new_session(num_sinks=4, window=12), ids, chunk)
    torch.testing.assert_close(out, whole, rtol=1e-4, atol=1e-5)


def test_encoder_bad_chunk_rejected_state_unchanged(encoder):
    s = encoder.new_session(num_sinks=2, window=8)
    ids = _ids(30, b=2)
    encoder.feed(s, ids[:, :20])
    before = s.state_dict()
    for bad, exc, msg in ((ids[:, 20:] + 100, ValueError, "vocab_size"),
                          (ids[:1, 20:], ValueError, "batch size"),
                          (ids[:, 20:].float(), TypeError, "integer"),
                          (ids[:, :0], ValueError, "n >= 1"),
                          (ids[0], ValueError, r"\(B, n\)")):
        with pytest.raises(exc, match=msg):
            encoder.feed(s, bad)
        after = s.state_dict()
        assert after["position"] == before["position"] == 20
        for la, lb in zip(before["layers"], after["layers"]):
            assert all(torch.equal(la[n], lb[n]) for n in la)
    with pytest.raises(ValueError, match="not made for this encoder"):
        StreamingEncoder(vocab_size=50, dim=32, num_layers=1).feed(s, ids[:, 20:])


def test_encoder_resume_bit_exact_with_retention(encoder):
    def session():
        return encoder.new_session(num_sinks=2, window=8, cache_dtype="int8",
                                   retention=RetentionStore(32, capacity=3, segment_tokens=5))
    ids = _ids(60, seed=3)
    a = session()
    _feed(encoder, a, ids[:, :33], 4)
    b = session()
    b.load_state_dict(a.state_dict())
    assert torch.equal(_feed(encoder, a, ids[:, 33:], 9), _feed(encoder, b, ids[:, 33:], 9))
    assert a.retention.hits() == b.retention.hits() and len(a.retention) == 3
    q = torch.randn(32)
    assert a.retention.search(q, k=2) == b.retention.search(q, k=2)


def test_session_memory_flat_with_retention(encoder):
    s = encoder.new_session(num_sinks=2, window=8, retention=RetentionStore(32, capacity=4, segment_tokens=6))
    ids = _ids(100, seed=4)
    sizes = []
    for i in range(0, 100, 10):
        encoder.feed(s, ids[:, i:i + 10])
        sizes.append(s.nbytes())
    assert len(set(sizes[5:])) == 1 and len(s.retention) == 4   # 24 tokens fill the store


@pytest.mark.parametrize("store", ["default", "torch"])
def test_retention_eviction_policies(store):
    dim = 4
    basis = torch.eye(dim)
    for policy, survivor_sets in (("oldest", [{1, 2}]), ("least_retrieved", [{0, 2}])):
        r = RetentionStore(dim, capacity=2, segment_tokens=2, eviction=policy,
                           store=TorchCosineStore(dim) if store == "torch" else None)
        r.ingest(basis[[0, 0]], 0)            # segment 0: direction e0
        r.ingest(basis[[1, 1, 2]], 2)         # segment 1: e1 (+ half of segment 2 pending)
        assert [h["id"] for h in r.search(basis[0], k=1)[0]] == [0]  # segment 0 retrieved once
        r.ingest(basis[[2]], 5)               # segment 2 finishes -> evict one
        assert set(r.hits()) in survivor_sets
        spans = {h["id"]: (h["start"], h["end"]) for h in r.search(basis[2], k=2)[0]}
        assert spans[2] == (4, 6) and len(r.store) == 2


def test_retention_rejects_bad_input_unchanged():
    r = RetentionStore(4, capacity=2, segment_tokens=3)
    r.ingest(torch.randn(2, 4), 0)
    before = r.state_dict()
    with pytest.raises(ValueError, match="continue at position 2"):
        r.ingest(torch.randn(2, 4), 5)
    with pytest.raises(ValueError, match="NaN"):
        r.ingest(torch.full((2, 4), float("nan")), 2)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        r.ingest(torch.randn(2, 5), 2)
    after = r.state_dict()
    assert after["pending_count"] == before["pending_count"] == 2
    assert torch.equal(after["pending_sum"], before["pending_sum"])


def test_torch_cosine_store():
    s = TorchCosineStore(3)
    s.add(torch.tensor([7, 9]), torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]))
    scores, ids = s.search(torch.tensor([[0, 1.0, 0.1]]), 5)
    assert ids.tolist() == [[9, 7]] and scores.shape == (1, 2)
    s.remove(torch.tensor([9]))
    assert len(s) == 1
    with pytest.raises(ValueError, match="already"):
        s.add(torch.tensor([7]), torch.ones(1, 3))


def test_default_store_is_the_retrieval_vector_store_when_faiss_is_installed():
    pytest.importorskip("faiss")
    assert isinstance(default_store(8), VectorStoreAdapter)
