"""DynamicQueryGenerator: multi-round retrieval whose later queries are built from what the
earlier rounds retrieved, with reciprocal-rank fusion of every query's results.

Round 1 runs the question and, at half weight, its entity words alone (entities: words whose document frequency
in the corpus is at most ``max_df``; a name is rare, "born" or "the" is not), so that the asked
entity's passages are found even where template words that every passage of a relation shares
dominate the question's own match. Round 2 takes the ``expand_top`` best fused passages that mention an asked entity (a hop starts
from the asked entity) and, for each entity in them
that the question does not mention, asks the residual question -- the question's words that the
passage did not already match, plus that entity -- and keeps only results that mention the entity.
For "what is the capital of the country where X was born ?" the passage "X was born in C ." yields
"what is the capital of the country where ? c", which finds "the capital of C is Y .". Every list
is searched ``depth`` deep (at least k); the passage behind an expansion joins its list right
after the best hit (it is the first half of the chain); a round-2 list weighs ``second_round_weight`` in the
fusion (round 1: 1), since its query knows what round 1 found.

    gen = DynamicQueryGenerator([p["text"] for p in corpus])
    passages, trace = gen.retrieve(question, search, k=10)   # search(queries, k) -> lists of dicts
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Dict, List, Sequence, Tuple

__all__ = ["DynamicQueryGenerator", "reciprocal_rank_fusion"]

Search = Callable[[List[str], int], List[List[Dict[str, Any]]]]


def _words(text: str) -> List[str]:
    return re.findall(r"\w+", text.lower())


def _text(passage: Dict[str, Any]) -> str:
    return f"{passage.get('title', '')} {passage['text']}"


def _matched(ranked: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Drop results that share nothing with the query (score <= 0): their order is arbitrary."""
    return [p for p in ranked if p.get("score", 1.0) > 0]


def reciprocal_rank_fusion(lists: Sequence[Sequence[Dict[str, Any]]], weights: Sequence[float] = (),
                           k: int = 60) -> List[Dict[str, Any]]:
    """Fuse ranked lists of dicts with an ``"id"``: score(d) = sum_i w_i / (k + rank_i(d)), rank
    from 1; ties keep first-seen order. Returns the dicts, best first, with ``"score"`` replaced."""
    if weights and len(weights) != len(lists):
        raise ValueError(f"weights must have one entry per list ({len(lists)}); got {len(weights)}")
    if k < 0:
        raise ValueError(f"k must be >= 0; got {k}")
    fused: Dict[int, float] = {}
    items: Dict[int, Dict[str, Any]] = {}
    for i, ranked in enumerate(lists):
        w = weights[i] if weights else 1.0
        for rank, item in enumerate(ranked, start=1):
            key = item["id"]
            fused[key] = fused.get(key, 0.0) + w / (k + rank)
            items.setdefault(key, item)
    order = sorted(fused, key=lambda key: -fused[key])
    return [{**items[key], "score": fused[key]} for key in order]


class DynamicQueryGenerator:
    """Args:
        documents: the corpus texts (titles included if they are searched), for document frequency.
        max_df: a word in at most this fraction of the documents is an entity.
        expand_top: round-2 queries come from this many best round-1 passages.
        rounds: 1 (question + its entities only) or 2.
        fusion_k: the reciprocal-rank-fusion constant.
        second_round_weight: fusion weight of each round-2 list.
        depth: results searched per query (at least the k asked for) before fusion.
    """

    def __init__(self, documents: Sequence[str], *, max_df: float = 0.015, expand_top: int = 6,
                 rounds: int = 2, fusion_k: int = 60,
                 depth: int = 20, second_round_weight: float = 2.0):
        if len(documents) == 0:
            raise ValueError("documents must be a non-empty sequence of corpus texts")
        if not 0.0 < max_df <= 1.0:
            raise ValueError(f"max_df must be in (0, 1]; got {max_df!r}")
        if rounds not in (1, 2):
            raise ValueError(f"rounds must be 1 or 2; got {rounds!r}")
        if expand_top < 1:
            raise ValueError(f"expand_top must be >= 1; got {expand_top!r}")
        df = Counter(w for text in documents for w in set(_words(text)))
        limit = max_df * len(documents)
        self.entity_words = {w for w, n in df.items() if n <= limit}
        self.expand_top, self.rounds, self.fusion_k = expand_top, rounds, fusion_k
        self.depth, self.second_round_weight = depth, second_round_weight

    def entities(self, text: str) -> List[str]:
        """The text's entity words, in order, without repeats."""
        return list(dict.fromkeys(w for w in _words(text) if w in self.entity_words))

    def first_round(self, question: str) -> List[str]:
        ents = self.entities(question)
        return [question] + ([" ".join(ents)] if ents else [])

    def second_round(self, question: str, passages: Sequence[Dict[str, Any]]) -> List[Tuple[str, int]]:
        """(query, the passage it came from) for each new entity in the best passages that mention
        an asked entity."""
        asked = set(self.entities(question))
        about = [p for p in passages if asked & set(_words(_text(p)))][:self.expand_top]
        out, seen = [], set(asked)
        for source in about:
            text = _text(source)
            matched = set(_words(text))
            residual = " ".join(w for w in _words(question) if w not in asked and w not in matched)
            for e in self.entities(text):
                if e not in seen:
                    seen.add(e)
                    out.append((f"{residual} {e}".strip(), source))
        return out

    def retrieve(self, question: str, search: Search, k: int) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
        """Top-``k`` fused passages for ``question`` and a trace {"round1": queries, "round2": queries}."""
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        queries = self.first_round(question)
        depth = max(k, self.depth)
        lists = [_matched(r) for r in search(queries, depth)]
        weights = [1.0, 0.5][:len(queries)]     # the question itself decides the top ranks
        fused = reciprocal_rank_fusion(lists, weights, k=self.fusion_k)
        trace: Dict[str, Any] = {"round1": queries, "round2": []}
        if self.rounds == 2:
            expansions = self.second_round(question, fused)
            if expansions:
                trace["round2"] = [q for q, _ in expansions]
                found = []
                for (q, source), ranked in zip(expansions, search(trace["round2"], depth)):
                    hits = [p for p in _matched(ranked) if q.split()[-1] in _words(_text(p))]
                    # The passage that led to a hit is half of the chain: it ranks right after it.
                    found.append(hits[:1] + [source] + [p for p in hits[1:] if p["id"] != source["id"]])
                lists = lists + found
                weights = weights + [self.second_round_weight] * len(expansions)
                fused = reciprocal_rank_fusion(lists, weights, k=self.fusion_k)
        return fused[:k], trace
