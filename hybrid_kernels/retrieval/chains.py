"""Entity-linked passage chains for a reader that encodes each passage on its own (FiD).

A passage whose text names another retrieved passage's entity (its title) is read together with
that passage: "X was born in C ." followed by "the capital of C is Y ." becomes one input, so the
encoder sees both hops of a bridge question in one place instead of the decoder having to join
them across separate passages among distractors. The set keeps its size and order (the linked
passage also stays on its own), so retrieval metrics and per-passage attention are unchanged.

    linked = link_passages([("X", "X was born in C ."), ("C", "the capital of C is Y .")])
    # [("X", "X was born in C . the capital of C is Y ."), ("C", "the capital of C is Y .")]

:func:`mark_asked_entities` adds an exact-match marker to the title of passages about an entity
the question names; :func:`prepare_for_reader` does both.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

__all__ = ["link_passages", "mark_asked_entities", "prepare_for_reader"]

MATCH_MARKER = "match:"


def _words(text: str) -> List[str]:
    return re.findall(r"\w+", text.lower())


def link_passages(passages: Sequence[Tuple[str, str]], max_links: int = 1,
                  question: Optional[str] = None) -> List[Tuple[str, str]]:
    """(title, text) passages -> the same passages, each text followed by the texts of up to
    ``max_links`` other passages (best-ranked first) whose title it mentions and whose title is not
    its own. With ``question``, a passage is linked only where it covers a question word the
    linking passage leaves open (the chain answers the rest of the question): "the capital of C
    is Y ." joins "X was born in C ." for "what is the capital of the country where X was born ?"
    but not for "where was X born ?", which "X was born in C ." answers alone. One hop: the
    appended texts are the originals, not their linked versions."""
    if not isinstance(max_links, int) or max_links < 0:
        raise ValueError(f"max_links must be an int >= 0; got {max_links!r}")
    if question is not None and not isinstance(question, str):
        raise TypeError(f"question must be None or a str; got {type(question).__name__}")
    for i, p in enumerate(passages):
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) for x in p)):
            raise TypeError(f"passages[{i}] must be a (title, text) pair of str; got {p!r}")
    asked = set(_words(question)) if question is not None else None
    titles = [set(_words(t)) for t, _ in passages]
    bodies = [set(_words(f"{t} {x}")) for t, x in passages]
    out = []
    for title, text in passages:
        words = set(_words(text))
        own = set(_words(title))
        open_words = asked - words - own if asked is not None else None
        linked = []
        for j, (t2, x2) in enumerate(passages):
            if len(linked) >= max_links:
                break
            if not titles[j] or titles[j] == own or not titles[j] <= words or x2 == text or x2 in linked:
                continue
            if open_words is not None and not open_words & bodies[j]:
                continue
            linked.append(x2)
        out.append((title, " ".join([text] + linked)))
    return out


def mark_asked_entities(question: str, passages: Sequence[Tuple[str, str]],
                        marker: str = MATCH_MARKER) -> List[Tuple[str, str]]:
    """An exact-match feature (as DrQA's): a passage whose title (its entity) the question names
    gets ``marker`` before its title, so a reader that encodes each passage with the question need
    not learn to compare names token by token. (title, text) pairs in, same count and order out."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str; got {type(question).__name__}")
    asked = set(_words(question))
    out = []
    for i, p in enumerate(passages):
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) for x in p)):
            raise TypeError(f"passages[{i}] must be a (title, text) pair of str; got {p!r}")
        title, text = p
        words = set(_words(title))
        out.append((f"{marker} {title}" if words and words <= asked else title, text))
    return out


def prepare_for_reader(question: str, passages: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """:func:`link_passages` (question-aware), then :func:`mark_asked_entities`: the reader's view
    of a retrieved set."""
    return mark_asked_entities(question, link_passages(passages, question=question))
