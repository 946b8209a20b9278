"""A generated multi-passage QA task for training Fusion-in-Decoder from scratch.

Every question asks for one relation (birthplace, job, pet, instrument, food, colour) of one
person; k passages are retrieved for it and the answer sits in exactly one of them. The k - 1
distractors state the other relations of the same person and relations of other people, never the
asked relation. Facts are drawn afresh for every example, so nothing can be memorized: a model must
find the one passage that answers the question and copy the answer from it. A model that reads n
of the k passages (chosen at random) can only answer when the gold passage is among them (a blind
guess is right 1/16 to 1/68 of the time), so exact match grows with n: about n/k for a perfect
reader.
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
_ANIMALS = ["cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "lizard",
            "ferret", "pony", "snake", "canary", "goat", "pig", "duck", "owl"]
_INSTRUMENTS = ["piano", "violin", "guitar", "flute", "cello", "trumpet", "harp", "drums",
                "oboe", "banjo", "organ", "tuba", "clarinet", "saxophone", "ukulele", "accordion"]
_FOODS = ["pizza", "sushi", "pasta", "curry", "tacos", "soup", "rice", "bread", "cheese",
          "noodles", "salad", "pie", "dumplings", "falafel", "paella", "pancakes"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black",
           "white", "gray", "teal", "gold", "silver", "violet", "indigo"]
# relation -> (values, question template, passage template)
_RELATIONS = {
    "city": (_CITIES, "where was {name} born ?", "{name} was born in {x} ."),
    "job": (_JOBS, "what does {name} do for a living ?", "{name} works as a {x} ."),
    "pet": (_ANIMALS, "what pet does {name} have ?", "{name} has a pet {x} ."),
    "instrument": (_INSTRUMENTS, "what instrument does {name} play ?", "{name} plays the {x} ."),
    "food": (_FOODS, "what is the favorite food of {name} ?", "{name} likes to eat {x} ."),
    "color": (_COLORS, "what is the favorite color of {name} ?", "{name} loves the color {x} ."),
}
_SPECIALS = ["<pad>", "</s>", "<unk>"]
_TEMPLATE_WORDS = " ".join(["question: title: context:"] + [q + " " + p for _, q, p in _RELATIONS.values()]
                          ).replace("{name}", "").replace("{x}", "").split()


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
        hard_negatives: probability that a distractor about another person states the asked
            relation (then only the name tells the passages apart).
    """

    def __init__(self, num_passages: int = 10, num_names: int = 400, seed: int = 0,
                 hard_negatives: float = 0.0):
        if num_passages < 1:
            raise ValueError(f"num_passages must be >= 1; got {num_passages}")
        self.k = num_passages
        self.names = _names(num_names)
        values = [v for vals, _, _ in _RELATIONS.values() for v in vals]
        self.tokenizer = WordTokenizer(_TEMPLATE_WORDS + self.names + values)
        self.seed = seed
        if not 0.0 <= hard_negatives <= 1.0:
            raise ValueError(f"hard_negatives must be in [0, 1]; got {hard_negatives}")
        self.hard_negatives = hard_negatives

    def example(self, rng: random.Random) -> QAExample:
        relations = sorted(_RELATIONS)
        relation = rng.choice(relations)
        name = rng.choice(self.names)
        values, question, _ = _RELATIONS[relation]
        answer = rng.choice(values)
        facts = [(name, relation, answer)]
        own = [r for r in relations if r != relation]
        rng.shuffle(own)
        while len(facts) < self.k:
            if own and rng.random() < 0.5:          # another fact about the same person
                facts.append((name, own.pop(), None))
            else:                                   # a fact about someone else
                other = rng.choice(self.names)
                if other != name:
                    hard = rng.random() < self.hard_negatives
                    rel = relation if hard else rng.choice([r for r in relations if r != relation])
                    facts.append((other, rel, None))
        rng.shuffle(facts)
        passages = []
        for person, rel, value in facts:
            vals, _, text = _RELATIONS[rel]
            passages.append((person, text.format(name=person, x=value or rng.choice(vals))))
        gold = next(i for i, (p, r, v) in enumerate(facts) if v is not None)
        return QAExample(question.format(name=name), passages, answer, gold)

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
