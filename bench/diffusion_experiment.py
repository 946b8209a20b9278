"""Text and embedding diffusion on the generated QA corpus.

1. Trains the masked diffusion LM (:class:`hybrid_kernels.diffusion.MaskedDiffusionLM`, denoiser
   a bidirectional HybridEncoder) on (question -> answering passage) pairs, then reports the
   denoising accuracy at several mask rates, and for generated documents the share that parse as
   valid facts of the corpus' templates and the share that also speak of the asked person.
2. Trains the embedding diffusion (:class:`hybrid_kernels.diffusion.EmbeddingDiffusion`) to
   sample passage embeddings given a query embedding, and measures retriever recall@k on held-out
   questions (each with its 10 passages in one shared index) for: the query alone, the query
   plus sampled passage embeddings, and the query plus embeddings of text-diffusion documents.

    PYTHONPATH=. python bench/diffusion_experiment.py [--text-seconds 240 --embed-seconds 60]
        [--save-dir DIR]       # the text model, for hybrid-kernels serve --diffusion DIR
"""
import argparse
import os
import random
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hybrid_kernels.bench.env import device_name  # noqa: E402
from hybrid_kernels.diffusion import EmbeddingDiffusion, MaskedDiffusionLM, fact_corpus, parse_fact  # noqa: E402
from hybrid_kernels.diffusion.text import train as train_text  # noqa: E402
from hybrid_kernels.retrieval import HashingEmbedder, VectorStore  # noqa: E402
from hybrid_kernels.training import QATask  # noqa: E402


def train_embedding(model, queries, passages, seconds, batch_size=128, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    q, p = torch.from_numpy(queries), torch.from_numpy(passages)
    start, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, len(q), (batch_size,), generator=g)
        loss = model.loss(p[idx], q[idx], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
    model.eval()
    return step, float(np.mean(losses[-50:]))


def recall(store, query_vectors, gold_ids, ks):
    _, ids = store.search(query_vectors, max(ks))
    return {k: float(np.mean([g in row[:k] for g, row in zip(gold_ids, ids)])) for k in ks}


def normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text-seconds", type=float, default=240)
    ap.add_argument("--embed-seconds", type=float, default=60)
    ap.add_argument("--train-pairs", type=int, default=20000)
    ap.add_argument("--eval", type=int, default=300)
    ap.add_argument("--samples", type=int, default=4, help="augmentation samples per query")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = QATask()
    train_pairs = fact_corpus(task, args.train_pairs, "train")
    test_examples = task.examples(args.eval, "test")
    test_pairs = [(ex.question, ex.passages[ex.gold_index][1]) for ex in test_examples]
    print(f"on {device_name('cpu')}, {args.threads} thread(s), shared machine")

    model = MaskedDiffusionLM(task.tokenizer)
    t0 = time.perf_counter()
    losses = train_text(model, train_pairs, steps=100_000, max_seconds=args.text_seconds)
    print(f"text diffusion: {sum(p.numel() for p in model.parameters())} parameters, trained "
          f"{time.perf_counter() - t0:.0f} s, final loss {losses[-1] if losses else float('nan'):.3f}")
    conds, docs = [c for c, _ in test_pairs], [d for _, d in test_pairs]
    for rate in (0.25, 0.5, 0.9):
        print(f"  denoising accuracy at mask rate {rate}: {model.denoising_accuracy(conds, docs, rate):.3f}")
    generated = {}
    for steps in (1, 4, 10):
        t0 = time.perf_counter()
        out = [model.generate_texts(c, 1, steps, seed=i)[0] for i, c in enumerate(conds)]
        sec = time.perf_counter() - t0
        parsed = [parse_fact(d, task.names) for d in out]
        valid = sum(p is not None for p in parsed) / len(out)
        on_topic = sum(p is not None and p[0] in c.split() for p, c in zip(parsed, conds)) / len(out)
        print(f"  generate num_steps={steps:>2}: valid facts {valid:.3f}, valid and about the asked "
              f"person {on_topic:.3f}, {1e3 * sec / len(out):.1f} ms/document")
        generated[steps] = out
    print(f"  e.g. {conds[0]!r} -> {generated[10][0]!r}")
    if args.save_dir:
        model.save_pretrained(args.save_dir)
        print(f"  saved to {args.save_dir}")

    emb = HashingEmbedder()
    train_q = emb([c for c, _ in train_pairs[:10000]])
    train_p = emb([d for _, d in train_pairs[:10000]])
    ediff = EmbeddingDiffusion(emb.dim)
    steps, loss = train_embedding(ediff, train_q, train_p, args.embed_seconds)
    print(f"embedding diffusion: {steps} steps in {args.embed_seconds:.0f} s, final loss {loss:.3f}")

    store = VectorStore(emb.dim, use_gpu=False)
    gold_ids = []
    for ex in test_examples:
        ids = store.add(emb([f"{t} {p}" for t, p in ex.passages]))
        gold_ids.append(int(ids[ex.gold_index]))
    q = emb(conds)
    ks = (1, 5, 10)
    sampled = ediff.sample(torch.from_numpy(q), args.samples, torch.Generator().manual_seed(0)).numpy()
    text_aug = np.stack([emb(model.generate_texts(c, args.samples, 10, seed=i)) for i, c in enumerate(conds)])
    rows = {"query alone": q,
            "query + sampled embeddings": normalize(q + normalize(sampled).mean(1)),
            "query + text-diffusion documents": normalize(q + text_aug.mean(1))}
    print(f"retriever recall@k, {args.eval} questions, {len(store)} passages in the index "
          f"(hashing embedder, {args.samples} samples per query)")
    for name, vectors in rows.items():
        r = recall(store, vectors.astype(np.float32), gold_ids, ks)
        print(f"  {name:<34} " + "  ".join(f"R@{k} {v:.3f}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    random.seed(0)
    raise SystemExit(main())
