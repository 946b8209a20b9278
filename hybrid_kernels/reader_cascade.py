"""A confidence-routed reader cascade for short (single-token) answers: the student answers when
the max softmax probability of its first answer token clears a threshold, else the teacher does.
Thresholds are picked on dev as the lowest confidence at which the student's answers reach a
target accuracy.

    answers, conf = first_token_answers(student, tokenizer, ids, mask)
    t = threshold_for_accuracy(conf_dev, correct_dev, 0.9)
    use_student = route(conf, t)          # bool (B,)
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .cascade import greedy_steps

__all__ = ["first_token_answers", "threshold_for_accuracy", "route", "cascade_answers"]


@torch.no_grad()
def first_token_answers(model, tokenizer, input_ids: Tensor, attention_mask: Tensor,
                        max_new_tokens: int = 4) -> Tuple[List[str], Tensor]:
    """Greedy answers of a FiDT5 for (B, P, L) inputs and the confidence (B,): the probability
    of the first generated token."""
    tokens, first = [], None
    for tok, logp in greedy_steps(model, input_ids, attention_mask, max_new_tokens):
        tokens.append(tok)
        if first is None:
            first = logp.exp()
    seqs = torch.stack(tokens, 1)
    return [tokenizer.decode(s.tolist()) for s in seqs], first


def threshold_for_accuracy(confidence: Sequence[float], correct: Sequence[bool], target: float) -> float:
    """The lowest threshold t such that the student's accuracy over {confidence >= t} is at least
    ``target`` (the largest confidence + epsilon when no threshold reaches it: nothing routed)."""
    pairs = sorted(zip((float(c) for c in confidence), (bool(x) for x in correct)), reverse=True)
    best, hits = float(pairs[0][0]) + 1e-6 if pairs else 1.0, 0
    for i, (c, ok) in enumerate(pairs, start=1):
        hits += ok
        if hits / i >= target and (i == len(pairs) or pairs[i][0] < c):
            best = c
    return best


def route(confidence: Tensor, threshold: float) -> Tensor:
    """True where the student answers."""
    return torch.as_tensor(confidence) >= threshold


def cascade_answers(student_answers: Sequence[str], teacher_answers: Sequence[str],
                    use_student: Tensor) -> List[str]:
    return [s if u else t for s, t, u in zip(student_answers, teacher_answers, use_student.tolist())]
