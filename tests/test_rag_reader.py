"""The RAG experiment's parts on tiny data: the reader's passage attention, the retriever
distillation loss, confidence routing, the attention PNG and a reader that learns."""
import random

import pytest
import torch

pytest.importorskip("transformers")

from hybrid_kernels.models import FiDT5, small_t5_config  # noqa: E402
from hybrid_kernels.reader_cascade import cascade_answers, route, threshold_for_accuracy  # noqa: E402
from hybrid_kernels.retrieval.distill import (BagOfWordsTower, reader_distillation_loss,  # noqa: E402
                                              recall_at_k, set_scores)
from hybrid_kernels.retrieval.neural import NeuralRetriever  # noqa: E402
from hybrid_kernels.training import EntityQATask, exact_match  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task():
    return EntityQATask(num_people=40, num_countries=10, seed=3)


def test_passage_attention_is_a_distribution_matching_dense_attention(task):
    torch.manual_seed(0)
    model = FiDT5.from_config(small_t5_config(len(task.tokenizer), 32, layers=1))
    w = task.world("train")
    qs = task.questions(w, 3, seed=1)
    # ragged sets: the padding passage of the short one gets no mass
    sets = [w.passages[:4], w.passages[4:8], w.passages[8:11]]
    b = task.batch([q.question for q in qs], sets, [q.answer for q in qs])
    mass = model.passage_attention(b["input_ids"], b["attention_mask"], b["labels"])
    assert mass.shape == (3, 4)
    assert torch.allclose(mass.sum(-1), torch.ones(3), atol=1e-5)
    assert (mass > 0).all() and model._ctx.attention_probs is None
    # the recorded weights are the ones the kernels use: same output from a dense recomputation
    layer = model.t5.decoder.block[0].layer[1].EncDecAttention
    enc, key_mask = model.encode(b["input_ids"], b["attention_mask"])
    hidden = torch.randn(3, 2, model.config.d_model)
    from hybrid_kernels.models.cross_kv import CrossKV
    from hybrid_kernels.models.fid import _dense_cross_probs
    k, v = layer.project_kv(enc)
    q = layer.q(hidden).view(3, 2, layer.n_heads, -1).transpose(1, 2)
    cache = CrossKV(k, v, key_mask, b["input_ids"].shape[2], None)
    dense = _dense_cross_probs(q, cache) @ v
    assert torch.allclose(dense, cache.attend(q), atol=1e-4)


def test_distillation_loss_moves_the_retriever_toward_the_reader(task):
    torch.manual_seed(0)
    tok = task.tokenizer
    retriever = NeuralRetriever(BagOfWordsTower(len(tok), 16), temperature=0.1)
    w = task.world("train")
    qs = task.questions(w, 8, seed=2, multi_hop_share=0.0)
    q_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(tok.encode(q.question)) for q in qs], batch_first=True)
    texts = [[f"{t} {x}" for t, x in w.passages[5 * i:5 * i + 5]] for i in range(8)]
    enc = [torch.tensor(tok.encode(t)) for row in texts for t in row]
    p_ids = torch.nn.utils.rnn.pad_sequence(enc, batch_first=True).view(8, 5, -1)
    target = torch.softmax(torch.randn(8, 5) * 3, -1)          # a peaked "reader" distribution
    opt = torch.optim.Adam(retriever.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = reader_distillation_loss(set_scores(retriever, q_ids, q_ids != 0, p_ids, p_ids != 0), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
    with torch.no_grad():
        p = torch.softmax(set_scores(retriever, q_ids, q_ids != 0, p_ids, p_ids != 0), -1)
    assert (p.argmax(-1) == target.argmax(-1)).float().mean() >= 0.75
    # KL is zero at the target, and padding passages leave both distributions
    scores = torch.log(target)
    assert float(reader_distillation_loss(scores, target)) == pytest.approx(0.0, abs=1e-5)
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[:, -1] = False
    assert float(reader_distillation_loss(scores[:, :4].clone(), target[:, :4])) == pytest.approx(
        float(reader_distillation_loss(torch.cat([scores[:, :4], torch.zeros(8, 1)], 1), target, mask)), abs=1e-5)
    with pytest.raises(ValueError, match="match"):
        reader_distillation_loss(scores, target[:, :3])


def test_recall_at_k():
    assert recall_at_k([[1, 2, 3], [4, 5, 6]], [[2], [6, 4]], 2) == 0.5
    assert recall_at_k([[1, 2, 3], [4, 5, 6]], [[2], [6, 4]], 3) == 1.0


def test_cascade_routes_by_threshold():
    conf = [0.9, 0.8, 0.6, 0.4, 0.2]
    correct = [True, True, False, True, False]
    assert threshold_for_accuracy(conf, correct, 1.0) == 0.8          # top two are right
    assert threshold_for_accuracy(conf, correct, 0.75) == 0.4         # 3 of the top 4
    assert threshold_for_accuracy(conf, correct, 0.0) == 0.2
    use = route(torch.tensor(conf), 0.8)
    assert use.tolist() == [True, True, False, False, False]
    assert cascade_answers(["s"] * 5, ["t"] * 5, use) == ["s", "s", "t", "t", "t"]
    assert threshold_for_accuracy([0.5], [False], 0.5) > 0.5           # nothing reaches it: nothing routed


def test_attention_png_is_written(tmp_path):
    from hybrid_kernels.rag_plots import plot_passage_attention
    path = plot_passage_attention([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [[True, False, False], [False, False, True]],
                                  ["q one", "q two"], str(tmp_path / "a.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="mass and gold"):
        plot_passage_attention([[0.5, 0.5]], [[True]], ["q"], str(tmp_path / "b.png"))


def test_reader_learns_a_tiny_task_above_chance(task):
    """Gold passage handed over: the reader must copy the value from it; chance is ~1/16."""
    from hybrid_kernels.training import TrainConfig, Trainer
    torch.manual_seed(0)
    model = FiDT5.from_config(small_t5_config(len(task.tokenizer), 64))
    world = task.world("train")
    rng = random.Random(0)

    def batches():
        while True:
            qs = task.questions(world, 16, seed=rng.randrange(10 ** 6), multi_hop_share=0.0)
            yield task.batch([q.question for q in qs], [[world.passages[q.gold[0]]] for q in qs],
                             [q.answer for q in qs])
    Trainer(model, lambda m, b: m(b["input_ids"], b["attention_mask"], labels=b["labels"])["loss"],
            TrainConfig(lr=3e-3, warmup_steps=20, max_steps=250, progress=False)).train(batches())
    test = task.world("test")
    qs = task.questions(test, 40, seed=5, multi_hop_share=0.0)
    b = task.batch([q.question for q in qs], [[test.passages[q.gold[0]]] for q in qs])
    out = model.generate(b["input_ids"], b["attention_mask"], max_new_tokens=3)
    em = sum(exact_match(task.tokenizer.decode(o[1:].tolist()), q.answer) for o, q in zip(out, qs)) / len(qs)
    assert em >= 0.5, em
