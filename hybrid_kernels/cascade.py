"""Teacher-student cascade of FiD readers: the small student answers when its calibrated
confidence reaches ``threshold``, otherwise the large teacher answers.

Confidence: the student's mean token log-probability of its own greedy answer (eos included,
read off the decoding steps),
mapped to P(correct) by Platt scaling (``sigmoid(a * x + b)``) fitted on a dev set by
:meth:`Cascade.calibrate`; before calibration it is the geometric-mean token probability.

    cascade = Cascade(student, teacher, tokenizer)
    table = cascade.calibrate(dev_ids, dev_mask, dev_answers)      # picks cascade.threshold
    results = cascade.answer(input_ids, attention_mask)            # [CascadeAnswer]
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Cascade", "CascadeAnswer", "answer_log_prob", "distillation_loss", "greedy_steps"]


@dataclass
class CascadeAnswer:
    answer: str
    answered_by: str          # "student" or "teacher"
    confidence: float         # the student's calibrated confidence


@torch.no_grad()
def greedy_steps(model, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 should_stop=None) -> Iterator[Tuple[Tensor, Tensor]]:
    """Greedy decoding of a :class:`~hybrid_kernels.models.FiDT5` one step at a time: yields
    (token (B,), its log-probability (B,)) per step for inputs (B, P, L); stops when every row
    has produced eos, after ``max_new_tokens`` or when ``should_stop()`` is true. Rows that
    finished keep yielding eos with log-probability 0. The encoder runs once."""
    from transformers.cache_utils import DynamicCache
    cfg = model.config
    model.eval()
    enc, key_mask = model.encode(input_ids, attention_mask)
    B, P, L = input_ids.shape
    caches = model.cross_caches(enc, key_mask, L)
    past = DynamicCache(config=model.t5.decoder.config)
    dummy = enc.new_zeros((B, 1, enc.shape[-1]))
    token = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=enc.device)
    done = torch.zeros(B, dtype=torch.bool, device=enc.device)
    with model._cross(key_mask, L, caches):
        for _ in range(max_new_tokens):
            if should_stop is not None and should_stop():
                return
            logp = F.log_softmax(model._decode_step(token, past, dummy), -1)
            best, nxt = logp.max(-1)
            nxt = torch.where(done, torch.full_like(nxt, cfg.eos_token_id), nxt)
            best = torch.where(done, torch.zeros_like(best), best)
            yield nxt, best
            done |= nxt == cfg.eos_token_id
            if bool(done.all()):
                return
            token = nxt[:, None]


def greedy_answers(model, tokenizer, input_ids: Tensor, attention_mask: Tensor,
                   max_new_tokens: int) -> Tuple[List[str], Tensor]:
    """Greedy answers and their mean token log-probability (eos included), (B,)."""
    eos = model.config.eos_token_id
    tokens, total, count = [], torch.zeros(input_ids.shape[0]), torch.zeros(input_ids.shape[0])
    alive = torch.ones(input_ids.shape[0], dtype=torch.bool)
    for nxt, logp in greedy_steps(model, input_ids, attention_mask, max_new_tokens):
        total += torch.where(alive, logp.float().cpu(), torch.zeros(()))
        count += alive.float()
        tokens.append(torch.where(alive, nxt.cpu(), torch.full_like(nxt.cpu(), eos)))
        alive &= nxt.cpu() != eos
    rows = torch.stack(tokens, 1) if tokens else torch.zeros((input_ids.shape[0], 0), dtype=torch.long)
    return [tokenizer.decode(r.tolist()) for r in rows], total / count.clamp_min(1)


@torch.no_grad()
def answer_log_prob(model, input_ids: Tensor, attention_mask: Tensor, generated: Tensor) -> Tensor:
    """Mean log-probability per token of ``generated`` (B, 1 + T) -- the output of
    ``model.generate``, starting with the decoder start token -- up to and including its first
    eos (generate pads after it), for inputs (B, P, L). Returns (B,) float."""
    eos = model.config.eos_token_id
    labels = generated[:, 1:]
    logits = model(input_ids, attention_mask, decoder_input_ids=generated[:, :-1])["logits"].float()
    logp = F.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    after_eos = (labels == eos).long().cumsum(1) - (labels == eos).long()   # tokens after the first eos
    valid = after_eos == 0       # a pad chosen before eos is the model's choice: it counts
    return (logp * valid).sum(1) / valid.sum(1).clamp_min(1)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> Tensor:
    """``alpha`` * KL(teacher || student) at ``temperature`` (scaled by T^2) + (1 - alpha) * the
    cross-entropy on ``labels``; logits (B, T, V), labels (B, T) with -100 ignored."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (B, T, V)")
    keep = labels != -100
    s = F.log_softmax(student_logits[keep].float() / temperature, -1)
    t = F.log_softmax(teacher_logits[keep].float() / temperature, -1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(student_logits[keep].float(), labels[keep])
    return alpha * kl + (1 - alpha) * ce


class Cascade:
    """``student`` / ``teacher``: :class:`~hybrid_kernels.models.FiDT5` sharing ``tokenizer``."""

    def __init__(self, student, teacher, tokenizer, *, threshold: float = 0.5):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.threshold = threshold
        self.platt: Optional[Tensor] = None       # (a, b) after calibrate()

    def save_calibration(self, path: str) -> None:
        """Write the threshold and Platt parameters as JSON."""
        with open(path, "w") as f:
            json.dump({"threshold": self.threshold,
                       "platt": None if self.platt is None else self.platt.tolist()}, f)

    def load_calibration(self, path: str) -> None:
        with open(path) as f:
            meta = json.load(f)
        platt = meta.get("platt")
        if platt is not None and (len(platt) != 2 or not all(isinstance(v, (int, float)) for v in platt)):
            raise ValueError(f"{path}: platt must be two numbers; got {platt!r}")
        threshold = float(meta["threshold"])
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{path}: threshold must be in [0, 1]; got {threshold}")
        self.threshold = threshold
        self.platt = None if platt is None else torch.tensor(platt, dtype=torch.float32)

    def confidence(self, mean_log_prob: Tensor) -> Tensor:
        if self.platt is None:
            return mean_log_prob.exp()
        return torch.sigmoid(self.platt[0] * mean_log_prob + self.platt[1])

    def _student(self, input_ids, attention_mask, max_new_tokens):
        answers, mean_logp = greedy_answers(self.student, self.tokenizer, input_ids, attention_mask,
                                            max_new_tokens)
        return answers, self.confidence(mean_logp)

    def _teacher(self, input_ids, attention_mask, max_new_tokens) -> List[str]:
        out = self.teacher.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens)
        return [self.tokenizer.decode(o[1:].tolist()) for o in out]

    def answer(self, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int = 16,
               threshold: Optional[float] = None) -> List[CascadeAnswer]:
        """Inputs (B, P, L). The teacher runs only on the rows the student is unsure of."""
        threshold = self.threshold if threshold is None else threshold
        answers, conf = self._student(input_ids, attention_mask, max_new_tokens)
        results = [CascadeAnswer(a, "student", float(c)) for a, c in zip(answers, conf)]
        hard = (conf < threshold).nonzero().flatten()
        if len(hard):
            for i, a in zip(hard.tolist(), self._teacher(input_ids[hard], attention_mask[hard],
                                                         max_new_tokens)):
                results[i] = CascadeAnswer(a, "teacher", results[i].confidence)
        return results

    def calibrate(self, input_ids: Tensor, attention_mask: Tensor, answers: Sequence[str], *,
                  thresholds: Optional[Sequence[float]] = None, tolerance: float = 0.01,
                  max_new_tokens: int = 16) -> List[Dict[str, float]]:
        """Fit the Platt scaling on a dev set (inputs (B, P, L), gold ``answers``), then evaluate
        each threshold: a row {threshold, accuracy, student_share, seconds, teacher_seconds}
        (default thresholds: the calibrated confidences' 25th, 50th and 75th percentiles).
        ``self.threshold`` becomes the lowest threshold whose accuracy is within ``tolerance`` of
        the teacher alone (the highest one if none is)."""
        from .training.qa_task import exact_match
        if len(answers) != input_ids.shape[0]:
            raise ValueError(f"answers must have one entry per row of input_ids "
                             f"({input_ids.shape[0]}); got {len(answers)}")
        predicted, x = greedy_answers(self.student, self.tokenizer, input_ids, attention_mask,
                                      max_new_tokens)
        student_ok = torch.tensor([exact_match(p, a) for p, a in zip(predicted, answers)],
                                  dtype=torch.float32)
        self.platt = _fit_platt(x, student_ok)
        if thresholds is None:   # the student's share of the dev set is then 75%, 50%, 25%
            conf = self.confidence(x)
            thresholds = [round(float(conf.quantile(q)), 4) for q in (0.25, 0.5, 0.75)]
        t0 = time.perf_counter()
        teacher_answers = self._teacher(input_ids, attention_mask, max_new_tokens)
        teacher_seconds = time.perf_counter() - t0
        teacher_acc = sum(exact_match(p, a) for p, a in zip(teacher_answers, answers)) / len(answers)
        rows = []
        for th in thresholds:
            t0 = time.perf_counter()
            res = self.answer(input_ids, attention_mask, max_new_tokens=max_new_tokens, threshold=th)
            rows.append({"threshold": th, "seconds": time.perf_counter() - t0,
                         "teacher_seconds": teacher_seconds, "teacher_accuracy": teacher_acc,
                         "accuracy": sum(exact_match(r.answer, a) for r, a in zip(res, answers)) / len(answers),
                         "student_share": sum(r.answered_by == "student" for r in res) / len(res)})
        good = [r["threshold"] for r in rows if r["accuracy"] >= teacher_acc - tolerance]
        self.threshold = min(good) if good else max(thresholds)
        return rows


def _fit_platt(x: Tensor, correct: Tensor, steps: int = 200) -> Tensor:
    """Logistic regression of ``correct`` (0/1) on the scalar feature ``x``: returns (a, b)."""
    params = torch.tensor([1.0, 0.0], requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(params[0] * x + params[1], correct)
        loss = loss + 1e-3 * (params ** 2).sum()      # keeps (a, b) finite when one class is empty
        loss.backward()
        return loss

    opt.step(closure)
    return params.detach()
