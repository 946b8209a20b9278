"""An entity-grounded, multi-hop QA corpus that a reader cannot game by "find the passage that
states the asked relation".

A world holds ``num_people`` people and ``num_countries`` countries. Every person has one fact per
relation (born in a country, job, pet, instrument, food, colour), each country one capital; each
fact is one passage, so the pooled corpus has ``num_people * 6 + num_countries`` passages and
every relation is stated about every person: the only way to the answer is the asked entity.

Questions:
    single-hop  "what pet does {person} have ?"                           -> the pet
    multi-hop   "what is the capital of the country where {person} was born ?"
                needs "{person} was born in {country} ." then "the capital of {country} is {city} ."

Splits are worlds drawn with different seeds (train 0, dev 1, test 2, offset by ``seed``): the
same names, fresh facts, so nothing learned about one split's facts answers another's.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .qa_task import _CITIES, _RELATIONS, WordTokenizer, _names

__all__ = ["EntityQuestion", "EntityWorld", "EntityQATask", "SPLITS", "MULTI_HOP_QUESTION"]

SPLITS = {"train": 0, "dev": 1, "test": 2}
BORN = "{name} was born in {x} ."
CAPITAL = "the capital of {name} is {x} ."
MULTI_HOP_QUESTION = "what is the capital of the country where {name} was born ?"
# The person relations: "city" becomes the birth country, so that a second hop exists.
_PERSON = {"country": (None, "where was {name} born ?", BORN),
           **{r: v for r, v in _RELATIONS.items() if r != "city"}}


@dataclass
class EntityQuestion:
    question: str
    answer: str
    gold: List[int]          # corpus indices of the passages the answer needs, hop order
    hops: int                # 1 or 2


class EntityWorld:
    """One drawn world: ``passages`` [(title, text)] and the facts behind them."""

    def __init__(self, people: Sequence[str], countries: Sequence[str], rng: random.Random):
        capitals = rng.sample(_CITIES, len(countries))
        self.capital = dict(zip(countries, capitals))
        self.passages: List[Tuple[str, str]] = []
        self.index: Dict[Tuple[str, str], int] = {}
        self.facts: Dict[Tuple[str, str], str] = {}
        for country, city in self.capital.items():
            self._add(country, "capital", city, CAPITAL)
        for person in people:
            for rel in sorted(_PERSON):
                values, _, template = _PERSON[rel]
                self._add(person, rel, rng.choice(values or list(countries)), template)
        self.people = list(people)

    def _add(self, entity: str, relation: str, value: str, template: str) -> None:
        self.index[(entity, relation)] = len(self.passages)
        self.facts[(entity, relation)] = value
        self.passages.append((entity, template.format(name=entity, x=value)))

    def question(self, rng: random.Random, multi_hop_share: float) -> EntityQuestion:
        person = rng.choice(self.people)
        if rng.random() < multi_hop_share:
            country = self.facts[(person, "country")]
            return EntityQuestion(MULTI_HOP_QUESTION.format(name=person), self.capital[country],
                                  [self.index[(person, "country")], self.index[(country, "capital")]], 2)
        rel = rng.choice(sorted(_PERSON))
        return EntityQuestion(_PERSON[rel][1].format(name=person), self.facts[(person, rel)],
                              [self.index[(person, rel)]], 1)


class EntityQATask:
    """Worlds, questions and FiD tensors of the entity-grounded task.

    Args:
        num_people: people per world (6 passages each).
        num_countries: countries per world (one capital passage each; at most 68).
        multi_hop_share: fraction of questions that need two passages.
        seed: offsets every split's world seed.
    """

    def __init__(self, num_people: int = 340, num_countries: int = 40, multi_hop_share: float = 0.3,
                 seed: int = 0):
        if not isinstance(num_people, int) or num_people < 2:
            raise ValueError(f"num_people must be an int >= 2; got {num_people!r}")
        if not isinstance(num_countries, int) or not 2 <= num_countries <= len(_CITIES):
            raise ValueError(f"num_countries must be an int in [2, {len(_CITIES)}]; got {num_countries!r}")
        if not 0.0 <= multi_hop_share <= 1.0:
            raise ValueError(f"multi_hop_share must be in [0, 1]; got {multi_hop_share!r}")
        self.people = _names(num_people)
        # Country names end in "ia", which no person name (consonant-vowel pairs) can.
        self.countries = [n + "ia" for n in _names(num_countries, seed=4321)]
        self.multi_hop_share, self.seed = multi_hop_share, seed
        values = [v for vals, _, _ in _PERSON.values() if vals for v in vals]
        words = " ".join(t for _, t, p in _PERSON.values()) + " " + CAPITAL + " " + MULTI_HOP_QUESTION
        words += " " + " ".join(p for _, _, p in _PERSON.values())
        template = words.replace("{name}", "").replace("{x}", "").split()
        self.tokenizer = WordTokenizer(["question:", "title:", "context:", "match:"] + template + self.people
                                       + self.countries + values + list(_CITIES))

    def world(self, split: str = "train", index: int = 0) -> EntityWorld:
        """World ``index`` of ``split`` (train worlds 0, 1, ...; dev and test use index 0)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}; got {split!r}")
        rng = random.Random((self.seed * 1000003 + SPLITS[split]) * 7919 + index)
        return EntityWorld(self.people, self.countries, rng)

    def questions(self, world: EntityWorld, count: int, seed: int = 0,
                  multi_hop_share: Optional[float] = None) -> List[EntityQuestion]:
        share = self.multi_hop_share if multi_hop_share is None else multi_hop_share
        rng = random.Random(seed)
        return [world.question(rng, share) for _ in range(count)]

    def batch(self, questions: Sequence[str], passage_sets: Sequence[Sequence[Tuple[str, str]]],
              answers: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """FiD tensors: ``input_ids``/``attention_mask`` (B, P, L) for the given (title, text) sets
        (padded to the largest set with empty passages), ``labels`` (B, T) when answers are given."""
        from ..models.fid import format_passage
        if len(questions) != len(passage_sets):
            raise ValueError(f"questions and passage_sets must have one entry per question; got "
                             f"{len(questions)} and {len(passage_sets)}")
        tok = self.tokenizer
        rows = [[tok.encode(format_passage(q, t, x)) for t, x in ps] or [tok.encode(format_passage(q, "", ""))]
                for q, ps in zip(questions, passage_sets)]
        P = max(len(r) for r in rows)
        L = max(len(ids) for r in rows for ids in r)
        input_ids = torch.zeros((len(rows), P, L), dtype=torch.long)
        for b, row in enumerate(rows):
            for p, ids in enumerate(row):
                input_ids[b, p, :len(ids)] = torch.tensor(ids)
        mask = input_ids != tok.pad_token_id
        mask[:, :, 0] = True          # an empty padding passage keeps one visible key
        out = {"input_ids": input_ids, "attention_mask": mask}
        if answers is not None:
            enc = [tok.encode(a) for a in answers]
            labels = torch.full((len(enc), max(len(a) for a in enc)), -100, dtype=torch.long)
            for b, a in enumerate(enc):
                labels[b, :len(a)] = torch.tensor(a)
            out["labels"] = labels
        return out
