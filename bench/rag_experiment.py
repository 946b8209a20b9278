"""RAG on the entity-grounded multi-hop corpus: a FiD reader trained on retrieved top-k sets,
exact match over the pooled test corpus at top-1/5/10/20 with one retrieval round (question + its
entities), with the DynamicQueryGenerator's rule-based second round and with a learned second
round (LearnedSecondRound: question tokens attend over the first round's passages, a dense query
for the bridge passage, fused by reciprocal rank), against the gold passages handed over;
retrieval recall@k of each. Then: a dual-encoder retriever and the reader trained alternately
(round 1: the reader teaches the retriever by KL to its passage attention, alone and + InfoNCE;
round 2: the reader fine-tuned on that retriever's sets teaches it again), recall and reader EM
per round; a student/teacher cascade routed by the student's first-token probability (thresholds
calibrated on dev); a heatmap of the reader's passage attention (passage_attention.png) and
HybridRAGPipeline.compare_methods on a multi-hop question. Writes results.json and results.md.

    PYTHONPATH=. python bench/rag_experiment.py --out results/rag            # full (~17 min, 2 cores)
    PYTHONPATH=. python bench/rag_experiment.py --quick --out /tmp/rag       # smoke (~40 s)

The reader is trained on the sets the two-round retriever returns for questions about 10 fresh
training worlds (gold passages always in, each set shuffled so that rank position tells nothing),
with a curriculum over the passages read: the gold passages alone, then 5, then a mix of 5, 10 and
20 (fractions 0.08 / 0.3 / 1 of the time budget). Distractors state the same relation about other
people, so only the asked name tells the gold passage apart. Every set is read as
prepare_for_reader makes it: entity-linked where the chain answers the rest of the question ("X
was born in C ." is read together with a retrieved "the capital of C is Y ." for the 2-hop
question, not for "where was X born ?") and with an exact-match marker on the passages about the
asked entity. The reader trains on the sets of every retrieval method (one round, rule-based and
learned second round), the learned round being trained first.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hybrid_kernels.models.fid import FiDT5, small_t5_config  # noqa: E402
from hybrid_kernels.rag import HybridRAGPipeline  # noqa: E402
from hybrid_kernels.rag_plots import plot_passage_attention  # noqa: E402
from hybrid_kernels.reader_cascade import (cascade_answers, first_token_answers, route,  # noqa: E402
                                           threshold_for_accuracy)
from hybrid_kernels.retrieval import DynamicQueryGenerator, TfidfEmbedder, VectorStore  # noqa: E402
from hybrid_kernels.retrieval.distill import (BagOfWordsTower, reader_distillation_loss,  # noqa: E402
                                              recall_at_k, set_scores)
from hybrid_kernels.retrieval.chains import prepare_for_reader  # noqa: E402
from hybrid_kernels.retrieval.neural import NeuralRetriever  # noqa: E402
from hybrid_kernels.retrieval.query_enhancer import (EnhancerGroup, LearnedQueryEnhancer,  # noqa: E402
                                                     LearnedSecondRound, fit_query_enhancer)
from hybrid_kernels.training import EntityQATask, TrainConfig, Trainer, exact_match  # noqa: E402

TOP_K = (1, 5, 10, 20)
METHODS = {1: "question + entities", 2: "+ rule-based 2nd round", "learned": "+ learned 2nd round"}


class WorldIndex:
    """One world's passages behind a HybridRAGPipeline (TF-IDF store) and both query generators."""

    def __init__(self, world, model, tokenizer):
        texts = [text for _, text in world.passages]
        embedder = TfidfEmbedder(texts)
        self.pipe = HybridRAGPipeline(model, tokenizer, embedder=embedder,
                                      store=VectorStore(embedder.dim), top_k=max(TOP_K), max_new_tokens=4,
                                      prepare_passages=prepare_for_reader)
        self.pipe.add_documents([{"title": t, "text": x} for t, x in world.passages])
        self.generators = {rounds: DynamicQueryGenerator(texts, rounds=rounds) for rounds in (1, 2)}
        self.corpus = [{"id": i, "title": t, "text": x} for i, (t, x) in enumerate(world.passages)]

    def add_learned_round(self, enhancer, tokenizer):
        """The learned second round (:class:`LearnedSecondRound`) over this world as method "learned"."""
        self.generators["learned"] = LearnedSecondRound(enhancer, tokenizer.encode, self.corpus,
                                                        self.generators[1])

    def search(self, queries, k):
        return self.pipe.retrieve(queries, k)[0]

    def retrieve(self, question: str, k: int, rounds):
        """Top-k passage dicts by method ``rounds``: 1, 2 (rule-based second round) or "learned"."""
        return self.generators[rounds].retrieve(question, self.search, k)[0]


def fid_batch(task, questions, passage_sets, answers=None):
    """The reader's tensors for (title, text) sets, entity-linked (a passage naming another retrieved
    passage's entity is read together with it) and marked where the question names the passage's
    entity (:func:`prepare_for_reader`)."""
    return task.batch(questions, [prepare_for_reader(q, ps) for q, ps in zip(questions, passage_sets)], answers)


def _with_gold(ps, gold, k):
    """A gold passage the retriever missed replaces the lowest ranks."""
    missing = [g for g in gold if g not in ps]
    return ps[:k - len(missing)] + missing if missing else ps


def training_sets(task, worlds, indexes, questions_per_world, k, seed=0, multi_hop_share=None):
    """(question, top-k passages of the two-round retriever in rank order, answer, gold passages,
    [top-k of the other retrieval methods of the index]) for training-world questions, gold
    passages always in. Every world draws fresh facts about the same names, so more worlds mean
    less memorization; training on every method's sets keeps their distractors in distribution."""
    data = []
    for w, (world, index) in enumerate(zip(worlds, indexes)):
        for q in task.questions(world, questions_per_world, seed=100 + w + 1000 * seed,
                                multi_hop_share=multi_hop_share):
            gold = [world.passages[i] for i in q.gold]
            sets = {m: _with_gold([(p["title"], p["text"]) for p in index.retrieve(q.question, k, m)], gold, k)
                    for m in index.generators}
            data.append((q.question, sets[2], q.answer, gold, [ps for m, ps in sets.items() if m != 2]))
    return data


CURRICULUM = ((0.08, (1,)), (0.3, (5,)), (1.0, (5, 10, 20, 20)))


def curriculum_passages(fraction: float, rng: random.Random, curriculum=CURRICULUM) -> int:
    """Passages read at this fraction of the training budget: the gold passages alone (n = 1), then
    5 (where telling the asked name from the others is learned), then a mix of 5, 10 and 20 (20
    twice as often) for the rest, so that the reader is trained at the set sizes it is evaluated
    at and more passages do not become a distribution shift."""
    for end, sizes in curriculum:
        if fraction < end:
            return rng.choice(sizes)
    return rng.choice(curriculum[-1][1])


def batches(task, data, batch_size, seed, budget_seconds=None, total_steps=None, curriculum=CURRICULUM):
    """Training batches whose passage count follows :func:`curriculum_passages` over the time
    budget (or the step budget); n = 1 reads the gold passages alone. The gold passages stay in
    every set and each set is shuffled, so that the reader cannot learn the retriever's rank
    order (where the gold passage sits) instead of reading the asked name."""
    rng = random.Random(seed)
    t0, step = time.perf_counter(), 0
    while True:
        frac = ((time.perf_counter() - t0) / budget_seconds if budget_seconds
                else step / max(1, total_steps or 1))
        n = curriculum_passages(frac, rng, curriculum)
        chosen = rng.sample(data, batch_size)
        # the set of one of the retrieval methods (the two-round one, or one of c[4])
        sets = [list(c[3]) if n == 1 else list(rng.choice([c[1]] + list(c[4] if len(c) > 4 else []))[:n])
                for c in chosen]
        for c, ps in zip(chosen, sets):
            for g in c[3]:
                if g not in ps:
                    ps[len(ps) - 1 - c[3].index(g)] = g
            if n > 1:
                rng.shuffle(ps)
        step += 1
        yield fid_batch(task, [c[0] for c in chosen], sets, [c[2] for c in chosen])


def read(model, task, questions, passage_sets, batch_size=50):
    answers = []
    for i in range(0, len(questions), batch_size):
        b = fid_batch(task, questions[i:i + batch_size], passage_sets[i:i + batch_size])
        out = model.generate(b["input_ids"], b["attention_mask"], max_new_tokens=4)
        answers += [task.tokenizer.decode(o[1:].tolist()) for o in out]
    return answers


def evaluate(model, task, world, index, questions):
    model.eval()
    qtexts = [q.question for q in questions]
    rows = []
    gold_sets = [[world.passages[i] for i in q.gold] for q in questions]
    gold_em = [exact_match(a, q.answer) for a, q in zip(read(model, task, qtexts, gold_sets), questions)]
    for rounds in index.generators:
        for k in TOP_K:
            found = [index.retrieve(q.question, k, rounds) for q in questions]
            sets = [[(p["title"], p["text"]) for p in ps] for ps in found]
            ems = [exact_match(a, q.answer) for a, q in zip(read(model, task, qtexts, sets), questions)]
            for hops in (1, 2):
                sel = [i for i, q in enumerate(questions) if q.hops == hops]
                recall = [set(questions[i].gold) <= {p["id"] for p in found[i]} for i in sel]
                rows.append({"rounds": rounds, "top_k": k, "hops": hops, "questions": len(sel),
                             "exact_match": sum(ems[i] for i in sel) / max(1, len(sel)),
                             "recall": sum(recall) / max(1, len(sel))})
            rows.append({"rounds": rounds, "top_k": k, "hops": "all", "questions": len(questions),
                         "exact_match": sum(ems) / len(ems)})
    gold = {"all": sum(gold_em) / len(gold_em)}
    for hops in (1, 2):
        sel = [g for g, q in zip(gold_em, questions) if q.hops == hops]
        gold[hops] = sum(sel) / max(1, len(sel))
    return rows, gold


def em_table(rows, gold, pct=lambda x: f"{100 * x:.1f}%"):
    """Markdown lines of the exact-match / recall table, one row per (method, top-k)."""
    lines = ["| retrieval | top-k | EM all | EM 1-hop | EM 2-hop | recall 1-hop | recall 2-hop |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for rounds in dict.fromkeys(x["rounds"] for x in rows):
        for k in TOP_K:
            r = {str(x["hops"]): x for x in rows if x["rounds"] == rounds and x["top_k"] == k}
            lines.append(f"| {METHODS[rounds]} | {k} | {pct(r['all']['exact_match'])} | {pct(r['1']['exact_match'])} | "
                         f"{pct(r['2']['exact_match'])} | {pct(r['1']['recall'])} | {pct(r['2']['recall'])} |")
    return lines


def print_tables(rows, gold):
    print("\nExact match over the pooled test corpus (gold passages handed over: "
          f"all {100 * gold['all']:.1f}%, 1-hop {100 * gold[1]:.1f}%, 2-hop {100 * gold[2]:.1f}%)")
    print("\n".join(em_table(rows, gold)))


def encode_texts(tokenizer, texts):
    """Word ids (N, L) and mask (N, L) of the texts, padded with 0."""
    enc = [tokenizer.encode(t) for t in texts]
    ids = torch.zeros((len(enc), max(len(e) for e in enc)), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
    return ids, ids != 0


def reader_targets(model, task, data, batch_size=16):
    """The reader's cross-attention mass over each training set's passages: (N, P)."""
    out = []
    for i in range(0, len(data), batch_size):
        part = data[i:i + batch_size]
        b = fid_batch(task, [c[0] for c in part], [c[1] for c in part], [c[2] for c in part])
        out.append(model.passage_attention(b["input_ids"], b["attention_mask"], b["labels"]))
    return torch.cat(out)


def corpus_recall(retriever, tokenizer, world, questions):
    """Recall@k of a dual encoder over the whole corpus, per hop type and overall."""
    docs, dmask = encode_texts(tokenizer, [f"{t} {x}" for t, x in world.passages])
    qs, qmask = encode_texts(tokenizer, [q.question for q in questions])
    with torch.no_grad():
        ranked = (retriever.encode_queries(qs, qmask) @ retriever.encode_documents(docs, dmask).T
                  ).topk(max(TOP_K), dim=-1).indices.tolist()
    out = {}
    for hops in ("all", 1, 2):
        sel = [i for i, q in enumerate(questions) if hops == "all" or q.hops == hops]
        out[str(hops)] = {k: recall_at_k([ranked[i] for i in sel], [questions[i].gold for i in sel], k)
                          for k in TOP_K}
    return out


def train_retriever(task, data, targets, seconds, use_contrastive, seed=0, init=None):
    """A bag-of-words dual encoder trained by the reader: KL(reader attention || retriever softmax)
    over each retrieved set, plus (``use_contrastive``) InfoNCE with the first gold passage as
    positive, the batch's other positives and the set's non-gold passages as negatives (hard
    negatives: the sets are what a retriever returned). ``init``: continue from this retriever."""
    torch.manual_seed(seed)
    retriever = (copy.deepcopy(init) if init is not None else
                 NeuralRetriever(BagOfWordsTower(len(task.tokenizer), 64), temperature=0.1))
    opt = torch.optim.AdamW(retriever.parameters(), lr=3e-3)
    rng = random.Random(seed)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        idx = rng.sample(range(len(data)), min(32, len(data)))
        part = [data[i] for i in idx]
        q_ids, q_mask = encode_texts(task.tokenizer, [c[0] for c in part])
        P = len(part[0][1])
        p_ids, p_mask = encode_texts(task.tokenizer, [f"{t} {x}" for c in part for t, x in c[1]])
        p_ids, p_mask = p_ids.view(len(part), P, -1), p_mask.view(len(part), P, -1)
        loss = reader_distillation_loss(set_scores(retriever, q_ids, q_mask, p_ids, p_mask), targets[idx])
        if use_contrastive:
            pos = encode_texts(task.tokenizer, [f"{c[3][0][0]} {c[3][0][1]}" for c in part])
            negs = [f"{t} {x}" for c in part for t, x in c[1][:5] if (t, x) not in c[3]]
            neg = encode_texts(task.tokenizer, negs)
            loss = loss + retriever.contrastive_loss(q_ids, q_mask, *pos, *neg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return retriever, steps


def dense_ranking(retriever, tokenizer, world, questions, k):
    """Corpus ids of each question's top-k under a dual encoder: (Q, k) lists."""
    docs, dmask = encode_texts(tokenizer, [f"{t} {x}" for t, x in world.passages])
    qs, qmask = encode_texts(tokenizer, [q.question for q in questions])
    with torch.no_grad():
        return (retriever.encode_queries(qs, qmask) @ retriever.encode_documents(docs, dmask).T
                ).topk(k, dim=-1).indices.tolist()


def dense_training_sets(task, worlds, retriever, questions_per_world, k, seed=0, multi_hop_share=None):
    """Like :func:`training_sets`, from the dual encoder's top-k (gold passages kept in)."""
    data = []
    for w, world in enumerate(worlds):
        qs = task.questions(world, questions_per_world, seed=100 + w + 1000 * seed, multi_hop_share=multi_hop_share)
        for q, ranked in zip(qs, dense_ranking(retriever, task.tokenizer, world, qs, k)):
            ps = [world.passages[i] for i in ranked]
            gold = [world.passages[i] for i in q.gold]
            missing = [g for g in gold if g not in ps]
            if missing:
                ps = ps[:k - len(missing)] + missing
            data.append((q.question, ps, q.answer, gold))
    return data


def dense_reader_em(model, task, retriever, test, questions, k=10):
    """Test EM of the reader on the dual encoder's top-k sets (rank order)."""
    ranked = dense_ranking(retriever, task.tokenizer, test, questions, k)
    answers = read(model, task, [q.question for q in questions], [[test.passages[i] for i in r] for r in ranked])
    return sum(exact_match(a, q.answer) for a, q in zip(answers, questions)) / len(questions)


def retriever_stage(task, model, data, worlds, test, questions, seconds, reader_seconds, args, seed=0):
    """Reader and retriever trained alternately. Round 1: the reader (trained on the TF-IDF
    two-round sets) teaches the dual encoder (KL alone, and KL + InfoNCE); round 2: a copy of the
    reader is fine-tuned on the round-1 retriever's top-20 sets, and its attention over those sets
    (+ InfoNCE with the sets' non-gold passages as hard negatives) continues the retriever's
    training. Recall@k on the whole test corpus and the reader's EM@10 on the retriever's top-10
    after each round."""
    rng = random.Random(seed)
    data = [c for c in data if len(c[1]) == max(TOP_K)]      # one set size: (N, P) targets
    data = rng.sample(data, min(1500, len(data)))
    targets = reader_targets(model, task, data)
    torch.manual_seed(seed)
    untrained = NeuralRetriever(BagOfWordsTower(len(task.tokenizer), 64), temperature=0.1)
    result = {"before": corpus_recall(untrained, task.tokenizer, test, questions),
              "before_reader_em10": dense_reader_em(model, task, untrained, test, questions)}
    retriever, result["after_kl_steps"] = train_retriever(task, data, targets, seconds / 4, False, seed)
    result["after_kl"] = corpus_recall(retriever, task.tokenizer, test, questions)
    first, result["round1_steps"] = train_retriever(task, data, targets, 3 * seconds / 8, True, seed)
    result["round1"] = corpus_recall(first, task.tokenizer, test, questions)
    result["round1_reader_em10"] = dense_reader_em(model, task, first, test, questions)
    gold_mass = [sum(float(t[j]) for j, p in enumerate(c[1]) if p in c[3]) for c, t in zip(data, targets)]
    result["reader_mass_on_gold"] = sum(gold_mass) / len(gold_mass)
    result["uniform_mass_on_gold"] = sum(len(c[3]) / len(c[1]) for c in data) / len(data)
    # round 2: the reader again, on the round-1 retriever's sets
    reader = copy.deepcopy(model)
    per_world = max(1, 1500 // max(1, len(worlds)))
    data2 = dense_training_sets(task, worlds, first, per_world, max(TOP_K), seed=seed,
                                multi_hop_share=args.train_multi_hop_share)
    trainer = Trainer(reader, lambda m, b: m(b["input_ids"], b["attention_mask"], labels=b["labels"])["loss"],
                      TrainConfig(lr=args.lr / 3, warmup_steps=10, max_steps=100000, max_seconds=reader_seconds,
                                  log_every=100))
    trainer.train(batches(task, data2, args.batch_size, seed=3 + 100 * seed, budget_seconds=reader_seconds,
                          curriculum=((1.0, (5, 10, 20, 20)),)))
    result["round2_reader_steps"] = trainer.step
    result["round2_reader_em10_on_round1"] = dense_reader_em(reader, task, first, test, questions)
    targets2 = reader_targets(reader, task, data2)
    second, result["round2_steps"] = train_retriever(task, data2, targets2, 3 * seconds / 8, True, seed, init=first)
    result["round2"] = corpus_recall(second, task.tokenizer, test, questions)
    result["round2_reader_em10"] = dense_reader_em(reader, task, second, test, questions)
    gold_mass2 = [sum(float(t[j]) for j, p in enumerate(c[1]) if p in c[3]) for c, t in zip(data2, targets2)]
    result["round2_reader_mass_on_gold"] = sum(gold_mass2) / len(gold_mass2)
    return result


def enhancer_stage(task, worlds, indexes, test_index, questions, seconds, seed=0, max_passages=3):
    """Train the learned second round (:class:`LearnedQueryEnhancer`: question tokens attend over
    the first round's top ``max_passages`` passages) with InfoNCE over each training world's whole
    corpus; the positive is the passage the first round cannot find by the question's words: the
    bridge passage (second hop) of a 2-hop question, the gold passage itself of a 1-hop one (half
    of the questions each). Attaches it to every index in ``indexes`` and to ``test_index`` as
    method "learned". Returns the target passage's recall@k under the enhanced query alone (whole
    test corpus, per hop type), untrained and trained, and the losses."""
    groups = []
    for w, (world, index) in enumerate(zip(worlds, indexes)):
        qs = task.questions(world, 300, seed=500 + w + 1000 * seed, multi_hop_share=0.5)
        first = [[f"{p['title']} {p['text']}" for p in index.retrieve(q.question, max_passages, 1)] for q in qs]
        groups.append(EnhancerGroup.from_texts(task.tokenizer.encode, [q.question for q in qs], first,
                                               [f"{t} {x}" for t, x in world.passages],
                                               [q.gold[-1] for q in qs], max_passages))

    def target_recall():
        second = LearnedSecondRound(enhancer, task.tokenizer.encode, test_index.corpus, test_index.generators[1])
        ranked = [(second.documents @ second.query(q.question, test_index.retrieve(q.question, max_passages, 1))
                   ).topk(max(TOP_K)).indices.tolist() for q in questions]
        return {str(h): {k: recall_at_k([r for r, q in zip(ranked, questions) if q.hops == h],
                                        [[q.gold[-1]] for q in questions if q.hops == h], k) for k in TOP_K}
                for h in (1, 2)}

    torch.manual_seed(seed)
    enhancer = LearnedQueryEnhancer(len(task.tokenizer), dim=64, num_heads=4, max_passages=max_passages)
    before = target_recall()
    t0 = time.perf_counter()
    losses = fit_query_enhancer(enhancer, groups, steps=100000, seconds=seconds, batch_size=32, lr=3e-3, seed=seed)
    trained_seconds = time.perf_counter() - t0
    after = target_recall()
    for index in list(indexes) + [test_index]:
        index.add_learned_round(enhancer, task.tokenizer)
    return {"target_recall_untrained": before, "target_recall_trained": after, "steps": len(losses),
            "seconds": trained_seconds, "loss_first": sum(losses[:20]) / max(1, len(losses[:20])),
            "loss_last": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "training_questions": sum(g.positives.shape[0] for g in groups)}


def segments_rerank_stage(task, model, data, index, questions, seconds, seed=0, k=20):
    """RetrievalAugmentedSegments as a passage reranker: the question's token embeddings are the
    main sequence (segments of 4 tokens, window + landmark attention), the two-round retriever's
    top-``k`` passages its cross-attended passages; the segments' mean relevance over the passages
    is trained (cross entropy) toward the gold passages of the training sets. Reports recall@k of
    the retriever's order and of the reranked order on the test questions, and the reader's EM at
    top-5 of each."""
    from hybrid_kernels.models import RetrievalAugmentedSegments
    torch.manual_seed(seed)
    d = 64
    embed = torch.nn.Embedding(len(task.tokenizer), d, padding_idx=0)
    ranker = RetrievalAugmentedSegments(d, 4, segment_len=4, window=(4, 4), num_layers=1)
    params = list(embed.parameters()) + list(ranker.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)

    def relevance(qs, sets):
        """(B,) questions, B sets of k (title, text) -> mean segment relevance (B, k)."""
        q_ids, q_mask = encode_texts(task.tokenizer, qs)
        padded = [list(ps)[:k] + [None] * (k - len(ps)) for ps in sets]      # short lists: empty passages
        p_ids, p_mask = encode_texts(task.tokenizer, [f"{p[0]} {p[1]}" if p else "" for ps in padded for p in ps])
        p_mask &= torch.tensor([p is not None for ps in padded for p in ps])[:, None]
        B, L = len(sets), p_ids.shape[1]
        out = ranker(embed(q_ids), embed(p_ids).view(B, k, L, d), p_mask.view(B, k, L), q_mask)
        seg_real = q_mask[:, ::4].float()                                   # (B, S) real segments
        return (out.relevance * seg_real[..., None]).sum(1) / seg_real.sum(1, keepdim=True)

    rng = random.Random(seed)
    train = [c for c in data if len(c[1]) == k]
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        part = rng.sample(train, min(32, len(train)))
        sets = [list(c[1]) for c in part]
        for ps in sets:
            rng.shuffle(ps)
        target = torch.tensor([[float(p in c[3]) for p in ps] for c, ps in zip(part, sets)])
        rel = relevance([c[0] for c in part], sets)
        loss = -(target / target.sum(1, keepdim=True) * torch.log(rel + 1e-9)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    found = [index.retrieve(q.question, k, 2) for q in questions]
    with torch.no_grad():
        rel = torch.cat([relevance([q.question for q in questions[i:i + 50]],
                                   [[(p["title"], p["text"]) for p in ps] for ps in found[i:i + 50]])
                         for i in range(0, len(questions), 50)])
    reranked = [[ps[j] for j in r.argsort(descending=True).tolist() if j < len(ps)] for ps, r in zip(found, rel)]
    out = {"steps": steps, "seconds": time.perf_counter() - t0}
    for name, lists in (("retriever order", found), ("segments reranker", reranked)):
        ids = [[p["id"] for p in ps] for ps in lists]
        out[name] = {str(h): {kk: recall_at_k([r for r, q in zip(ids, questions) if h == "all" or q.hops == h],
                                              [q.gold for q in questions if h == "all" or q.hops == h], kk)
                              for kk in (1, 5, 10)} for h in ("all", 1, 2)}
        answers = read(model, task, [q.question for q in questions],
                       [[(p["title"], p["text"]) for p in ps[:5]] for ps in lists])
        out[name]["reader_em5"] = sum(exact_match(a, q.answer) for a, q in zip(answers, questions)) / len(questions)
    return out


def cascade_stage(task, teacher, student, dev_index, test_index, dev_qs, test_qs, k=10):
    """Student answers when its first-token probability clears a threshold calibrated on dev, else
    the teacher. Time saved is estimated from the measured all-student and all-teacher times."""
    def sets(index, qs):
        return [[(p["title"], p["text"]) for p in index.retrieve(q.question, k, 2)] for q in qs]

    def student_read(qs, ps):
        answers, conf = [], []
        for i in range(0, len(qs), 50):
            b = fid_batch(task, [q.question for q in qs[i:i + 50]], ps[i:i + 50])
            a, c = first_token_answers(student, task.tokenizer, b["input_ids"], b["attention_mask"])
            answers, conf = answers + a, conf + c.tolist()
        return answers, torch.tensor(conf)

    dev_sets, test_sets = sets(dev_index, dev_qs), sets(test_index, test_qs)
    dev_s, dev_conf = student_read(dev_qs, dev_sets)
    dev_t = read(teacher, task, [q.question for q in dev_qs], dev_sets)
    dev_correct = [exact_match(a, q.answer) for a, q in zip(dev_s, dev_qs)]
    teacher_dev = sum(exact_match(a, q.answer) for a, q in zip(dev_t, dev_qs)) / len(dev_qs)
    t0 = time.perf_counter()
    test_t = read(teacher, task, [q.question for q in test_qs], test_sets)
    teacher_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    test_s, test_conf = student_read(test_qs, test_sets)
    student_time = time.perf_counter() - t0
    rows = []
    # one threshold where the student's dev accuracy matches the teacher's; two that hand the
    # student the 50% / 80% most confident dev questions
    ranked = sorted(dev_conf.tolist(), reverse=True)
    thresholds = [("student dev EM >= teacher dev EM", threshold_for_accuracy(dev_conf.tolist(), dev_correct, teacher_dev))]
    thresholds += [(f"{int(100 * s)}% of dev to the student", ranked[int(s * len(ranked)) - 1]) for s in (0.5, 0.8)]
    for rule, t in thresholds:
        use = route(test_conf, t)
        answers = cascade_answers(test_s, test_t, use)
        share = float(use.float().mean())
        # the student runs on every query; the teacher only on those it hands over
        cascade_time = student_time + (1 - share) * teacher_time
        rows.append({"rule": rule, "threshold": t, "student_share": share,
                     "accuracy": sum(exact_match(a, q.answer) for a, q in zip(answers, test_qs)) / len(test_qs),
                     "time_saved": 1 - cascade_time / teacher_time})
    return {"teacher_accuracy": sum(exact_match(a, q.answer) for a, q in zip(test_t, test_qs)) / len(test_qs),
            "student_accuracy": sum(exact_match(a, q.answer) for a, q in zip(test_s, test_qs)) / len(test_qs),
            "teacher_dev_accuracy": teacher_dev, "teacher_seconds": teacher_time,
            "student_seconds": student_time, "rows": rows}


def attention_figure(task, model, test, index, questions, path, k=10):
    """Heatmap of the reader's passage attention for a few single- and multi-hop test questions."""
    chosen = [q for q in questions if q.hops == 1][:4] + [q for q in questions if q.hops == 2][:4]
    found = [index.retrieve(q.question, k, 2) for q in chosen]
    sets = [[(p["title"], p["text"]) for p in ps] for ps in found]
    b = fid_batch(task, [q.question for q in chosen], sets, [q.answer for q in chosen])
    mass = model.passage_attention(b["input_ids"], b["attention_mask"], b["labels"])
    gold = [[p["id"] in q.gold for p in ps] + [False] * (mass.shape[1] - len(ps)) for q, ps in zip(chosen, found)]
    plot_passage_attention(mass.numpy(), gold, [q.question for q in chosen], path)
    return {"questions": [q.question for q in chosen], "mass": mass.tolist(), "gold": gold}


def compare_methods_demo(index, questions):
    q = next(x for x in questions if x.hops == 2)
    out = index.pipe.compare_methods(q.question, index.generators[2])
    return {"question": q.question, "answer": q.answer,
            **{name: {"answer": r.answer, "gold_retrieved": set(q.gold) <= {p["id"] for p in r.passages},
                      "passages": len(r.passages)} for name, r in out.items()}}


def markdown(rows, gold, retr, enh, casc, demo, timing, cmd, segs):
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"# RAG on the entity-grounded multi-hop corpus\n\n`{cmd}`: wall time {timing['total']:.0f} s "
             f"(data and learned query enhancer {timing['data']:.0f} s, reader {timing['train']:.0f} s / {timing['train_steps']} steps, "
             f"eval {timing['eval']:.0f} s, "
             f"alternating retriever/reader rounds {timing['retriever']:.0f} s, cascade {timing['cascade']:.0f} s, "
             f"segments reranker {timing['segments']:.0f} s)\n",
             f"Gold passages handed over: EM all {pct(gold['all'])}, 1-hop {pct(gold[1])}, 2-hop {pct(gold[2])}\n",
             *em_table(rows, gold, pct)]
    r10 = {(x["rounds"], str(x["hops"])): x for x in rows if x["top_k"] == 10}
    lines += ["", "Second retrieval round, rule-based against learned (top-10; the learned round: question "
              "tokens attend over the first round's top-3 passages, 4 heads, InfoNCE on the bridge passage of "
              f"2-hop and the gold passage of 1-hop questions, {enh['training_questions']} training-world "
              f"questions, {enh['steps']} steps / "
              f"{enh['seconds']:.0f} s, loss {enh['loss_first']:.2f} -> {enh['loss_last']:.2f})\n",
              "| second round | EM@10 all | EM@10 2-hop | 2-hop recall@10 |", "|---|---:|---:|---:|"]
    for m in (1, 2, "learned"):
        lines.append(f"| {METHODS[m]} | {pct(r10[(m, 'all')]['exact_match'])} | {pct(r10[(m, '2')]['exact_match'])} | "
                     f"{pct(r10[(m, '2')]['recall'])} |")
    lines += [""] + [
        f"Target passage ({'bridge' if h == '2' else 'gold'}) under the enhanced query alone, {h}-hop test "
        "questions, whole test corpus, untrained -> trained: " + ", ".join(
            f"R@{k} {pct(enh['target_recall_untrained'][h][k])} -> {pct(enh['target_recall_trained'][h][k])}"
            for k in TOP_K) for h in ("1", "2")]
    lines += ["", "Dual-encoder retriever trained by the reader, alternating rounds (whole test corpus, recall@k; "
              "2-hop: both gold passages; reader EM@10: the reader of that round on the retriever's top-10). "
              f"Reader attention mass on gold passages of its training sets: round 1 "
              f"{pct(retr['reader_mass_on_gold'])}, round 2 {pct(retr['round2_reader_mass_on_gold'])} (uniform: "
              f"{pct(retr['uniform_mass_on_gold'])})\n",
              "| retriever | hops | " + " | ".join(f"R@{k}" for k in TOP_K) + " | reader EM@10 |",
              "|---|---|" + "---:|" * (len(TOP_K) + 1)]
    names = {"before": ("untrained", retr["before_reader_em10"]),
             "after_kl": ("round 1, KL alone", None),
             "round1": ("round 1: KL + InfoNCE from the reader", retr["round1_reader_em10"]),
             "round2": ("round 2: reader fine-tuned on round-1 sets, then KL + InfoNCE",
                        retr["round2_reader_em10"])}
    for name, (label, em10) in names.items():
        for hops in ("all", "1", "2"):
            em = pct(em10) if em10 is not None and hops == "all" else ""
            recall = " | ".join(pct(retr[name][hops][k]) for k in TOP_K)
            lines.append(f"| {label} | {hops} | {recall} | {em} |")
    lines += ["", f"Round-2 reader ({retr['round2_reader_steps']} fine-tuning steps) on the round-1 retriever's "
              f"top-10: EM {pct(retr['round2_reader_em10_on_round1'])}"]
    lines += ["", f"Cascade (top-10, two rounds): teacher EM {pct(casc['teacher_accuracy'])}, student EM "
              f"{pct(casc['student_accuracy'])}; teacher {casc['teacher_seconds']:.1f} s, student "
              f"{casc['student_seconds']:.1f} s on the test questions\n",
              "| threshold rule (dev) | threshold | student share | cascade EM | time saved |", "|---|---:|---:|---:|---:|"]
    for r in casc["rows"]:
        lines.append(f"| {r['rule']} | {r['threshold']:.3f} | {pct(r['student_share'])} | "
                     f"{pct(r['accuracy'])} | {pct(r['time_saved'])} |")
    lines += ["", "Hierarchical segments reranker (RetrievalAugmentedSegments: question segments with window + "
              "landmark attention, cross-attention to the passages, per-segment relevance) over the rule-based "
              f"two-round top-20, {segs['steps']} steps / {segs['seconds']:.0f} s (recall@k; reader EM on the top-5)\n",
              "| order | hops | R@1 | R@5 | R@10 | reader EM@5 |", "|---|---|---:|---:|---:|---:|"]
    for name in ("retriever order", "segments reranker"):
        for h in ("all", "1", "2"):
            em5 = pct(segs[name]["reader_em5"]) if h == "all" else ""
            lines.append(f"| {name} | {h} | " + " | ".join(pct(segs[name][h][kk]) for kk in (1, 5, 10)) + f" | {em5} |")
    lines += ["", f"compare_methods on \"{demo['question']}\" (answer {demo['answer']}): " + "; ".join(
        f"{n}: {demo[n]['answer']!r} (gold retrieved: {demo[n]['gold_retrieved']})"
        for n in ("no_retrieval", "retrieve_then_read", "hybrid")), ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/rag", help="directory for results.json/.md and the PNG")
    ap.add_argument("--quick", action="store_true", help="smoke run: small worlds, few seconds per stage")
    ap.add_argument("--train-seconds", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--questions-per-world", type=int, default=300)
    ap.add_argument("--train-worlds", type=int, default=10,
                    help="training worlds (fresh facts about the same names; questions are generated, not reused)")
    ap.add_argument("--train-multi-hop-share", type=float, default=0.45,
                    help="share of 2-hop questions in the training sets (the test split keeps the task's 0.3)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the reader's initialization, its training questions and batch order")
    ap.add_argument("--test-questions", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 because the 2 cores are shared (2 threads thrash when another job runs)")
    args = ap.parse_args(argv)
    q = args.quick
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    timing = {}
    task = EntityQATask(num_people=60 if q else 340, num_countries=12 if q else 40, seed=0)
    torch.manual_seed(args.seed)
    model = FiDT5.from_config(small_t5_config(len(task.tokenizer), 32 if q else args.d_model))
    worlds = [task.world("train", i) for i in range(1 if q else args.train_worlds)]
    indexes = [WorldIndex(world, model, task.tokenizer) for world in worlds]
    test, dev = task.world("test"), task.world("dev")
    index, dev_index = WorldIndex(test, model, task.tokenizer), WorldIndex(dev, model, task.tokenizer)
    questions = task.questions(test, 30 if q else args.test_questions, seed=7)
    t0 = time.perf_counter()
    enh = enhancer_stage(task, worlds, indexes, index, questions, 4 if q else 45, seed=args.seed)
    timing["enhancer"] = time.perf_counter() - t0
    data = training_sets(task, worlds, indexes, 200 if q else args.questions_per_world, max(TOP_K),
                         seed=args.seed, multi_hop_share=args.train_multi_hop_share)
    timing["data"] = time.perf_counter() - t_start
    budget = args.train_seconds or (10 if q else 540)
    steps = args.steps or 100000
    cfg = TrainConfig(lr=args.lr, warmup_steps=100 if not q else 5, max_steps=steps, max_seconds=budget,
                      log_every=50)
    trainer = Trainer(model, lambda m, b: m(b["input_ids"], b["attention_mask"], labels=b["labels"])["loss"], cfg)
    t0 = time.perf_counter()
    trainer.train(batches(task, data, args.batch_size, seed=1 + 100 * args.seed,
                          budget_seconds=None if args.steps else budget, total_steps=args.steps))
    timing["train"], timing["train_steps"] = time.perf_counter() - t0, trainer.step
    t0 = time.perf_counter()
    rows, gold = evaluate(model, task, test, index, questions)
    timing["eval"] = time.perf_counter() - t0
    print_tables(rows, gold)
    t0 = time.perf_counter()
    retr = retriever_stage(task, model, data, worlds, test, questions, 6 if q else 80, 4 if q else 90, args,
                           seed=args.seed)
    timing["retriever"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.manual_seed(1)
    student = FiDT5.from_config(small_t5_config(len(task.tokenizer), 32 if q else 64, layers=1))
    s_budget = 5 if q else 120
    Trainer(student, lambda m, b: m(b["input_ids"], b["attention_mask"], labels=b["labels"])["loss"],
            TrainConfig(lr=2e-3, warmup_steps=5 if q else 100, max_steps=100000, max_seconds=s_budget,
                        log_every=100)).train(batches(task, data, args.batch_size, seed=2, budget_seconds=s_budget))
    dev_qs = task.questions(dev, 30 if q else 150, seed=9)
    casc = cascade_stage(task, model, student, dev_index, index, dev_qs, questions)
    timing["cascade"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    segs = segments_rerank_stage(task, model, data, index, questions, 5 if q else 50, seed=args.seed)
    timing["segments"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    figure = attention_figure(task, model, test, index, questions, os.path.join(args.out, "passage_attention.png"))
    demo = compare_methods_demo(index, questions)
    timing["total"] = time.perf_counter() - t_start
    em = {(r["rounds"], r["top_k"]): r["exact_match"] for r in rows if r["hops"] == "all"}
    cmd = "PYTHONPATH=. python bench/rag_experiment.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(rows, gold, retr, enh, casc, demo, timing, cmd.strip(), segs)
    md += "\n" + "\n".join(
        f"{METHODS[m]}: EM top-10 >= top-1: {em[(m, 10)] >= em[(m, 1)]}; top-20 >= top-10: "
        f"{em[(m, 20)] >= em[(m, 10)]}; EM top-10 / gold-handed EM: "
        + (f"{em[(m, 10)] / gold['all']:.2f}" if gold["all"] > 0 else "n/a (gold-handed EM is 0)")
        for m in METHODS) + "\n"
    print(md)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "gold_exact_match": {str(k): v for k, v in gold.items()},
                   "retriever": retr, "query_enhancer": enh, "cascade": casc, "segments_reranker": segs,
                   "attention": figure,
                   "compare_methods": demo,
                   "corpus_passages": len(test.passages), "timing": timing,
                   "train_history": trainer.history, "args": vars(args)}, f, indent=1, default=str)
    return {"rows": rows, "gold": gold, "retriever": retr, "query_enhancer": enh, "cascade": casc, "timing": timing}


if __name__ == "__main__":
    main()
