"""A generated multi-passage QA task for training Fusion-in-Decoder from scratch.

Every question is about one person; k passages are retrieved for it, and the answer sits in
exactly one of them (the person's own passage) among k - 1 distractor passages about other people.
Facts are drawn afresh for every example, so nothing can be memorized: a model must find the
passage whose title matches the question and copy the answer from it. A model that reads n of the
k passages (chosen at random) can only answer when the gold passage is among them, so exact match
grows with n: about n/k for a perfect reader.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["QAExample", "WordTokenizer", "QATask", "exact_match", "normalize_answer"]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CITIES = ["paris", "oslo", "lima", "quito", "cairo", "delhi", "tokyo", "seoul", "rome", "bern",
           "dublin", "lisbon", "madrid", "vienna", "prague", "warsaw", "athens", "sofia", "kyiv",
           "riga", "tallinn", "vilnius", "minsk", "baku", "tbilisi", "ankara", "tehran", "kabul",
           "doha", "muscat", "sanaa", "amman", "beirut", "damascus", "nairobi", "accra", "dakar",
           "lagos", "tunis", "rabat", "algiers", "tripoli", "khartoum", "luanda", "harare",
           "lusaka", "maputo", "ottawa", "havana", "panama", "bogota", "caracas", "santiago",
           "asuncion", "brasilia", "montevideo", "canberra", "wellington", "manila", "hanoi",
           "bangkok", "jakarta", "dhaka", "colombo", "kathmandu", "thimphu", "beijing", "taipei"]
_JOBS = ["baker", "pilot", "nurse", "farmer", "lawyer", "painter", "dentist", "chemist",
         "teacher", "plumber", "sailor", "miner", "writer", "singer", "dancer", "butcher",
         "tailor", "welder", "judge", "poet", "surgeon", "architect", "gardener", "jeweler",
         "librarian", "mechanic", "potter", "carpenter", "fisher", "banker", "drummer", "clerk"]
_QUESTIONS = {"city": "where was {name} born ?", "job": "what does {name} do for a living ?"}
_SPECIALS = ["<pad>", "</s>", "<unk>"]
_TEMPLATE_WORDS = ("question: title: context: where was born ? what does do for a living "
                   "and works as a . in").split()


def _names(count: int, seed: int = 1234) -> List[str]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < count:
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3))))
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def normalize_answer(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary (pad=0, eos=1, unk=2)."""

    pad_token_id, eos_token_id, unk_token_id = 0, 1, 2

    def __init__(self, words: Sequence[str]):
        vocab = list(_SPECIALS) + [w for w in dict.fromkeys(words) if w not in _SPECIALS]
        self.vocab = vocab
        self.ids = {w: i for i, w in enumerate(vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_eos: bool = True) -> List[int]:
        ids = [self.ids.get(w, self.unk_token_id) for w in text.lower().split()]
        return ids + [self.eos_token_id] if add_eos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id and skip_special_tokens:
                break
            if skip_special_tokens and i < len(_SPECIALS):
                continue
            words.append(self.vocab[i] if 0 <= i < len(self.vocab) else "<unk>")
        return " ".join(words)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"vocab": self.vocab}, f)

    @classmethod
    def load(cls, path: str) -> "WordTokenizer":
        with open(path) as f:
            return cls(json.load(f)["vocab"])


@dataclass
class QAExample:
    question: str
    passages: List[Tuple[str, str]]   # (title, text)
    answer: str
    gold_index: int


class QATask:
    """Generator of :class:`QAExample` and their FiD tensors.

    Args:
        num_passages: k, the passages retrieved per question (one holds the answer).
        num_names: size of the pool of person names.
    """

    def __init__(self, num_passages: int = 10, num_names: int = 400, seed: int = 0):
        if num_passages < 1:
            raise ValueError(f"num_passages must be >= 1; got {num_passages}")
        self.k = num_passages
        self.names = _names(num_names)
        self.tokenizer = WordTokenizer(_TEMPLATE_WORDS + self.names + _CITIES + _JOBS)
        self.seed = seed

    def example(self, rng: random.Random) -> QAExample:
        people = rng.sample(self.names, self.k)
        facts = {p: {"city": rng.choice(_CITIES), "job": rng.choice(_JOBS)} for p in people}
        passages = [(p, f"{p} was born in {facts[p]['city']} and works as a {facts[p]['job']} .")
                    for p in people]
        gold = rng.randrange(self.k)
        relation = rng.choice(sorted(_QUESTIONS))
        name = people[gold]
        return QAExample(_QUESTIONS[relation].format(name=name), passages,
                         facts[name][relation], gold)

    def examples(self, count: int, split: str = "train", seed: Optional[int] = None) -> List[QAExample]:
        offset = {"train": 0, "valid": 1, "test": 2}[split]
        rng = random.Random((self.seed if seed is None else seed) * 1000003 + offset)
        return [self.example(rng) for _ in range(count)]

    def batch(self, examples: Sequence[QAExample], n_passages: int, rng: random.Random,
              with_labels: bool = True, include_gold: bool = False) -> Dict[str, Tensor]:
        """FiD tensors for a model reading ``n_passages`` of the k passages, drawn at random
        (``include_gold``: the gold passage is always one of them, for curricula)."""
        from ..models.fid import format_passage
        if not 1 <= n_passages <= self.k:
            raise ValueError(f"n_passages must be in [1, {self.k}]; got {n_passages}")
        tok = self.tokenizer
        rows = []
        for ex in examples:
            if include_gold:
                others = rng.sample([i for i in range(self.k) if i != ex.gold_index], n_passages - 1)
                chosen = others + [ex.gold_index]
                rng.shuffle(chosen)
            else:
                chosen = rng.sample(range(self.k), n_passages)
            rows.append([tok.encode(format_passage(ex.question, *ex.passages[i])) for i in chosen])
        L = max(len(ids) for row in rows for ids in row)
        input_ids = torch.zeros((len(rows), n_passages, L), dtype=torch.long)
        for b, row in enumerate(rows):
            for p, ids in enumerate(row):
                input_ids[b, p, :len(ids)] = torch.tensor(ids)
        out = {"input_ids": input_ids, "attention_mask": input_ids != tok.pad_token_id}
        if with_labels:
            answers = [tok.encode(ex.answer) for ex in examples]
            T = max(len(a) for a in answers)
            labels = torch.full((len(rows), T), -100, dtype=torch.long)
            for b, a in enumerate(answers):
                labels[b, :len(a)] = torch.tensor(a)
            out["labels"] = labels
        return out
