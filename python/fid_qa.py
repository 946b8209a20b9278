"""Retrieval-augmented QA with Fusion-in-Decoder on the generated multi-passage task.

Builds a corpus from held-out questions' passages (one document per passage), indexes it in a
faiss VectorStore with the packaged all-MiniLM-L6-v2 embedder (or --embedder hashing), retrieves
top-k passages per question and answers with a FiDT5 checkpoint:

    PYTHONPATH=. python bench/train_fid.py --passages 10 --save-dir /tmp/fid10   # train a reader
    PYTHONPATH=. python python/fid_qa.py --model /tmp/fid10 --questions 50

Without --model, a small random-init FiDT5 is used (answers are then meaningless, but every stage
runs and is timed).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hybrid_kernels.models import FiDT5  # noqa: E402
from hybrid_kernels.rag import HybridRAGPipeline, load_tokenizer  # noqa: E402
from hybrid_kernels.retrieval import HashingEmbedder, TextEmbedder, VectorStore  # noqa: E402
from hybrid_kernels.training import QATask, exact_match  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="FiDT5 checkpoint dir saved with its tokenizer")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--embedder", choices=("minilm", "hashing"), default="minilm")
    ap.add_argument("--index", choices=("flat", "ivf", "hnsw"), default="flat")
    ap.add_argument("--int8", action="store_true", help="INT8 cross-attention K/V")
    ap.add_argument("--top-passages", type=int, default=None, help="landmark sparse fusion")
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--show", type=int, default=3, help="print this many answers in full")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    task = QATask(num_passages=10)
    opts = dict(cross_attention_quant="int8" if args.int8 else None, top_passages=args.top_passages)
    if args.model:
        model, tokenizer = FiDT5.from_pretrained(args.model, **opts), load_tokenizer(args.model)
    else:
        from transformers import T5Config
        tokenizer = task.tokenizer
        model = FiDT5.from_config(T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128,
                                           num_layers=2, num_heads=4, decoder_start_token_id=0,
                                           pad_token_id=0, eos_token_id=1), **opts)
    model.eval()
    embedder = TextEmbedder() if args.embedder == "minilm" else HashingEmbedder()
    pipe = HybridRAGPipeline(model, tokenizer, embedder=embedder,
                             store=VectorStore(embedder.dim, index=args.index), top_k=args.top_k,
                             max_new_tokens=4, num_beams=args.num_beams)
    examples = task.examples(args.questions, "test", seed=7)
    t0 = time.perf_counter()
    n_chunks = pipe.add_documents([{"title": t, "text": x} for ex in examples for t, x in ex.passages])
    t_index = time.perf_counter() - t0
    hits = recall = 0
    totals = {}
    for i, ex in enumerate(examples):
        r = pipe.answer(ex.question)
        hits += exact_match(r.answer, ex.answer)
        recall += any(p["title"] == ex.passages[ex.gold_index][0] for p in r.passages)
        for k, v in r.timings.items():
            totals[k] = totals.get(k, 0.0) + v
        if i < args.show:
            print(f"Q: {ex.question}\nA: {r.answer!r} (gold {ex.answer!r}); top passage: "
                  f"{r.passages[0]['title']}: {r.passages[0]['text']}")
    n = len(examples)
    print(f"\nindexed {n_chunks} passages in {t_index:.2f} s")
    print(f"exact match {100 * hits / n:.1f}%, gold passage in top-{args.top_k}: {100 * recall / n:.1f}%")
    print("mean per question: " + ", ".join(f"{k} {1e3 * v / n:.1f} ms" for k, v in totals.items()))


if __name__ == "__main__":
    main()
