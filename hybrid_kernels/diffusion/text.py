"""Masked (absorbing-state) discrete diffusion LM, MDLM / LLaDA style, on a HybridEncoder.

Forward process: each target token is replaced by [MASK] independently with probability t,
t ~ U(0, 1). The denoiser -- a bidirectional :class:`~hybrid_kernels.models.HybridEncoder` (full
attention on ``hk.attention``) over ``[condition | noisy target]`` -- predicts the clean tokens;
the loss is the cross-entropy on the masked positions. Output logits use the tied token embedding.
Sampling starts from an all-[MASK] target and over ``num_steps`` steps reveals the most confident
predictions (a sample is drawn per position; the least confident stay masked), so each step
unmasks about ``target_len / num_steps`` tokens.

Training data (:func:`fact_corpus`): (question, gold passage) pairs of the generated QA task, e.g.
"where was bako born ?" -> "bako was born in lima ."; :func:`parse_fact` checks that a generated
document is a well-formed fact of the task's templates.
"""
from __future__ import annotations

import json
import os
import random
import re
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskedDiffusionLM", "fact_corpus", "parse_fact"]

CONFIG_NAME = "diffusion_config.json"


def fact_corpus(task, count: int, split: str = "train", seed: int = 0) -> List[Tuple[str, str]]:
    """``count`` (condition, document) pairs: a task question and the passage that answers it."""
    return [(ex.question, ex.passages[ex.gold_index][1]) for ex in task.examples(count, split, seed)]


def _fact_patterns():
    from ..training.qa_task import _RELATIONS      # the templates the corpus is written with
    return {rel: re.compile("^" + re.escape(text).replace(re.escape("{name}"), r"(\w+)")
                            .replace(re.escape("{x}"), r"(\w+)") + "$")
            for rel, (_, _, text) in _RELATIONS.items()}


def parse_fact(text: str, names: Sequence[str]) -> Optional[Tuple[str, str, str]]:
    """(name, relation, value) if ``text`` is a template fact with a known name and a value of
    that relation, else None."""
    from ..training.qa_task import _RELATIONS
    known = set(names)
    for rel, pattern in _fact_patterns().items():
        m = pattern.match(" ".join(text.split()))
        if m and m.group(1) in known and m.group(2) in _RELATIONS[rel][0]:
            return m.group(1), rel, m.group(2)
    return None


class MaskedDiffusionLM(nn.Module):
    """Args:
        tokenizer: a :class:`~hybrid_kernels.training.WordTokenizer` (pad 0, eos 1).
        encoder_config: :class:`~hybrid_kernels.models.encoder.HybridEncoderConfig` fields
            (vocab_size and max_position are set here).
        condition_len / target_len: token slots for the condition and the generated document.
    """

    def __init__(self, tokenizer, condition_len: int = 12, target_len: int = 10, **encoder_config):
        super().__init__()
        from ..models.encoder import HybridEncoder, HybridEncoderConfig
        self.tokenizer = tokenizer
        self.condition_len, self.target_len = condition_len, target_len
        self.mask_id = len(tokenizer)
        base = dict(hidden_size=128, num_layers=3, num_heads=4, intermediate_size=256, conv_kernel=3,
                    window=None, landmark_stride=0, num_landmarks=0, segment_length=0, dropout=0.0)
        base.update(encoder_config)
        base.update(vocab_size=len(tokenizer) + 1, max_position=condition_len + target_len)
        self.denoiser = HybridEncoder(HybridEncoderConfig(**base))

    @classmethod
    def default(cls, seed: int = 0) -> "MaskedDiffusionLM":
        """Random-init model over the generated QA task's vocabulary."""
        from ..training.qa_task import QATask
        torch.manual_seed(seed)
        return cls(QATask().tokenizer).eval()

    # ------------------------------------------------------------------ tensors
    def _pad(self, texts: Sequence[str], length: int, name: str) -> Tensor:
        rows = [self.tokenizer.encode(t) for t in texts]
        too_long = [t for t, r in zip(texts, rows) if len(r) > length]
        if too_long:
            raise ValueError(f"{name} must encode to <= {length} tokens (eos included); "
                             f"{too_long[0]!r} has {len(self.tokenizer.encode(too_long[0]))}")
        out = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return out

    def logits(self, condition: Tensor, noisy_target: Tensor) -> Tensor:
        """(B, C) condition ids and (B, T) target ids with masks -> (B, T, V) logits (V excludes
        [MASK])."""
        ids = torch.cat([condition, noisy_target], dim=1)
        attend = torch.cat([condition != self.tokenizer.pad_token_id,
                            torch.ones_like(noisy_target, dtype=torch.bool)], dim=1)
        hidden = self.denoiser(ids, attend).last_hidden_state[:, condition.shape[1]:]
        return hidden @ self.denoiser.embed.weight[:self.mask_id].t()

    def loss(self, conditions: Sequence[str], documents: Sequence[str],
             generator: Optional[torch.Generator] = None) -> Tensor:
        cond = self._pad(conditions, self.condition_len, "conditions")
        target = self._pad(documents, self.target_len, "documents")
        t = torch.rand((len(target), 1), generator=generator).clamp_min(0.05)
        masked = torch.rand(target.shape, generator=generator) < t
        logits = self.logits(cond, target.masked_fill(masked, self.mask_id))
        return F.cross_entropy(logits[masked], target[masked])

    @torch.no_grad()
    def denoising_accuracy(self, conditions: Sequence[str], documents: Sequence[str],
                           mask_rate: float = 0.5, seed: int = 0) -> float:
        """Share of masked tokens predicted exactly (argmax) at the given mask rate."""
        g = torch.Generator().manual_seed(seed)
        cond = self._pad(conditions, self.condition_len, "conditions")
        target = self._pad(documents, self.target_len, "documents")
        masked = torch.rand(target.shape, generator=g) < mask_rate
        pred = self.logits(cond, target.masked_fill(masked, self.mask_id)).argmax(-1)
        return float((pred[masked] == target[masked]).float().mean())

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, condition: Tensor, num_steps: int = 8, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """(B, C) condition ids -> (B, T) generated ids."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
        if condition.dim() != 2 or condition.shape[1] != self.condition_len:
            raise ValueError(f"condition must be (B, {self.condition_len}); got {tuple(condition.shape)}")
        B, T = condition.shape[0], self.target_len
        x = torch.full((B, T), self.mask_id, dtype=torch.long)
        for step in range(num_steps):
            still = x == self.mask_id
            probs = F.softmax(self.logits(condition, x).float() / max(temperature, 1e-6), -1)
            sample = torch.multinomial(probs.view(B * T, -1), 1, generator=generator).view(B, T)
            conf = probs.gather(-1, sample.unsqueeze(-1)).squeeze(-1).masked_fill(~still, -1.0)
            reveal = round(T * (step + 1) / num_steps) - int((~still[0]).sum())
            if reveal > 0:
                top = conf.topk(reveal, dim=-1).indices
                x.scatter_(1, top, sample.gather(1, top))
        return x

    def generate_texts(self, condition: str, num_samples: int = 1, num_steps: int = 8,
                       seed: int = 0) -> List[str]:
        cond = self._pad([condition] * num_samples, self.condition_len, "condition")
        out = self.generate(cond, num_steps, generator=torch.Generator().manual_seed(seed))
        return [self.tokenizer.decode(row.tolist()) for row in out]

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str) -> None:
        self.denoiser.save_pretrained(directory)
        self.tokenizer.save(os.path.join(directory, "word_tokenizer.json"))
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump({"condition_len": self.condition_len, "target_len": self.target_len}, f)

    @classmethod
    def from_pretrained(cls, directory: str) -> "MaskedDiffusionLM":
        from ..models.encoder import HybridEncoder
        from ..training.qa_task import WordTokenizer
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.exists(path):
            raise ValueError(f"{directory!r} has no {CONFIG_NAME}: not a saved MaskedDiffusionLM")
        with open(path) as f:
            meta = json.load(f)
        model = cls(WordTokenizer.load(os.path.join(directory, "word_tokenizer.json")), **meta)
        model.denoiser = HybridEncoder.from_pretrained(directory)
        return model.eval()


def train(model: MaskedDiffusionLM, pairs: Sequence[Tuple[str, str]], *, steps: int,
          batch_size: int = 64, lr: float = 2e-3, max_seconds: Optional[float] = None,
          seed: int = 0) -> List[float]:
    """Train with the package's :class:`~hybrid_kernels.training.Trainer`; returns the losses."""
    from ..training.trainer import TrainConfig, Trainer
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            part = rng.sample(list(pairs), batch_size)
            yield {"c": [p[0] for p in part], "d": [p[1] for p in part]}

    cfg = TrainConfig(lr=lr, warmup_steps=min(50, steps // 10), max_steps=steps,
                      max_seconds=max_seconds, log_every=max(1, min(100, steps // 10)), progress=True)
    trainer = Trainer(model, lambda m, b: m.loss(b["c"], b["d"], g), cfg)
    history = trainer.train(batches())
    model.eval()
    return [h["loss"] for h in history]
