"""The learned second retrieval round: after InfoNCE training on training-world multi-hop
questions, the enhanced query ranks the bridge passage (the capital of the birth country) far
higher on a held-out world than the untrained module, and fused with the first round it finds
both hops where the first round alone does not."""
import pytest
import torch

from hybrid_kernels.retrieval.embedder import TfidfEmbedder
from hybrid_kernels.retrieval.query_enhancer import (EnhancerGroup, LearnedQueryEnhancer,
                                                      LearnedSecondRound, fit_query_enhancer)
from hybrid_kernels.retrieval.query_generator import DynamicQueryGenerator
from hybrid_kernels.retrieval.vector_store import VectorStore
from hybrid_kernels.training import EntityQATask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Index:
    """TF-IDF search over one world plus its one-round generator."""

    def __init__(self, world):
        texts = [t for _, t in world.passages]
        self.embedder = TfidfEmbedder(texts)
        self.store = VectorStore(self.embedder.dim)
        self.corpus = [{"id": i, "title": t, "text": x} for i, (t, x) in enumerate(world.passages)]
        self.store.add(self.embedder([f"{t} {x}" for t, x in world.passages]),
                       payloads=[{"title": t, "text": x} for t, x in world.passages])
        self.first = DynamicQueryGenerator(texts, rounds=1)

    def search(self, queries, k):
        scores, ids = self.store.search(self.embedder(list(queries)), k)
        return [[dict(id=int(i), score=float(s), **self.store.payload(int(i))) for s, i in zip(sr, ir) if i >= 0]
                for sr, ir in zip(scores, ids)]

    def first_round(self, question, k=3):
        return self.first.retrieve(question, self.search, k)[0]


@pytest.fixture(scope="module")
def setup():
    task = EntityQATask(num_people=80, num_countries=30, seed=0)
    encode = task.tokenizer.encode
    groups = []
    for w in range(6):
        world = task.world("train", w)
        index = _Index(world)
        qs = task.questions(world, 100, seed=w, multi_hop_share=1.0)
        first = [[f"{p['title']} {p['text']}" for p in index.first_round(q.question)] for q in qs]
        groups.append(EnhancerGroup.from_texts(encode, [q.question for q in qs], first,
                                               [f"{t} {x}" for t, x in world.passages],
                                               [q.gold[1] for q in qs], max_passages=3))
    test = task.world("test")
    return task, groups, test, _Index(test), task.questions(test, 40, seed=5, multi_hop_share=1.0)


def _bridge_ranks(second, index, questions):
    ranks = []
    for q in questions:
        scores = second.documents @ second.query(q.question, index.first_round(q.question))
        ranks.append(int((scores > scores[q.gold[1]]).sum()) + 1)
    return torch.tensor(ranks, dtype=torch.float)


def test_trained_enhancer_ranks_the_bridge_passage_higher(setup):
    task, groups, test, index, questions = setup
    torch.manual_seed(0)
    enhancer = LearnedQueryEnhancer(len(task.tokenizer), dim=32, num_heads=4, max_passages=3)
    before = _bridge_ranks(LearnedSecondRound(enhancer, task.tokenizer.encode, index.corpus, index.first),
                           index, questions)
    losses = fit_query_enhancer(enhancer, groups, steps=250, batch_size=32, lr=1e-2)
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    second = LearnedSecondRound(enhancer, task.tokenizer.encode, index.corpus, index.first)
    after = _bridge_ranks(second, index, questions)
    assert float((after <= 5).float().mean()) >= 0.8
    assert float(after.median()) < 0.25 * float(before.median())
    # fused with the first round, both hops are in the top 10 far more often than with round 1 alone
    both_fused = sum(set(q.gold) <= {p["id"] for p in second.retrieve(q.question, index.search, 10)[0]}
                     for q in questions)
    both_first = sum(set(q.gold) <= {p["id"] for p in index.first.retrieve(q.question, index.search, 10)[0]}
                     for q in questions)
    assert both_fused >= both_first + 0.4 * len(questions)


def test_enhancer_shapes_and_input_errors():
    torch.manual_seed(0)
    enh = LearnedQueryEnhancer(50, dim=16, num_heads=2, max_passages=2)
    q = torch.randint(1, 50, (3, 5))
    p = torch.randint(1, 50, (3, 2, 7))
    out = enh(q, None, p)
    assert out.shape == (3, 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert enh.encode_documents(torch.randint(1, 50, (4, 6))).shape == (4, 16)
    with pytest.raises(ValueError, match="passage_ids"):
        enh(q, None, torch.randint(1, 50, (3, 3, 7)))           # more passages than max_passages
    with pytest.raises(ValueError, match="passage_ids"):
        enh(q, None, p[:, 0])                                     # not (B, M, L)
    with pytest.raises(ValueError, match="batch size"):
        enh(q[:2], None, p)
    with pytest.raises(ValueError, match="dim"):
        LearnedQueryEnhancer(50, dim=10, num_heads=3)
    with pytest.raises(ValueError, match="positives"):
        enh.loss(out, enh.encode_documents(torch.randint(1, 50, (4, 6))), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"):
        fit_query_enhancer(enh, [])
    with pytest.raises(TypeError, match="encode"):
        LearnedSecondRound(enh, "not callable", [{"id": 0, "title": "", "text": "x"}], None)
