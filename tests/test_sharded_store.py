"""ShardedVectorStore: VectorStore's API over several faiss indexes searched with IndexShards;
the same top-k as one flat index on a 100k-vector set, removal, payloads, save/load."""
import numpy as np
import pytest

pytest.importorskip("faiss")
from hybrid_kernels.retrieval import ShardedVectorStore, VectorStore  # noqa: E402


def _data(n=100_000, dim=32, queries=64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, dim)).astype(np.float32),
            rng.standard_normal((queries, dim)).astype(np.float32))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_shards_equal_one_index_on_100k_vectors(metric):
    x, q = _data()
    single, sharded = VectorStore(32, metric=metric), ShardedVectorStore(32, num_shards=4, metric=metric)
    single.add(x)
    ids = sharded.add(x)
    assert len(sharded) == len(x) and [len(s) for s in sharded.shards] == [25_000] * 4
    assert np.array_equal(ids, np.arange(len(x)))
    s1, i1 = single.search(q, k=10)
    s2, i2 = sharded.search(q, k=10)
    assert np.array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-5)


def test_remove_payloads_and_save_load(tmp_path):
    x, q = _data(n=2000, queries=8)
    store = ShardedVectorStore(32, num_shards=3)
    store.add(x, payloads=[f"doc {i}" for i in range(len(x))])
    _, top = store.search(q, k=1)
    assert store.remove(top[:, 0]) == len(set(top[:, 0].tolist()))
    _, again = store.search(q, k=5)
    assert not np.isin(top[:, 0], again).any(), "removed ids never come back"
    assert store.payload(7) == "doc 7"
    store.save(str(tmp_path / "s"))
    loaded = ShardedVectorStore.load(str(tmp_path / "s"))
    assert len(loaded) == len(store) and loaded.payload(7) == "doc 7"
    assert np.array_equal(loaded.search(q, k=5)[1], again)
    assert np.array_equal(loaded.add(x[:2]), [2000, 2001]), "ids continue after a reload"


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_shards_find_exact_matches(index):
    x, _ = _data(n=3000)
    store = ShardedVectorStore(32, num_shards=2, index=index, nlist=16, nprobe=16)
    store.add(x)
    scores, ids = store.search(x[:20], k=1)
    assert np.array_equal(ids[:, 0], np.arange(20))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_shards"):
        ShardedVectorStore(8, num_shards=0)
    store = ShardedVectorStore(8, num_shards=2)
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        store.add(np.zeros((3, 4), np.float32))
    store.add(np.ones((2, 8), np.float32), ids=[5, 6])
    with pytest.raises(ValueError, match="new and unique"):
        store.add(np.ones((1, 8), np.float32), ids=[5])
    with pytest.raises(ValueError, match="k must be"):
        store.search(np.ones(8, np.float32), k=0)
    scores, ids = ShardedVectorStore(8).search(np.ones(8, np.float32), k=3)
    assert (ids == -1).all() and np.isneginf(scores).all()
