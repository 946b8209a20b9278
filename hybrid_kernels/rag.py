"""HybridRAGPipeline: documents -> chunks -> vector store -> top-k passages -> FiD generate.

    pipe = HybridRAGPipeline(FiDT5.from_pretrained("ckpt"), load_tokenizer("ckpt"))
    pipe.add_documents([{"title": "Oslo", "text": "..."}, "plain text document", ...])
    result = pipe.answer("where was X born ?")
    result.answer, result.passages, result.timings      # timings per stage, seconds

CLI (``hybrid-kernels rag``)::

    hybrid-kernels rag --model CKPT --docs corpus.jsonl --question "where was X born ?"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

__all__ = ["HybridRAGPipeline", "RAGResult", "load_tokenizer", "chunk_text", "main"]


@dataclass
class RAGResult:
    question: str
    answer: str
    passages: List[Dict[str, Any]]            # {"id", "title", "text", "score"}, best first
    timings: Dict[str, float] = field(default_factory=dict)   # seconds per stage

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "passages": self.passages,
                "timings": self.timings}


class _HFTokenizer:
    """Adapter: a transformers tokenizer behind encode(text) / decode(ids)."""

    def __init__(self, tok):
        self.tok = tok
        self.pad_token_id = tok.pad_token_id

    def encode(self, text: str) -> List[int]:
        return self.tok(text)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str) -> None:
        self.tok.save_pretrained(directory)


def load_tokenizer(directory: str):
    """The tokenizer saved with a checkpoint: a WordTokenizer (``word_tokenizer.json``) or any
    transformers tokenizer in the directory (local files only)."""
    from .training.qa_task import WordTokenizer
    path = os.path.join(directory, "word_tokenizer.json")
    if os.path.exists(path):
        return WordTokenizer.load(path)
    from transformers import AutoTokenizer
    return _HFTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))


def save_tokenizer(tokenizer, directory: str) -> None:
    from .training.qa_task import WordTokenizer
    os.makedirs(directory, exist_ok=True)
    if isinstance(tokenizer, WordTokenizer):
        tokenizer.save(os.path.join(directory, "word_tokenizer.json"))
    else:
        tokenizer.save(directory)


def chunk_text(text: str, chunk_words: int = 100, overlap_words: int = 20) -> List[str]:
    """Split on whitespace into windows of ``chunk_words`` words overlapping by ``overlap_words``."""
    if chunk_words < 1 or not 0 <= overlap_words < chunk_words:
        raise ValueError(f"need chunk_words >= 1 and 0 <= overlap_words < chunk_words; got "
                         f"{chunk_words}, {overlap_words}")
    words = text.split()
    if len(words) <= chunk_words:
        return [" ".join(words)] if words else []
    step = chunk_words - overlap_words
    chunks = []
    for start in range(0, len(words), step):
        chunks.append(" ".join(words[start:start + chunk_words]))
        if start + chunk_words >= len(words):
            break
    return chunks


class HybridRAGPipeline:
    """Retrieval-augmented generation with a FiDT5 reader.

    Args:
        model: a :class:`hybrid_kernels.models.FiDT5`.
        tokenizer: object with ``encode(text) -> ids`` (ending in eos) and ``decode(ids)``.
        embedder: ``embedder(texts) -> float32 (n, dim)``; default the packaged all-MiniLM-L6-v2.
        store: a :class:`VectorStore` (default: a new flat inner-product store).
        top_k: passages retrieved and read per question.
        chunk_words / chunk_overlap: document chunking (in words).
        max_passage_tokens: truncation of each encoded (question, passage) input.
        max_new_tokens, num_beams: decoding.
        prepare_passages: optional ``prepare(question, [(title, text)]) -> [(title, text)]``
            applied to each question's passages before reading (same count and order), e.g.
            :func:`hybrid_kernels.retrieval.chains.prepare_for_reader`.
    """

    def __init__(self, model, tokenizer, *, embedder=None, store=None, top_k: int = 5,
                 chunk_words: int = 100, chunk_overlap: int = 20, max_passage_tokens: int = 256,
                 max_new_tokens: int = 32, num_beams: int = 1, prepare_passages=None):
        from .retrieval.vector_store import VectorStore
        if prepare_passages is not None and not callable(prepare_passages):
            raise TypeError(f"prepare_passages must be None or callable; got {type(prepare_passages).__name__}")
        self.prepare_passages = prepare_passages
        if embedder is None:
            from .retrieval.embedder import TextEmbedder
            embedder = TextEmbedder()
        self.model, self.tokenizer, self.embedder = model, tokenizer, embedder
        dim = getattr(embedder, "dim", None) or int(embedder(["x"]).shape[1])
        self.store = store if store is not None else VectorStore(dim)
        if self.store.dim != dim:
            raise ValueError(f"store dim {self.store.dim} != embedder dim {dim}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1; got {top_k}")
        self.top_k, self.chunk_words, self.chunk_overlap = top_k, chunk_words, chunk_overlap
        self.max_passage_tokens = max_passage_tokens
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams

    def add_documents(self, documents: Sequence[Union[str, Dict[str, str]]],
                      batch_size: int = 256) -> int:
        """Chunk, embed and index documents (str, or {"title", "text"}); returns chunks added."""
        chunks = []
        for doc in documents:
            title, text = ("", doc) if isinstance(doc, str) else (doc.get("title", ""), doc["text"])
            chunks += [{"title": title, "text": c} for c in chunk_text(text, self.chunk_words, self.chunk_overlap)]
        for i in range(0, len(chunks), batch_size):
            part = chunks[i:i + batch_size]
            vectors = self.embedder([f"{c['title']} {c['text']}".strip() for c in part])
            self.store.add(vectors, payloads=part)
        return len(chunks)

    def retrieve(self, questions: Sequence[str], k: Optional[int] = None):
        k = k or self.top_k
        t0 = time.perf_counter()
        q = self.embedder(list(questions))
        t1 = time.perf_counter()
        scores, ids = self.store.search(q, k)
        t2 = time.perf_counter()
        found = [[dict(id=int(i), score=float(s), **self.store.payload(int(i)))
                  for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]
        return found, {"embed_query": t1 - t0, "search": t2 - t1}

    def _inputs(self, questions: Sequence[str], passages: List[List[Dict[str, Any]]]):
        from .models.fid import format_passage
        pad = getattr(self.tokenizer, "pad_token_id", 0) or 0
        P = max(1, max(len(p) for p in passages))
        rows = []
        for qtext, ps in zip(questions, passages):
            if self.prepare_passages is not None and ps:
                linked = self.prepare_passages(qtext, [(p["title"], p["text"]) for p in ps])
                ps = [{**p, "title": t, "text": x} for p, (t, x) in zip(ps, linked)]
            enc = [self.tokenizer.encode(format_passage(qtext, p["title"], p["text"]))[:self.max_passage_tokens]
                   for p in ps] or [self.tokenizer.encode(format_passage(qtext, "", ""))]
            rows.append(enc)
        L = max(len(e) for row in rows for e in row)
        ids = torch.full((len(rows), P, L), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), P, L), dtype=torch.bool)
        for b, row in enumerate(rows):
            for p, e in enumerate(row):
                ids[b, p, :len(e)] = torch.tensor(e)
                mask[b, p, :len(e)] = True
        return ids, mask

    def read(self, questions: Sequence[str], passages: List[List[Dict[str, Any]]]) -> List[str]:
        """FiD answers to ``questions`` from the given passage dicts ({"title", "text"}) per question;
        an empty list reads the question alone."""
        return self._read(questions, passages)[0]

    def _read(self, questions, passages):
        t0 = time.perf_counter()
        ids, mask = self._inputs(questions, passages)
        t1 = time.perf_counter()
        device = next(self.model.parameters()).device
        out = self.model.generate(ids.to(device), mask.to(device), max_new_tokens=self.max_new_tokens,
                                  num_beams=self.num_beams)
        t2 = time.perf_counter()
        answers = [self.tokenizer.decode(o[1:].tolist()) for o in out.cpu()]
        return answers, {"tokenize": t1 - t0, "generate": t2 - t1}

    def answer_batch(self, questions: Sequence[str]) -> List[RAGResult]:
        t_start = time.perf_counter()
        passages, timings = self.retrieve(questions)
        answers, read_timings = self._read(questions, passages)
        timings.update(read_timings, total=time.perf_counter() - t_start)
        return [RAGResult(q, a, p, dict(timings)) for q, a, p in zip(questions, answers, passages)]

    def compare_methods(self, question: str, query_generator=None) -> Dict[str, RAGResult]:
        """The same reader three ways: ``"no_retrieval"`` (the question alone),
        ``"retrieve_then_read"`` (top_k for the question) and ``"hybrid"`` (top_k from
        ``query_generator``, a :class:`DynamicQueryGenerator`; default one over the indexed chunks)."""
        from .retrieval.query_generator import DynamicQueryGenerator
        if query_generator is None:
            texts = [f"{p['title']} {p['text']}" for p in map(self.store.payload, self.store.ids())]
            query_generator = DynamicQueryGenerator(texts)
        results = {}
        for name in ("no_retrieval", "retrieve_then_read", "hybrid"):
            t0 = time.perf_counter()
            if name == "no_retrieval":
                passages = []
            elif name == "retrieve_then_read":
                passages = self.retrieve([question])[0][0]
            else:
                passages = query_generator.retrieve(question, lambda qs, k: self.retrieve(qs, k)[0],
                                                    self.top_k)[0]
            answer = self.read([question], [passages])[0]
            results[name] = RAGResult(question, answer, passages, {"total": time.perf_counter() - t0})
        return results

    def answer(self, question: str) -> RAGResult:
        return self.answer_batch([question])[0]

    def save(self, directory: str) -> None:
        """Model, tokenizer and vector store under ``directory`` (model/, store/)."""
        self.model.save_pretrained(os.path.join(directory, "model"))
        save_tokenizer(self.tokenizer, os.path.join(directory, "model"))
        self.store.save(os.path.join(directory, "store"))


def _read_documents(paths: Sequence[str]) -> List[Dict[str, str]]:
    docs = []
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        docs.append({"title": rec.get("title", ""), "text": rec["text"]})
        else:
            with open(path) as f:
                docs.append({"title": os.path.basename(path), "text": f.read()})
    return docs


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="hybrid-kernels rag",
                                          description="Answer questions over documents with FiD-T5.")
    p.add_argument("--model", required=True, help="saved T5/FiD checkpoint directory (with its tokenizer)")
    p.add_argument("--docs", nargs="*", default=[], help="text files, or .jsonl with title/text per line")
    p.add_argument("--store", default=None, help="load this saved VectorStore (and save to it after --docs)")
    p.add_argument("--question", "-q", action="append", default=[], help="question (repeatable); "
                   "none: read one per line from stdin")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--embedder", choices=("minilm", "hashing"), default="minilm")
    p.add_argument("--index", choices=("flat", "ivf", "hnsw"), default="flat")
    p.add_argument("--chunk-words", type=int, default=100)
    p.add_argument("--chunk-overlap", type=int, default=20)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--int8", action="store_true", help="INT8 cross-attention K/V")
    p.add_argument("--top-passages", type=int, default=None, help="landmark sparse fusion: passages per step")
    p.add_argument("--json", action="store_true", help="print one JSON object per question")
    return p


def run(args: argparse.Namespace) -> int:
    from .models.fid import FiDT5
    from .retrieval.embedder import HashingEmbedder, TextEmbedder
    from .retrieval.vector_store import VectorStore
    embedder = TextEmbedder() if args.embedder == "minilm" else HashingEmbedder()
    if args.store and os.path.exists(os.path.join(args.store, "store.json")):
        store = VectorStore.load(args.store)
    else:
        store = VectorStore(embedder.dim, index=args.index)
    model = FiDT5.from_pretrained(args.model, cross_attention_quant="int8" if args.int8 else None,
                                  top_passages=args.top_passages).eval()
    pipe = HybridRAGPipeline(model, load_tokenizer(args.model), embedder=embedder, store=store,
                             top_k=args.top_k, chunk_words=args.chunk_words,
                             chunk_overlap=args.chunk_overlap, max_new_tokens=args.max_new_tokens,
                             num_beams=args.num_beams)
    if args.docs:
        n = pipe.add_documents(_read_documents(args.docs))
        print(f"indexed {n} chunks", file=sys.stderr)
        if args.store:
            store.save(args.store)
    if len(store) == 0:
        print("error: no documents indexed (pass --docs or a non-empty --store)", file=sys.stderr)
        return 2
    questions = args.question or [line.strip() for line in sys.stdin if line.strip()]
    for q in questions:
        r = pipe.answer(q)
        if args.json:
            print(json.dumps(r.to_dict()))
        else:
            print(f"Q: {q}\nA: {r.answer}")
            for p in r.passages:
                print(f"   [{p['score']:.3f}] {p['title']}: {p['text'][:80]}")
            print("   timings: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in r.timings.items()))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``hybrid-kernels rag`` (also ``python -m hybrid_kernels.rag``)."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
