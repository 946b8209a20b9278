"""Masked diffusion LM and embedding diffusion: training signal, sampling, persistence, parsing."""
import pytest
import torch

from hybrid_kernels.diffusion import EmbeddingDiffusion, MaskedDiffusionLM, fact_corpus, parse_fact
from hybrid_kernels.diffusion.text import train
from hybrid_kernels.training import QATask


@pytest.fixture(scope="module")
def task():
    return QATask()


def small(task):
    torch.manual_seed(0)
    return MaskedDiffusionLM(task.tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def test_parse_fact(task):
    name = task.names[0]
    assert parse_fact(f"{name} was born in lima .", task.names) == (name, "city", "lima")
    assert parse_fact(f"{name}  plays the harp .", task.names) == (name, "instrument", "harp")
    assert parse_fact(f"{name} was born in harp .", task.names) is None      # value of another relation
    assert parse_fact("nobody was born in lima .", task.names) is None       # unknown name
    assert parse_fact(f"{name} was born in", task.names) is None


def test_corpus_pairs_are_valid_facts_about_the_asked_person(task):
    for question, doc in fact_corpus(task, 20):
        name, _, _ = parse_fact(doc, task.names)
        assert name in question.split()


def test_training_lowers_the_loss_and_raises_denoising_accuracy(task):
    model = small(task)
    pairs = fact_corpus(task, 64)
    conds, docs = [c for c, _ in pairs], [d for _, d in pairs]
    before = model.denoising_accuracy(conds, docs)
    losses = train(model, pairs, steps=60, batch_size=32, lr=3e-3)
    assert losses[-1] < losses[0]
    assert model.denoising_accuracy(conds, docs) > before + 0.2


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_generate_unmasks_every_position(task, steps):
    model = small(task)
    cond = model._pad(["where was bako born ?"] * 2, model.condition_len, "condition")
    out = model.generate(cond, steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, model.target_len)
    assert not (out == model.mask_id).any()


def test_generate_validation(task):
    model = small(task)
    with pytest.raises(ValueError, match="num_steps"):
        model.generate_texts("where was bako born ?", 1, 0)
    with pytest.raises(ValueError, match="condition must encode"):
        model.generate_texts("a " * 20)
    with pytest.raises(ValueError, match="condition must be"):
        model.generate(torch.zeros(1, 3, dtype=torch.long))


def test_save_and_load_give_the_same_logits(task, tmp_path):
    model = small(task).eval()
    model.save_pretrained(str(tmp_path))
    loaded = MaskedDiffusionLM.from_pretrained(str(tmp_path))
    cond = model._pad(["where was bako born ?"], model.condition_len, "c")
    x = torch.full((1, model.target_len), model.mask_id)
    torch.testing.assert_close(loaded.logits(cond, x), model.logits(cond, x))
    with pytest.raises(ValueError, match="not a saved"):
        MaskedDiffusionLM.from_pretrained(str(tmp_path / "nothing"))


def test_embedding_diffusion_learns_to_sample_near_its_condition():
    torch.manual_seed(0)
    dim = 8
    model = EmbeddingDiffusion(dim, steps=20, hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):              # target = the condition itself
        c = torch.randn(64, dim, generator=g)
        loss = model.loss(c, c, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cond = torch.randn(4, dim, generator=g)
    samples = model.sample(cond, 8, torch.Generator().manual_seed(1))
    assert samples.shape == (4, 8, dim)
    near = (samples - cond[:, None]).norm(dim=-1).mean()
    far = (samples - cond.roll(1, 0)[:, None]).norm(dim=-1).mean()
    assert near < 0.7 * far          # an untrained sampler: near == far
    with pytest.raises(ValueError, match="condition must be"):
        model.sample(torch.zeros(2, dim + 1))
