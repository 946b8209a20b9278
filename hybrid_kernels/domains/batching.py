"""Mixed streams -> padded batches: text pieces become tokens, each domain span one position."""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .encoding import EMBEDDING_DIM, SpanEncoder, encode_spans
from .parsing import DomainParser, DomainSpan

__all__ = ["MixedBatch", "MixedStreamBatcher"]


@dataclass
class MixedBatch:
    """One padded batch of mixed streams, all (B, N[, 128]):

    token_ids: text token ids (``pad_token_id`` at span and padding positions);
    encodings: float64 fluxem encodings (zeros at text and padding);
    domain_types: 0 = text/padding, i + 1 = ``domains[i]``;
    domain_mask: True at domain spans; attention_mask: True at real positions;
    spans: per row, the :class:`DomainSpan` at each span position (``None`` for text tokens).
    """
    token_ids: Tensor
    encodings: Tensor
    domain_types: Tensor
    domain_mask: Tensor
    attention_mask: Tensor
    spans: List[List[Optional[DomainSpan]]]


class MixedStreamBatcher:
    """``batcher(texts) -> MixedBatch``.

    Args:
        text_tokenizer: str -> list of int ids for a text piece (no special tokens).
        domains: the domain vocabulary of the type ids (allow-list of the parser).
        pad_token_id: id used for padding and at span positions.
        max_length: optional cap; a longer stream raises ValueError.
    """

    def __init__(self, text_tokenizer: Callable[[str], Sequence[int]], domains: Sequence[str],
                 pad_token_id: int = 0, max_length: Optional[int] = None):
        if not callable(text_tokenizer):
            raise TypeError(f"text_tokenizer must be callable str -> ids; got {type(text_tokenizer).__name__}")
        self.parser = DomainParser(domains)
        self.domains = tuple(domains)
        self.encoder = SpanEncoder()
        self.tokenize = text_tokenizer
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    def spans(self, text: str) -> List[DomainSpan]:
        """Parsed, encoded spans of ``text`` (every fallback rule applied)."""
        return encode_spans(self.parser(text), self.encoder)

    def row(self, text: str):
        """(ids, encodings, types, span list) of one stream, unpadded."""
        ids, encs, types, spans = [], [], [], []
        for s in self.spans(text):
            if s.is_text:
                piece = list(self.tokenize(s.text))
                ids += piece
                encs += [None] * len(piece)
                types += [0] * len(piece)
                spans += [None] * len(piece)
            else:
                ids.append(self.pad_token_id)
                encs.append(s.metadata["encoding"])
                types.append(self.domains.index(s.domain) + 1)
                spans.append(s)
        if not ids:
            raise ValueError(f"text {text!r} produced no tokens")
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(f"text {text[:40]!r}... has {len(ids)} positions > max_length={self.max_length}")
        return ids, encs, types, spans

    def __call__(self, texts: Sequence[str]) -> MixedBatch:
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("texts must be a non-empty sequence of str")
        rows = [self.row(t) for t in texts]
        B, N = len(rows), max(len(r[0]) for r in rows)
        ids = torch.full((B, N), self.pad_token_id, dtype=torch.long)
        encodings = torch.zeros(B, N, EMBEDDING_DIM, dtype=torch.float64)
        types = torch.zeros(B, N, dtype=torch.long)
        attention = torch.zeros(B, N, dtype=torch.bool)
        for b, (row_ids, encs, row_types, _) in enumerate(rows):
            n = len(row_ids)
            ids[b, :n] = torch.tensor(row_ids)
            types[b, :n] = torch.tensor(row_types)
            attention[b, :n] = True
            for i, e in enumerate(encs):
                if e is not None:
                    encodings[b, i] = torch.from_numpy(np.asarray(e, dtype=np.float64))
        spans = [r[3] + [None] * (N - len(r[3])) for r in rows]
        return MixedBatch(ids, encodings, types, types > 0, attention, spans)
