"""HybridRAGPipeline end to end on a tiny corpus, chunking, persistence, and the CLI."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("faiss")
from transformers import T5Config  # noqa: E402

from hybrid_kernels.models import FiDT5  # noqa: E402
from hybrid_kernels.rag import HybridRAGPipeline, chunk_text, load_tokenizer, main, save_tokenizer  # noqa: E402
from hybrid_kernels.retrieval import HashingEmbedder, VectorStore  # noqa: E402
from hybrid_kernels.training import QATask  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    task = QATask(num_passages=4, num_names=40, seed=3)
    tok = task.tokenizer
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                   num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = FiDT5.from_config(cfg).eval()
    examples = task.examples(3, "test")
    docs = [{"title": t, "text": x} for ex in examples for t, x in ex.passages]
    return task, tok, model, examples, docs


def test_pipeline_answers_end_to_end(setup):
    task, tok, model, examples, docs = setup
    pipe = HybridRAGPipeline(model, tok, embedder=HashingEmbedder(2048), top_k=3, max_new_tokens=4,
                             num_beams=2)
    assert pipe.add_documents(docs) == len(docs) == 12
    ex = examples[0]
    result = pipe.answer(ex.question)
    gold_title = ex.passages[ex.gold_index][0]
    assert result.passages[0]["title"] == gold_title        # retrieval finds the person's passage
    assert len(result.passages) == 3
    assert [p["score"] for p in result.passages] == sorted((p["score"] for p in result.passages), reverse=True)
    assert set(result.timings) >= {"embed_query", "search", "tokenize", "generate", "total"}
    assert all(v >= 0 for v in result.timings.values())
    # The answer is exactly what FiD generates from the retrieved passages.
    ids, mask = pipe._inputs([ex.question], [result.passages])
    want = model.generate(ids, mask, max_new_tokens=4, num_beams=2)
    assert result.answer == tok.decode(want[0, 1:].tolist())
    batch = pipe.answer_batch([e.question for e in examples])
    assert [r.passages[0]["title"] for r in batch] == [e.passages[e.gold_index][0] for e in examples]


def test_chunking():
    text = " ".join(f"w{i}" for i in range(25))
    chunks = chunk_text(text, chunk_words=10, overlap_words=3)
    assert chunks[0].split() == [f"w{i}" for i in range(10)]
    assert chunks[1].split()[0] == "w7" and chunks[-1].split()[-1] == "w24"
    assert chunk_text("", 10, 3) == [] and chunk_text("a b", 10, 3) == ["a b"]
    with pytest.raises(ValueError, match="chunk_words"):
        chunk_text(text, 5, 5)


def test_cli_end_to_end(tmp_path, setup, capsys, monkeypatch):
    task, tok, model, examples, docs = setup
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(str(ckpt))
    save_tokenizer(tok, str(ckpt))
    assert load_tokenizer(str(ckpt)).vocab == tok.vocab
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in docs))
    store_dir = tmp_path / "store"
    ex = examples[1]
    rc = main(["--model", str(ckpt), "--docs", str(corpus), "--store", str(store_dir),
               "--embedder", "hashing", "--top-k", "2", "--max-new-tokens", "3", "--int8",
               "--question", ex.question, "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["question"] == ex.question and isinstance(out["answer"], str)
    assert out["passages"][0]["title"] == ex.passages[ex.gold_index][0]
    assert len(VectorStore.load(str(store_dir))) == len(docs)
    # Second run reuses the persisted store, no --docs.
    rc = main(["--model", str(ckpt), "--store", str(store_dir), "--embedder", "hashing",
               "--top-k", "2", "--max-new-tokens", "3", "--question", ex.question])
    assert rc == 0 and "A:" in capsys.readouterr().out
