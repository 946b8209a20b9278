"""The entity-grounded QA corpus, the exact TF-IDF embedder, reciprocal-rank fusion and the
DynamicQueryGenerator's two-round retrieval, on small generated worlds."""
import numpy as np
import pytest

from hybrid_kernels.retrieval.embedder import TfidfEmbedder
from hybrid_kernels.retrieval.query_generator import DynamicQueryGenerator, reciprocal_rank_fusion
from hybrid_kernels.training import EntityQATask


@pytest.fixture(scope="module")
def world():
    task = EntityQATask(num_people=120, num_countries=20, seed=1)
    return task, task.world("test")


def _search(world):
    texts = [t for _, t in world.passages]
    emb = TfidfEmbedder(texts)
    D = emb(texts)

    def search(queries, k):
        S = emb(list(queries)) @ D.T
        out = []
        for row in S:
            order = np.argsort(-row, kind="stable")[:k]
            out.append([{"id": int(i), "score": float(row[i]), "title": world.passages[i][0],
                         "text": world.passages[i][1]} for i in order])
        return out
    return texts, search


def test_corpus_states_every_relation_about_every_person(world):
    task, w = world
    assert len(w.passages) == 120 * 6 + 20
    for person in w.people[:5]:
        for rel in ("country", "job", "pet", "instrument", "food", "color"):
            title, text = w.passages[w.index[(person, rel)]]
            assert title == person and text.startswith(person + " ") and w.facts[(person, rel)] in text.split()
    q = task.questions(w, 50, seed=3, multi_hop_share=1.0)[0]
    born, capital = (w.passages[i][1] for i in q.gold)
    country = born.split()[-2]
    assert capital == f"the capital of {country} is {q.answer} ."
    assert q.question.split()[-3] in born.split()     # the asked person is the one born there


def test_splits_are_fixed_and_distinct(world):
    task, w = world
    assert task.world("test").passages == w.passages
    assert task.world("train", 0).passages != w.passages
    assert task.world("dev").passages != w.passages
    with pytest.raises(ValueError, match="split"):
        task.world("valid")
    with pytest.raises(ValueError, match="num_countries"):
        EntityQATask(num_countries=500)


def test_batch_shapes_and_labels(world):
    task, w = world
    qs = task.questions(w, 2, seed=0)
    b = task.batch([q.question for q in qs], [[w.passages[i] for i in q.gold] for q in qs],
                   [q.answer for q in qs])
    P = max(len(q.gold) for q in qs)
    assert b["input_ids"].shape[:2] == (2, P) and b["attention_mask"].dtype.is_floating_point is False
    assert task.tokenizer.decode(b["labels"][0][b["labels"][0] >= 0].tolist()) == qs[0].answer
    with pytest.raises(ValueError, match="passage_sets"):
        task.batch(["a"], [])


def test_tfidf_embedder_prefers_the_named_entity(world):
    _, w = world
    texts = [t for _, t in w.passages]
    emb = TfidfEmbedder(texts)
    person = w.people[7]
    gold = w.index[(person, "pet")]
    scores = emb([f"what pet does {person} have ?"]) @ emb(texts).T
    assert int(np.argmax(scores[0])) == gold
    assert np.allclose(np.linalg.norm(emb(texts[:3]), axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="documents"):
        TfidfEmbedder([])


def test_reciprocal_rank_fusion():
    a = [{"id": 1}, {"id": 2}, {"id": 3}]
    b = [{"id": 3}, {"id": 1}]
    fused = reciprocal_rank_fusion([a, b], k=0)
    assert [d["id"] for d in fused] == [1, 3, 2]               # 1 + 1/2, 1/3 + 1, 1/2
    assert fused[0]["score"] == pytest.approx(1.5)
    assert [d["id"] for d in reciprocal_rank_fusion([a, b], [0.1, 1.0], k=0)] == [3, 1, 2]
    with pytest.raises(ValueError, match="weights"):
        reciprocal_rank_fusion([a, b], [1.0])


def test_second_round_finds_the_bridge_passage(world):
    task, w = world
    texts, search = _search(w)
    questions = task.questions(w, 30, seed=11, multi_hop_share=1.0)
    recall = {}
    for rounds in (1, 2):
        gen = DynamicQueryGenerator(texts, rounds=rounds, max_df=0.02)
        hits = 0
        for q in questions:
            found, trace = gen.retrieve(q.question, search, 10)
            hits += set(q.gold) <= {p["id"] for p in found}
            assert len(found) <= 10 and (rounds == 2 or trace["round2"] == [])
        recall[rounds] = hits / len(questions)
    assert recall[2] >= 0.9 and recall[2] > recall[1] + 0.3, recall
    gen = DynamicQueryGenerator(texts, max_df=0.02)
    q = questions[0]
    country = w.passages[q.gold[0]][1].split()[-2]
    _, trace = gen.retrieve(q.question, search, 10)
    assert any(t.endswith(" " + country) for t in trace["round2"])


def test_single_hop_keeps_the_gold_passage(world):
    task, w = world
    texts, search = _search(w)
    gen = DynamicQueryGenerator(texts, max_df=0.02)
    questions = task.questions(w, 30, seed=12, multi_hop_share=0.0)
    hits = sum(q.gold[0] in {p["id"] for p in gen.retrieve(q.question, search, 5)[0]} for q in questions)
    assert hits / len(questions) >= 0.9


def test_query_generator_validation():
    with pytest.raises(ValueError, match="documents"):
        DynamicQueryGenerator([])
    with pytest.raises(ValueError, match="rounds"):
        DynamicQueryGenerator(["a b"], rounds=3)
    with pytest.raises(ValueError, match="max_df"):
        DynamicQueryGenerator(["a b"], max_df=0.0)
    with pytest.raises(ValueError, match="k must"):
        DynamicQueryGenerator(["a b"]).retrieve("a", lambda q, k: [[] for _ in q], 0)


def test_compare_methods_reads_three_ways(world):
    pytest.importorskip("transformers")
    pytest.importorskip("faiss")
    import torch
    from transformers import T5Config

    from hybrid_kernels.models import FiDT5
    from hybrid_kernels.rag import HybridRAGPipeline
    from hybrid_kernels.retrieval import VectorStore
    task, w = world
    texts = [t for _, t in w.passages]
    emb = TfidfEmbedder(texts)
    cfg = T5Config(vocab_size=len(task.tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                   num_decoder_layers=1, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = FiDT5.from_config(cfg).eval()
    pipe = HybridRAGPipeline(model, task.tokenizer, embedder=emb, store=VectorStore(emb.dim), top_k=10,
                             max_new_tokens=3)
    pipe.add_documents([{"title": t, "text": x} for t, x in w.passages])
    q = task.questions(w, 1, seed=5, multi_hop_share=1.0)[0]
    gen = DynamicQueryGenerator([f"{t} {x}" for t, x in w.passages], max_df=0.02)
    out = pipe.compare_methods(q.question, gen)
    assert set(out) == {"no_retrieval", "retrieve_then_read", "hybrid"}
    assert out["no_retrieval"].passages == []
    assert len(out["retrieve_then_read"].passages) == 10
    assert set(q.gold) <= {p["id"] for p in out["hybrid"].passages}
    for r in out.values():     # each answer is the reader's on exactly those passages
        assert r.answer == pipe.read([q.question], [r.passages])[0]
